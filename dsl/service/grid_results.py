"""A grid's results read back from MLflow, the report logged to its parent run, and the paper's rows
imported as reference runs — through the names of :mod:`dsl.service.lineage` only.

Reading: the grid parent run (by id, by experiment, or by grid name), one cell per (row, T) — a complete
run before a partial one, the newest first, runs marked superseded left out — with its metrics, its
Table 6 sharpness histories and its Fig 2 artifacts, and the likelihood runs (Table 3) of the grid's
checkpoints. Writing: the report files as artifacts under ``report/`` of the grid run; the paper's
Table 1 and Table 3 rows as runs of their own experiment (one run per row and T, found again by tags,
so a re-import never duplicates).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dsl.errors import UserError, one_line
from dsl.redact import scrub
from dsl.report import Fig2Source, paper
from dsl.report.tables import Cell, GridInfo, LikelihoodRun
from dsl.service import lineage as L
from dsl.service.tracking import experiment_id, experiment_url

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
REPORT_ARTIFACT_DIR = "report"

# MLflow metric name -> the report's name for it
_CELL_METRICS = {L.MAUVE: "mauve", L.MAUVE_MEAN: "mauve_mean", L.MAUVE_STD: "mauve_std", L.GENPPL: "genppl",
                 L.GENPPL_IMPOSSIBLE_SHARE: "genppl_impossible_share", L.SENTENCE_ENTROPY: "sentence_entropy",
                 L.NFE: "nfe", L.REWRITES_PER_TOKEN: "rewrites_per_token", L.ETA_CAP: "eta_cap",
                 L.NUM_SAMPLES_METRIC: "num_samples"}
_LIKELIHOOD_METRICS = {L.BPC: "bpc", L.BITS_PER_TOKEN: "bits_per_token", L.NLL_BOUND: "nll_bound",
                       L.NLL_STDERR: "nll_stderr"}


def _q(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


# ----------------------------------------------------------------------------------------------
# The store.


def report_tracking_uri(configured: str) -> str:
    """The store a report reads: ``service.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else an existing
    ``./mlflow.db`` — never a fresh empty database."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    if Path("mlflow.db").is_file():
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    raise UserError("no MLflow store to read: give service.tracking_uri=<http://host:port | sqlite:///path/mlflow.db "
                    "| postgresql://...> or set MLFLOW_TRACKING_URI (there is no ./mlflow.db here)")


def open_store(uri: str, *, create: bool = False) -> Any:
    """An MLflow client on ``uri`` after checking that the store is there (one line if not). ``create``
    lets a SQLite file be made (importing into a new store)."""
    import mlflow

    shown = scrub(uri)
    if uri.startswith("sqlite:///") and not create:
        path = uri[len("sqlite:///"):]
        if not Path(path).is_file():
            raise UserError(f"service.tracking_uri={shown}: no such MLflow database file")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
                pass
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(f"service.tracking_uri={shown}: no MLflow server answers there "
                            f"({one_line(exc)[:120]})") from None
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any store failure is one line naming the URI
        raise UserError(f"service.tracking_uri={shown}: cannot read the MLflow store "
                        f"({type(exc).__name__}: {one_line(exc)[:160]})") from None
    return client


