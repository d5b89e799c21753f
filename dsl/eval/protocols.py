"""The evaluation protocols ``jobs/evaluate.py`` runs, each a function of the job config:

- :func:`evaluate_samples` — Table 1's MAUVE (the headline seed's value, and mean ± std over k-means
  seeds), GenPPL under a judge, and sentence entropy of a sample file; every summary records its
  protocol (``eval.protocol``, :mod:`dsl.eval.paper_protocol`) and each setting that deviates from
  Table 1's;
- :func:`evaluate_calibration` — Fig 4: token ECE against SNR for one or more DSL checkpoints, and the
  reliability diagram, on the same corruption noise for every checkpoint (a paired comparison);
- :func:`evaluate_likelihood` — Table 3: eq. 4's upper bound on the NLL of the whole held-out split (the
  path integral to t* = γ_max plus the factorised end term; eq. 3 to γ = ∞ only on request), in nats and
  bits per token / per text character, with standard errors.

Files are written under temporary names and renamed; bad input raises ConfigError/UserError (one line)
before any featurization.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from dsl.atomic import atomic_path, write_json_atomic
from dsl.config import ConfigError, JobConfig
from dsl.errors import UserError
from dsl.outputs import RUNS_ROOT, cache_root, output_dir


def labelled_checkpoints(spec: str) -> list[tuple[str, str]]:
    """``label=uri,...`` or ``uri,...`` → [(label, uri)] (a label defaults to the path's last part)."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        label, sep, uri = part.partition("=")
        if not sep or "://" in label:
            label, uri = os.path.basename(part.rstrip("/")) or part, part
        out.append((label, uri))
    if not out:
        raise ConfigError("checkpoint='' : give checkpoint=<dir|s3://...>, or atomic=<ckpt>,smoothed=<ckpt>")
    return out


def _load_dsl_run(uri: str):
    from dsl.model_spec import OURS, parse_model_spec
    from dsl.models.loading import load_run

    run_cfg, model, tokenizer, _ = load_run(parse_model_spec(uri, "checkpoint", OURS).target)
    if run_cfg.objective != "dsl":
        raise UserError(f"checkpoint={uri}: objective={run_cfg.objective}; calibration and the path-integral "
                        f"likelihood need a DSL checkpoint (objective=dsl)")
    return run_cfg, model, tokenizer


def _heldout_batches(run_cfg: Any, tokenizer: Any, job: JobConfig) -> list[dict]:
    from dsl.data import build_data

    data = build_data(run_cfg, tokenizer)
    out = []
    for step in range(job.eval.batches):
        b = data.batch("valid", step)
        out.append({"ids": b["ids"][: job.eval.batch_size], "mask": b["mask"][: job.eval.batch_size]})
    return out


# ----------------------------------------------------------------------------------------------
# Samples: MAUVE, GenPPL, sentence entropy.


JUDGE_KINDS = ("none", "source", "oracle", "checkpoint", "run", "uri", "hf_dir", "hub")


def load_judge(job: JobConfig, ids: list[list[int]] | None):
    """(judge, items it scores) for ``eval.judge``; (None, None) when the judge is none."""
    from dsl.eval.genppl import ARCheckpointOracle, CausalLMOracle, ExactSourceOracle
    from dsl.model_spec import parse_model_spec

    spec = parse_model_spec(job.eval.judge, "eval.judge", JUDGE_KINDS)
    device = job.service.device
    if spec.kind == "none":
        return None, None
    if spec.kind == "source":
        raise ConfigError("eval.judge=source scores with the exact source of checkpoint=oracle:*, which "
                          "evaluating a sample file does not load; give eval.judge=oracle:<hmm|cyclic|topics>")
    if spec.kind == "oracle":
        from dsl.sources import build_source

        if ids is None:
            raise UserError(f"eval.judge={job.eval.judge} scores token ids: the samples file needs an 'ids' field")
        return ExactSourceOracle(build_source(spec.target, job.data, len(ids[0]))), ids
    if spec.ours:
        from dsl.models.loading import load_run

        if ids is None:
            raise UserError(f"eval.judge={spec.target} (an AR checkpoint) scores token ids: the samples need an "
                            f"'ids' field")
        run_cfg, model, _, _ = load_run(spec.target, device=device)
        if run_cfg.objective != "ar":
            raise UserError(f"eval.judge={spec.target}: objective={run_cfg.objective}; a GenPPL judge checkpoint "
                            f"must be autoregressive (objective=ar)")
        return ARCheckpointOracle(model, device=device), ids
    return CausalLMOracle.load(spec.target, max_length=job.eval.judge_max_length, device=device), None


def parse_num_buckets(raw: str) -> int | str:
    """``eval.num_buckets``: ``auto`` or an integer (one line otherwise)."""
    if raw == "auto":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"eval.num_buckets={raw!r}: expected 'auto' or an integer") from None


