"""The small-scale Table 1's science: its sizes, the η_cap(T) of its loop row, and its training phases.

The paper's Table 1 (Sec 6.2) compares samplers and fine-tunes of one MDLM checkpoint at step budgets
T = L/8 … L. At CPU scale on real text every cell sits at MAUVE's floor, so the study runs on the
sticky-topic language (:mod:`dsl.sources.topics`): full support, exact -log P of every sample, exact
reference samples, and a structure (a topic shared by the whole sequence) that parallel decoding breaks.

Training (each phase resumable: a finished phase is read back, a half-finished one resumes from its last
checkpoint):

1. ``pretrain``: MDLM from scratch on the language;
2. from that ONE checkpoint, with equal budgets (steps, batch, LR): ``mdlm-ft`` continues the MDLM
   objective, ``dsl-ft`` fine-tunes with the DSL objective (Sec 6.1; App C.1: no warm-up).

The cells (Table 1's rows, ``dsl/config/presets/grid/table1.toml``, at every T, after the reference rows
Data and the exact oracle with the ``mdlm`` sampler) are sampled and scored by the grid
(:func:`dsl.service.grid.run_grid`, one MLflow run per cell), driven by :mod:`dsl.service.reproduce`;
their metrics are :mod:`dsl.eval.cells`'. The featurizer is ``source-stats``
(:class:`dsl.eval.cells.SourceStatsFeaturizer`) by default: MiniLM (mean-pooled layer 3, which sees order
in English) is nearly blind to order on this language's made-up words: 192 vs 192 samples at L = 64,
3 seeds, MAUVE of exact samples / of the same samples word-shuffled / of exact-oracle ``mdlm`` samples at
T = L/8 was 0.96 / 0.91 / 0.42 with MiniLM and 0.93 / 0.30 / 0.43 with ``source-stats``.

η_cap(T) for ``dsl-budget``: the paper's values are for L = 1024 and hold the mean rewrites per token
near Table 5's (rewrites ≈ ½T·η·α_on in the loop window). At L ≪ 1024 the same η would rewrite almost
nothing, so the default table scales the budget: η_mini(T) = η_eq24(T·1024/L)·1024/L, which gives the
same rewrites per token at the same T/L as the paper (``eta_cap="paper-rewrites"``; at L = 64 it gives
0.16, 0.128, 0.112, 0.064; Table 5's 1.85 rewrites per token at T = L is met, while at T = L/8 the
coarse grid and η above (1 − α_on)/α_on saturate the loop's unmasking and rewrites fall short of 0.58,
see the measured ``rewrites_per_token``); ``"sec6.1"`` etc. take the paper's numbers as printed.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dsl.config import JobConfig, RunConfig
from dsl.errors import UserError

# ----------------------------------------------------------------------------------------------
# Sizes and η_cap(T).


@dataclass(frozen=True)
class StudySize:
    """The trainings of the study: a parsed ``jobs/reproduce.py`` config (its model, channel, data and
    train sections, ``reproduce.*``); the grid reads its sampling and scoring settings from the same config."""

    name: str
    config: JobConfig

    @property
    def length(self) -> int:
        return self.config.model.length

    @property
    def pretrain_steps(self) -> int:
        return self.config.reproduce.pretrain_steps

    @property
    def finetune_steps(self) -> int:
        return self.config.reproduce.finetune_steps

    @property
    def batch_size(self) -> int:
        return self.config.train.batch_size


def eta_cap_table(length: int, budgets: Sequence[int], spec: str = "paper-rewrites") -> str:
    """The ``sampling.eta_cap_table`` value for the step budgets of a grid at this L (see the module docstring)."""
    from dsl.sampling.schedules import PAPER_LENGTH, load_eta_cap

    if spec != "paper-rewrites":
        return spec
    scale = PAPER_LENGTH / length
    paper = load_eta_cap("eq24")  # the table that reproduces Table 5's rewrite counts
    table = {str(t): paper(round(t * scale)) * scale for t in budgets}
    return json.dumps({"table": table}, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Training.


def run_config(size: StudySize, objective: str, name: str, out: str | Path, *, steps: int, lr: float,
               init: str = "scratch", data: Sequence[str] = (), seed: int = 0) -> RunConfig:
    """The RunConfig of one training phase: the study's model, channel, data and train sections with this
    phase's objective, init, steps and learning rate (``data``: further ``key=value`` overrides, e.g.
    ``data.source=...``). No warm-up (App C.1); validation and checkpoints every ``train.ckpt_every``."""
    from dsl.config import run_config_of, set_key, validate

    job = copy.deepcopy(size.config)
    job.objective, job.name, job.out, job.init, job.seed = objective, name, str(out), init, seed
    job.train.steps, job.train.lr, job.train.warmup_steps = steps, lr, 0
    job.train.eval_every = job.train.ckpt_every
    job.train.eval_batches, job.train.log_every = 2, 50
    for word in data:
        key, _, raw = word.partition("=")
        set_key(job, key, raw)
    run = run_config_of(job)
    validate(run)
    return run


def train_phase(cfg: RunConfig, on_metrics: Callable[[dict, int], None] | None = None) -> str:
    """Train ``cfg`` to its ``train.steps`` (resuming from its last checkpoint); return the run directory."""
    from dsl.train import Trainer

    trainer = Trainer(cfg, on_metrics=on_metrics)
    trainer.resume()
    if trainer.step_count < cfg.train.steps:
        trainer.fit()
    return str(Path(cfg.out_dir) / trainer.name)


def train_models(size: StudySize, out: str | Path, *, data: Sequence[str] = (), seed: int = 0,
                 log: Callable[[str], None] = print) -> dict[str, str]:
    """Pretrain (unless ``reproduce.pretrain_steps=0``: then ``init`` is the pretrained MDLM), then continue
    MDLM and DSL-fine-tune from that one checkpoint with equal budgets: ``{phase: run dir or init}``."""
    from dsl.checkpoint import latest_complete

    runs = Path(out) / "runs"
    rc = size.config.reproduce
    t0 = time.perf_counter()
    if size.pretrain_steps > 0:
        pre = run_config(size, "mdlm", "pretrain", runs, steps=size.pretrain_steps, lr=rc.pretrain_lr,
                         data=data, seed=seed)
        log(f"[1/3] pretrain MDLM: {size.pretrain_steps} steps x {size.batch_size} x L={size.length}")
        pre_dir = train_phase(pre)
        init = latest_complete(pre_dir)
        if init is None:
            raise UserError(f"{pre_dir}: pretraining left no complete checkpoint")
        dirs = {"pretrain": pre_dir}
    else:
        init = size.config.init
        log(f"[1/3] pretrained MDLM: init={init} (reproduce.pretrain_steps=0)")
        dirs = {"pretrain": init}
    for k, objective in enumerate(("mdlm", "dsl"), start=2):
        name = f"{objective}-ft"
        cfg = run_config(size, objective, name, runs, steps=size.finetune_steps, lr=rc.finetune_lr,
                         init=init, data=data, seed=seed)
        log(f"[{k}/3] {objective} fine-tune from {init}: {size.finetune_steps} steps")
        dirs[name] = train_phase(cfg)
    log(f"training done in {time.perf_counter() - t0:.0f} s")
    return dirs


__all__ = ["StudySize", "eta_cap_table", "run_config", "train_phase", "train_models"]