def _all_experiment_ids(client: Any) -> list[str]:
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def _search(client: Any, experiment_ids: Sequence[str], flt: str, order_by: Sequence[str] = ()) -> list[Any]:
    runs, token = [], None
    for i in range(0, len(experiment_ids), 100):   # MLflow caps the experiments of one search
        chunk = list(experiment_ids[i:i + 100])
        while True:
            page = client.search_runs(chunk, filter_string=flt, max_results=1000, order_by=list(order_by) or None,
                                      page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                break
    return runs


# ----------------------------------------------------------------------------------------------
# Reading a grid.


def find_grid(client: Any, ref: str) -> tuple[Any, list[str]]:
    """``(grid parent run, other grids there)`` for ``report.grid``: a run id, an experiment name (its
    newest grid run) or a grid name (tag ``dsl.grid.name``, newest run)."""
    from mlflow.exceptions import MlflowException

    ref = ref.strip()
    if not ref:
        raise UserError("report.grid='' : give grid=<grid parent run id | experiment name | grid name>")
    if RUN_ID.match(ref):
        try:
            run = client.get_run(ref)
        except MlflowException:
            run = None
        if run is not None:
            kind = run.data.tags.get(L.KIND, "")
            if kind != L.KIND_GRID:
                raise UserError(f"grid={ref} is a run of kind {kind or 'unknown'!r}, not a grid's parent run "
                                f"({L.KIND}={L.KIND_GRID}); give the parent run of jobs/grid.py")
            return run, []
    newest = ["attributes.start_time DESC"]
    exp = client.get_experiment_by_name(ref)
    if exp is not None:
        runs = _search(client, [exp.experiment_id], f"tags.`{L.KIND}` = '{L.KIND_GRID}'", newest)
        if not runs:
            raise UserError(f"grid={ref}: experiment {ref!r} has no grid run ({L.KIND}={L.KIND_GRID}); run "
                            f"jobs/grid.py experiment={ref} first")
        return runs[0], [_grid_label(r) for r in runs[1:]]
    runs = _search(client, _all_experiment_ids(client),
                   f"tags.`{L.KIND}` = '{L.KIND_GRID}' and tags.`{L.GRID_NAME}` = '{_q(ref)}'", newest)
    if runs:
        return runs[0], [_grid_label(r) for r in runs[1:]]
    known = sorted({_grid_label(r) for r in _search(client, _all_experiment_ids(client),
                                                    f"tags.`{L.KIND}` = '{L.KIND_GRID}'")})
    raise UserError(f"grid={ref}: no grid parent run with that id, no experiment and no grid of that name in this "
                    f"store; grids here: {', '.join(known[:10]) or 'none (run jobs/grid.py first)'}")


def _grid_label(run: Any) -> str:
    return f"{run.data.tags.get(L.GRID_NAME) or run.info.run_name} ({run.info.run_id})"


def _json_artifact(client: Any, run_id: str, name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, name, tmp)
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except Exception:  # noqa: BLE001 - absent or unreadable: the report says so
            return {}
    return data if isinstance(data, dict) else {}


def run_url(uri: str, experiment: str, run_id: str | None = None) -> str:
    """The UI page of a run (or an experiment's runs view) when the store is a tracking server."""
    if not uri.startswith(("http://", "https://")):
        return ""
    if run_id:
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return experiment_url(uri, experiment)


def grid_info(client: Any, run: Any, uri: str) -> GridInfo:
    tags = run.data.tags
    exp = client.get_experiment(run.info.experiment_id)
    started = datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).isoformat(timespec="seconds")
    return GridInfo(run_id=run.info.run_id, name=tags.get(L.GRID_NAME) or run.info.run_name or "",
                    experiment=exp.name, experiment_id=exp.experiment_id, spec_name=tags.get(L.GRID_SPEC, ""),
                    protocol=tags.get(L.PROTOCOL, ""), status=run.info.status, started=started,
                    tracking_uri=scrub(uri), ui_url=run_url(uri, exp.experiment_id, run.info.run_id),
                    spec=_json_artifact(client, run.info.run_id, L.GRID_SPEC_ARTIFACT))


def _int(text: Any) -> int | None:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return None


def _length(run: Any, spec: dict) -> int | None:
    """The cell's sequence length L: its sampling/model params, else the grid spec's."""
    for key in ("sampling.length", "length", "model.length"):
        n = _int(run.data.params.get(key))
        if n and n > 0:
            return n
    for where in (spec, spec.get("sampling") if isinstance(spec.get("sampling"), dict) else {}):
        n = _int(where.get("length"))
        if n and n > 0:
            return n
    return None


