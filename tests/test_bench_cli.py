"""The CPU benches' thread counts: every count is timed in one run, so a bad list is refused up front with one
line naming the flag and what is accepted (before any model is built)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from machine import thread_counts  # noqa: E402


def test_thread_counts_parse_one_or_several():
    assert thread_counts("2") == [2]
    assert thread_counts("1,2") == [1, 2]
    assert thread_counts("4,1") == [4, 1]  # printed in the order given


@pytest.mark.parametrize("text", ["0", "1,0", "2,2", "1,x", "", "1,,2"])
def test_bad_thread_counts_name_the_flag_and_what_is_accepted(text):
    with pytest.raises(ValueError, match=r"^--threads=.*: .*e\.g\. 2 or 1,2$"):
        thread_counts(text)


@pytest.mark.slow  # two bench processes (torch import only: the counts are checked before any work)
@pytest.mark.parametrize("bench", ["bench_train.py", "bench_sampler.py"])
def test_bench_refuses_a_bad_thread_list_in_one_line(bench):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / bench), "--threads", "2,0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""  # refused before the bench printed (or timed) anything
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "--threads=2,0: thread counts must be distinct and at least 1, e.g. 2 or 1,2")


@pytest.mark.slow  # one bench process (refused before any device work)
def test_gpu_check_refuses_a_count_below_one_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--steps", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].endswith("--steps=0: must be at least 1")


@pytest.mark.slow  # one bench process (refused before any model is built)
def test_bench_train_refuses_a_memory_batch_below_one_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--memory-batch", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].endswith("--memory-batch=0: must be at least 1")
