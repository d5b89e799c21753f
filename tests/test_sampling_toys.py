"""The cyclic toys: Fig 3 recovery by confidence-driven remasking, Fig 1b SDE paths (and their PNGs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsl.sampling.toys import FIG3_DRAFT, FIG3_TRUTH, parse_draft, recover_cyclic, sde_localization
from dsl.sources import CyclicSource

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def test_fig3_draft_is_recovered_within_ten_steps():
    source = CyclicSource(7)
    draft = parse_draft(FIG3_DRAFT, source)
    assert source.decode(draft[0]) == FIG3_DRAFT
    runs = [recover_cyclic(source, draft, 10, torch.Generator().manual_seed(i)) for i in range(50)]
    assert all(r.valid for r in runs)
    assert sum(r.final == FIG3_TRUTH for r in runs) >= 48
    assert all(r.remasks >= 2 for r in runs)  # both visible-but-wrong tokens had to be remasked
    assert all(len(r.timeline) == 10 for r in runs)


def test_without_remasking_wrong_tokens_stay():
    source = CyclicSource(7)
    draft = parse_draft(FIG3_DRAFT, source)
    run = recover_cyclic(source, draft, 10, torch.Generator().manual_seed(0), remask=False)
    assert not run.valid and run.final[4] == "B" and run.final[6] == "D"


def test_sde_localization_paths_end_on_the_circle():
    res = sde_localization(k=5, steps=64, n=2, seed=0)
    assert res.mean_path.shape == (65, 2, 5, 2) and res.z_path.shape == (65, 2, 5, 2)
    assert torch.allclose(res.mean_path[0], torch.zeros(2, 5, 2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(res.mean_path[-1].norm(dim=-1), torch.ones(2, 5, dtype=torch.float64), atol=1e-3)


@pytest.mark.slow
def test_toy_plots_are_written(tmp_path):
    for toy in ("recover", "sde-2d"):
        out = tmp_path / f"{toy}.png"
        proc = subprocess.run([sys.executable, str(REPO / "jobs/sample.py"), toy, f"out={out}", "sampling.num_samples=4",
                               "sampling.steps=10" if toy == "recover" else "sampling.steps=48"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if toy == "recover":
            assert summary["valid_rate"] == 1.0
