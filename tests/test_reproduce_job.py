"""jobs/reproduce.py: the whole chain at micro size as a user runs it (both fine-tunes from the one pretrained
checkpoint with equal budgets, report.html and table1.csv equal to the MLflow runs, study.csv's exact NLL
against the Data row, a re-run recomputes nothing), the paper-scale preset parsed and planned (not run), and
impossible samples reported by count and share."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsl.cli import load_job, parse
from dsl.eval.cells import nll_stats
from dsl.seeding import sample_generator
from dsl.service.reproduce import impossible_lines, study_markdown, study_rows, write_study
from dsl.sources import CyclicSource

REPO = Path(__file__).resolve().parents[1]
JOB = load_job("jobs/reproduce.py")


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "jobs/reproduce.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.mark.integration
def test_micro_reproduction_writes_the_report_of_its_mlflow_runs_and_resumes(tmp_path):
    import mlflow

    out = tmp_path / "study"
    proc = _run("preset=micro", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out / "report.html").is_file() and (out / "study.md").is_file()
    table = list(csv.DictReader((out / "table1.csv").open()))
    # the Data row once, the oracle and Table 1's five rows at T = 1, 2, 4, 8 (L = 8)
    assert len(table) == 1 + 6 * 4 == summary["cells"]["total"] == summary["cells"]["computed"]
    assert {r["row"] for r in table} >= {"MDLM", "ReMDM", "DSL-FT + ReMDM", "DSL-FT + ReMDM-loop (eta_cap(T))",
                                         "DSL-FT + MDLM sampler", "Data (exact samples)"}
    assert {int(r["steps"]) for r in table if r["row"] == "MDLM"} == {1, 2, 4, 8}
    # every number of the table is the number of its MLflow cell run, under the grid run
    client = mlflow.MlflowClient(tracking_uri=summary["tracking_uri"])
    for r in table:
        run = client.get_run(r["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == summary["grid_run_id"]
        assert (run.data.tags["dsl.row"], run.data.tags["dsl.steps"]) == (r["row"], r["steps"])
        assert int(r["num_samples"]) == 16 and run.data.tags["dsl.num_samples"] == "16"
        for name in ("mauve", "mauve_std", "genppl", "sentence_entropy", "nfe", "rewrites_per_token"):
            assert float(r[name]) == pytest.approx(run.data.metrics[name], rel=1e-9), (r["row"], name)
        # GenPPL is exp of the exact NLL per token of the same samples (full support: no impossible sample)
        assert float(r["genppl"]) == pytest.approx(math.exp(run.data.metrics["nll_per_token"]), rel=1e-9)
        assert float(r["genppl_impossible_share"]) == 0.0
    assert "Table 1" in (out / "report.html").read_text()
    study = (out / "study.md").read_text()
    assert "over 16 samples" in study and "| MDLM |" in study
    lines = list(csv.DictReader((out / "study.csv").open()))
    assert [(r["row"], r["steps"]) for r in lines] == [(r["row"], r["steps"]) for r in table]
    for r in lines:
        assert r["n_samples"] == "16" and r["impossible"] == "0"   # full support
        assert float(r["nll_se"]) >= 0 and 0 <= float(r["mauve"]) <= 1   # an untrained model may repeat itself
    (data,) = [r for r in lines if r["row"] == "Data (exact samples)"]
    assert float(data["nll_se"]) > 0 and float(data["nll_gap"]) == 0.0
    (loop,) = [r for r in lines if r["row"] == "DSL-FT + ReMDM-loop (eta_cap(T))" and r["steps"] == "8"]
    assert float(loop["rewrites_per_token"]) > 0 and float(loop["eta_cap"]) > 0
    # the two fine-tunes start from the one pretrained checkpoint, with equal budgets
    _, micro = parse(JOB, ["preset=micro", f"out={out}"])
    assert set(summary["runs"]) == {"pretrain", "mdlm-ft", "dsl-ft"}
    for name in ("mdlm-ft", "dsl-ft"):
        manifest = json.loads(sorted((out / "runs" / name).glob("step-*/manifest.json"))[-1].read_text())
        assert manifest["step"] == micro.reproduce.finetune_steps
        assert manifest["config"]["init"].startswith(str(out / "runs" / "pretrain"))
    # the same command again: every phase read back, no cell recomputed, the same grid run and table
    ckpts = sorted((out / "runs").rglob("manifest.json"))
    again = _run("preset=micro", f"out={out}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(again.stdout.strip().splitlines()[-1])
    assert resumed["grid_run_id"] == summary["grid_run_id"]
    assert resumed["cells"] == {"total": 25, "skipped": 25, "computed": 0, "superseded": 0}
    assert sorted((out / "runs").rglob("manifest.json")) == ckpts
    assert list(csv.DictReader((out / "table1.csv").open())) == table
    assert list(csv.DictReader((out / "study.csv").open())) == lines


def test_paper_preset_parses_and_plans_without_running(tmp_path):
    mode, cfg = parse(JOB, ["plan", "preset=paper", f"out={tmp_path / 'paper'}"])
    assert cfg.init == "hf:kuleshov-group/mdlm-owt" and cfg.reproduce.pretrain_steps == 0
    assert cfg.eval.protocol == "paper-table1" and cfg.sampling.num_samples == 5000
    plan = JOB.modes[mode].run(cfg)
    assert plan["steps"] == [128, 256, 512, 1024]   # Table 1's columns: L/8 … L at L = 1024
    assert [r["label"] for r in plan["rows"]] == ["MDLM", "ReMDM", "DSL-FT + ReMDM", "DSL-FT + ReMDM-loop (eta_cap(T))",
                                                  "DSL-FT + MDLM sampler"]   # no exact source: no Data/oracle rows
    assert (plan["judge"], plan["featurizer"]) == ("gpt2-large", "gpt2-large")   # the paper's protocol
    assert set(plan["phases"]) == {"mdlm-ft", "dsl-ft"}   # no pretraining: the MDLM OWT checkpoint is the start
    dsl = plan["phases"]["dsl-ft"]
    assert dsl["init"] == "hf:kuleshov-group/mdlm-owt" and dsl["train"]["warmup_steps"] == 0   # App C.1
    assert dsl["train"]["steps"] == plan["phases"]["mdlm-ft"]["train"]["steps"] == 100_000
    assert dsl["channel"]["p_roar"] == 0.1 and dsl["channel"]["gamma_max"] == 50.0   # eq. 17, App C.1
    assert dsl["model"]["length"] == 1024 and dsl["train"]["precision"] == "fp32"
    assert not (tmp_path / "paper").exists()


def test_bad_input_is_one_line_before_anything_is_written(tmp_path, capsys):
    from dsl.cli import main

    assert main(JOB, ["preset=micro", f"out={tmp_path / 'x'}", "data.source=/no/such/corpus.txt"]) == 2
    assert capsys.readouterr().err.startswith("error: data.source=")
    assert main(JOB, ["preset=nope", f"out={tmp_path / 'x'}"]) == 2
    assert "smoke" in capsys.readouterr().err   # the job's own presets are named
    assert not any(tmp_path.iterdir())


def test_samples_impossible_under_the_source_are_counted_not_hidden(tmp_path):
    source = CyclicSource(5)
    ok = source.sample(3, sample_generator(0, "test-reproduce-job"))
    bad = torch.zeros(4, 5, dtype=torch.long)   # never emitted by the cyclic language
    cell = {"row": "MDLM", "steps": 2, "model": "mdlm", "mauve": 0.5, "mauve_std": 0.0, "mauve_std_resamples": 0.1,
            "sentence_entropy": 1.0, "nfe": 2.0, "rewrites_per_token": 0.0, "eta_cap": None}
    every = {**cell, **nll_stats(source, bad)}
    assert impossible_lines([every]) == ["MDLM T=2: 4 of 4 samples impossible under the source (100%); "
                                         "GenPPL undefined"]
    assert write_study([every], tmp_path, 4) == []   # no NLL to tabulate, and no table pretending otherwise
    some = {**cell, **nll_stats(source, torch.cat([ok, bad[:1]]))}
    assert impossible_lines([some]) == ["MDLM T=2: 1 of 4 samples impossible under the source (25%)"]
    assert write_study([some], tmp_path, 4) == ["study.csv", "study.md"]
    (line,) = list(csv.DictReader((tmp_path / "study.csv").open()))
    assert (line["impossible"], float(line["impossible_share"])) == ("1", 0.25)
    assert impossible_lines([{**cell, **nll_stats(source, ok)}]) == []


def test_study_table_measures_nll_against_the_data_row_and_fills_its_columns():
    def cell(row, steps, nll, model="mdlm"):
        return {"row": row, "steps": steps, "model": model, "n_samples": 4, "nll_per_token": nll, "nll_se": 0.01,
                "mauve": 0.5, "mauve_std": 0.02, "mauve_std_resamples": 0.05, "sentence_entropy": 2.0}

    cells = [cell("Data (exact samples)", 8, 1.25, "data"), cell("MDLM", 4, 1.5), cell("MDLM", 8, 1.375)]
    assert [r["nll_gap"] for r in study_rows(cells)] == [0.0, 0.25, 0.125]
    assert all(math.isnan(r["nll_gap"]) for r in study_rows(cells[1:]))   # no Data row: no gap to claim
    md = study_markdown(cells).splitlines()
    assert md[0] == "| row | T=4 | T=8 |"
    assert md[2] == "| Data (exact samples) | 1.250 ± 0.010 / 0.50 ± 0.05 / 2.00 | 1.250 ± 0.010 / 0.50 ± 0.05 / 2.00 |"
    assert md[3].startswith("| MDLM | 1.500 ± 0.010")