def read_cells(client: Any, grid: GridInfo, *, sharpness: bool = True) -> tuple[list[Cell], dict[str, int]]:
    """The grid's cells, one per (row, T), and the counts (complete, partial, superseded runs left out)."""
    runs = _search(client, [grid.experiment_id],
                   f"tags.`{L.PARENT_RUN}` = '{grid.run_id}' and tags.`{L.KIND}` = '{L.KIND_CELL}'",
                   ["attributes.start_time DESC"])
    chosen: dict[tuple[str, int], Any] = {}
    left_out = 0
    for run in runs:
        tags = run.data.tags
        steps = _int(tags.get(L.STEPS))
        if L.ROW not in tags or steps is None:
            left_out += 1
            continue
        key = (tags[L.ROW], steps)
        rank = (L.SUPERSEDED_BY not in tags, tags.get(L.CELL_STATUS) == L.CELL_COMPLETE)
        best = chosen.get(key)
        if best is None:
            chosen[key] = run
            continue
        left_out += 1
        best_tags = best.data.tags
        if rank > (L.SUPERSEDED_BY not in best_tags, best_tags.get(L.CELL_STATUS) == L.CELL_COMPLETE):
            chosen[key] = run   # runs come newest first: only a better status displaces one
    cells = []
    for (row, steps), run in chosen.items():
        tags, metrics = run.data.tags, run.data.metrics
        cell = Cell(row=row, steps=steps, run_id=run.info.run_id, run_name=run.info.run_name or "",
                    sampler=tags.get(L.SAMPLER, ""), checkpoint=tags.get(L.CHECKPOINT, ""),
                    protocol=tags.get(L.PROTOCOL, "") or grid.protocol, eta_cap_source=tags.get(L.ETA_CAP_SOURCE, ""),
                    num_samples=_int(tags.get(L.NUM_SAMPLES)) or _int(metrics.get(L.NUM_SAMPLES_METRIC)),
                    length=_length(run, grid.spec),
                    status="complete" if tags.get(L.CELL_STATUS) == L.CELL_COMPLETE else "partial",
                    training_run_id=tags.get(L.TRAINING_RUN, ""),
                    metrics={name: float(metrics[key]) for key, name in _CELL_METRICS.items() if key in metrics})
        if sharpness and L.DIAG_MEAN_MAX_PROB in metrics:
            for name, key in L.DIAGNOSTIC_METRICS.items():
                for m in client.get_metric_history(run.info.run_id, key):
                    cell.sharpness.setdefault(int(m.step), {})[name] = float(m.value)
        cells.append(cell)
    counts = {"complete": sum(c.status == "complete" for c in cells),
              "partial": sum(c.status != "complete" for c in cells), "superseded": left_out}
    return cells, counts


def _likelihood_rows(run: Any) -> list[tuple[str, dict[str, float]]]:
    """``[(checkpoint, metrics)]`` of a likelihood run: its first checkpoint by the plain metric names, the
    others (``checkpoint=label=uri,...``) by ``<label>.<name>``."""
    from dsl.eval.protocols import labelled_checkpoints

    metrics = run.data.metrics
    rows = [(run.data.tags.get(L.CHECKPOINT, ""),
             {name: float(metrics[key]) for key, name in _LIKELIHOOD_METRICS.items() if key in metrics})]
    try:
        labelled = labelled_checkpoints(run.data.params.get("checkpoint", ""))
    except Exception:  # noqa: BLE001 - no checkpoint param: the first checkpoint is all there is
        labelled = []
    for label, uri in labelled[1:]:
        rows.append((uri, {name: float(metrics[f"{label}.{key}"]) for key, name in _LIKELIHOOD_METRICS.items()
                           if f"{label}.{key}" in metrics}))
    return [(ckpt, m) for ckpt, m in rows if m]


