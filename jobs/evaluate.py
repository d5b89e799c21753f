"""Evaluate samples (Table 1: MAUVE / GenPPL / sentence entropy), calibration (Fig 4), likelihood (Table 3).

    python jobs/evaluate.py samples=<file> reference=<file|hf:dataset> [featurizer=minilm|gpt2-large|<dir>] \\
        [oracle=none|gpt2-large|<HF dir>|<AR checkpoint>|oracle:hmm] [n_reference=N] [seeds=25,26,27] \\
        [num_buckets=auto] [max_length=...] [workers=N [ray_address=...]] [cache=<dir|s3://...>] [out=<dir>]
    python jobs/evaluate.py calibration checkpoint=atomic=<ckpt>,smoothed=<ckpt> [snr=70,80,90,95,100] [out=<dir>]
    python jobs/evaluate.py likelihood checkpoint=<ckpt> [heldout=<text file>] [chunk=256] [n_mc=32]

The last stdout line is a JSON summary: for samples ``mauve_mean, mauve_std, genppl,
sentence_entropy, n_samples, n_reference, featurizer`` (+ the details: per-seed values, K, the token
budget both sets were cut to, ...). Calibration writes ``calibration.png`` (ECE vs SNR + reliability
diagram) and ``calibration.json`` under ``out`` (default runs/calibration); likelihood reports
NLL/bits per character with standard errors. Files are written under temporary names and renamed, and
reference features are cached only once complete: a failed run overwrites nothing. Bad input prints
``error: <one line>`` and exits 2. ``python jobs/evaluate.py --help`` lists every key.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

import torch  # noqa: F401  -- before mauve/faiss (OpenMP clash in the other order)

from dsl.config import ConfigError, EvalConfig, describe, load
from dsl.errors import UserError, run_cli

MODES = ("calibration", "likelihood")


# ----------------------------------------------------------------------------------------------
# Helpers.


def _write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _checkpoints(spec: str) -> list[tuple[str, str]]:
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
    from dsl.checkpoint import load_run

    if "://" not in uri and not os.path.exists(uri):
        raise UserError(f"checkpoint={uri}: no such directory; give a checkpoint directory or an s3:// URI")
    run_cfg, model, tokenizer, _ = load_run(uri)
    if run_cfg.objective != "dsl":
        raise UserError(f"checkpoint={uri}: objective={run_cfg.objective}; calibration and the path-integral "
                        f"likelihood need a DSL checkpoint (objective=dsl)")
    return run_cfg, model, tokenizer


def _heldout_batches(run_cfg: Any, tokenizer: Any, job: EvalConfig) -> list[dict]:
    from dsl.data import build_data

    data = build_data(run_cfg, tokenizer)
    out = []
    for step in range(job.batches):
        b = data.batch("valid", step)
        out.append({"ids": b["ids"][: job.batch_size], "mask": b["mask"][: job.batch_size]})
    return out


# ----------------------------------------------------------------------------------------------
# Samples: MAUVE, GenPPL, sentence entropy.


def _make_oracle(job: EvalConfig, ids: list[list[int]] | None):
    """(oracle, items it scores) for ``job.oracle``; None when oracle=none."""
    from dsl.eval.genppl import ARCheckpointOracle, CausalLMOracle, ExactSourceOracle

    spec = job.oracle.strip()
    if spec in ("", "none"):
        return None, None
    if spec.startswith("oracle:"):
        from dsl.sources import build_source

        if ids is None:
            raise UserError(f"oracle={spec} scores token ids: the samples file needs an 'ids' field")
        name = spec.split(":", 1)[1]
        if name not in ("hmm", "cyclic"):
            raise ConfigError(f"oracle={spec!r}: exact oracles are oracle:hmm and oracle:cyclic")
        return ExactSourceOracle(build_source(name, job.data, len(ids[0]))), ids
    is_ours = "://" in spec or os.path.isfile(os.path.join(spec, "manifest.json")) or (
        os.path.isdir(spec) and any(n.startswith("step-") for n in os.listdir(spec)))
    if is_ours:
        from dsl.checkpoint import load_run

        if ids is None:
            raise UserError(f"oracle={spec} (an AR checkpoint) scores token ids: the samples need an 'ids' field")
        run_cfg, model, _, _ = load_run(spec, device=job.device)
        if run_cfg.objective != "ar":
            raise UserError(f"oracle={spec}: objective={run_cfg.objective}; a GenPPL oracle checkpoint must be "
                            f"autoregressive (objective=ar)")
        return ARCheckpointOracle(model, device=job.device), ids
    return CausalLMOracle.load(spec, max_length=job.oracle_max_length, device=job.device), None


def _featurizer_or_pool(job: EvalConfig):
    """(featurizer, cleanup) — in-process, or a MauvePool on Ray when workers > 0."""
    if job.workers == 0:
        from dsl.eval.featurizers import get_featurizer

        return get_featurizer(job.featurizer, job.max_length, device=job.device,
                              batch_size=job.featurize_batch), lambda: None
    import ray

    from dsl.service.mauve_pool import MauvePool

    owns_ray = not ray.is_initialized()
    temp_dir = None
    if owns_ray:
        if job.ray_address:
            ray.init(address=job.ray_address, logging_level="WARNING", log_to_driver=False)
        else:  # private, loopback-only, own temp dir; ray.shutdown stops exactly what it started
            temp_dir = tempfile.mkdtemp(prefix="ray-eval-", dir="/tmp")  # short: unix socket path limit
            ray.init(num_cpus=max(1, job.workers), _node_ip_address="127.0.0.1", include_dashboard=False,
                     _temp_dir=temp_dir, logging_level="WARNING", log_to_driver=False)

    def stop_ray() -> None:
        if owns_ray:
            ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)

    try:
        pool = MauvePool(job.featurizer, job.workers, job.max_length, job.gpus_per_worker,
                         batch_size=job.featurize_batch)
    except BaseException:
        stop_ray()
        raise

    def cleanup() -> None:
        pool.close()
        stop_ray()

    return pool, cleanup


def evaluate_samples(job: EvalConfig) -> dict[str, Any]:
    from dsl.eval.entropy import sentence_entropy
    from dsl.eval.genppl import genppl
    from dsl.eval.mauve import ReferenceSet, evaluate_mauve, read_records

    if not job.samples:
        raise ConfigError("samples='' : give samples=<file.jsonl|file.txt> (as jobs/sample.py writes)")
    if not job.reference:
        raise ConfigError("reference='' : give reference=<file.jsonl|file.txt|hf:dataset>")
    records = read_records(job.samples, job.text_field)
    texts = [r.get("text") for r in records]
    if any(not isinstance(t, str) for t in texts):
        raise UserError(f"{job.samples}: every sample needs a {job.text_field!r} text for MAUVE")
    ids = [r["ids"] for r in records] if all("ids" in r for r in records) else None
    # cheap checks first, so a bad oracle or reference fails before any featurization
    oracle, oracle_items = _make_oracle(job, ids)
    references = ReferenceSet.from_spec(job.reference, job.n_reference or len(texts), job.reference_seed,
                                        cache=job.cache, text_field=job.text_field, split=job.reference_split,
                                        words_per_text=job.words_per_reference)
    buckets: int | str = job.num_buckets if job.num_buckets == "auto" else _int_key("num_buckets", job.num_buckets)
    featurizer, cleanup = _featurizer_or_pool(job)
    try:
        scored = evaluate_mauve(texts, references, featurizer, seeds=job.seeds, num_buckets=buckets,
                                match_length=job.match_length, n_tokens=job.length_budget, progress=job.progress)
    finally:
        cleanup()
    ppl = None
    if oracle is not None:
        ppl = genppl(oracle, oracle_items if oracle_items is not None else texts, job.genppl_batch, job.progress)
    return {
        "mauve_mean": scored["mean"], "mauve_std": scored["std"],
        "genppl": None if ppl is None else ppl["genppl"],
        "sentence_entropy": None if ids is None else sentence_entropy(ids),
        "n_samples": len(texts), "n_reference": len(references), "featurizer": scored["featurizer"],
        "mauve_values": scored["values"], "num_buckets": scored["num_buckets"], "seeds": list(job.seeds),
        "length_budget": scored["length_budget"], "max_length": scored["max_length"],
        "genppl_tokens": None if ppl is None else ppl["n_tokens"],
        "genppl_impossible": None if ppl is None else ppl["impossible"], "oracle": job.oracle,
        "reference": job.reference, "reference_seed": job.reference_seed, "workers": job.workers,
        "reference_features_computed": references.computed,
    }


def _int_key(key: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: expected 'auto' or an integer") from None


# ----------------------------------------------------------------------------------------------
# Calibration (Fig 4) and likelihood (Table 3).


def evaluate_calibration(job: EvalConfig) -> dict[str, Any]:
    from dsl.eval.calibration import calibration_by_snr, model_posterior, plot_calibration

    if not job.snr or any(s <= 0 for s in job.snr):
        raise ConfigError(f"snr={','.join(map(str, job.snr))}: give positive SNRs, e.g. snr=70,80,90,95,100")
    loaded = [(label, uri, _load_dsl_run(uri)) for label, uri in _checkpoints(job.checkpoint)]
    results, summary = {}, {}
    for label, uri, (run_cfg, model, tokenizer) in loaded:
        batches = _heldout_batches(run_cfg, tokenizer, job)
        posterior, embed = model_posterior(model)
        # the same noise for every checkpoint: a paired comparison
        by_snr = calibration_by_snr(posterior, embed, batches, job.snr, torch.Generator().manual_seed(job.seed),
                                    job.calibration_bins, job.progress)
        results[label] = by_snr
        summary[label] = {"checkpoint": uri, "roar": run_cfg.channel.roar,
                          "ece": {f"{s:g}": r.ece for s, r in by_snr.items()},
                          "accuracy": {f"{s:g}": r.accuracy for s, r in by_snr.items()}}
    out_dir = job.out or os.path.join("runs", "calibration")
    os.makedirs(out_dir, exist_ok=True)
    png, js = os.path.join(out_dir, "calibration.png"), os.path.join(out_dir, "calibration.json")
    tmp_png = os.path.join(out_dir, f".tmp-{os.getpid()}-calibration.png")
    plot_calibration(results, tmp_png, job.reliability_snr)
    os.replace(tmp_png, png)
    _write_json_atomic(js, {label: {s: r.to_dict() for s, r in by_snr.items()} for label, by_snr in results.items()})
    return {"mode": "calibration", "snr": list(job.snr), "bins": job.calibration_bins, "checkpoints": summary,
            "plot": png, "details": js}


def evaluate_likelihood(job: EvalConfig) -> dict[str, Any]:
    from dsl.eval.likelihood import factorised_log_prob, path_integral_likelihood, text8_chunks

    rows = {}
    for label, uri in _checkpoints(job.checkpoint):
        run_cfg, model, tokenizer = _load_dsl_run(uri)
        if job.heldout:
            if not os.path.isfile(job.heldout):
                raise UserError(f"heldout={job.heldout}: file not found (expected a plain text file)")
            if tokenizer is None:
                raise UserError(f"checkpoint={uri}: no tokenizer saved with the run; cannot encode heldout text")
            with open(job.heldout, encoding="utf-8") as fh:
                ids = text8_chunks(fh.read(), tokenizer.encode, job.chunk)[: job.batches * job.batch_size]
            n_chars = ids.numel()
        else:
            parts = [b["ids"] for b in _heldout_batches(run_cfg, tokenizer, job)]
            ids = torch.cat(parts)
            n_chars = sum(len(tokenizer.decode(r)) for r in ids.tolist()) if tokenizer is not None else ids.numel()
        stopped = job.t_end > 0
        res = path_integral_likelihood(model.posterior_mean, model.embed, ids, job.n_mc,
                                       torch.Generator().manual_seed(job.seed), job.batch_size, n_chars, job.progress,
                                       t_end=job.t_end if stopped else None,
                                       end_log_prob=factorised_log_prob(model) if stopped else None)
        rows[label] = {"checkpoint": uri, **res}
    return {"mode": "likelihood", "n_mc": job.n_mc, "t_end": job.t_end or None,
            "estimator": "eq. 10 (factorised end term: upper bound)" if job.t_end > 0 else "eq. 3",
            "checkpoints": rows}


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(describe(EvalConfig))
        return 0
    mode = "samples"
    if argv and "=" not in argv[0]:
        mode = argv[0]
        argv = argv[1:]
    def body() -> dict:
        if mode not in ("samples",) + MODES:
            raise ConfigError(f"unknown mode {mode!r}: use key=value arguments (samples), or the first word "
                              f"calibration or likelihood")
        job = load(EvalConfig, argv, presets={})
        from dsl.service.tracking import tracked_job  # one MLflow run per invocation, if tracking is on

        evaluate = {"calibration": evaluate_calibration, "likelihood": evaluate_likelihood}.get(mode, evaluate_samples)
        summary = tracked_job(f"evaluate-{mode}", job, job.checkpoint.split(",")[0] or None, lambda: evaluate(job),
                              tags={"dsl.samples": job.samples} if job.samples else None)
        if job.out and mode != "calibration":
            _write_json_atomic(os.path.join(job.out, f"{mode}.json"), summary)
        return summary

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
