"""The README's tour runs as written, in order, on a fresh copy of the repository, at smoke size.

The commands come from the README's "A tour" code block itself (one source of truth). Each job command
gets smoke-size keys appended (a later key wins); nothing else is changed. The MLflow UI command is
started in the background on a free port and must answer.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Appended to each command of that entry point: small enough for 2 CPU cores, same code paths.
SMOKE = {
    "jobs/finetune.py": ["train.steps=4", "train.batch_size=4", "train.eval_every=2", "train.ckpt_every=2",
                         "train.eval_batches=1", "train.log_every=1"],
    # T=8 for every sample command (the README's T=256 oracle draw alone took minutes); the search below
    # tunes the same T, so the last command still reads its η_cap at a budget the table holds
    "jobs/sample.py": ["sampling.num_samples=8", "sampling.steps=8"],
    "jobs/evaluate.py": ["eval.mauve_seeds=25", "eval.num_buckets=2", "eval.batches=1", "eval.batch_size=2",
                         "eval.n_mc=2", "eval.max_sequences=2", "eval.snr=70,100"],
    "tune/eta_cap_search.py": ["search.budgets=8", "search.trials=2", "sampling.num_samples=8", "search.min_samples=8",
                               "eval.references=8", "eval.mauve_seeds=25"],
    "-m dsl.verify": ["n=2", "n_mc=4"],
}
# Appended to the MLflow UI command: one server worker (the default four each import MLflow's server stack);
# in its environment: no consumers for MLflow's server-side jobs (the tour submits none). Measured on 2 busy
# cores: /health answered after 31 s instead of 41-48 s.
SMOKE_UI = ["--workers", "1"]
SMOKE_UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def tour_commands(readme: str) -> list[str]:
    """The commands of the README's tour block, continuation lines joined, comments dropped."""
    block = readme.split("## A tour", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip() if not line.lstrip().startswith("#") else ""
        if line:
            commands.append(re.sub(r"\s+", " ", line))
    return commands


def smoke(command: str) -> str:
    for entry, keys in SMOKE.items():
        if command.startswith(f"python {entry}"):
            return command + " " + " ".join(keys)
    return command


def _copy_repo(dest: Path) -> None:
    """The files a fresh clone has (tracked by git), as they are in the working tree."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tour_block_is_found_and_every_job_command_parses():
    from dsl.cli import load_job, parse

    commands = tour_commands((REPO / "README.md").read_text())
    assert commands[0].startswith('eval "$(cluster/local_cluster.sh start')
    assert commands[-1].startswith("mlflow ui") and commands[-2] == "cluster/local_cluster.sh stop"
    jobs = [c for c in commands if re.match(r"python (jobs|tune)/", c)]
    assert len(jobs) == 11
    for command in jobs:
        script, *argv = smoke(command).split()[1:]
        parse(load_job(script), [a for a in argv if not a.startswith("$")])


@pytest.mark.slow
@pytest.mark.integration
def test_the_tour_runs_as_written_in_order_on_a_fresh_copy(tmp_path):
    repo = tmp_path / "repo"
    _copy_repo(repo)
    commands = tour_commands((repo / "README.md").read_text())
    *steps, ui = commands
    script = "set -euo pipefail\n" + "".join(f"echo '>>> {c[:60]}'\n{smoke(c)}\n" for c in steps)
    ray_dir = f"/tmp/ray-tour-{uuid.uuid4().hex[:8]}"   # short: Ray's unix socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE",
                                                               "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")}
    env.update(PYTHONPATH=str(repo), DSL_RAY_TEMP_DIR=ray_dir, DSL_CACHE_DIR=str(tmp_path / "cache"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    try:
        run = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=2400)
    finally:
        subprocess.run([sys.executable, "-m", "dsl.service.local_cluster", "stop", "--temp-dir", ray_dir],
                       cwd=repo, env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_dir, ignore_errors=True)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert "Traceback" not in log and "error:" not in log, log[-6000:]
    for path in ("runs/hmm-dsl/step-4/manifest.json", "runs/hmm-atomic/step-4/manifest.json", "samples.jsonl",
                 "heldout.jsonl", "fig3.png", "fig1b.png", "runs/calibration/calibration.png",
                 "runs/eta_cap_search/eta_cap_table.json", "tuned.jsonl", "mlflow.db"):
        assert (repo / path).is_file(), path
    assert not (repo / "runs" / "_ray").exists()   # Ray's run state is not left in the working directory

    port = _free_port()
    server = subprocess.Popen(["bash", "-c", " ".join([ui, *SMOKE_UI, "--port", str(port)])], cwd=repo,
                              env={**env, **SMOKE_UI_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not come up"
                time.sleep(1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