def feature_cache(spec: str) -> str:
    """The storage URI of ``eval.feature_cache``: ``auto`` is the cache root's ``mauve-features``; a local
    directory must not be a file; '' (off) stays ''."""
    if spec == "auto":
        return str(cache_root() / "mauve-features")
    if spec and "://" not in spec:
        output_dir(spec, "eval.feature_cache")
    return spec


def _run_tokenizer(job: JobConfig) -> tuple[Any, str]:
    """``(tokenizer, its name)`` of the run ``checkpoint=`` names (one of ours), else ``(None, "")``."""
    from dsl.model_spec import classify

    spec = classify(job.checkpoint) if job.checkpoint else None
    if spec is None or not spec.ours:
        return None, ""
    from dsl.checkpoint import MANIFEST, latest_complete, read_tokenizer
    from dsl.storage import open_storage

    storage = open_storage(spec.target)
    if not storage.exists(MANIFEST):
        latest = latest_complete(storage)
        if latest is None:
            raise UserError(f"checkpoint={job.checkpoint}: no complete checkpoint to take the tokenizer from")
        storage = open_storage(latest)
    tokenizer = read_tokenizer(storage)
    return tokenizer, f"run tokenizer of {job.checkpoint}" if tokenizer is not None else ""


def load_references(job: JobConfig, n: int) -> Any:
    """The :class:`~dsl.eval.mauve.ReferenceSet` of ``eval.reference`` (a file or ``hf:`` dataset):
    ``n`` texts drawn with ``eval.reference_seed`` in the layout the ``eval`` keys give. Evaluation and
    the η_cap search read references through this one function."""
    from dsl.eval.mauve import ReferenceSet

    ev = job.eval
    tokenizer = None
    if ev.reference_blocks > 0:
        from dsl.eval.references import load_reference_tokenizer

        tokenizer = load_reference_tokenizer(ev.reference_tokenizer)
    return ReferenceSet.from_spec(ev.reference, n, ev.reference_seed, cache=feature_cache(ev.feature_cache),
                                  text_field=job.data.text_field, split=ev.reference_split,
                                  words_per_text=ev.words_per_reference, blocks=ev.reference_blocks,
                                  tokenizer=tokenizer, heldout_docs=ev.heldout_docs, eot=ev.eot,
                                  progress=job.progress)


def check_samples(job: JobConfig) -> None:
    """Before anything is read or recorded: the keys name a sample file and references, and the outputs
    (``out``, the feature cache) can be directories."""
    ev = job.eval
    if not ev.samples:
        raise ConfigError("eval.samples='' : give eval.samples=<file.jsonl|file.txt> (as jobs/sample.py writes)")
    if not ev.reference:
        raise ConfigError("eval.reference='' : give eval.reference=<file.jsonl|file.txt|hf:dataset>")
    if ev.reference == "source":
        raise ConfigError("eval.reference=source draws texts from checkpoint=oracle:*, which evaluating a sample "
                          "file does not load; give eval.reference=<file.jsonl|file.txt|hf:dataset>")
    if job.out:
        output_dir(job.out)
    feature_cache(ev.feature_cache)


