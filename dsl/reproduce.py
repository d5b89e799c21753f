"""The small-scale Table 1: pretrain an MDLM on an exact language, fine-tune it two ways, decode it five ways.

The paper's Table 1 (Sec 6.2) compares samplers and fine-tunes of one MDLM checkpoint at step budgets
T = L/8 … L. At CPU scale on real text every cell sits at MAUVE's floor, so this study runs on the
sticky-topic language (:mod:`dsl.sources.topics`): full support, exact -log P of every sample, exact
reference samples, and a structure (a topic shared by the whole sequence) that parallel decoding breaks.

Pipeline (each phase is resumable: a finished phase is read back, a half-finished training resumes
from its last checkpoint, a finished cell is never recomputed):

1. ``pretrain``: MDLM from scratch on the language;
2. from that ONE checkpoint, with equal budgets (steps, batch, LR): ``mdlm-ft`` continues the MDLM
   objective, ``dsl-ft`` fine-tunes with the DSL objective (Sec 6.1; App C.1: no warm-up);
3. cells: every row × T ∈ {L/8, L/4, L/2, L}; each draws ``n_samples`` sequences and scores them.

Rows (``TABLE1_ROWS``, Sec 6.1 decoding protocols): MDLM (``mdlm``), ReMDM (``remdm-official``),
DSL-FT + ReMDM (``remdm-official``), DSL-FT + ReMDM-loop η_cap(T) (``dsl-budget``), and DSL-FT with the
plain ``mdlm`` sampler (separates the model from the sampler). Reference rows: "Data" (a second set of
exact samples: the ceiling and the noise floor of every metric) and the exact oracle with the ``mdlm``
sampler (the error of factorised parallel decoding itself, with a perfect denoiser).

Metrics per cell, primary first:

* exact NLL per token of the samples under the true source, mean ± standard error over samples
  (GenPPL = exp of the pooled NLL per token), and its gap to the source's entropy rate (the Data row);
  the count and share of samples impossible under the source (0 by construction: full support);
* MAUVE against exact reference samples, ± its std over k-means seeds and, separately, over bootstrap
  resamples of the samples (the sampling noise of MAUVE at this n). Featurizer: ``source-stats``
  (:class:`SourceStatsFeaturizer`) by default. MiniLM (mean-pooled layer 3, which sees order in English)
  is nearly blind to order on this language's made-up words: 192 vs 192 samples at L = 64, 3 seeds,
  MAUVE of exact samples / of the same samples word-shuffled / of exact-oracle ``mdlm`` samples at
  T = L/8 was 0.96 / 0.91 / 0.42 with MiniLM and 0.93 / 0.30 / 0.43 with ``source-stats``;
* sentence entropy, NFE, rewrites per token (eq. 25), the η_cap used.

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
import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsl.atomic import write_json_atomic
from dsl.config import JobConfig, RunConfig, SamplingConfig, load
from dsl.errors import UserError
from dsl.eval.cells import SourceStatsFeaturizer, mauve_with_errors, nll_stats  # the grid's cell computation

PAPER_LENGTH = 1024  # Table 1's L (Sec 6.1)


# ----------------------------------------------------------------------------------------------
# Sizes and rows.


@dataclass(frozen=True)
class StudySize:
    """Everything that sets the cost of the study: a parsed ``jobs/reproduce.py`` config (its model,
    channel, data and train sections, ``reproduce.*``, and the grid's ``sampling.num_samples``,
    ``sampling.batch_size``, ``eval.mauve_seeds``, ``table.mauve_resamples``)."""

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

    @property
    def n_samples(self) -> int:
        return self.config.sampling.num_samples

    @property
    def sample_batch(self) -> int:
        return self.config.sampling.batch_size

    @property
    def mauve_seeds(self) -> tuple[int, ...]:
        return tuple(self.config.eval.mauve_seeds)

    @property
    def mauve_resamples(self) -> int:
        return self.config.table.mauve_resamples


PRESETS_FOLDER = "reproduce"  # dsl/config/presets/reproduce/<name>.toml: jobs/reproduce.py preset=<name>


def study_size(preset: str, overrides: Sequence[str] = ()) -> StudySize:
    """The study of ``preset`` (micro | smoke | default | paper), with ``key=value`` overrides."""
    from dsl.config import run_presets
    from dsl.config.parse import load as load_config

    cfg = load_config(JobConfig, [f"preset={preset}", *overrides], presets=run_presets(PRESETS_FOLDER))
    return StudySize(preset, cfg)


class _Sizes(dict):
    """``SIZES[name]``: the study of a preset, read from its TOML file on first use."""

    def __missing__(self, name: str) -> StudySize:
        self[name] = study_size(name)
        return self[name]


SIZES: dict[str, StudySize] = _Sizes()


@dataclass(frozen=True)
class Row:
    """A Table 1 row: which model (``mdlm`` = the continued MDLM, ``dsl`` = the DSL fine-tune, ``oracle``
    = the exact source, ``data`` = exact samples) decoded with which sampler."""

    name: str
    model: str
    sampler: str = ""

    @property
    def slug(self) -> str:
        keep = "".join(c.lower() if c.isalnum() else "-" for c in self.name)
        return "-".join(p for p in keep.split("-") if p)


TABLE1_ROWS = (
    Row("MDLM", "mdlm", "mdlm"),
    Row("ReMDM", "mdlm", "remdm-official"),
    Row("DSL-FT + ReMDM", "dsl", "remdm-official"),
    Row("DSL-FT + ReMDM-loop (eta_cap(T))", "dsl", "dsl-budget"),
    Row("DSL-FT + MDLM sampler", "dsl", "mdlm"),
)
REFERENCE_ROWS = (
    Row("Data (exact samples)", "data"),
    Row("Exact oracle + MDLM sampler", "oracle", "mdlm"),
)


def step_budgets(length: int) -> list[int]:
    """T ∈ {L/8, L/4, L/2, L} (Table 1's 128…1024 at L = 1024), at least 1 step each."""
    return sorted({max(1, length // 8), max(1, length // 4), max(1, length // 2), length})


def eta_cap_table(length: int, spec: str = "paper-rewrites") -> str:
    """The ``sampling.eta_cap_table`` value for this study's step budgets (see the module docstring)."""
    from dsl.sampling.schedules import load_eta_cap

    if spec != "paper-rewrites":
        return spec
    scale = PAPER_LENGTH / length
    paper = load_eta_cap("eq24")  # the table that reproduces Table 5's rewrite counts
    table = {str(t): paper(round(t * scale)) * scale for t in step_budgets(length)}
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


# ----------------------------------------------------------------------------------------------
# Scoring.


def scorer_job(size: StudySize, featurizer: str, source_name: str, data: Any, seed: int) -> Any:
    """The grid settings this study scores its cells with: the exact source as judge and as the reference
    sampler, ``featurizer`` (``source-stats`` or a text featurizer on the decoded ids), the study's seeds."""
    from dsl.config import JobConfig

    job = JobConfig()
    job.seed = seed
    job.data = copy.deepcopy(data)
    job.sampling.num_samples = size.n_samples
    job.eval.judge = f"oracle:{source_name}"
    job.eval.featurizer = featurizer
    job.eval.reference = "source"
    job.eval.feature_cache = ""
    job.eval.mauve_seeds = tuple(size.mauve_seeds)
    job.table.mauve_resamples = size.mauve_resamples
    return job


# ----------------------------------------------------------------------------------------------
# Cells.


def sampling_config(row: Row, steps: int, size: StudySize, eta_cap: str) -> SamplingConfig:
    return load(SamplingConfig, [f"sampler={row.sampler}", f"steps={steps}", f"batch_size={size.sample_batch}",
                                 f"eta_cap_table={eta_cap}"])


def run_cells(source: Any, denoisers: dict[str, Any], size: StudySize, out: str | Path, *,
              rows: Sequence[Row] = REFERENCE_ROWS + TABLE1_ROWS, featurizer: str = "source-stats",
              eta_cap: str = "paper-rewrites", seed: int = 0, data: Any = None, log: Callable[[str], None] = print
              ) -> list[dict[str, Any]]:
    """Sample and score every row × T (skipping cells already on disk) with the grid's cell computation
    (:func:`dsl.service.grid_scoring.cell_result`); return one dict per cell. ``data``: the source's ``data.*``."""
    from dsl.config import DataConfig
    from dsl.sampling import generate
    from dsl.service.grid_scoring import GridScorer, batch_draw, cell_result, data_draw

    out = Path(out)
    data = data if data is not None else DataConfig(source="topics")
    scorer = GridScorer(scorer_job(size, featurizer, data.source, data, seed), source.length, source=source)
    eta_table = eta_cap_table(source.length, eta_cap)
    cells = []
    try:
        for row in rows:
            for steps in (step_budgets(source.length) if row.model != "data" else [source.length]):
                path = out / "cells" / row.slug / f"T{steps}.json"
                if path.is_file():
                    cells.append(json.loads(path.read_text()))
                    continue
                t0 = time.perf_counter()
                if row.model == "data":
                    draw = data_draw(scorer, size.n_samples)
                else:
                    cfg = sampling_config(row, steps, size, eta_table)
                    batch = generate(denoisers[row.model], cfg, size.n_samples, source.length, seed)
                    draw = batch_draw(batch, source.decode) | {"rule": batch.settings["resolved"]}
                result = cell_result(draw, scorer)
                cell = {"row": row.name, "model": row.model, "sampler": row.sampler, "steps": steps, **result,
                        **({"rule": draw["rule"]} if "rule" in draw else {}), "featurizer": featurizer,
                        "wall_s": time.perf_counter() - t0, "examples": draw["texts"][:3],
                        "ids": draw["ids"].tolist()}
                write_json_atomic(path, cell)
                log(f"{row.name:34s} T={steps:4d}  NLL/tok {cell['nll_per_token']:.3f} ± {cell['nll_se']:.3f}  "
                    f"MAUVE {cell['mauve']:.3f} ± {cell['mauve_std']:.3f}  ({cell['wall_s']:.0f} s)")
                cells.append(cell)
    finally:
        scorer.close()
    return cells


def load_cells(out: str | Path) -> list[dict[str, Any]]:
    """The cells already written under ``out/cells`` (a study in progress or finished), in row order."""
    order = {row.slug: k for k, row in enumerate(REFERENCE_ROWS + TABLE1_ROWS)}
    paths = sorted(Path(out).glob("cells/*/T*.json"),
                   key=lambda p: (order.get(p.parent.name, len(order)), p.parent.name, int(p.stem[1:])))
    return [json.loads(p.read_text()) for p in paths]


# ----------------------------------------------------------------------------------------------
# Tables.

TABLE_FIELDS = ("row", "steps", "n_samples", "nll_per_token", "nll_se", "nll_gap", "genppl", "impossible",
                "impossible_share", "mauve", "mauve_std", "mauve_std_resamples", "sentence_entropy",
                "nfe", "rewrites_per_token", "eta_cap")


def table_rows(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat record per cell with ``nll_gap`` = NLL − the Data row's NLL (the source's entropy rate
    estimate); ids and examples dropped."""
    data = [c for c in cells if c["model"] == "data"]
    floor = data[0]["nll_per_token"] if data else math.nan
    return [{k: (c["nll_per_token"] - floor if k == "nll_gap" else c.get(k)) for k in TABLE_FIELDS}
            for c in cells]


def to_csv(cells: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TABLE_FIELDS)
    writer.writeheader()
    for r in table_rows(cells):
        writer.writerow(r)
    return buf.getvalue()


def to_markdown(cells: Sequence[dict[str, Any]]) -> str:
    """Table 1's shape: a row per method, a column per T; each entry NLL/token ± SE | MAUVE ± std."""
    recs = table_rows(cells)
    budgets = sorted({r["steps"] for r in recs if r["row"] and not r["row"].startswith("Data")})
    names = list(dict.fromkeys(r["row"] for r in recs))
    lines = ["| row | " + " | ".join(f"T={t}" for t in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for name in names:
        mine = {r["steps"]: r for r in recs if r["row"] == name}
        entries = []
        for t in budgets:
            r = mine.get(t) or (next(iter(mine.values())) if name.startswith("Data") else None)
            entries.append("–" if r is None else
                           f"{r['nll_per_token']:.3f} ± {r['nll_se']:.3f} / {r['mauve']:.2f} ± "
                           f"{max(r['mauve_std'], r['mauve_std_resamples'] or 0):.2f} / "
                           f"{r['sentence_entropy']:.2f}")
        lines.append(f"| {name} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The study.


def load_denoisers(dirs: dict[str, str], source: Any, gamma_vis: float = 50.0) -> dict[str, Any]:
    """``{"mdlm": continued MDLM, "dsl": DSL fine-tune, "oracle": the exact source}`` as denoisers."""
    from dsl.models.loading import load_run
    from dsl.sampling import DSLDenoiser, MDLMDenoiser, OracleDenoiser

    _, mdlm, tok, _ = load_run(dirs["mdlm-ft"])
    _, dsl, _, _ = load_run(dirs["dsl-ft"])
    return {"mdlm": MDLMDenoiser(mdlm, tok), "dsl": DSLDenoiser(dsl, gamma_vis, tok), "oracle": OracleDenoiser(source)}


def run_study(size: str | StudySize, out: str | Path, *, data: Sequence[str] = (), featurizer: str = "source-stats",
              eta_cap: str = "paper-rewrites", rows: Sequence[Row] = REFERENCE_ROWS + TABLE1_ROWS, seed: int = 0,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) and run every cell; write ``table1.json``, ``table1.csv``, ``table1.md`` in ``out``."""
    from dsl.sources import build_source

    size = SIZES[size] if isinstance(size, str) else size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = train_models(size, out, data=data, seed=seed, log=log)
    t_train = time.perf_counter() - t0
    data_cfg = copy.deepcopy(run_config(size, "mdlm", "x", out, steps=1, lr=1e-3, data=data).data)
    source = build_source(data_cfg.source, data_cfg, size.length)
    cells = run_cells(source, load_denoisers(dirs, source), size, out, rows=rows, featurizer=featurizer,
                      eta_cap=eta_cap, seed=seed, data=data_cfg, log=log)
    summary = {"size": asdict(size), "data": asdict(data_cfg), "featurizer": featurizer,
               "eta_cap_table": eta_cap_table(size.length, eta_cap), "runs": dirs,
               "train_wall_s": t_train, "total_wall_s": time.perf_counter() - t0,
               "table": table_rows(cells)}
    write_json_atomic(out / "table1.json", summary)
    (out / "table1.csv").write_text(to_csv(cells))
    (out / "table1.md").write_text(to_markdown(cells))
    return summary


__all__ = ["StudySize", "SIZES", "PRESETS_FOLDER", "study_size", "Row", "TABLE1_ROWS", "REFERENCE_ROWS",
           "step_budgets", "eta_cap_table", "run_config", "train_phase", "train_models", "nll_stats",
           "SourceStatsFeaturizer", "scorer_job", "mauve_with_errors", "run_cells", "load_cells", "table_rows", "to_csv",
           "to_markdown", "load_denoisers", "run_study"]
