"""Evaluate samples (Table 1: MAUVE / GenPPL / sentence entropy), calibration (Fig 4), likelihood (Table 3).

    python jobs/evaluate.py eval.protocol=paper-table1 eval.samples=<5,000 samples>      # Table 1, as the paper
    python jobs/evaluate.py eval.samples=<file> reference=<file|hf:dataset> [featurizer=minilm|gpt2-large|<dir>] \\
        [eval.judge=none|oracle:hmm|gpt2-large|<HF dir>|<AR checkpoint>] [eval.references=N] \\
        [eval.mauve_seeds=25,26,27] [eval.workers=N [service.ray_address=...]] [eval.feature_cache=<dir|s3://>] [out=<dir>]
    python jobs/evaluate.py calibration checkpoint=atomic=<ckpt>,smoothed=<ckpt> [eval.snr=70,80,90,95,100] [out=<dir>]
    python jobs/evaluate.py likelihood checkpoint=<ckpt> [eval.heldout=<text file>] [eval.max_sequences=N] \\
        [eval.n_mc=32] [eval.t_end=gamma_max|<t*>|inf [eval.allow_eq3=true]]

The last stdout line is a JSON summary: for samples ``mauve`` (at the headline seed, the first of
eval.mauve_seeds), ``mauve_mean, mauve_std, genppl, sentence_entropy, n_samples, n_reference,
featurizer``, ``protocol`` (its name and every setting that deviates from Table 1's) and the details
(per-seed values, K, the token budget, the ``<|endoftext|>`` rule applied to both sides, ...). Calibration writes ``calibration.png`` (ECE vs SNR + reliability diagram) and
``calibration.json`` under ``out`` (default runs/calibration); likelihood reports eq. 4's upper bound on
the NLL (the integral to t* = γ_max of the run's channel plus the factorised end term) and bits per text
character, with standard errors, over the whole held-out split. Reference features are cached only once
complete.
"""

from __future__ import annotations

import sys

import torch  # noqa: F401  -- before mauve/faiss (OpenMP clash in the other order)

from dsl.cli import Job, Mode, main, renamed
from dsl.config import JobConfig
from dsl.eval.protocols import (
    check_samples,
    evaluate_calibration,
    evaluate_likelihood,
    evaluate_samples,
    labelled_checkpoints,
)
from dsl.service import lineage


def log_samples_result(run, summary: dict) -> None:
    """An evaluation's headline metrics by the names every reader uses, and the full result (``Mode.after``)."""
    n, impossible = summary["n_samples"], summary["genppl_impossible"]
    run.set_tags({lineage.PROTOCOL: summary["protocol"]["name"]})
    run.log_metrics({
        lineage.MAUVE: summary["mauve"], lineage.MAUVE_MEAN: summary["mauve_mean"],
        lineage.MAUVE_STD: summary["mauve_std"], lineage.NUM_SAMPLES_METRIC: n,
        **({lineage.GENPPL: summary["genppl"]} if summary["genppl"] is not None else {}),
        **({lineage.GENPPL_IMPOSSIBLE_SHARE: impossible / n} if impossible is not None else {}),
        **({lineage.SENTENCE_ENTROPY: summary["sentence_entropy"]}
           if summary["sentence_entropy"] is not None else {})}, step=0)
    run.log_json(summary, "evaluation.json")


def log_calibration(run, summary: dict) -> None:
    run.log_artifact(summary["plot"])
    run.log_artifact(summary["details"])


def log_likelihood(run, summary: dict) -> None:
    rows = summary["checkpoints"]
    for i, (label, row) in enumerate(rows.items()):
        prefix = "" if i == 0 else f"{label}."   # the first (usually only) checkpoint by the plain names
        run.log_metrics({prefix + lineage.BPC: row["bits_per_char"],
                         prefix + lineage.BITS_PER_TOKEN: row["bits_per_token"],
                         prefix + lineage.NLL_BOUND: row["nll_per_token"],
                         prefix + lineage.NLL_STDERR: row["stderr_per_token"]}, step=0)
    run.set_tags({lineage.ESTIMATOR: next(iter(rows.values()))["estimator"]})
    run.log_json(summary, "likelihood.json")


def _labels(cfg: JobConfig) -> str:
    try:
        return ",".join(label for label, _ in labelled_checkpoints(cfg.checkpoint))
    except Exception:  # noqa: BLE001 - the run itself reports a bad checkpoint= in one line
        return cfg.checkpoint or "?"


def _samples_name(cfg: JobConfig) -> str:
    return lineage.evaluate_run_name("MAUVE", cfg.eval.samples)


def _samples_tags(cfg: JobConfig) -> dict[str, str]:
    return lineage.samples_tags(cfg.eval.samples) if cfg.eval.samples else {}


RENAMED = {
    "samples": renamed("eval.samples"), "n_reference": renamed("eval.references"),
    "seeds": renamed("eval.mauve_seeds"), "cache": renamed("eval.feature_cache"),
    "oracle": renamed("eval.judge"), "oracle_max_length": renamed("eval.judge_max_length"),
    "text_field": renamed("data.text_field"), "ray_address": renamed("service.ray_address"),
    "device": renamed("service.device"),
    **{k: renamed(f"eval.{k}") for k in (
        "reference_split", "reference_seed", "words_per_reference", "max_length", "featurize_batch", "num_buckets",
        "match_length", "length_budget", "workers", "gpus_per_worker", "genppl_batch", "snr", "calibration_bins",
        "reliability_snr", "batches", "batch_size", "n_mc", "heldout", "t_end")},
}

def apply_protocol(cfg: JobConfig, mode: str, named: frozenset[str]) -> None:
    """A named protocol's settings go in before anything runs or is logged (one line on a conflict)."""
    if mode == "samples" and cfg.eval.protocol != "none":
        from dsl.eval.paper_protocol import PaperTable1

        PaperTable1().apply(cfg.eval, {k.removeprefix("eval.") for k in named if k.startswith("eval.")})


JOB = Job(
    script="jobs/evaluate.py", doc=__doc__,
    modes={"samples": Mode(evaluate_samples, "MAUVE / GenPPL / sentence entropy of eval.samples (the default)",
                           tracked=True, check=check_samples, tags=_samples_tags, run_name=_samples_name,
                           after=log_samples_result),
           "calibration": Mode(evaluate_calibration, "token ECE vs SNR and a reliability diagram of DSL "
                                                     "checkpoint(s) (Fig 4)", tracked=True, after=log_calibration,
                               run_name=lambda c: f"evaluate calibration {_labels(c)}"),
           "likelihood": Mode(evaluate_likelihood, "path-integral NLL bound / bits per character of DSL "
                                                   "checkpoint(s) (Table 3)", tracked=True, after=log_likelihood,
                              run_name=lambda c: f"evaluate likelihood {_labels(c)}")},
    uses=("name", "experiment", "seed", "checkpoint", "out", "progress", "eval", "data.text_field",
          "data.hmm_states", "data.hmm_words", "data.hmm_seed", "data.cyclic_k", "service.ray_address",
          "service.device", "service.mlflow", "service.tracking_uri"),
    renamed=RENAMED,
    settle=apply_protocol,
)

if __name__ == "__main__":
    sys.exit(main(JOB))
