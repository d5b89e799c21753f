"""jobs/evaluate.py end to end, in process: the JSON summary, the cache, calibration, bad input."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from dsl.cli import load_job, main
from dsl.config import DataConfig, RunConfig, load, to_dict
from dsl.eval.entropy import sentence_entropy
from dsl.sources import build_source

JOB = load_job("jobs/evaluate.py")

LENGTH = 24


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Samples (ids + text, as jobs/sample.py writes them) and references from the default HMM source."""
    root = tmp_path_factory.mktemp("eval")
    source = build_source("hmm", DataConfig(), LENGTH)
    samples = source.sample(30, torch.Generator().manual_seed(0))
    refs = source.sample(40, torch.Generator().manual_seed(1))
    with open(root / "samples.jsonl", "w") as fh:
        for row in samples.tolist():
            fh.write(json.dumps({"ids": row, "text": source.decode(row)}) + "\n")
    with open(root / "refs.jsonl", "w") as fh:
        for row in refs.tolist():
            fh.write(json.dumps({"text": source.decode(row)}) + "\n")
    (root / "empty.jsonl").write_text("")
    return root, source, samples


def _run(capsys, *args):
    rc = main(JOB, [str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_samples_summary_is_the_last_json_line(files, capsys, tmp_path):
    root, source, samples = files
    base = [f"eval.samples={root / 'samples.jsonl'}", f"reference={root / 'refs.jsonl'}", "featurizer=minilm",
            "eval.max_length=64", "eval.mauve_seeds=25,26", "eval.num_buckets=4", "eval.judge=oracle:hmm",
            f"eval.feature_cache={tmp_path / 'cache'}", "progress=false"]
    rc, out, err = _run(capsys, *base)
    summary = json.loads(out.strip().splitlines()[-1])
    # 30 + 30 points in K=4 buckets: fewer per bucket than faiss asks for, said once, recorded
    assert rc == 0 and err.strip().splitlines() == [f"warning: {w}" for w in summary["mauve_warnings"]]
    assert len(summary["mauve_warnings"]) == 1 and "K=4 buckets" in summary["mauve_warnings"][0]
    for key in ("mauve_mean", "mauve_std", "genppl", "sentence_entropy", "n_samples", "n_reference", "featurizer"):
        assert key in summary
    assert summary["n_samples"] == 30 and summary["n_reference"] == 30 and summary["featurizer"] == "minilm"
    assert 0.0 <= summary["mauve_mean"] <= 1.0 and len(summary["mauve_values"]) == 2
    exact = math.exp(float(-source.log_prob(samples).sum()) / samples.numel())
    assert summary["genppl"] == pytest.approx(exact, rel=1e-9)
    assert summary["sentence_entropy"] == pytest.approx(sentence_entropy(samples.tolist()))
    assert summary["sentence_entropy_tokens"] == "ids"
    assert summary["reference_features_computed"] == 1
    # a second run finds the reference features in the cache
    rc, out, _ = _run(capsys, *base, f"out={tmp_path / 'out'}")
    again = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and again["reference_features_computed"] == 0
    assert again["mauve_values"] == summary["mauve_values"]
    assert json.loads((tmp_path / "out" / "samples.json").read_text())["genppl"] == summary["genppl"]


@pytest.mark.parametrize("args, message", [
    (["eval.samples={root}/missing.jsonl", "reference={root}/refs.jsonl"], "file not found"),
    (["eval.samples={root}/empty.jsonl", "reference={root}/refs.jsonl"], "holds no texts"),
    (["eval.samples={root}/samples.jsonl", "reference={root}/refs.jsonl", "eval.references=20"], "at least as large"),
    (["eval.samples={root}/samples.jsonl", "reference={root}/refs.jsonl", "eval.references=41"], "fewer than the 41"),
    (["eval.samples={root}/samples.jsonl", "reference={root}/refs.jsonl", "featurizer=bert-huge"],
     "unknown featurizer"),
    (["eval.samples={root}/samples.jsonl", "reference={root}/refs.jsonl", "eval.judge=gpt2-large"], "offline"),
    (["eval.samples={root}/samples.jsonl", "reference={root}/refs.jsonl", "featurizer=gpt2-large"], "offline"),
    (["eval.samples={root}/samples.jsonl", "reference={root}/refs.jsonl", "eval.mauve_seeds=x"], "eval.mauve_seeds"),
    (["eval.samples={root}/samples.jsonl", "reference=source"], "eval.reference=source"),
    (["eval.samples={root}/samples.jsonl", "reference={root}/refs.jsonl", "sampling.steps=4"], "not read by"),
    (["calibration", "checkpoint={root}/nope"], "no such file or directory"),
    (["frobnicate"], "unknown mode"),
])
def test_bad_input_is_one_error_line_and_exit_2(files, capsys, monkeypatch, tmp_path, args, message):
    root = files[0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    rc, out, err = _run(capsys, *[a.format(root=root) for a in args], f"eval.feature_cache={cache}", "progress=false")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


def _toy_checkpoint(root: Path, roar: str) -> str:
    from dsl.checkpoint import save_checkpoint
    from dsl.models import build_model

    cfg = load(RunConfig, ["preset=embedded", "model=toy", f"model.length={LENGTH}", f"channel.roar={roar}",
                           "train.batch_size=8"])
    model = build_model(cfg, build_source("hmm", cfg.data, LENGTH).vocab_size)
    return save_checkpoint(str(root / roar), 0, config=to_dict(cfg), model_state=model.state_dict())


def test_calibration_compares_two_checkpoints_in_one_command(capsys, tmp_path):
    atomic, smoothed = _toy_checkpoint(tmp_path, "atomic"), _toy_checkpoint(tmp_path, "smoothed")
    rc, out, err = _run(capsys, "calibration", f"checkpoint=atomic={atomic},smoothed={smoothed}",
                        "eval.snr=1,70,100", "eval.batches=1", "eval.batch_size=4", f"out={tmp_path / 'fig'}",
                        "progress=false")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary["checkpoints"]) == {"atomic", "smoothed"}
    assert summary["checkpoints"]["atomic"]["roar"] == "atomic"
    for row in summary["checkpoints"].values():
        assert set(row["ece"]) == {"1", "70", "100"} and all(0.0 <= v <= 1.0 for v in row["ece"].values())
    assert (tmp_path / "fig" / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    details = json.loads((tmp_path / "fig" / "calibration.json").read_text())
    assert sum(details["atomic"]["100.0"]["bin_counts"]) == 4 * LENGTH
    assert not [p for p in os.listdir(tmp_path / "fig") if p.startswith(".tmp")]


@pytest.mark.parametrize("t_end, expected", [("gamma_max", 50.0), ("5", 5.0)])
def test_likelihood_of_a_learned_model_is_eq4s_bound_to_gamma_max_by_default(capsys, tmp_path, t_end, expected):
    ckpt = _toy_checkpoint(tmp_path, "smoothed")  # channel.gamma_max = 50 (App C.1)
    args = ["likelihood", f"checkpoint={ckpt}", "eval.max_sequences=2", "eval.batch_size=2", "eval.n_mc=4",
            "progress=false"]
    rc, out, err = _run(capsys, *args, *([f"eval.t_end={t_end}"] if t_end != "gamma_max" else []))
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    row = summary["checkpoints"]["step-0"]
    assert row["t_end"] == expected and "upper bound" in row["estimator"]
    assert row["n_tokens"] == 2 * LENGTH and row["stderr_per_token"] > 0
    assert math.isfinite(row["bits_per_char"]) and row["bits_per_token"] == pytest.approx(
        row["nll_per_token"] / math.log(2))
    # eq. 3 (to γ = ∞) of a learned model: one line, unless asked for explicitly
    rc, out, err = _run(capsys, *args, "eval.t_end=inf")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "allow_eq3" in err
    rc, out, err = _run(capsys, *args, "eval.t_end=inf", "eval.allow_eq3=true")
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["checkpoints"]["step-0"]["t_end"] is None


def _char_checkpoint(root: Path, corpus: Path) -> str:
    from dsl.checkpoint import save_checkpoint
    from dsl.data import build_data
    from dsl.models import build_model

    cfg = load(RunConfig, ["model=toy", "model.length=8", "data.tokenizer=char", f"data.source={corpus}",
                           "data.valid_fraction=0.5", "train.batch_size=2"])
    data = build_data(cfg)
    model = build_model(cfg, data.vocab_size)
    return save_checkpoint(str(root / "char"), 0, config=to_dict(cfg), model_state=model.state_dict(),
                           tokenizer=data.tokenizer)


def test_bits_per_character_count_text_characters_of_the_wrapped_blocks(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["the cat sat on the mat", "a dog ran far away", "hello world again",
                                    "one more document here", "and another one there"]))
    ckpt = _char_checkpoint(tmp_path, corpus)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("hello world\n\nabc")
    rc, out, err = _run(capsys, "likelihood", f"checkpoint={ckpt}", f"eval.heldout={heldout}", "eval.n_mc=4", "progress=false")
    assert rc == 0, err
    row = json.loads(out.strip().splitlines()[-1])["checkpoints"]["step-0"]
    # L = 8: "hello world" [EOS] "abc" [EOS] wraps into [BOS] "hello " [EOS] and [BOS] "world" [EOS] [EOS];
    # the 4 tokens left ("abc" [EOS]) do not fill a block: 2 blocks, 16 tokens, 11 characters of text
    assert (row["n_sequences"], row["n_tokens"], row["n_chars"]) == (2, 16, 11)
    total = row["nll_per_token"] * 16
    assert row["bits_per_char"] == pytest.approx(total / (11 * math.log(2)))
    # the run's own validation split, whole by default: characters = its non-special ids
    from dsl.data import heldout_blocks
    from dsl.models.loading import load_run

    run_cfg, _, tok, _ = load_run(ckpt)
    ids, _ = heldout_blocks(run_cfg, tok)
    rc, out, err = _run(capsys, "likelihood", f"checkpoint={ckpt}", "eval.n_mc=4", "progress=false")
    assert rc == 0, err
    row = json.loads(out.strip().splitlines()[-1])["checkpoints"]["step-0"]
    text_chars = int((ids >= 8).sum())  # a-z and space are ids 8..34
    assert row["n_sequences"] == ids.shape[0] and row["n_chars"] == text_chars < ids.numel()


@pytest.mark.parametrize("old, new, value, read", [
    ("samples", "eval.samples", "s.jsonl", lambda c: c.eval.samples == "s.jsonl"),
    ("n_reference", "eval.references", "12", lambda c: c.eval.references == 12),
    ("seeds", "eval.mauve_seeds", "1,2", lambda c: c.eval.mauve_seeds == (1, 2)),
    ("oracle", "eval.judge", "oracle:hmm", lambda c: c.eval.judge == "oracle:hmm"),
    ("workers", "eval.workers", "2", lambda c: c.eval.workers == 2),
    ("cache", "eval.feature_cache", "fc", lambda c: c.eval.feature_cache == "fc"),
    ("text_field", "data.text_field", "body", lambda c: c.data.text_field == "body"),
    ("device", "service.device", "cuda", lambda c: c.service.device == "cuda"),
])
def test_old_spellings_land_in_the_new_key_with_one_warning(capsys, old, new, value, read):
    from dsl.cli import parse

    mode, cfg = parse(JOB, ["calibration", f"{old}={value}"])
    assert mode == "calibration" and read(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {old}= is deprecated and will be removed in the next release; use {new}="]


def test_sentence_entropy_of_text_only_samples_is_computed_from_the_text(files, capsys, tmp_path):
    """A .txt sample file has no ids: the run's tokenizer (checkpoint=) counts its tokens, else GPT-2's
    when it loads offline, else words; the summary says which."""
    from dsl.eval.entropy import text_token_ids

    root, source, samples = files
    texts = [source.decode(row) for row in samples.tolist()]
    (tmp_path / "samples.txt").write_text("\n".join(texts) + "\n")
    base = [f"eval.samples={tmp_path / 'samples.txt'}", f"reference={root / 'refs.jsonl'}", "eval.max_length=64",
            "eval.mauve_seeds=25", "eval.num_buckets=2", "eval.feature_cache=", "progress=false"]
    rc, out, err = _run(capsys, *base)
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    ids, used = text_token_ids(texts)
    assert summary["sentence_entropy_tokens"] == used and used in ("gpt2", "words")
    assert summary["sentence_entropy"] == pytest.approx(sentence_entropy(ids)) and summary["sentence_entropy"] > 0
    # with the run that wrote them: its own tokenizer (for the HMM language: the source's words = the ids)
    from dsl.checkpoint import save_checkpoint
    from dsl.data import SourceTokenizer
    from dsl.models import build_model

    cfg = load(RunConfig, ["preset=embedded", "model=toy", f"model.length={LENGTH}"])
    tok = SourceTokenizer.for_source("hmm", cfg.data, LENGTH)
    run = save_checkpoint(str(tmp_path / "run"), 0, config=to_dict(cfg), tokenizer=tok,
                          model_state=build_model(cfg, tok.vocab_size).state_dict())
    rc, out, err = _run(capsys, *base, f"checkpoint={run}")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["sentence_entropy"] == pytest.approx(sentence_entropy(samples.tolist()))
    assert summary["sentence_entropy_tokens"] == f"run tokenizer of {run}"


def test_reference_features_are_cached_under_the_cache_root_not_the_working_directory(files, capsys, tmp_path,
                                                                                      monkeypatch):
    root = files[0]
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DSL_CACHE_DIR", str(cache))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, out, err = _run(capsys, f"eval.samples={root / 'samples.jsonl'}", f"reference={root / 'refs.jsonl'}",
                        "eval.max_length=64", "eval.mauve_seeds=25", "eval.num_buckets=2", "progress=false")
    assert rc == 0, err
    assert list(cwd.iterdir()) == []
    assert list((cache / "mauve-features").rglob("*.safetensors"))
