"""Search η_cap(T) per step budget with Ray Tune + Optuna, scored by parallel MAUVE workers.

    python tune/eta_cap_search.py                                  # offline embedded default (oracle:hmm)
    python tune/eta_cap_search.py checkpoint=s3://bucket/run/step-100 budgets=128,256,512,1024 \\
        trials=24 sampling.num_samples=512 eval.references=512 \\
        search.study_db=postgresql://postgres@db/optuna service.ray_address=auto

Re-running the same command continues the study. The table and the fitted rule land in
``<out>/eta_cap_table.json`` / ``eta_cap_rule.json`` for ``jobs/sample.py eta_cap_table=<file>``.
"""

from __future__ import annotations

import sys

from dsl.cli import Job, Mode, Renamed, main, renamed, used_params
from dsl.config import ConfigError, JobConfig
from dsl.service.search_config import check_search


def run(cfg: JobConfig) -> dict:
    from dsl.service.search import run_search

    summary = run_search(cfg, params=used_params(JOB, cfg))
    return {k: v for k, v in summary.items() if k != "records"}


def _seed_count(raw: str) -> tuple[list[str], str | None]:
    """The old ``mauve_seeds=N`` counted seeds from 25 (mauve-text's default seed)."""
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"mauve_seeds={raw!r} is not a count; use eval.mauve_seeds=25,26,27") from None
    if n < 1:
        raise ConfigError(f"mauve_seeds={n} is out of range: expected a count >= 1")
    return [f"eval.mauve_seeds={','.join(str(25 + i) for i in range(n))}"], None


def _judge(raw: str) -> tuple[list[str], str | None]:
    return [f"eval.judge={raw or 'source'}"], None


def _tracking_uri(raw: str) -> tuple[list[str], str | None]:
    if raw.strip().lower() == "none":
        return ["service.mlflow=off"], None
    return [f"service.tracking_uri={raw}"], None


RENAMED = {
    "steps": renamed("search.budgets"), "length": renamed("sampling.length"),
    "samples": renamed("sampling.num_samples"), "eta": renamed("search.eta_cap_range"),
    **{k: renamed(f"search.{k}_range") for k in ("t_on", "t_off", "alpha_on", "top_p")},
    **{k: renamed(f"search.{k}") for k in ("min_samples", "asha_reduction", "asha", "rewrite_target", "penalty",
                                           "startup_trials", "max_concurrent", "trial_cpus")},
    "storage": renamed("search.study_db"), "mauve_workers": renamed("eval.workers"),
    "mauve_seeds": Renamed("eval.mauve_seeds=25,26,... (the seeds, not their count)", convert=_seed_count),
    "max_length": renamed("eval.max_length"), "references": renamed("eval.references"),
    "judge": Renamed("eval.judge= ('' is now source)", convert=_judge),
    "ray_address": renamed("service.ray_address"), "ray_cpus": renamed("service.ray_cpus"),
    "out_dir": renamed("out"), "mlflow_experiment": renamed("experiment"),
    "tracking_uri": Renamed("service.tracking_uri= (none is now service.mlflow=off)", convert=_tracking_uri),
    "sampling.seed": renamed("seed"),
}

JOB = Job(
    script="tune/eta_cap_search.py", doc=__doc__,
    modes={"search": Mode(run, "search η_cap(T) for every budget in search.budgets")},
    uses=("name", "experiment", "seed", "checkpoint", "out", "progress", "sampling", "search",
          "eval.featurizer", "eval.max_length", "eval.mauve_seeds", "eval.reference", "eval.references",
          "eval.judge", "eval.workers", "service.ray_address", "service.ray_cpus", "service.mlflow",
          "service.tracking_uri"),
    ignores=("sampling.steps", "sampling.eta", "sampling.eta_cap_table", "sampling.first_index",
             "sampling.trajectory", "sampling.plot"),
    defaults=("checkpoint=oracle:hmm", "out=runs/eta_cap_search", "experiment=eta-cap-search",
              "sampling.length=32", "sampling.num_samples=32", "eval.workers=1", "eval.max_length=128",
              "eval.reference=source", "eval.references=64", "eval.judge=source"),
    renamed=RENAMED, validate=check_search, tracks_by_default=True,
)

if __name__ == "__main__":
    sys.exit(main(JOB))
