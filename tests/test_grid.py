"""The Table 1 grid (jobs/grid.py) as people run it: a 2-row × 2-budget grid on the exact sticky-topic
language, sampled on a real Ray cluster and recorded in a real MLflow server; the driver is
killed after its first cell and the same command run again; the report read back from MLflow; the grid's
runs seen in the MLflow UI by headless Chromium. Fast parts: the spec, the shards, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from dsl.cli import load_job, main
from dsl.config import DataConfig, SamplingConfig, to_dict
from dsl.service import lineage as L
from dsl.service.grid_shards import draw_shard, merge_shards, shard_ranges
from dsl.service.grid_spec import load_spec, named_specs

REPO = Path(__file__).resolve().parents[1]
JOB = load_job("jobs/grid.py")
LENGTH = 16
SPEC = """\
description = "two rows of the exact oracle, two budgets"
steps = [4, 16]

[[rows]]
label = "Exact oracle + MDLM sampler"
model = "oracle:topics"
sampler = "mdlm"

[[rows]]
label = "Exact oracle + ReMDM-loop (eta_cap(T))"
model = "oracle"
sampler = "dsl-budget"
eta_cap_table = "eq24"
"""


# ----------------------------------------------------------------------------------------------
# Fast parts.


def test_named_specs_hold_table1s_rows_and_the_papers_layout():
    assert {"table1", "paper-table1"} <= set(named_specs())
    paper = load_spec("paper-table1")
    assert [r.label for r in paper.rows] == ["MDLM", "ReMDM", "DSL-FT + ReMDM", "DSL-FT + ReMDM-loop (eta_cap(T))"]
    assert [(r.model, r.sampler) for r in paper.rows] == [("mdlm", "mdlm"), ("mdlm", "remdm-official"),
                                                          ("dsl", "remdm-official"), ("dsl", "dsl-budget")]
    assert paper.budgets(1024) == [128, 256, 512, 1024]
    assert {"sampling.num_samples=5000", "sampling.length=1024", "eval.protocol=paper-table1"} <= set(paper.settings)
    assert load_spec("table1").budgets(64) == [8, 16, 32, 64]            # T = L/8 ... L
    assert load_spec("table1").budgets(64, (5, 7)) == [5, 7]
    topics = load_spec("topics")   # the sticky-topic study: reference rows first, exact scoring
    assert [r.model for r in topics.rows[:2]] == ["data", "oracle:topics"]
    assert {"eval.judge=oracle:topics", "eval.featurizer=source-stats", "eval.reference=source"} == set(topics.settings)


def test_a_cells_samples_do_not_depend_on_the_number_of_shards():
    sampling = to_dict(SamplingConfig(sampler="dsl-budget", steps=6, eta_cap_table="eq24", batch_size=3))
    data = to_dict(DataConfig(source="topics"))

    def cell(shards: int):
        parts = [draw_shard("oracle:topics", sampling, data, first, count, LENGTH, 3, "cpu")
                 for first, count in shard_ranges(7, shards)]
        return merge_shards(parts)

    one, three = cell(1), cell(3)
    assert shard_ranges(10, 3) == [(0, 4), (4, 3), (7, 3)] and shard_ranges(2, 5) == [(0, 1), (1, 1)]
    assert torch.equal(one["ids"], three["ids"]) and one["texts"] == three["texts"]
    assert torch.equal(one["nfe"], three["nfe"]) and torch.equal(one["mean_rewrites"], three["mean_rewrites"])
    for key, values in one["diagnostics"].items():   # per-step means of the same samples, summed in parts
        np.testing.assert_allclose(values, three["diagnostics"][key], rtol=1e-12, equal_nan=True, err_msg=key)


def test_source_stats_of_impossible_sequences_are_finite():
    from dsl.eval.cells import SourceStatsFeaturizer, nll_stats
    from dsl.sources import build_source

    source = build_source("hmm", DataConfig(), LENGTH)        # sparse: most sequences are impossible
    ids = torch.cat([source.sample(3, torch.Generator().manual_seed(0)), torch.zeros(2, LENGTH, dtype=torch.long)])
    feats = SourceStatsFeaturizer(source).features(ids)
    assert np.isfinite(feats).all() and not feats[3:, source.n_words:].any() and feats[:3, source.n_words:].any()
    assert nll_stats(source, ids)["impossible"] == 2


def test_bad_grid_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec, bad = tmp_path / "spec.toml", tmp_path / "bad.toml"
    spec.write_text(SPEC)
    bad.write_text(SPEC.replace('sampler = "mdlm"', 'sampler = "fastest"'))
    cases = [
        ([f"table.spec={bad}"], "fastest"),
        (["table.spec=no-such-spec"], "table.spec"),
        ([f"table.spec={tmp_path / 'missing.toml'}"], "table.spec"),
        (["table.spec=table1"], "table.models=mdlm="),                           # the rows' models are not named
        (["table.spec=table1", "table.models=mdlm"], "table.models"),
        ([f"table.spec={spec}", "table.steps=0"], "table.steps"),
        ([f"table.spec={spec}", "table.models=oracle=oracle:topics", "service.mlflow=off"], "service.mlflow"),
        (["table.spec=paper-table1", "eval.max_length=128", "table.models=mdlm=oracle:topics,dsl=oracle:topics"],
         "eval.max_length"),                                               # a fixed setting of the paper's protocol
    ]
    for argv, key in cases:
        assert main(JOB, argv) == 2, argv
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "spec.toml"]   # no mlflow.db, nothing else


# ----------------------------------------------------------------------------------------------
# The grid on Ray and MLflow, killed and resumed, then reported and seen in the UI.


def _command(spec: Path, experiment: str, name: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs/grid.py"), f"table.spec={spec}", "table.models=oracle=oracle:topics",
            f"table.name={name}", f"experiment={experiment}", f"sampling.length={LENGTH}", "sampling.num_samples=24",
            "sampling.batch_size=8", "eval.judge=oracle:topics", "eval.featurizer=source-stats",
            "eval.reference=source", "eval.mauve_seeds=25,26", "table.workers=2", "table.mauve_resamples=2"]


def _children(client, grid_run: str) -> list:
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exp_ids, filter_string=f"tags.`{L.PARENT_RUN}` = '{grid_run}'", max_results=100)


@pytest.mark.integration
def test_grid_killed_after_its_first_cell_resumes_without_recomputing_it(ray_cluster, mlflow_server, chromium,
                                                                         tmp_path):
    """The grid's driver joins the session's Ray cluster (tests/conftest.py) through RAY_ADDRESS, as on a real
    cluster."""
    import mlflow

    from dsl.service.tracking import experiment_url

    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    experiment, name = f"grid-{uuid.uuid4().hex[:8]}", f"mini-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    env.update({**ray_cluster.env, **mlflow_server.env,
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    client = mlflow.MlflowClient(mlflow_server.tracking_uri)

    # first run: SIGKILL once a cell is complete and the next one has started (its run exists, partial)
    proc = subprocess.Popen(_command(spec, experiment, name), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    grid_run, finished, started = None, {}, time.monotonic()
    try:
        for line in proc.stderr:
            if grid_run is None and line.startswith(f"grid {name}:"):
                grid_run = line.split("MLflow run ")[1].split()[0]
            if " T=" in line and "MAUVE" in line:   # a cell is logged complete
                break
        assert grid_run, "the driver never announced its grid run"
        while time.monotonic() - started < 300:
            runs = _children(client, grid_run)
            finished = {(r.data.tags[L.ROW], r.data.tags[L.STEPS]): r for r in runs
                        if r.data.tags.get(L.CELL_STATUS) == L.CELL_COMPLETE}
            if len(runs) > len(finished):     # the next cell has begun
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    before = {key: (r.info.run_id, r.data.metrics, r.info.end_time) for key, r in finished.items()}
    assert 1 <= len(before) < 4
    left_partial = [r.info.run_id for r in _children(client, grid_run)
                    if r.data.tags.get(L.CELL_STATUS) != L.CELL_COMPLETE]

    # the same command again: the finished cells are skipped, the partial one is superseded
    again = subprocess.run(_command(spec, experiment, name), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["grid_run_id"] == grid_run and summary["grid_name"] == name
    assert summary["cells"]["total"] == 4 and summary["cells"]["skipped"] == len(before)
    assert summary["cells"]["computed"] == 4 - len(before) and summary["cells"]["superseded"] == len(left_partial)
    runs = {r.info.run_id: r for r in _children(client, grid_run)}
    complete = {(r.data.tags[L.ROW], r.data.tags[L.STEPS]): r for r in runs.values()
                if r.data.tags.get(L.CELL_STATUS) == L.CELL_COMPLETE}
    assert len(complete) == 4 and all(r.info.status == "FINISHED" for r in complete.values())
    for key, (run_id, metrics, end_time) in before.items():   # not recomputed: same run, same numbers, same end
        assert complete[key].info.run_id == run_id and complete[key].data.metrics == metrics
        assert complete[key].info.end_time == end_time
    for run_id in left_partial:
        old = runs[run_id]
        assert old.info.status == "KILLED" and old.data.tags[L.SUPERSEDED_BY] in {r.info.run_id for r in complete.values()}
    assert client.get_run(grid_run).info.status == "FINISHED"

    # what a cell holds: tags, metrics at step 0, the sharpness curves by sampler step, artifacts
    loop = complete[("Exact oracle + ReMDM-loop (eta_cap(T))", "16")]
    tags, metrics = loop.data.tags, loop.data.metrics
    assert tags[L.KIND] == L.KIND_CELL and tags[L.CHECKPOINT] == "oracle:topics" and tags[L.SAMPLER] == "dsl-budget"
    assert tags[L.ETA_CAP_SOURCE] == "builtin:eq24" and tags[L.PROTOCOL] == "offline" and tags[L.NUM_SAMPLES] == "24"
    assert loop.data.params["sampling.length"] == str(LENGTH)
    assert metrics[L.GENPPL_IMPOSSIBLE_SHARE] == 0.0 and metrics[L.NUM_SAMPLES_METRIC] == 24
    assert 0 < metrics[L.MAUVE] <= 1 and metrics[L.ETA_CAP] > 0 and metrics[L.REWRITES_PER_TOKEN] > 0
    artifacts = {f.path for f in client.list_artifacts(loop.info.run_id)}
    assert {L.SAMPLES_ARTIFACT, L.DIAGNOSTICS_ARTIFACT, L.FIG2_ARTIFACT} <= artifacts
    diag_file = client.download_artifacts(loop.info.run_id, L.DIAGNOSTICS_ARTIFACT, str(tmp_path))
    records = [json.loads(line) for line in Path(diag_file).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(16))   # one record per sampler step k
    history = {m.step: m.value for m in client.get_metric_history(loop.info.run_id, L.DIAG_MEAN_MAX_PROB)}
    assert history == {r["step"]: r["mean_max_prob"] for r in records if r["mean_max_prob"] is not None}
    assert len(history) >= 8
    samples = client.download_artifacts(loop.info.run_id, L.SAMPLES_ARTIFACT, str(tmp_path))
    assert len(Path(samples).read_text().splitlines()) == 24

    # the report reads exactly what the grid wrote
    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, str(REPO / "dashboards/report.py"), f"grid={name}", f"out={out}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert json.loads(rep.stdout.strip().splitlines()[-1])["cells"] == {"complete": 4, "partial": 0,
                                                                       "superseded": len(left_partial)}
    lines = list(csv.DictReader((out / "table1.csv").open()))
    assert len(lines) == 4
    for ln in lines:
        cell = complete[(ln["row"], ln["steps"])]
        assert ln["run_id"] == cell.info.run_id and ln["length"] == str(LENGTH) and ln["status"] == "complete"
        for column in ("mauve", "mauve_std", "genppl", "sentence_entropy", "nfe", "rewrites_per_token"):
            assert float(ln[column]) == cell.data.metrics[column], (ln["row"], ln["steps"], column)

    # the grid's runs, as the MLflow UI lists them
    exp = client.get_experiment_by_name(experiment)
    text = chromium.text(experiment_url(mlflow_server.tracking_uri, exp.experiment_id))
    assert f"grid {name}" in text, text[:800]
