"""Table 1's protocol offline: references in MDLM's OWT layout (wrapped blocks of the held-out tail of a
train-only dataset), one text rule for samples and references, eval.protocol=paper-table1 end to end on a
small stand-in, and conflicting overrides as one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsl.data import BPETokenizer, GPT2Tokenizer
from dsl.data.wrapping import wrap_documents
from dsl.errors import UserError
from dsl.eval.mauve import ReferenceSet, evaluate_mauve

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parents[1] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
EOT = "<|endoftext|>"
HELDOUT = 18  # of the 36 documents: the tail plays MDLM's "last 100,000"


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """A train-only dataset in OWT's layout, a GPT-2-format BPE and a tiny GPT-2 (1,024 positions) in one dir."""
    from transformers import GPT2Config, GPT2Model, GPT2TokenizerFast

    root = tmp_path_factory.mktemp("owt-standin")
    docs = [d.strip() for d in (SHARED / "owt_valid_sample.txt").read_text().split(EOT) if d.strip()]
    (root / "owt").mkdir()
    with open(root / "owt" / "train.jsonl", "w") as fh:  # one split, "train", as OpenWebText
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    hf = GPT2TokenizerFast(tokenizer_object=BPETokenizer.train(docs, vocab_size=512)._tok,
                           bos_token=EOT, eos_token=EOT)
    hf.save_pretrained(root / "gpt2")
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(hf), n_positions=1024, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        root / "gpt2")
    return root, docs, GPT2Tokenizer.from_pretrained(str(root / "gpt2"))


def _blocks(docs, tok, length):
    return [tok.decode(b) for b, _ in wrap_documents((tok.encode(d) for d in docs), length, tok.bos_id, tok.eos_id)]


def test_references_are_wrapped_blocks_of_the_heldout_tail(standin, monkeypatch):
    root, docs, tok = standin
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = f"hf:{root / 'owt'}"
    # a dataset with only a train split: its held-out documents are the tail (MDLM: train[-100000:])
    plain = ReferenceSet.from_spec(spec, 4, seed=1, heldout_docs=HELDOUT)
    assert set(plain.texts) <= set(docs[-HELDOUT:]) and plain.origin.endswith(f"[train[-{HELDOUT}:]]")
    refs = ReferenceSet.from_spec(spec, 6, seed=1, blocks=64, tokenizer=tok, heldout_docs=HELDOUT)
    tail, head = set(_blocks(docs[-HELDOUT:], tok, 64)), set(_blocks(docs[:-HELDOUT], tok, 64))
    assert len(refs) == 6 == len(set(refs.texts)) and set(refs.texts) <= tail and not set(refs.texts) & head
    assert all(t.startswith(EOT) and t.endswith(EOT) for t in refs.texts)  # [BOS] … [EOS], decoded as text
    assert all(len(tok.encode(t)) == 64 for t in refs.texts)
    assert refs.layout == f"64-token wrapped blocks (n of {len(tail)})"
    again = ReferenceSet.from_spec(spec, 6, seed=1, blocks=64, tokenizer=tok, heldout_docs=HELDOUT)
    other = ReferenceSet.from_spec(spec, 6, seed=2, blocks=64, tokenizer=tok, heldout_docs=HELDOUT)
    assert again.texts == refs.texts and other.texts != refs.texts
    with pytest.raises(UserError, match="fewer than the 5000 references"):
        ReferenceSet.from_spec(spec, 5000, seed=1, blocks=64, tokenizer=tok, heldout_docs=HELDOUT)


def test_samples_and_references_go_through_the_same_text_rule(standin, monkeypatch):
    from dsl.eval.featurizers import get_featurizer

    root, docs, tok = standin
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    samples = _blocks(docs[:-HELDOUT], tok, 64)[:6]  # decoded like the model's samples: with EOT
    fz = get_featurizer("minilm", max_length=64)
    for rule, share in (("keep", 1.0), ("drop", 0.0)):
        refs = ReferenceSet.from_spec(f"hf:{root / 'owt'}", 6, seed=1, blocks=64, tokenizer=tok,
                                      heldout_docs=HELDOUT, eot=rule)
        res = evaluate_mauve(samples, refs, fz, seeds=(25,), num_buckets=2)
        assert res["eot"] == rule and res["eot_share"] == {"samples": share, "references": share}
        assert res["mauve"] == res["values"][0] and res["headline_seed"] == 25


