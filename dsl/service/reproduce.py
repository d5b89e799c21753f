"""``jobs/reproduce.py``'s run: the study's trainings (:mod:`dsl.reproduce`), its cells through the Table 1
grid (:func:`dsl.service.grid.run_grid`: one MLflow child run per row × T under one grid run), and the
comparison report (``dashboards/report.py``) read back from those runs.

The MLflow store defaults to ``<out>/mlflow.db``, so one ``out=`` holds the whole study: checkpoints
(``runs/``), the store, the report. Re-running the command resumes every phase: finished trainings are
read back and the grid (named by its spec, models and settings) skips the cells already complete.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dsl.config import JobConfig
from dsl.service import lineage as L

DATA_LABEL = "Data (exact samples)"
ORACLE_LABEL = "Exact oracle + MDLM sampler"
STUDY_CSV, STUDY_MD = "study.csv", "study.md"
STUDY_FIELDS = ("row", "steps", "n_samples", "nll_per_token", "nll_se", "nll_gap", "genppl", "impossible",
                "impossible_share", "mauve", "mauve_std", "mauve_std_resamples", "sentence_entropy",
                "nfe", "rewrites_per_token", "eta_cap")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def exact(cfg: JobConfig) -> bool:
    """Whether the study's language is a synthetic source with exact likelihoods and samples."""
    from dsl.sources import SOURCE_NAMES

    return cfg.data.source in SOURCE_NAMES


def tracking_uri(cfg: JobConfig) -> str:
    return cfg.service.tracking_uri or f"sqlite:///{(Path(cfg.out) / 'mlflow.db').resolve()}"


def study_spec(cfg: JobConfig) -> Any:
    """The grid of the study: Table 1's rows (``dsl/config/presets/grid/table1.toml``, T = L/8 … L) with the
    loop row's η_cap(T) for this L (``reproduce.eta_cap``), after the reference rows Data and the exact
    oracle with the MDLM sampler when the source is exact."""
    from dsl.reproduce import eta_cap_table
    from dsl.service.grid_spec import DATA_ROW, GridRow, GridSpec, load_spec

    table1 = load_spec("table1")
    eta = eta_cap_table(cfg.model.length, table1.budgets(cfg.model.length), cfg.reproduce.eta_cap)
    rows = [replace(r, eta_cap_table=eta) if r.sampler == "dsl-budget" else r for r in table1.rows]
    if exact(cfg):
        rows = [GridRow(DATA_LABEL, DATA_ROW), GridRow(ORACLE_LABEL, f"oracle:{cfg.data.source}", "mdlm"), *rows]
    return GridSpec(name="reproduce", rows=tuple(rows), steps_per_length=table1.steps_per_length,
                    description="the small-scale Table 1 of jobs/reproduce.py")


def grid_job(cfg: JobConfig, dirs: dict[str, str]) -> JobConfig:
    """The grid's settings: the two fine-tunes as the rows' models, L, the study's samples and seeds; on an
    exact source the source judges (exact NLL) and draws the MAUVE references."""
    job = copy.deepcopy(cfg)
    job.table.models = f"mdlm={dirs['mdlm-ft']},dsl={dirs['dsl-ft']}"
    job.sampling.length = cfg.model.length
    job.service.mlflow, job.service.tracking_uri = "on", tracking_uri(cfg)
    if exact(cfg):
        job.eval.judge, job.eval.reference = f"oracle:{cfg.data.source}", "source"
    elif not job.eval.reference:
        job.eval.reference = cfg.data.source   # texts of the training corpus itself
    return job


def cell_records(client: Any, cell_runs: dict[str, str]) -> list[dict[str, Any]]:
    """The grid's cells as the study's table reads them, from their MLflow runs."""
    out = []
    for run_id in cell_runs.values():
        run = client.get_run(run_id)
        tags, m = run.data.tags, run.data.metrics
        out.append({"row": tags[L.ROW], "steps": int(tags[L.STEPS]),
                    "model": "data" if tags.get(L.SAMPLER) == "data" else tags.get(L.CHECKPOINT, ""),
                    "n_samples": int(m.get(L.NUM_SAMPLES_METRIC, 0)), "nll_per_token": m.get("nll_per_token"),
                    "nll_se": m.get("nll_se"), "genppl": m.get(L.GENPPL), "impossible": int(m.get("impossible", 0)),
                    "impossible_share": m.get(L.GENPPL_IMPOSSIBLE_SHARE), "mauve": m.get(L.MAUVE),
                    "mauve_std": m.get(L.MAUVE_STD), "mauve_std_resamples": m.get("mauve_std_resamples"),
                    "sentence_entropy": m.get(L.SENTENCE_ENTROPY), "nfe": m.get(L.NFE),
                    "rewrites_per_token": m.get(L.REWRITES_PER_TOKEN), "eta_cap": m.get(L.ETA_CAP)})
    return out


