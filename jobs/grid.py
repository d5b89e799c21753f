"""The paper's Table 1 as one resumable distributed job: every row × step budget T sampled on Ray and scored.

    python jobs/grid.py table.models=mdlm=<mdlm run>,dsl=<dsl run> [table.spec=table1] [table.steps=16,32] \\
        [sampling.num_samples=256] [eval.featurizer=minilm eval.reference=<file|hf:dataset>] [eval.judge=...] \\
        [experiment=<name>] [service.tracking_uri=...] [service.ray_address=...]
    python jobs/grid.py table.spec=paper-table1 table.models=mdlm=<mdlm run>,dsl=<dsl run>   # the paper's
    python jobs/grid.py table.spec=<spec.toml> eval.judge=oracle:topics eval.featurizer=source-stats eval.reference=source

Rows and columns come from a spec (``table.spec``: a named one in dsl/config/presets/grid/ — ``table1``,
Table 1's rows at T = L/8 … L scored offline; ``paper-table1``, the paper's layout, L = 1024, 5,000
samples, ``eval.protocol=paper-table1``; ``topics``, the sticky-topic study's rows with exact scoring —
or a TOML file with ``[[rows]]`` of label, model, sampler and optionally eta_cap_table); the rows name
their models by role, filled by ``table.models``. Each cell's samples are drawn by Ray tasks (split by
sample index: the texts do not depend on the worker count; one GPU per task on a GPU cluster) and scored
once per cell: MAUVE against reference features computed once
per grid (``eval.workers`` > 0: a MauvePool), GenPPL under ``eval.judge`` (exact NLL and impossible share
under an ``oracle:*`` judge), sentence entropy, NFE, rewrites per token, the Table 6 sharpness curves.

MLflow (``experiment``): one parent run per grid (tag ``dsl.grid.name``, ``table.name`` or derived from the
command) and one child run per (row, T) with its metrics, ``samples.jsonl``, ``diagnostics.jsonl`` and
``fig2.png``. Running the same command again skips the cells already complete and reruns the partial
ones (a killed driver loses at most the cells in flight). Then: python dashboards/report.py grid=<grid name>.
The last stdout line is a JSON summary (grid run id, cells computed and skipped, one record per cell).
"""

from __future__ import annotations

import sys

import torch  # noqa: F401  -- before mauve/faiss (OpenMP clash in the other order)

from dsl.cli import Job, Mode, main
from dsl.config import JobConfig
from dsl.service.grid import run_grid
from dsl.service.grid_spec import check_grid, settle_grid


def _settle(cfg: JobConfig, mode: str, named: frozenset[str]) -> None:
    settle_grid(cfg, named)


JOB = Job(
    script="jobs/grid.py", doc=__doc__,
    modes={"grid": Mode(lambda cfg: run_grid(cfg), "sample and score every row x T of table.spec, resuming",
                        check=check_grid)},
    uses=("experiment", "seed", "progress", "table", "sampling", "eval", "data.text_field", "data.hmm_states",
          "data.hmm_words", "data.hmm_seed", "data.cyclic_k", "data.topics", "data.topics_switch",
          "data.topics_smoothing", "data.topics_seed", "service.ray_address", "service.ray_cpus", "service.device",
          "service.mlflow", "service.tracking_uri"),
    ignores=("sampling.sampler", "sampling.steps", "sampling.first_index", "sampling.trajectory", "sampling.plot", "eval.samples",
             "eval.snr", "eval.calibration_bins", "eval.reliability_snr", "eval.batches", "eval.batch_size",
             "eval.n_mc", "eval.max_sequences", "eval.heldout", "eval.t_end", "eval.allow_eq3"),
    defaults=("progress=false",),
    settle=_settle,
    tracks_by_default=True,
    kind="grid",
)

if __name__ == "__main__":
    sys.exit(main(JOB))