def _evaluate(*args, cwd, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(cwd / "hf-home"), **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a whole jobs/evaluate.py run in a subprocess, on 1024-token blocks
def test_paper_table1_recipe_runs_offline_on_a_small_standin(standin, tmp_path):
    """The README's paper evaluation with stand-ins for the hub: a local OWT-layout dataset, its tokenizer,
    a tiny GPT-2 in place of GPT-2 Large, no judge, 8 samples. Everything else is the protocol's."""
    root, docs, tok = standin
    samples = tmp_path / "samples.jsonl"
    with open(samples, "w") as fh:
        for ids, _ in list(wrap_documents((tok.encode(d) for d in docs[:-HELDOUT]), 1024, tok.bos_id,
                                          tok.eos_id))[:8]:
            fh.write(json.dumps({"ids": ids, "text": tok.decode(ids),
                                 "settings": {"top_p": 0.9, "length": 1024, "sampler": "dsl-budget"}}) + "\n")
    proc = _evaluate("eval.protocol=paper-table1", f"eval.samples={samples}", f"reference=hf:{root / 'owt'}",
                     f"featurizer={root / 'gpt2'}", f"eval.reference_tokenizer={root / 'gpt2'}",
                     f"eval.heldout_docs={HELDOUT}", "eval.judge=none", f"eval.feature_cache={tmp_path / 'fc'}",
                     "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["protocol"]["name"] == "paper-table1"
    deviations = out["protocol"]["deviations"]
    assert set(deviations) == {"featurizer", "judge", "reference", "reference_tokenizer", "heldout_docs", "samples",
                               "references", "K"}
    assert deviations["featurizer"] == {"paper": "gpt2-large", "used": str(root / "gpt2")}
    assert deviations["samples"] == {"paper": 5000, "used": 8} and deviations["K"] == {"paper": 500, "used": 2}
    # the protocol's fixed settings, as run
    assert out["max_length"] == 1024 and out["length_budget"] is None and out["num_buckets"] == 2
    assert out["mauve_seeds"] == [25, 26, 27] and out["mauve"] == out["mauve_values"][0]
    assert out["mauve_headline_seed"] == 25 and 0.0 <= out["mauve"] <= 1.0
    assert out["eot"] == "keep" and out["eot_share"] == {"samples": 1.0, "references": 1.0}
    assert out["reference_layout"].startswith("1024-token wrapped blocks")
    assert out["reference"] == f"hf:{root / 'owt'}[train[-{HELDOUT}:]]" and out["n_reference"] == 8


@pytest.mark.parametrize("override, words", [
    ("eval.num_buckets=50", "fixes eval.num_buckets=auto"),
    ("eval.max_length=512", "fixes eval.max_length=1024"),
    ("eval.match_length=true", "fixes eval.match_length=false"),
    ("eval.num_buckets=500", None),  # the paper's K itself, and stand-ins: no error
    ("eval.judge=none", None),
    ("eval.eot=drop", "fixes eval.eot=keep"),
    ("eval.reference_blocks=128", "fixes eval.reference_blocks=1024"),
    ("eval.mauve_seeds=1,2", "must start with it"),
    ("eval.references=100", "as many references as samples"),
    ("reference=refs.jsonl", "held-out tail"),
])
def test_a_conflicting_override_is_one_error_line(override, words, capsys):
    from dsl.cli import load_job, parse

    job = load_job("jobs/evaluate.py")
    argv = ["eval.protocol=paper-table1", "eval.samples=s.jsonl", override]
    if words is None:
        _, cfg = parse(job, argv)
        assert cfg.eval.match_length is False and cfg.eval.featurizer == "gpt2-large"
        assert cfg.eval.reference == "hf:openwebtext" and cfg.eval.reference_blocks == 1024
        assert cfg.eval.num_buckets == "auto" and cfg.eval.judge == ("none" if "judge" in override else "gpt2-large")
        return
    from dsl.cli import main

    assert main(job, argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: eval.protocol=paper-table1") \
        and words in lines[0]
