"""The small-scale Table 1 in one command: pretrain an MDLM, fine-tune it two ways, decode both with
Table 1's rows at every step budget, write the comparison report.

    python jobs/reproduce.py preset=smoke out=runs/repro-smoke        # L=32: 25 min measured on 2 busy cores
    python jobs/reproduce.py out=runs/repro                           # preset=default, L=64: 30+ min estimated
    python jobs/reproduce.py preset=smoke data.source=<corpus.txt> out=runs/repro-text  # real text, MiniLM MAUVE
    python jobs/reproduce.py plan preset=paper out=runs/repro-paper      # what the paper-scale run would do
    ray job submit --working-dir . -- python jobs/reproduce.py preset=paper out=runs/repro-paper

Phases (re-running the same command resumes: a finished phase is read back, a training resumes from its
last checkpoint, a finished cell is never recomputed):

1. ``pretrain``: MDLM from scratch on the sticky-topic language (``data.source=topics``: full support,
   exact -log P of every sample, exact reference samples); ``reproduce.pretrain_steps=0`` skips it and
   takes ``init=`` as the pretrained MDLM (preset=paper: hf:kuleshov-group/mdlm-owt, Sec 6.1);
2. ``mdlm-ft`` and ``dsl-ft``: from that one checkpoint, equal budgets (steps, batch, LR), the MDLM
   objective continued and the DSL objective (Sec 4.1, App C.1: no warm-up);
3. ``grid``: rows MDLM, ReMDM, DSL-FT + ReMDM, DSL-FT + ReMDM-loop (η_cap(T)), DSL-FT + MDLM sampler,
   and the references Data (exact samples) and Exact oracle + MDLM sampler, at T ∈ {L/8, L/4, L/2, L}
   (at L = 1024 Table 1's 128, 256, 512, 1024), through the Table 1 grid (``dsl.service.grid.run_grid``):
   each cell is one MLflow run under one grid run (``service.tracking_uri``, default ``<out>/mlflow.db``);
4. ``report``: ``<out>/report.html`` (Table 1 beside the paper's, plots, Table 5) and ``<out>/table1.csv``
   (one line per row × T: MAUVE, its std, GenPPL, sentence entropy, NFE, rewrites per token, the
   paper's value where one exists), read back from the MLflow runs; ``<out>/study.md``/``study.csv``:
   the exact NLL per token of every cell ± its standard error over samples, samples per cell, and the
   count and share of samples impossible under the source.

On real text (``data.source=<file|folder|hf:dataset>``) there is no exact source: the Data and oracle
rows are left out, MAUVE compares MiniLM features with texts of ``eval.reference`` (default: the corpus
itself) and GenPPL needs ``eval.judge=`` (an AR run or an HF causal LM). ``plan`` prints every phase's
training config and the grid's rows and budgets, and writes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch  # noqa: F401  -- before mauve/faiss (OpenMP clash in the other order)

from dsl.cli import Job, Mode, main
from dsl.config import JobConfig


def settle(cfg: JobConfig, mode: str, named: frozenset[str]) -> None:
    """Real text has no exact source: MAUVE on MiniLM features unless the command line names a featurizer.
    A named evaluation protocol (preset=paper: Table 1's) fixes its settings where the line is silent."""
    from dsl.service.reproduce import exact

    if not exact(cfg) and cfg.eval.featurizer == "source-stats" and "eval.featurizer" not in named:
        cfg.eval.featurizer = "minilm"
    if cfg.eval.protocol != "none":
        from dsl.eval.paper_protocol import PaperTable1

        PaperTable1().apply(cfg.eval, {k.removeprefix("eval.") for k in named if k.startswith("eval.")})


def check(cfg: JobConfig) -> None:
    """Inputs before anything is written: the output directory, a start for the fine-tunes, a featurizer
    that can read the source."""
    from dsl.errors import UserError
    from dsl.outputs import output_dir
    from dsl.service.reproduce import exact

    if not cfg.out:
        raise UserError("out='' : give out=<directory> (the study's checkpoints, MLflow store and report)")
    output_dir(cfg.out)
    if cfg.reproduce.pretrain_steps == 0 and cfg.init == "scratch":
        raise UserError("reproduce.pretrain_steps=0 needs init=<the pretrained MDLM> (e.g. hf:kuleshov-group/mdlm-owt)")
    if not exact(cfg):
        if cfg.eval.featurizer == "source-stats":
            raise UserError(f"eval.featurizer=source-stats reads an exact source, not data.source={cfg.data.source}; "
                            f"use eval.featurizer=minilm")
        if "://" not in cfg.data.source and not cfg.data.source.startswith("hf:") and not Path(cfg.data.source).exists():
            raise UserError(f"data.source={cfg.data.source}: no such file or folder (a synthetic language: hmm, "
                            f"cyclic, topics; real text: a .txt/.jsonl/.parquet file or folder, hf:<dataset>)")


def plan(cfg: JobConfig) -> dict:
    """Every phase's training config and the grid's cells, as the run would use them (nothing written)."""
    from dataclasses import asdict

    from dsl.reproduce import StudySize, run_config
    from dsl.service.reproduce import grid_job, study_spec

    size = StudySize("cli", cfg)
    rc = cfg.reproduce
    runs = f"{cfg.out}/runs"
    phases = {}
    init = cfg.init
    if rc.pretrain_steps > 0:
        phases["pretrain"] = asdict(run_config(size, "mdlm", "pretrain", runs, steps=rc.pretrain_steps,
                                               lr=rc.pretrain_lr, seed=cfg.seed))
        init = f"{runs}/pretrain (its latest complete checkpoint)"
    for objective in ("mdlm", "dsl"):
        phases[f"{objective}-ft"] = asdict(run_config(size, objective, f"{objective}-ft", runs, init=init,
                                                      steps=rc.finetune_steps, lr=rc.finetune_lr, seed=cfg.seed))
    spec = study_spec(cfg)
    job = grid_job(cfg, {"mdlm-ft": f"{runs}/mdlm-ft", "dsl-ft": f"{runs}/dsl-ft"})
    ev = job.eval
    return {"phases": phases, "rows": [asdict(r) for r in spec.rows], "steps": spec.budgets(cfg.model.length),
            "samples_per_cell": job.sampling.num_samples, "protocol": ev.protocol, "judge": ev.judge,
            "featurizer": ev.featurizer, "reference": ev.reference, "tracking_uri": job.service.tracking_uri,
            "out": cfg.out}


def run(cfg: JobConfig) -> dict:
    from dsl.service.reproduce import run_reproduction

    return run_reproduction(cfg)


JOB = Job(
    script="jobs/reproduce.py", doc=__doc__,
    modes={"run": Mode(run, "pretrain → fine-tune (MDLM, DSL) → grid → report (the default)", check=check,
                       defaults=("preset=default",)),
           "plan": Mode(plan, "print every phase's config and the grid's rows and budgets; run nothing, write nothing",
                        defaults=("preset=default",))},
    uses=("experiment", "seed", "init", "out", "progress", "model", "channel", "mdlm", "data", "train.batch_size",
          "train.ema", "train.ckpt_every", "train.precision", "sampling.num_samples", "sampling.batch_size",
          "sampling.gamma_vis", "sampling.top_p", "eval.protocol", "eval.featurizer", "eval.mauve_seeds",
          "eval.reference", "eval.judge", "eval.workers", "table.mauve_resamples", "table.workers", "reproduce",
          "service.tracking_uri", "service.ray_address", "service.device"),
    settle=settle,
    presets="reproduce",
)

if __name__ == "__main__":
    sys.exit(main(JOB))
