"""bench/gpu_check.py --smoke: the GPU check runs end to end on the CPU at reduced shapes and reports every
figure the GPU run will (fields and their relations, not timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the benchmark itself in a subprocess (training, converter and sampler timings)
def test_smoke_run_reports_every_field():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "the check prints exactly one JSON line on stdout"
    report = json.loads(lines[0])
    assert report["smoke"] is True and report["device"] == "cpu"
    assert report["matmul_bf16_tflops"] > 0

    train = report["train"]
    assert train["batch"] >= 1 and train["precision"] == "bf16 autocast"
    for objective in ("mdlm", "dsl"):
        row = train[objective]
        assert row["step_s"] > 0 and row["flops_per_step"] > 0 and row["params_m"] > 0
        assert abs(row["tokens_per_s"] * row["step_s"] - train["batch"] * train["shape"]["length"]) < 1e-6 * \
            row["tokens_per_s"] * row["step_s"]
        assert abs(row["mfu"] - row["tflops"] / report["matmul_bf16_tflops"]) < 1e-9 * max(row["mfu"], 1)
        assert "peak_mem_gib" in row
    assert train["dsl_over_mdlm_step"] > 0
    assert train["dsl_over_mdlm_flops"] > 1  # the converter adds GEMMs: DSL costs more FLOPs per step

    converter = report["converter"]
    assert converter["gemm_flops"] > 0
    for key in ("chunked_fp32", "chunked_bf16", "attention_fp32", "attention_bf16"):
        assert "ms" in converter[key] or "error" in converter[key], key
    assert converter["chunked_fp32"]["ms"] > 0 and converter["chunked_bf16"]["ms"] > 0  # never allowed to fail

    sampler = report["sampler"]
    for name in ("mdlm", "dsl-budget"):
        row = sampler[name]
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["forward_s"] > 0
        assert 1 <= row["nfe"] <= sampler["steps"] + 1  # at most one forward per step, plus noise removal
        assert row["math_s_per_step"] >= 0
