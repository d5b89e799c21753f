"""The grid report as people use it: a grid's runs in a real MLflow store (written by the names of
dsl.service.lineage, cells decoded by the real samplers on the exact cyclic source), the report command
run as a user runs it, its CSV/Markdown checked against the runs, and its page checked as rendered by
headless Chromium (the tables' cells, every image decoded). The paper's rows imported as reference runs,
twice, without duplicates."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dsl.cli import load_job, main
from dsl.report import fig2_cells, paper
from dsl.report.tables import Cell, table1_records, table6_records

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "dashboards/report.py"
JOB = load_job(SCRIPT)

LENGTH = 32
BUDGETS = (4, 8, 16, 32)
ROWS = (("MDLM", "mdlm", "runs/mdlm-ft"), ("ReMDM", "remdm-official", "runs/mdlm-ft"),
        ("DSL-FT + ReMDM", "remdm-official", "runs/dsl-ft"),
        ("DSL-FT + ReMDM-loop (eta_cap(T))", "dsl-budget", "runs/dsl-ft"),
        ("DSL-FT + MDLM sampler", "mdlm", "runs/dsl-ft"))


# ----------------------------------------------------------------------------------------------
# Pure parts: how our cells meet the paper's numbers.


def test_rows_meet_the_papers_by_label():
    assert paper.paper_row("DSL-FT + ReMDM") == "DSL-FT + ReMDM (official schedule)"
    assert paper.paper_row("DSL-FT + ReMDM-loop (η_cap(T))") == "DSL-FT + ReMDM-loop (eta_cap(T))"
    assert paper.paper_row("remdm") == "ReMDM" and paper.paper_row("MDLM") == "MDLM"
    assert paper.paper_row("DSL-FT + MDLM sampler") is None and paper.paper_row("Exact oracle + MDLM sampler") is None
    assert paper.mark("ReMDM") == "‡" and paper.mark("ADLM") == "§" and paper.mark("SEDD (absorb)") == ""


def test_budgets_meet_the_papers_at_the_same_fraction_of_the_length():
    assert [paper.paper_steps(t, 32) for t in BUDGETS] == [128, 256, 512, 1024]
    assert paper.paper_steps(12, 32) is None                      # 384 is not a paper budget
    assert paper.paper_steps(128, None) == 128 and paper.paper_steps(8, 64) == 128
    assert paper.paper_steps(8, 64, "steps") is None and paper.paper_steps(256, 64, "steps") == 256


def test_table6_checkpoints_map_the_papers_steps_to_our_budget():
    assert paper.table6_checkpoints(128, 128) == [(0, 0), (56, 56), (71, 71), (127, 127)]
    assert paper.table6_checkpoints(32, 1024) == [(0, 0), (14, 455), (18, 568), (31, 1023)]
    assert paper.table6_checkpoints(10, None) == [(0, None), (4, None), (6, None), (9, None)]


def _cell(row, steps, protocol, length, **metrics):
    return Cell(row=row, steps=steps, protocol=protocol, length=length, sampler="dsl-budget", metrics=metrics)


def test_table1_puts_the_papers_numbers_and_differences_beside_ours_with_their_protocols():
    ours = [_cell("ReMDM", 128, "paper-table1", 1024, mauve=0.1, genppl=40.0, sentence_entropy=5.4),
            _cell("ReMDM", 4, "offline", 32, mauve=0.5, genppl=20.0, sentence_entropy=3.0),
            _cell("DSL-FT + MDLM sampler", 4, "offline", 32, mauve=0.7)]
    recs = {(r["row"], r["steps"]): r for r in table1_records(ours)}
    same = recs[("ReMDM", 128)]
    assert same["paper_mauve"] == 0.057 and same["same_protocol"] is True
    assert math.isclose(same["diff_mauve"], 0.1 - 0.057) and math.isclose(same["diff_genppl"], 40.0 - 42.5)
    cross = recs[("ReMDM", 4)]
    assert cross["paper_steps"] == 128 and cross["paper_mauve"] == 0.057 and cross["same_protocol"] is False
    assert cross["paper_protocol"] == "paper-table1" and "ReMDM" in cross["paper_reported_by"]
    alone = recs[("DSL-FT + MDLM sampler", 4)]
    assert alone["paper_row"] is None and alone["diff_mauve"] is None
    # Table 6's values stand beside the step-budget protocol's cells only
    ours[1].sharpness = {k: {"t": 1 - k / 4, "mean_max_prob": 0.5, "nucleus_size": 3.0} for k in range(4)}
    rows = table6_records(ours)
    assert [r["k"] for r in rows] == [0, 2, 3] and rows[1]["paper_k"] == 56 and rows[1]["paper_mean_max_prob"] == 0.9391


def test_fig2_cells_are_chosen_by_budget():
    cells = [Cell(row=r, steps=t) for r in ("A", "B") for t in (8, 4, 16)]
    assert [(c.row, c.steps) for c in fig2_cells(cells, "smallest")] == [("A", 4), ("B", 4)]
    assert [(c.row, c.steps) for c in fig2_cells(cells, "8,16")] == [("A", 8), ("B", 8), ("A", 16), ("B", 16)]
    assert fig2_cells(cells, "none") == [] and len(fig2_cells(cells, "all")) == 6


def test_help_lists_the_report_keys_and_bad_values_are_one_line(capsys, tmp_path):
    assert main(JOB, ["grid=x", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("report.grid", "report.fig2", "report.match", "report.log_artifacts", "service.tracking_uri",
                "import-paper", "grid= → report.grid="):
        assert key in text, key
    for argv in (["report.fig2=sometimes"], ["report.match=nearest"], ["sampling.steps=4"]):
        assert main(JOB, [*argv, f"out={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and argv[0].split("=")[0] in err[0]
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# A grid in MLflow, as jobs/grid.py logs it.


def _decode(sampler: str, steps: int):
    """A real decode of the exact cyclic source: NFE, rewrites per token and the per-step diagnostics."""
    from dsl.config import SamplingConfig
    from dsl.sampling import OracleDenoiser, generate
    from dsl.sources.cyclic import CyclicSource

    cfg = SamplingConfig(sampler=sampler, steps=steps, batch_size=4, eta_cap_table="eq24")
    return generate(OracleDenoiser(CyclicSource(5, LENGTH)), cfg, 4, LENGTH, seed=0)


def log_grid(uri: str, experiment: str, tmp: Path) -> dict:
    """A 5-row × 4-budget grid (L=32) under one parent run, plus what a report must leave out: a newer
    partial run of a complete cell, a newer superseded run, an unrelated sample run; one cell that only
    ran partially; a likelihood run of a grid checkpoint and one of another checkpoint elsewhere.
    Cells at the smallest T carry Fig 2 artifacts: fig2.png (three rows), diagnostics.jsonl only
    (ReMDM: redrawn), nothing (DSL-FT + MDLM sampler)."""
    import mlflow
    from mlflow.entities import Metric, Param

    from dsl.sampling.figures import plot_diagnostics
    from dsl.service import lineage as L
    from dsl.service.tracking import experiment_id

    client = mlflow.MlflowClient(uri)
    exp = experiment_id(client, experiment)
    grid_name = f"mini-{uuid.uuid4().hex[:6]}"
    grid = client.create_run(exp, run_name=f"grid {grid_name}", tags={
        L.KIND: L.KIND_GRID, L.GRID_NAME: grid_name, L.GRID_SPEC: "table1-mini", L.PROTOCOL: "offline"}).info.run_id
    spec = {"rows": [{"label": r, "sampler": s, "checkpoint": c} for r, s, c in ROWS], "steps": list(BUDGETS),
            "length": LENGTH, "num_samples": 4, "protocol": "offline"}
    (tmp / "grid_spec.json").write_text(json.dumps(spec))
    client.log_artifact(grid, str(tmp / "grid_spec.json"))
    rng = random.Random(7)
    decodes = {(s, t): _decode(s, t) for s in {r[1] for r in ROWS} for t in BUDGETS}
    now = int(time.time() * 1000)

    def cell_run(row, sampler, ckpt, steps, status, metrics, extra_tags=None, diag=None):
        tags = {L.PARENT_RUN: grid, L.KIND: L.KIND_CELL, L.ROW: row, L.CHECKPOINT: ckpt, L.SAMPLER: sampler,
                L.STEPS: str(steps), L.ETA_CAP_SOURCE: "eq24" if sampler == "dsl-budget" else "none",
                L.PROTOCOL: "offline", L.NUM_SAMPLES: "4", L.CELL_STATUS: status, **(extra_tags or {})}
        run_id = client.create_run(exp, run_name=f"cell {row} T={steps}", tags=tags).info.run_id
        batch = [Metric(k, v, now, 0) for k, v in metrics.items()]
        for k, rec in enumerate(diag or []):
            batch += [Metric(key, rec[name], now, k) for name, key in L.DIAGNOSTIC_METRICS.items()
                      if rec[name] is not None]
        client.log_batch(run_id, metrics=batch, params=[Param("sampling.length", str(LENGTH))])
        client.set_terminated(run_id, "FINISHED" if status == L.CELL_COMPLETE else "KILLED")
        return run_id

    expected = {}
    for row, sampler, ckpt in ROWS:
        for steps in BUDGETS:
            b = decodes[(sampler, steps)]
            metrics = {L.MAUVE: rng.uniform(0.2, 0.95), L.MAUVE_MEAN: rng.uniform(0.2, 0.95),
                       L.MAUVE_STD: rng.uniform(0.002, 0.06), L.GENPPL: rng.uniform(4.0, 60.0),
                       L.GENPPL_IMPOSSIBLE_SHARE: 0.0, L.SENTENCE_ENTROPY: rng.uniform(2.5, 3.5),
                       L.NFE: float(b.nfe.double().mean()), L.REWRITES_PER_TOKEN: float(b.mean_rewrites.mean()),
                       L.NUM_SAMPLES_METRIC: 4.0}
            if sampler == "dsl-budget":
                metrics[L.ETA_CAP] = float(b.eta_cap)
            partial_only = (row, steps) == ("DSL-FT + MDLM sampler", 32)
            records = b.diagnostics_records()
            run_id = cell_run(row, sampler, ckpt, steps, L.CELL_PARTIAL if partial_only else L.CELL_COMPLETE,
                              metrics, diag=records)
            expected[(row, steps)] = {"run_id": run_id, "status": "partial" if partial_only else "complete",
                                      "metrics": metrics, "sampler": sampler, "diag": records}
            if steps == BUDGETS[0] and row != "DSL-FT + MDLM sampler":
                diag_path = tmp / "diagnostics.jsonl"
                diag_path.write_text("".join(json.dumps(r) + "\n" for r in records))
                client.log_artifact(run_id, str(diag_path))
                if row != "ReMDM":
                    plot_diagnostics(b.diagnostics, f"{sampler} T={steps}", str(tmp / "fig2.png"))
                    client.log_artifact(run_id, str(tmp / "fig2.png"))
    # what the report must leave out: newer runs that do not displace a complete cell
    cell_run("MDLM", "mdlm", "runs/mdlm-ft", 8, L.CELL_PARTIAL, {L.MAUVE: 0.001})
    cell_run("ReMDM", "remdm-official", "runs/mdlm-ft", 16, L.CELL_COMPLETE, {L.MAUVE: 0.002},
             extra_tags={L.SUPERSEDED_BY: "another-run"})
    client.set_terminated(client.create_run(exp, run_name="sample", tags={L.KIND: L.KIND_SAMPLE}).info.run_id)
    like = client.create_run(exp, run_name="likelihood dsl-ft", tags={
        L.KIND: L.KIND_EVALUATE, L.MODE: "likelihood", L.CHECKPOINT: "runs/dsl-ft", L.ESTIMATOR: "eq. 10 bound"})
    like_metrics = {L.BPC: 1.537, L.BITS_PER_TOKEN: 4.21, L.NLL_BOUND: 2.918, L.NLL_STDERR: 0.012}
    client.log_batch(like.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in like_metrics.items()]
                     + [Metric("atomic." + L.BPC, 1.611, now, 0)],   # a second checkpoint, by its label
                     params=[Param("checkpoint", "smoothed=runs/dsl-ft,atomic=runs/dsl-atomic")])
    client.set_terminated(like.info.run_id)
    other = client.create_run(experiment_id(client, experiment + "-other"), tags={
        L.KIND: L.KIND_EVALUATE, L.MODE: "likelihood", L.CHECKPOINT: "runs/unrelated", L.ESTIMATOR: "eq. 10 bound"})
    client.log_batch(other.info.run_id, metrics=[Metric(L.BPC, 9.9, now, 0)])
    return {"grid_run_id": grid, "grid_name": grid_name, "cells": expected,
            "likelihood": {"run_id": like.info.run_id, "metrics": like_metrics}}


# ----------------------------------------------------------------------------------------------
# Reading the rendered page.


class _Tables(HTMLParser):
    """Every <table id=...> of a page as rows of cell texts; every <img> and the body's attributes."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.body: dict[str, str] = {}
        self.images = 0
        self._table = None
        self._row = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = {k: v or "" for k, v in attrs}
        elif tag == "img":
            self.images += 1
        elif tag == "table":
            self._table = a.get("id", f"table-{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def read_page(html: str) -> _Tables:
    parser = _Tables()
    parser.feed(html)
    return parser


def _ppl(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _count(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _entry(m: dict) -> str:
    """Table 1's entry as documented: MAUVE ± std / GenPPL / sentence entropy / NFE."""
    return (f"{m['mauve']:.3f} ± {m['mauve_std']:.3f} / {_ppl(m['genppl'])} / {m['sentence_entropy']:.2f} / "
            f"{_count(m['nfe'])}")


def _run(*argv: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / SCRIPT), *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


@pytest.mark.integration
def test_report_of_a_grid_as_a_person_sees_it(mlflow_server, chromium, tmp_path):
    import mlflow

    uri = mlflow_server.tracking_uri
    experiment = f"grid-{uuid.uuid4().hex[:8]}"
    grid = log_grid(uri, experiment, tmp_path)
    env = _env(**mlflow_server.env)
    out = tmp_path / "report"

    # by experiment name (its newest grid run), on the server named by MLFLOW_TRACKING_URI
    proc = _run(f"grid={experiment}", f"out={out}", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["grid_run_id"] == grid["grid_run_id"] and summary["logged_to"]
    assert summary["cells"] == {"complete": 19, "partial": 1, "superseded": 2}
    assert summary["table3_rows"] == 2 and summary["fig2_panels"] == 4

    # table1.csv: one line per row × T, every number as MLflow holds it, the paper's where a row meets one
    client = mlflow.MlflowClient(uri)
    lines = list(csv.DictReader((out / "table1.csv").open()))
    assert len(lines) == len(ROWS) * len(BUDGETS)
    assert [ln["row"] for ln in lines[::len(BUDGETS)]] == [r for r, _, _ in ROWS]   # the spec's order
    names = {"mauve": "mauve", "mauve_std": "mauve_std", "genppl": "genppl", "sentence_entropy": "sentence_entropy",
             "nfe": "nfe", "rewrites_per_token": "rewrites_per_token"}
    for ln in lines:
        key = (ln["row"], int(ln["steps"]))
        want = grid["cells"][key]
        stored = client.get_run(want["run_id"]).data.metrics
        assert ln["run_id"] == want["run_id"] and ln["status"] == want["status"] and ln["length"] == str(LENGTH)
        for column, metric in names.items():
            assert float(ln[column]) == stored[metric], (key, column)
        paper_t = {4: 128, 8: 256, 16: 512, 32: 1024}[key[1]]
        prow = {"MDLM": "MDLM", "ReMDM": "ReMDM", "DSL-FT + ReMDM": "DSL-FT + ReMDM (official schedule)",
                "DSL-FT + ReMDM-loop (eta_cap(T))": "DSL-FT + ReMDM-loop (eta_cap(T))"}.get(key[0])
        if prow is None:
            assert ln["paper_mauve"] == "" and ln["paper_row"] == ""
            continue
        pm, pg, pe = paper.TABLE1[prow][paper_t]
        assert (ln["paper_row"], int(ln["paper_steps"]), float(ln["paper_mauve"])) == (prow, paper_t, pm)
        assert float(ln["paper_genppl"]) == pg and float(ln["paper_sentence_entropy"]) == pe
        assert math.isclose(float(ln["diff_mauve"]), stored["mauve"] - pm, abs_tol=1e-12)
        assert ln["paper_protocol"] == "paper-table1" and ln["protocol"] == "offline" and ln["same_protocol"] == "False"
        if key[0] == "DSL-FT + ReMDM-loop (eta_cap(T))":
            assert float(ln["paper_rewrites_per_token"]) == paper.TABLE5[paper_t][1]

    # the Markdown carries the same entries
    md = (out / "table1.md").read_text()
    for (row, steps), want in grid["cells"].items():
        assert _entry(want["metrics"]) in md, (row, steps)

    # logged beside the grid
    logged = {f.path for f in client.list_artifacts(grid["grid_run_id"], "report")}
    assert {"report/report.html", "report/table1.csv", "report/table1.md", "report/table5.csv",
            "report/table6.csv", "report/table3.csv", "report/plots"} <= logged

    # the rendered page, as a person sees it
    page = read_page(chromium.dom((out / "report.html").as_uri()))
    assert page.body.get("data-images-total") == "7" and page.body.get("data-images-loaded") == "7", page.body
    t1 = page.tables["table1"]
    header = t1[0]
    assert header[:3] == ["row", "measured", "protocol"] and header[3] == "T=4 (paper T=128)"
    ours = {r[0]: r for r in t1[1:] if r[1] == "ours"}
    for (row, steps), want in grid["cells"].items():
        text = ours[row][3 + BUDGETS.index(steps)]
        assert text == _entry(want["metrics"]) + (" (partial)" if want["status"] == "partial" else ""), (row, steps)
        assert ours[row][2] == "offline"
    theirs = {r[0]: r for r in t1[1:] if r[1] == "paper"}
    assert theirs["ReMDM ‡"][3] == "0.057 / 42.5 / 5.43 / –" and theirs["ReMDM ‡"][2] == "paper-table1"
    assert theirs["ADLM §"][6] == "0.699 / 25.4 / 5.35 / –"          # a paper row we did not run, at T'=1024
    diffs = [r for r in t1[1:] if r[1] == "ours − paper"]
    assert len(diffs) == 4 and all("different protocols: offline vs paper-table1" == r[2] for r in diffs)
    t5 = {(r[0], int(r[1])): r for r in page.tables["table5"][1:]}
    loop = t5[("DSL-FT + ReMDM-loop (eta_cap(T))", 4)]
    assert loop[3] == "eq24" and loop[9] == f"{paper.TABLE5[128][1]:.4f}" and loop[7] == "0.01"
    assert loop[5] == f"{grid['cells'][('DSL-FT + ReMDM-loop (eta_cap(T))', 4)]['metrics']['rewrites_per_token']:.4f}"
    assert any(r[0] == "eq24" and "T=1024: 0.004" in r[1] for r in page.tables["eta-cap-tables"][1:])
    t6 = [r for r in page.tables["table6"][1:] if r[0] == "DSL-FT + ReMDM-loop (eta_cap(T))" and r[1] == "32"]
    diag = grid["cells"][("DSL-FT + ReMDM-loop (eta_cap(T))", 32)]["diag"]
    assert [r[2] for r in t6] == ["0", "14", "18", "31"] and [r[7] for r in t6] == ["0", "455", "568", "1023"]
    assert t6[1][4] == f"{diag[14]['mean_max_prob']:.4f}" and t6[1][9] == "0.9482"
    t3 = sorted(page.tables["table3"][1:])
    assert [(r[0], r[1], r[2]) for r in t3] == [("runs/dsl-atomic", "eq. 10 bound", "1.611"),
                                                ("runs/dsl-ft", "eq. 10 bound", "1.537")]
    assert ["MD4", "discrete diffusion", "1.370", "yes", "text8-bpc"] in page.tables["paper-table3"]

    # the check can fail: a copy with one image's bytes cut shows fewer decoded images
    html = (out / "report.html").read_text()
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(html[:start] + html[start + 200:])
    body = read_page(chromium.dom(broken.as_uri())).body
    assert body.get("data-images-total") == "7" and body.get("data-images-loaded") == "6"

    # bad input: one line, and the report already written is left as it was
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for argv in ([f"grid=no-such-grid-{uuid.uuid4().hex[:6]}"], [f"grid={grid['cells'][('MDLM', 4)]['run_id']}"]):
        bad = _run(*argv, f"out={out}", env=env, cwd=tmp_path)
        assert bad.returncode == 2 and bad.stdout == "", bad.stderr[-2000:]
        (line,) = [x for x in bad.stderr.strip().splitlines() if x.startswith("error: ")]
        assert "grid=" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.integration
def test_paper_reference_runs_import_once_and_show_in_the_mlflow_ui(mlflow_server, chromium, tmp_path):
    import mlflow

    from dsl.service import lineage as L
    from dsl.service.grid_results import paper_reference_runs
    from dsl.service.tracking import experiment_url

    experiment = f"paper-{uuid.uuid4().hex[:8]}"
    env = _env(**mlflow_server.env)
    expected = len(paper_reference_runs())
    first = _run("import-paper", f"experiment={experiment}", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.strip().splitlines()[-1])["created"] == expected
    again = json.loads(_run("import-paper", f"experiment={experiment}", env=env, cwd=tmp_path).stdout.splitlines()[-1])
    assert again["created"] == 0 and again["unchanged"] == expected

    client = mlflow.MlflowClient(mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    assert len(runs) == expected
    by_key = {(r.data.tags.get(L.PAPER_TABLE), r.data.tags[L.ROW], r.data.tags.get(L.STEPS)): r for r in runs}
    remdm = by_key[("table1", "ReMDM", "128")]
    assert remdm.data.metrics[L.MAUVE] == 0.057 and remdm.data.metrics[L.GENPPL] == 42.5
    assert remdm.data.tags[L.PROTOCOL] == "paper-table1" and "ReMDM" in remdm.data.tags[L.REPORTED_BY]
    assert remdm.data.tags[L.SOURCE] == paper.SOURCE and remdm.data.tags[L.KIND] == L.KIND_PAPER
    loop = by_key[("table1", "DSL-FT + ReMDM-loop (eta_cap(T))", "512")]
    assert loop.data.metrics[L.REWRITES_PER_TOKEN] == paper.TABLE5[512][1]
    history = {m.step: m.value for m in client.get_metric_history(loop.info.run_id, L.DIAG_MEAN_MAX_PROB)}
    assert history == {0: 0.0398, 227: 0.9466, 284: 0.9632, 511: 0.9973}
    assert by_key[("table3", "MD4", None)].data.metrics[L.BPC] == 1.37

    # a hand-edited value is put back, once
    client.log_metric(remdm.info.run_id, L.MAUVE, 0.5, step=0)
    fixed = json.loads(_run("import-paper", f"experiment={experiment}", env=env, cwd=tmp_path).stdout.splitlines()[-1])
    assert fixed["updated"] == 1 and fixed["created"] == 0
    assert client.get_run(remdm.info.run_id).data.metrics[L.MAUVE] == 0.057

    text = chromium.text(experiment_url(mlflow_server.tracking_uri, exp.experiment_id))
    assert "paper · ReMDM · T=128" in text or "paper · ReMDM · T=1024" in text, text[:800]
