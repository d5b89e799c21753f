"""The comparison report of a Table 1 grid: our cells beside the paper's numbers, from MLflow.

    python dashboards/report.py grid=<grid parent run id | experiment name | grid name> out=<dir> \\
        [report.fig2=smallest|all|none|128,1024] [report.match=fraction|steps] [report.log_artifacts=false] \\
        [service.tracking_uri=<http://host:port | sqlite:///mlflow.db | postgresql://...>]
    python dashboards/report.py import-paper [experiment=paper-reference] [service.tracking_uri=...]

``report`` reads the grid's parent run and its cell runs (any tracking URI: service.tracking_uri, else
MLFLOW_TRACKING_URI, else ./mlflow.db) and writes into ``out`` (default runs/report-<grid name>):
``report.html`` — one self-contained page (figures embedded; opens from disk with no server or network)
with Table 1 (our rows beside the paper's for every T, the differences, the protocol of every number),
the plots (MAUVE vs T, MAUVE vs NFE, GenPPL vs sentence entropy, the paper's points in the same axes),
Table 5 (rewrites per token, the η_cap tables used), Table 6 (sharpness checkpoints), Table 3 (bits per
character, when likelihood runs of the grid's checkpoints exist) and the Fig 2 panels of chosen cells;
``table1.csv`` (one line per row × T: MAUVE, its std, GenPPL, sentence entropy, NFE, rewrites per token,
and the paper's values where a row meets one) and the CSV and Markdown of every table; ``plots/*.png``.
The files are logged as artifacts of the grid run under ``report/``.

``import-paper`` writes the paper's Table 1 and Table 3 rows into their own MLflow experiment, one run
per row and T (tagged dsl.kind=paper-reference), so the MLflow UI compares ours and the paper's in one
chart; re-importing changes nothing that is already there.
"""

from __future__ import annotations

import os
import sys
import tempfile

from dsl.cli import Job, Mode, main
from dsl.config import ConfigError, JobConfig
from dsl.errors import UserError, one_line
from dsl.outputs import RUNS_ROOT, output_dir


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return "-".join(p for p in keep.split("-") if p) or "grid"


def check_report(cfg: JobConfig) -> None:
    if not cfg.report.grid.strip():
        raise ConfigError("report.grid='' : give grid=<grid parent run id | experiment name | grid name>")
    if cfg.out:
        output_dir(cfg.out)


def run_report(cfg: JobConfig) -> dict:
    from dsl.redact import scrub
    from dsl.report import fig2_cells, write_report
    from dsl.service import grid_results as results
    from dsl.service.tracking import ui_command

    uri = results.report_tracking_uri(cfg.service.tracking_uri)
    client = results.open_store(uri)
    run, other_grids = results.find_grid(client, cfg.report.grid)
    grid = results.grid_info(client, run, uri)
    cells, counts = results.read_cells(client, grid)
    if not cells:
        raise UserError(f"grid={cfg.report.grid}: grid run {grid.run_id} has no cell runs yet "
                        f"(jobs/grid.py logs one per row and T as it finishes them)")
    out = str(output_dir(cfg.out or os.path.join(RUNS_ROOT, f"report-{_slug(grid.name or grid.run_id)}")))
    likelihood = results.read_likelihood(client, grid, cells)
    paper_exp = client.get_experiment_by_name(cfg.experiment)
    paper_url = results.run_url(uri, paper_exp.experiment_id) if paper_exp is not None else ""
    command = (f"python dashboards/report.py grid={cfg.report.grid} out={out} — open in the MLflow UI: "
               f"{ui_command(uri, grid.experiment)}")
    with tempfile.TemporaryDirectory() as tmp:
        sources, missing = results.fetch_fig2(client, fig2_cells(cells, cfg.report.fig2, grid.spec_rows()), tmp)
        files = write_report(grid, cells, out, match=cfg.report.match, likelihood=likelihood, fig2=sources,
                             fig2_missing=missing, counts=counts, paper_experiment_url=paper_url, command=command)
    logged = None
    if cfg.report.log_artifacts:
        try:
            results.log_report(client, grid.run_id, out, files)
            logged = f"runs:/{grid.run_id}/{results.REPORT_ARTIFACT_DIR}"
        except Exception as exc:  # noqa: BLE001 - the report on disk stands; say why it is not in MLflow
            print(f"warning: the report was not logged to grid run {grid.run_id} ({type(exc).__name__}: "
                  f"{scrub(one_line(exc))[:200]})", file=sys.stderr)
    return {"grid_run_id": grid.run_id, "grid": grid.name, "experiment": grid.experiment, "out": out,
            "report": os.path.join(out, "report.html"), "files": files, "cells": counts,
            "rows": sorted({c.row for c in cells}), "steps": sorted({c.steps for c in cells}),
            "protocols": sorted({c.protocol for c in cells}), "table3_rows": len(likelihood),
            "fig2_panels": len(sources), "logged_to": logged, "other_grids": other_grids}


def run_import_paper(cfg: JobConfig) -> dict:
    from dsl.service import grid_results as results
    from dsl.service.tracking import default_tracking_uri, ui_command

    uri = cfg.service.tracking_uri or default_tracking_uri()
    client = results.open_store(uri, create=True)
    summary = results.import_paper(client, cfg.experiment)
    return {**summary, "ui": ui_command(uri, cfg.experiment)}


JOB = Job(
    script="dashboards/report.py", doc=__doc__,
    modes={"report": Mode(run_report, "the grid's report: HTML page, CSV and Markdown tables, plots (the default)",
                          check=check_report),
           "import-paper": Mode(run_import_paper, "the paper's Table 1 and Table 3 rows as MLflow reference runs "
                                                  "in experiment= (idempotent)")},
    uses=("experiment", "out", "report", "service.tracking_uri"),
    defaults=("experiment=paper-reference",),
)

if __name__ == "__main__":
    sys.exit(main(JOB))