def impossible_lines(cells: Sequence[dict]) -> list[str]:
    """One line per cell with samples the exact source gives probability 0: their count and share."""
    return [f"{c['row']} T={c['steps']}: {c['impossible']} of {c['n_samples']} samples impossible under the source "
            f"({c['impossible'] / c['n_samples']:.0%})" + ("; GenPPL undefined" if c["impossible"] == c["n_samples"]
                                                          else "")
            for c in cells if c.get("impossible")]


def study_rows(cells: Sequence[dict]) -> list[dict[str, Any]]:
    """One record of ``STUDY_FIELDS`` per cell, with ``nll_gap`` = its NLL per token − the Data row's (the
    source's entropy rate as measured on exact samples; NaN without a Data row)."""
    data = [c for c in cells if c["model"] == "data"]
    floor = data[0]["nll_per_token"] if data else math.nan
    return [{k: (c["nll_per_token"] - floor if k == "nll_gap" else c.get(k)) for k in STUDY_FIELDS} for c in cells]


def study_markdown(cells: Sequence[dict]) -> str:
    """Table 1's shape: a line per row, a column per T; each entry NLL/token ± SE / MAUVE ± std / sentence
    entropy. The Data row (drawn once, at T = L) fills every column."""
    from dsl.report.formatting import markdown_table

    recs = study_rows(cells)
    budgets = sorted({r["steps"] for r in recs if not r["row"].startswith("Data")})
    lines = []
    for name in dict.fromkeys(r["row"] for r in recs):
        mine = {r["steps"]: r for r in recs if r["row"] == name}
        entries = []
        for t in budgets:
            r = mine.get(t) or (next(iter(mine.values())) if name.startswith("Data") else None)
            entries.append("–" if r is None else
                           f"{r['nll_per_token']:.3f} ± {r['nll_se']:.3f} / {r['mauve']:.2f} ± "
                           f"{max(r['mauve_std'], r['mauve_std_resamples'] or 0):.2f} / {r['sentence_entropy']:.2f}")
        lines.append([name, *entries])
    return markdown_table(["row", *(f"T={t}" for t in budgets)], lines)


def write_study(cells: Sequence[dict], out: Path, n: int) -> list[str]:
    """``study.csv``/``study.md``: exact NLL per token ± standard error over samples per cell (and its gap
    to the Data row), MAUVE ± std, sentence entropy, impossible count and share."""
    from dsl.report.formatting import to_csv

    scored = [c for c in cells if c["nll_per_token"] is not None and math.isfinite(c["nll_per_token"])]
    if not scored:
        return []
    (out / STUDY_CSV).write_text(to_csv(study_rows(cells), STUDY_FIELDS))
    (out / STUDY_MD).write_text(f"Per cell: exact NLL per token of the samples under the source ± standard error "
                                f"over {n} samples / MAUVE ± max(std over k-means seeds, std over bootstrap "
                                f"resamples) / sentence entropy\n\n" + study_markdown(scored))
    return [STUDY_CSV, STUDY_MD]


def run_reproduction(cfg: JobConfig) -> dict:
    """pretrain → mdlm-ft + dsl-ft → the grid (MLflow) → the report; the run's summary."""
    from dsl.cli import load_job, parse
    from dsl.reproduce import StudySize, train_models
    from dsl.service.grid import run_grid
    from dsl.service.grid_results import open_store

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg)
    client = open_store(uri, create=True)   # one line before any training when the store cannot be used
    t0 = time.perf_counter()
    dirs = train_models(StudySize("cli", cfg), out, seed=cfg.seed, log=_log)
    t_train = time.perf_counter() - t0
    _log("[grid] every row x T sampled and scored, one MLflow run per cell")
    grid = run_grid(grid_job(cfg, dirs), study_spec(cfg), log=_log)
    t_grid = time.perf_counter() - t0 - t_train
    _log(f"[report] grid run {grid['grid_run_id']} read back from {grid['tracking_uri']}")
    report_job = load_job("dashboards/report.py")
    mode, report_cfg = parse(report_job, ["report", f"grid={grid['grid_run_id']}", f"out={out}",
                                          f"service.tracking_uri={uri}", f"experiment={cfg.experiment}"])
    report = report_job.modes[mode].run(report_cfg)
    cells = cell_records(client, grid["cell_runs"])
    study = write_study(cells, out, cfg.sampling.num_samples)
    lines = impossible_lines(cells)
    for line in lines:
        _log(line)
    return {"out": str(out), "report": report["report"], "table1": str(out / "table1.csv"),
            "study": [str(out / f) for f in study], "grid_run_id": grid["grid_run_id"], "grid": grid["grid_name"],
            "tracking_uri": grid["tracking_uri"], "runs": dirs, "cells": grid["cells"],
            "samples_per_cell": cfg.sampling.num_samples, "impossible": lines,
            "train_wall_s": round(t_train, 1), "grid_wall_s": round(t_grid, 1),
            "total_wall_s": round(time.perf_counter() - t0, 1)}


__all__ = ["STUDY_FIELDS", "study_spec", "grid_job", "cell_records", "impossible_lines", "study_rows", "study_markdown",
           "write_study", "run_reproduction"]