def read_likelihood(client: Any, grid: GridInfo, cells: Sequence[Cell]) -> list[LikelihoodRun]:
    """Likelihood runs (Table 3) in the grid's experiment, or of one of its checkpoints anywhere; the newest
    per checkpoint and estimator."""
    checkpoints = {c.checkpoint for c in cells if c.checkpoint}
    runs = _search(client, _all_experiment_ids(client),
                   f"tags.`{L.KIND}` = '{L.KIND_EVALUATE}' and tags.`{L.MODE}` = 'likelihood'",
                   ["attributes.start_time DESC"])
    out: dict[tuple[str, str], LikelihoodRun] = {}
    for run in runs:
        estimator = run.data.tags.get(L.ESTIMATOR, "")
        for ckpt, metrics in _likelihood_rows(run):
            if run.info.experiment_id == grid.experiment_id or ckpt in checkpoints:
                out.setdefault((ckpt, estimator), LikelihoodRun(run_id=run.info.run_id, checkpoint=ckpt,
                                                                estimator=estimator, run_name=run.info.run_name or "",
                                                                metrics=metrics))
    return list(out.values())


def fetch_fig2(client: Any, cells: Sequence[Cell], dst: str) -> tuple[list[Fig2Source], list[str]]:
    """Each cell's ``fig2.png`` artifact, else its ``diagnostics.jsonl`` to redraw from; the cells with
    neither are returned by name."""
    sources, missing = [], []
    for i, cell in enumerate(cells):
        try:
            names = {os.path.basename(f.path) for f in client.list_artifacts(cell.run_id)}
        except Exception:  # noqa: BLE001 - an unreachable artifact store leaves the panels out
            names = set()
        got = None
        for name, kind in ((L.FIG2_ARTIFACT, "png"), (L.DIAGNOSTICS_ARTIFACT, "records")):
            if name in names:
                where = os.path.join(dst, str(i))
                os.makedirs(where, exist_ok=True)
                try:
                    got = Fig2Source(cell, kind, client.download_artifacts(cell.run_id, name, where))
                    break
                except Exception:  # noqa: BLE001
                    continue
        if got is None:
            missing.append(f"{cell.row}, T={cell.steps}")
        else:
            sources.append(got)
    return sources, missing


def log_report(client: Any, run_id: str, out: str, files: Sequence[str]) -> None:
    """The report's files as artifacts of the grid run, under ``report/`` (same relative layout)."""
    for name in files:
        sub = os.path.dirname(name)
        client.log_artifact(run_id, os.path.join(out, name),
                            REPORT_ARTIFACT_DIR + (f"/{sub}" if sub else ""))


# ----------------------------------------------------------------------------------------------
# The paper's rows as reference runs.