def evaluate_samples(job: JobConfig) -> dict[str, Any]:
    """Table 1's metrics of ``eval.samples`` (after :func:`check_samples`, the mode's check)."""
    from dsl.eval.entropy import sentence_entropy, text_token_ids
    from dsl.eval.genppl import genppl, impossible_note
    from dsl.eval.mauve import evaluate_mauve, read_records
    from dsl.service.mauve_pool import open_featurizer

    ev = job.eval
    text_field = job.data.text_field
    records = read_records(ev.samples, text_field)
    texts = [r.get("text") for r in records]
    if any(not isinstance(t, str) for t in texts):
        raise UserError(f"{ev.samples}: every sample needs a {text_field!r} text for MAUVE")
    ids = [r["ids"] for r in records] if all("ids" in r for r in records) else None
    # cheap checks first, so a bad judge or reference fails before any featurization
    judge, judge_items = load_judge(job, ids)
    buckets = parse_num_buckets(ev.num_buckets)
    run_tokenizer = _run_tokenizer(job) if ids is None else (None, "")
    references = load_references(job, ev.references or len(texts))
    featurizer, close = open_featurizer(ev.featurizer, ev.workers, ev.max_length, gpus_per_worker=ev.gpus_per_worker,
                                        batch_size=ev.featurize_batch, device=job.service.device,
                                        ray_address=job.service.ray_address)
    try:
        scored = evaluate_mauve(texts, references, featurizer, seeds=ev.mauve_seeds, num_buckets=buckets,
                                match_length=ev.match_length, n_tokens=ev.length_budget, progress=job.progress)
    finally:
        close()
    ppl = None
    if judge is not None:
        ppl = genppl(judge, judge_items if judge_items is not None else texts, ev.genppl_batch, job.progress)
        note = impossible_note(ppl, f"eval.judge={ev.judge}")
        if note:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    from dsl.eval.paper_protocol import protocol_record

    settings = records[0].get("settings")
    entropy_ids, entropy_tokens = (ids, "ids") if ids is not None else text_token_ids(texts, *run_tokenizer)
    for line in scored.get("warnings", ()):
        print(f"warning: {line}", file=sys.stderr, flush=True)
    summary = {
        "protocol": protocol_record(ev, n_samples=len(texts), n_references=len(references),
                                    num_buckets=scored["num_buckets"],
                                    sample_settings=settings if all(r.get("settings") == settings for r in records)
                                    else None),
        "mauve": scored["mauve"], "mauve_headline_seed": scored["headline_seed"],
        "mauve_mean": scored["mean"], "mauve_std": scored["std"], "mauve_warnings": scored.get("warnings", []),
        "genppl": None if ppl is None else ppl["genppl"],
        "sentence_entropy": sentence_entropy(entropy_ids), "sentence_entropy_tokens": entropy_tokens,
        "n_samples": len(texts), "n_reference": len(references), "featurizer": scored["featurizer"],
        "mauve_values": scored["values"], "num_buckets": scored["num_buckets"], "mauve_seeds": list(ev.mauve_seeds),
        "length_budget": scored["length_budget"], "max_length": scored["max_length"],
        "genppl_tokens": None if ppl is None else ppl["n_tokens"],
        "genppl_impossible": None if ppl is None else ppl["impossible"],
        "genppl_impossible_share": None if ppl is None else ppl["impossible_share"], "judge": ev.judge,
        "reference": references.origin, "reference_layout": references.layout, "reference_seed": ev.reference_seed,
        "eot": scored["eot"], "eot_share": scored["eot_share"], "workers": ev.workers,
        "reference_features_computed": references.computed,
    }
    if job.out:
        write_json_atomic(os.path.join(job.out, "samples.json"), summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Calibration (Fig 4) and likelihood (Table 3).


def evaluate_calibration(job: JobConfig) -> dict[str, Any]:
    from dsl.eval.calibration import calibration_by_snr, model_posterior, plot_calibration

    ev = job.eval
    if not ev.snr or any(s <= 0 for s in ev.snr):
        raise ConfigError(f"eval.snr={','.join(map(str, ev.snr))}: give positive SNRs, e.g. eval.snr=70,80,90,95,100")
    out_dir = output_dir(job.out or os.path.join(RUNS_ROOT, "calibration"))
    loaded = [(label, uri, _load_dsl_run(uri)) for label, uri in labelled_checkpoints(job.checkpoint)]
    results, summary = {}, {}
    for label, uri, (run_cfg, model, tokenizer) in loaded:
        batches = _heldout_batches(run_cfg, tokenizer, job)
        posterior, embed = model_posterior(model)
        # the same noise for every checkpoint: a paired comparison
        by_snr = calibration_by_snr(posterior, embed, batches, ev.snr, torch.Generator().manual_seed(job.seed),
                                    ev.calibration_bins, job.progress)
        results[label] = by_snr
        summary[label] = {"checkpoint": uri, "roar": run_cfg.channel.roar,
                          "ece": {f"{s:g}": r.ece for s, r in by_snr.items()},
                          "accuracy": {f"{s:g}": r.accuracy for s, r in by_snr.items()}}
    os.makedirs(out_dir, exist_ok=True)
    png, js = os.path.join(out_dir, "calibration.png"), os.path.join(out_dir, "calibration.json")
    with atomic_path(png) as tmp_png:
        plot_calibration(results, str(tmp_png), ev.reliability_snr)
    write_json_atomic(js, {label: {s: r.to_dict() for s, r in by_snr.items()} for label, by_snr in results.items()})
    return {"mode": "calibration", "snr": list(ev.snr), "bins": ev.calibration_bins, "checkpoints": summary,
            "plot": png, "details": js}


def evaluate_likelihood(job: JobConfig) -> dict[str, Any]:
    from dsl.data import SYNTHETIC, heldout_blocks
    from dsl.eval.likelihood import count_text_characters, factorised_log_prob, path_integral_likelihood

    ev = job.eval
    if job.out:
        output_dir(job.out)
    rows = {}
    for label, uri in labelled_checkpoints(job.checkpoint):
        run_cfg, model, tokenizer = _load_dsl_run(uri)
        if ev.heldout and tokenizer is None:
            raise UserError(f"checkpoint={uri}: no tokenizer saved with the run; cannot lay out eval.heldout text")
        endless = run_cfg.data.source in SYNTHETIC and not ev.heldout
        limit = ev.max_sequences or (ev.batches * ev.batch_size if endless else 0)
        ids, _ = heldout_blocks(run_cfg, tokenizer, ev.heldout, limit)
        res = path_integral_likelihood(model.posterior_mean, model.embed, ids, ev.n_mc,
                                       torch.Generator().manual_seed(job.seed), ev.batch_size,
                                       count_text_characters(ids, tokenizer), job.progress, t_end=ev.t_end,
                                       gamma_max=run_cfg.channel.gamma_max, end_log_prob=factorised_log_prob(model),
                                       allow_eq3=ev.allow_eq3)
        rows[label] = {"checkpoint": uri, "heldout": ev.heldout or "validation split", **res}
    summary = {"mode": "likelihood", "n_mc": ev.n_mc, "checkpoints": rows}
    if job.out:
        write_json_atomic(os.path.join(job.out, "likelihood.json"), summary)
    return summary


__all__ = ["check_samples", "evaluate_samples", "evaluate_calibration", "evaluate_likelihood", "load_judge", "JUDGE_KINDS",
           "labelled_checkpoints", "load_references", "parse_num_buckets"]
