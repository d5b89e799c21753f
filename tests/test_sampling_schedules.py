"""η_cap(T) tables and rules: defaults, log-T interpolation, files, URIs, one-line errors; the time grid."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsl.errors import UserError
from dsl.sampling.schedules import load_eta_cap, time_grid


def test_default_is_sec61_table():
    sched = load_eta_cap("")
    assert sched.source == "default:sec6.1"
    assert [sched(t) for t in (128, 256, 512, 1024)] == [0.010, 0.008, 0.007, 0.002]


def test_builtin_tables_keep_the_papers_disagreement():
    assert load_eta_cap("eq24")(1024) == 0.004
    assert load_eta_cap("table4")(512) == 0.008
    assert load_eta_cap("table4").source == "builtin:table4"


def test_log_t_interpolation_and_ends():
    sched = load_eta_cap("")
    # halfway between 128 and 256 in log T is √(128·256)
    assert sched(round(math.sqrt(128 * 256))) == pytest.approx(
        0.010 + (0.008 - 0.010) * (math.log(181) - math.log(128)) / math.log(2))
    assert sched(64) == 0.010 and sched(4096) == 0.002


def test_json_file_and_rule(tmp_path):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"rule": {"form": "linear_log_t", "a": 0.05, "b": -0.006}}))
    sched = load_eta_cap(str(path))
    assert sched.source == str(path)
    assert sched(256) == pytest.approx(0.05 - 0.006 * math.log(256))
    assert sched(10**9) == 0.0  # clipped at 0
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"table": {"100": 0.02, "1000": 0.01}}))
    assert load_eta_cap(str(table))(int(math.sqrt(100 * 1000))) == pytest.approx(0.015, abs=1e-4)
    inline = load_eta_cap('{"rule": {"form": "power", "a": 0.64, "b": -0.5}}')
    assert inline(256) == pytest.approx(0.04) and inline.source.startswith("inline:")


def test_storage_uri(tmp_path):
    (tmp_path / "eta.json").write_text(json.dumps({"table": {"128": 0.02}}))
    assert load_eta_cap(f"file://{tmp_path}/eta.json")(128) == 0.02


@pytest.mark.parametrize("content", ['{"table": {}}', '{"table": {"x": 1}}', '{"rule": {"form": "cubic"}}',
                                     '{"table": {"128": -1}}', "[1, 2]", "not json"])
def test_bad_specs_fail_with_one_line(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        load_eta_cap(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_file():
    with pytest.raises(UserError, match="no such file"):
        load_eta_cap("/does/not/exist.json")


def test_time_grid():
    grid = time_grid(4, 1e-5)
    assert grid.dtype == torch.float64 and grid[0] == 1.0 and grid[-1] == 1e-5 and len(grid) == 5
