"""jobs/sample.py: JSON lines, diagnostics file, summary line, trajectory, one-line errors, no overwrite."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sample_job", REPO / "jobs" / "sample.py")
sample_job = importlib.util.module_from_spec(spec)
sys.modules["sample_job"] = sample_job  # dataclasses look their module up by name
spec.loader.exec_module(sample_job)


def _run(tmp_path, *args):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "sample.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    return proc.returncode, proc.stdout, proc.stderr


def test_end_to_end_with_trajectory(tmp_path):
    out, traj, plot = tmp_path / "s.jsonl", tmp_path / "traj.npy", tmp_path / "diag.png"
    rc, stdout, stderr = _run(tmp_path, "checkpoint=oracle:cyclic", "sampler=remdm-loop", "steps=24", "n=5",
                              f"out={out}", f"trajectory={traj}", "eta=0.2", "seed=3", f"plot={plot}")
    assert rc == 0, stderr
    assert plot.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 5 and summary["n"] == 5
    first = lines[0]
    assert set(first) >= {"ids", "text", "seed", "settings", "nfe", "mean_rewrites"}
    assert len(first["ids"]) == 7 and len(first["text"]) == 7 and first["settings"]["sampler"] == "remdm-loop"
    assert summary["mean_nfe"] == pytest.approx(np.mean([x["nfe"] for x in lines]))
    assert summary["mean_rewrites_per_token"] == pytest.approx(np.mean([x["mean_rewrites"] for x in lines]))
    assert {"wall_time_s", "eta_cap", "eta_cap_source"} <= set(summary)
    diag = [json.loads(line) for line in Path(summary["diagnostics"]).read_text().splitlines()]
    assert len(diag) == 24 and diag[-1]["masked_ratio"] == 0.0
    # rewrite counts (remask events, the default reading) recounted from the saved trajectory
    t = np.load(traj)  # (T, n, L)
    mask = 7
    prev = np.concatenate([np.full((1,) + t.shape[1:], mask), t[:-1]])
    recount = ((prev != mask) & (t == mask)).sum(0).mean(-1)
    assert np.allclose(recount, [x["mean_rewrites"] for x in lines])
    assert [x["ids"] for x in lines] == t[-1].tolist()


def test_same_seed_same_samples_any_batch_size(tmp_path, capsys):
    outs = []
    for bs in (1, 4):
        out = tmp_path / f"b{bs}.jsonl"
        assert sample_job.main(["checkpoint=oracle:hmm", "length=8", "sampler=remdm-cap", "steps=8", "n=4",
                                f"out={out}", f"batch_size={bs}"]) == 0
        outs.append([json.loads(x)["ids"] for x in out.read_text().splitlines()])
    assert outs[0] == outs[1]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resolved"] == "remdm-cap" and summary["length"] == 8


def test_dsl_budget_reports_its_eta_cap(tmp_path, capsys):
    table = tmp_path / "eta.json"
    table.write_text(json.dumps({"table": {"16": 0.05}}))
    out = tmp_path / "s.jsonl"
    assert sample_job.main(["checkpoint=oracle:cyclic", "sampler=dsl-budget", "steps=16", "n=2", f"out={out}",
                            f"eta_cap_table={table}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["eta_cap"] == 0.05 and summary["eta_cap_source"] == str(table)


@pytest.mark.parametrize("arg,needle", [("steps=0", "sampling.steps"), ("top_p=0", "sampling.top_p"),
                                        ("top_p=1.2", "sampling.top_p"), ("eta=-0.1", "sampling.eta"),
                                        ("t_off=0.7", "t_off"), ("sampler=ddim", "sampling.sampler"),
                                        ("checkpoint=/no/such/dir", "/no/such/dir"), ("bogus=1", "bogus")])
def test_bad_values_fail_with_one_line_and_overwrite_nothing(tmp_path, capsys, arg, needle):
    out = tmp_path / "s.jsonl"
    out.write_text("keep me\n")
    args = ["checkpoint=oracle:cyclic", "n=2", f"out={out}"]
    args = [a for a in args if a.split("=")[0] != arg.split("=")[0]] + [arg]
    assert sample_job.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err
    assert out.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]
