"""dsl.verify: the path-integral check as a command (subprocess) and as a function."""

import json
import math
import subprocess
import sys

import pytest

from dsl import config as C
from dsl.verify import ALIASES, VerifyConfig, main, path_integral


def run(*args):
    return subprocess.run([sys.executable, "-m", "dsl.verify", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_command_reports_exact_and_estimated_nll_on_cyclic():
    proc = run("path-integral", "source=cyclic", "n=16", "seed=0", "n_mc=128")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"exact_nll", "estimate_nll", "stderr", "z_score", "source", "n"} <= set(result)
    assert result["source"] == "cyclic" and result["n"] == 16 and result["length"] == 7
    assert result["exact_nll"] == pytest.approx(math.log(7))  # every shift has P = 1/K (App B, K = 7)
    assert abs(result["estimate_nll"] - result["exact_nll"]) < 3 * result["stderr"]
    assert result["stderr"] < 0.1 * result["exact_nll"]


@pytest.mark.slow
def test_command_on_a_small_hmm():
    proc = run("path-integral", "source=hmm", "n=8", "seed=1", "length=6", "n_mc=128", "states=5",
               "words=12", "dim=16")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["source"] == "hmm" and result["length"] == 6
    assert abs(result["z_score"]) < 3 and result["stderr"] < 0.1 * result["exact_nll"]


@pytest.mark.parametrize("args, words", [
    (["path-integral", "bogus=1"], "'bogus'"),
    (["path-integral", "source=text"], "source='text'"),
    (["path-integral", "n=0"], "n=0"),
    (["sample"], "path-integral"),
    (["path-integral", "source=hmm", "embedding=circle"], "embedding=circle"),
])
def test_bad_input_is_one_error_line_and_exit_2(args, words, capsys):
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    assert out == ""


@pytest.mark.slow
def test_bad_input_exit_status_of_the_command():
    proc = run("path-integral", "n_mc=1")
    assert proc.returncode == 2 and proc.stderr.startswith("error: n_mc=1") and proc.stdout == ""


def test_function_with_a_finite_end_snr_uses_eq10():
    cfg = C.load(VerifyConfig, ["source=cyclic", "k=5", "n=16", "n_mc=128", "t_end=1.5"], aliases=ALIASES,
                 presets={})
    result = path_integral(cfg, progress=False)
    assert result["t_end"] == 1.5 and result["exact_nll"] == pytest.approx(math.log(5))
    assert abs(result["z_score"]) < 3 and result["stderr"] < 0.1 * result["exact_nll"]


def test_function_is_deterministic_given_the_seed():
    cfg = C.load(VerifyConfig, ["source=cyclic", "k=5", "n=4", "n_mc=16"], aliases=ALIASES, presets={})
    a, b = path_integral(cfg, progress=False), path_integral(cfg, progress=False)
    for timing in ("seconds", "cpu_seconds"):
        a.pop(timing), b.pop(timing)
    assert a == b and a["length"] == 5