def paper_reference_runs() -> list[dict[str, Any]]:
    """Every run the import writes: ``{"key", "name", "tags", "metrics", "histories"}`` (histories:
    ``{metric: [(step, value)]}``, Table 6's checkpoints on the step-budget row)."""
    runs = []
    loop_row = "DSL-FT + ReMDM-loop (eta_cap(T))"
    for row, by_t in paper.TABLE1.items():
        for steps, (mauve, genppl, entropy) in sorted(by_t.items()):
            tags = {L.KIND: L.KIND_PAPER, L.SOURCE: paper.SOURCE, L.PAPER_TABLE: "table1", L.ROW: row,
                    L.STEPS: str(steps), L.PROTOCOL: paper.TABLE1_PROTOCOL, L.NUM_SAMPLES: str(paper.TABLE1_SAMPLES)}
            if row in paper.TABLE1_REPORTED_BY:
                tags[L.REPORTED_BY] = paper.TABLE1_REPORTED_BY[row]
            metrics = {L.MAUVE: mauve, L.GENPPL: genppl, L.SENTENCE_ENTROPY: entropy,
                       L.NUM_SAMPLES_METRIC: float(paper.TABLE1_SAMPLES)}
            histories: dict[str, list[tuple[int, float]]] = {}
            if row == loop_row:
                tags[L.SAMPLER] = paper.STEP_BUDGET_SAMPLER
                if steps in paper.TABLE5:
                    metrics[L.REWRITES_PER_TOKEN] = paper.TABLE5[steps][1]
                for (t, k), (t_k, mmp, nucleus) in sorted(paper.TABLE6.items()):
                    if t == steps:
                        for key, value in ((L.DIAG_T, t_k), (L.DIAG_MEAN_MAX_PROB, mmp), (L.DIAG_NUCLEUS_SIZE, nucleus)):
                            histories.setdefault(key, []).append((k, value))
            runs.append({"key": ("table1", row, str(steps)), "name": f"paper · {row} · T={steps}", "tags": tags,
                         "metrics": metrics, "histories": histories})
    for row, (family, bpc, bound) in paper.TABLE3.items():
        tags = {L.KIND: L.KIND_PAPER, L.SOURCE: paper.SOURCE, L.PAPER_TABLE: "table3", L.ROW: row,
                L.MODE: "likelihood", L.PROTOCOL: paper.TABLE3_PROTOCOL,
                L.ESTIMATOR: f"{family}, upper bound (≤)" if bound else f"{family}, exact"}
        runs.append({"key": ("table3", row, ""), "name": f"paper · Table 3 · {row}", "tags": tags,
                     "metrics": {L.BPC: bpc}, "histories": {}})
    return runs


def import_paper(client: Any, experiment: str) -> dict[str, Any]:
    """Write the paper's rows into ``experiment``: a missing run is created, a run whose numbers differ
    gets the transcribed ones, an identical one is left alone, duplicates of one key are deleted."""
    from mlflow.entities import Metric, RunStatus, RunTag

    exp_id = experiment_id(client, experiment)
    existing: dict[tuple[str, str, str], list[Any]] = {}
    for run in _search(client, [exp_id], f"tags.`{L.KIND}` = '{L.KIND_PAPER}'", ["attributes.start_time ASC"]):
        t = run.data.tags
        existing.setdefault((t.get(L.PAPER_TABLE, ""), t.get(L.ROW, ""), t.get(L.STEPS, "")), []).append(run)
    counts = {"created": 0, "updated": 0, "unchanged": 0, "duplicates_deleted": 0}
    now = int(time.time() * 1000)
    for spec in paper_reference_runs():
        found = existing.get(spec["key"], [])
        for extra in found[1:]:
            client.delete_run(extra.info.run_id)
            counts["duplicates_deleted"] += 1
        latest = dict(spec["metrics"])
        for key, points in spec["histories"].items():
            latest[key] = max(points)[1]
        if found:
            run = found[0]
            if all(run.data.metrics.get(k) == v for k, v in latest.items()) and \
                    all(run.data.tags.get(k) == v for k, v in spec["tags"].items()):
                counts["unchanged"] += 1
                continue
            run_id = run.info.run_id
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in spec["tags"].items()])
            counts["updated"] += 1
        else:
            run_id = client.create_run(exp_id, run_name=spec["name"], tags=spec["tags"]).info.run_id
            counts["created"] += 1
        metrics = [Metric(k, float(v), now, 0) for k, v in spec["metrics"].items()]
        metrics += [Metric(k, float(v), now, int(step)) for k, pts in spec["histories"].items() for step, v in pts]
        for i in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[i:i + 900])
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED), end_time=now)
    return {"experiment": experiment, "experiment_id": exp_id, "runs": len(paper_reference_runs()), **counts}


__all__ = ["report_tracking_uri", "open_store", "find_grid", "grid_info", "read_cells", "read_likelihood",
           "fetch_fig2", "log_report", "paper_reference_runs", "import_paper", "run_url", "REPORT_ARTIFACT_DIR"]
