"""jobs/finetune.py through `ray job submit` on a real two-node local Ray cluster: DDP equivalence,
S3 + MLflow server, worker and driver faults, corruption fallback, credential scan, one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from dsl.checkpoint import MANIFEST, load_checkpoint
from dsl.config import ConfigError, RunConfig, load
from dsl.service.local_cluster import cluster_pids, free_port
from dsl.service.tracking import TAG_RUN_NAME

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=toy", "model.length=32", "train.batch_size=8", "train.eval_every=0", "train.eval_batches=1",
        "train.ema=0.9", "data.source=hmm", "train.log_every=1", "train.lr=1e-3"]
SECRET = "testing-secret-9f3c1e"  # tests/conftest.py FAKE_AWS


def ray_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), *args]


def submit(cluster, env, args: list[str], *, wait: bool = True, timeout: float = 400,
           job_env: dict | None = None) -> subprocess.CompletedProcess:
    extra = ["--runtime-env-json", json.dumps({"env_vars": job_env})] if job_env else []
    cmd = ray_cmd("job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO), *extra,
                  *([] if wait else ["--no-wait"]), "--", "python", "jobs/finetune.py", *args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def summary_of(out: subprocess.CompletedProcess) -> dict:
    if out.returncode != 0:
        pytest.fail(f"job failed (exit {out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def wait_for(cond, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def complete_steps(root: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in root.glob(f"step-*/{MANIFEST}"))


def runs_named(tracking_uri: str, name: str) -> list:
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("dsl")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_RUN_NAME}` = '{name}'")


def steps_of(tracking_uri: str, run_id: str, metric: str) -> list[tuple[int, float]]:
    hist = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, metric)
    return sorted((m.step, m.value) for m in hist)


def train_workers(cluster) -> list[psutil.Process]:
    out = []
    for pid in cluster_pids(cluster.temp_dir, cluster.address):
        try:
            p = psutil.Process(pid)
            if "RayTrainWorker" in p.name() or "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def job_drivers(cluster, name: str) -> list[psutil.Process]:
    out = []
    for pid in cluster_pids(cluster.temp_dir, cluster.address):
        try:
            p = psutil.Process(pid)
            cmd = " ".join(p.cmdline())
            if "jobs/finetune.py" in cmd and f"name={name}" in cmd and "job submit" not in cmd:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


# ----------------------------------------------------------------------------------------------
# without a cluster: errors that must be one clear line before any Ray starts


def run_plain(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/finetune.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, needle", [
    (["service.workers=0"], "service.workers=0 is out of range"),
    (["service.storage=gs://bucket/x"], "service.storage='gs://bucket/x'"),
    (["init=/no/such/ckpt"], "init=/no/such/ckpt: no such file or directory"),
    (["train.batch_size=9", "service.workers=2"], "train.batch_size=9 must be divisible by service.workers=2"),
    (["embedded=yes", "train.steps=0"], "train.steps=0 is out of range"),
    (["sampling.steps=4"], "sampling.steps is not read by jobs/finetune.py"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path, capsys, monkeypatch):
    """jobs/finetune.py's entry (dsl.cli.main) in this process; the script's own exit status is checked
    as users run it in tests/test_cli.py::test_entry_points_as_users_run_them."""
    from dsl.cli import load_job, main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(load_job("jobs/finetune.py"), [*args, f"out={tmp_path}", "service.mlflow=off"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1], lines[-3:]
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_hf_init_offline_is_one_clear_line(tmp_path):
    out = run_plain(["init=hf:kuleshov-group/mdlm-owt", f"out={tmp_path}", "service.mlflow=off"],
                    env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: hf:kuleshov-group/mdlm-owt:") and "local directory" in last


@pytest.mark.slow
def test_unreachable_s3_storage_fails_after_retries_with_one_line(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    out = run_plain(["service.storage=s3://bucket/runs", f"service.storage_endpoint={dead}", f"out={tmp_path}",
                     "service.mlflow=off"],
                    env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"})
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: s3://bucket/runs/") and "attempts" in last and dead in last


def test_config_keys_and_names():
    from dsl.cli import load_job, parse
    from dsl.config import run_config_of
    from dsl.service.ray_train import resolve_name, storage_root

    job = load_job("jobs/finetune.py")
    mode, cfg = parse(job, ["service.workers=4", "service.gpus_per_worker=1", "lr=1e-4", "model=toy",
                            "service.storage=s3://b/runs"])
    assert mode == "train"
    assert (cfg.service.workers, cfg.service.gpus_per_worker, cfg.train.lr) == (4, 1.0, 1e-4)
    run = run_config_of(cfg)
    assert type(run) is RunConfig and run.model.hidden == 32
    name = resolve_name(cfg)
    assert name == resolve_name(cfg) and name.startswith("dsl-")  # stable without a timestamp
    assert storage_root(cfg, name) == f"s3://b/runs/{name}"
    os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps({"metadata": {"job_submission_id": "raysubmit_abc"}})
    try:
        assert resolve_name(parse(job, ["model=toy"])[1]) == "raysubmit_abc"
    finally:
        del os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"]


def test_sub_modes_and_booleans_parse_one_way(capsys):
    """``demo`` is the first word or, for one release, ``embedded=<bool>``: every boolean spelling of
    true selects the demo (never a full-size training run), false selects train, anything else is an error."""
    from dsl.cli import load_job, parse

    job = load_job("jobs/finetune.py")
    assert parse(job, [])[0] == "demo"
    assert parse(job, ["demo"])[0] == "demo"
    assert parse(job, ["model=toy"])[0] == "train"
    for word in ("true", "yes", "on", "1", "True"):
        mode, cfg = parse(job, [f"embedded={word}"])
        assert mode == "demo" and cfg.model.hidden == 64 and cfg.train.steps == 300   # preset=embedded
    assert parse(job, ["embedded=no", "model=toy"])[0] == "train"
    with pytest.raises(ConfigError, match="embedded='maybe' is not a boolean"):
        parse(job, ["embedded=maybe"])
    assert capsys.readouterr().err.count("warning: embedded= is deprecated") == 7


@pytest.mark.parametrize("old, value, new, read", [
    ("workers", "3", "service.workers=", lambda c: c.service.workers == 3),
    ("storage", "/x", "service.storage=", lambda c: c.service.storage == "/x"),
    ("steps", "7", "train.steps=", lambda c: c.train.steps == 7),
    ("batch_size", "8", "train.batch_size=", lambda c: c.train.batch_size == 8),
    ("out_dir", "o", "out=", lambda c: c.out == "o"),
    ("tracking_uri", "sqlite:///m.db", "service.tracking_uri=", lambda c: c.service.tracking_uri == "sqlite:///m.db"),
    ("service.log_to_mlflow", "false", "service.mlflow=on|off", lambda c: c.service.mlflow == "off"),
    ("service.experiment", "e", "experiment=", lambda c: c.experiment == "e"),
])
def test_old_spellings_land_in_the_new_key_with_one_warning(capsys, old, value, new, read):
    from dsl.cli import load_job, parse

    assert read(parse(load_job("jobs/finetune.py"), ["model=toy", f"{old}={value}"])[1])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {old}= is deprecated and will be removed in the next release; use {new}"]


# ----------------------------------------------------------------------------------------------
# on the cluster, through `ray job submit`


@pytest.mark.integration
def test_s3_storage_and_mlflow_server_run_two_workers_equal_one_process(ray_cluster, ray_env, s3_server, s3_bucket,
                                                                         mlflow_server, tmp_path):
    from dsl.train import Trainer

    args = [*TINY, "train.steps=4", "train.ckpt_every=2", "name=s3run", "service.workers=2",
            f"service.storage={s3_bucket}/runs", f"service.tracking_uri={mlflow_server.tracking_uri}"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = submit(ray_cluster, ray_env, args, job_env={"DSL_GIT_COMMIT": commit})
    summary = summary_of(out)
    assert summary["checkpoint"] == f"{s3_bucket}/runs/s3run/step-4"
    bucket = s3_bucket.removeprefix("s3://")
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    for f in ("model.safetensors", "ema.safetensors", "optim.safetensors", "state.json", MANIFEST):
        assert f"runs/s3run/step-4/{f}" in keys
    assert "runs/s3run/step-2/manifest.json" in keys
    assert "world_size=2" in out.stdout + out.stderr or "rank 0 of 2" in out.stdout + out.stderr

    # two DDP workers train the weights one process trains (storage and tracking change nothing)
    torch.set_num_threads(1)
    single_cfg = load(RunConfig, [*TINY, "train.steps=4", "train.ckpt_every=0", "name=single"])
    single = Trainer(single_cfg, storage=str(tmp_path / "single"))
    single.fit()
    ref, distributed = single.raw_model.state_dict(), load_checkpoint(summary["checkpoint"]).model_state
    assert set(ref) == set(distributed)
    for k, v in ref.items():
        torch.testing.assert_close(distributed[k], v, rtol=1e-5, atol=1e-6, msg=k)
    start = Trainer(single_cfg, storage=str(tmp_path / "unused")).raw_model.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in ref.items())  # training moved the weights

    (run,) = runs_named(mlflow_server.tracking_uri, "s3run")
    assert run.data.params["train.steps"] == "4" and run.data.params["service.workers"] == "2"
    assert run.data.tags["dsl.checkpoint"] == summary["checkpoint"]
    assert run.data.tags["dsl.checkpoint.step-2"] == f"{s3_bucket}/runs/s3run/step-2"
    assert run.data.tags["mlflow.source.git.commit"] == commit and len(run.data.tags["dsl.code_digest"]) == 16
    assert [s for s, _ in steps_of(mlflow_server.tracking_uri, run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert {"lr", "grad_norm", "tokens_per_s", "valid_loss", "valid_denoising_ce"} <= set(run.data.metrics)

    # the checkpoint URI is all the sampling job needs
    sample = subprocess.run([sys.executable, "jobs/sample.py", f"checkpoint={summary['checkpoint']}",
                             "sampling.num_samples=2", "sampling.steps=4", "sampler=mdlm",
                             f"out={tmp_path / 's.jsonl'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, **s3_server.env, "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri})
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2
    client = mlflow.MlflowClient(mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name("dsl").experiment_id
    (sampled,) = client.search_runs([exp], filter_string="tags.`dsl.kind` = 'sample'")
    assert sampled.data.tags["dsl.training_run_id"] == run.info.run_id  # side by side with its fine-tune
    assert sampled.data.tags["dsl.checkpoint"] == summary["checkpoint"]

    # no credentials in MLflow params/tags or in the job's logs
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)
    logs = subprocess.run(ray_cmd("job", "logs", "--address", ray_cluster.dashboard_url, job_id),
                          env=ray_env, capture_output=True, text=True, timeout=60).stdout
    assert "step 4/4" in logs  # progress is visible in the job logs
    blobs = [json.dumps(run.data.params), json.dumps(run.data.tags), out.stdout, out.stderr, logs]
    for blob in blobs:
        assert SECRET not in blob


def _fault_args(name: str, root: Path, tracking: str, steps: int) -> list[str]:
    return [*TINY, f"train.steps={steps}", "train.ckpt_every=5", "train.keep_last=10", f"name={name}",
            "service.workers=2", f"service.storage={root.parent}", f"service.tracking_uri={tracking}",
            "service.max_failures=2"]


@pytest.mark.integration
def test_killed_worker_restarts_from_last_checkpoint(ray_cluster, ray_env, tmp_path):
    name, steps, every = "wkill", 60, 5
    root, tracking = tmp_path / "runs" / name, f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = submit(ray_cluster, ray_env, _fault_args(name, root, tracking, steps), wait=False)
    assert out.returncode == 0, out.stderr[-2000:]
    wait_for(lambda: [s for s in complete_steps(root) if s >= every], 300, "a first checkpoint")
    victims = wait_for(lambda: train_workers(ray_cluster), 60, "training worker processes")
    assert len(victims) == 2
    killed_after = max(complete_steps(root))
    victims[-1].send_signal(signal.SIGKILL)
    wait_for(lambda: complete_steps(root) and max(complete_steps(root)) == steps, 400, "the run to finish", every=2)

    (run,) = runs_named(tracking, name)  # exactly one MLflow run
    starts = [v for _, v in steps_of(tracking, run.info.run_id, "resumed_from_step")]
    assert starts[0] == 0 and len(starts) == 2, starts
    assert starts[1] >= killed_after and starts[1] % every == 0
    loss_steps = [s for s, _ in steps_of(tracking, run.info.run_id, "loss")]
    assert sorted(set(loss_steps)) == list(range(1, steps + 1))
    redone = len(loss_steps) - len(set(loss_steps))
    assert redone <= every  # lost work: at most one checkpoint interval
    assert load_checkpoint(str(root / f"step-{steps}")).step == steps


@pytest.mark.integration
def test_killed_driver_then_resubmitted_resumes_from_the_last_intact_checkpoint(ray_cluster, ray_env, tmp_path):
    """A killed driver leaves checkpoints behind; the latest is then damaged (one flipped byte) and the
    resubmitted run resumes from the one before it, never from the damaged one, in the same MLflow run."""
    name, steps, every = "dkill", 40, 5
    root, tracking = tmp_path / "runs" / name, f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = _fault_args(name, root, tracking, steps)
    assert submit(ray_cluster, ray_env, args, wait=False).returncode == 0
    wait_for(lambda: [s for s in complete_steps(root) if s >= 2 * every], 300, "two checkpoints")
    for proc in wait_for(lambda: job_drivers(ray_cluster, name), 30, "the job driver"):
        proc.send_signal(signal.SIGKILL)  # the entrypoint's shell and its python
    wait_for(lambda: not train_workers(ray_cluster), 120, "the killed job's workers to go")
    before = max(complete_steps(root))
    assert before < steps

    blob = root / f"step-{before}" / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))

    summary = summary_of(submit(ray_cluster, ray_env, args))
    assert summary["resumed"] is True and summary["step"] == steps
    (run,) = runs_named(tracking, name)
    starts = [v for _, v in steps_of(tracking, run.info.run_id, "resumed_from_step")]
    assert starts[0] == 0 and starts[-1] == before - every  # resumed, not restarted; the damaged one skipped
    assert summary["mlflow_run_id"] == run.info.run_id
    # the damaged step was trained again and written intact
    assert load_checkpoint(str(root / f"step-{before}")).step == before
    assert load_checkpoint(str(root / f"step-{steps}")).step == steps


@pytest.mark.integration
def test_embedded_default_pretrains_then_fine_tunes_offline(tmp_path):
    """The no-argument demo path (here shortened by overrides), on a private local Ray."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "finetune.py"), "demo", "model=toy",
                          "model.length=32", "train.steps=3", "train.eval_batches=1", "service.system_metrics=false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    summary = summary_of(out)
    pre, fine = summary["pretrain"], summary["finetune"]
    assert pre["name"] == "embedded-mdlm" and fine["name"] == "embedded-dsl"
    assert pre["step"] == 3 and fine["step"] == 3
    assert fine["checkpoint"] == str(tmp_path / "runs" / "embedded-dsl" / "step-3")
    assert load_checkpoint(fine["checkpoint"]).config["init"] == pre["checkpoint"] + "/ema.safetensors"
    assert load_checkpoint(fine["checkpoint"]).config["objective"] == "dsl"
    db = tmp_path / "mlflow.db"
    assert f"open the UI: mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1" in out.stdout
    assert f"checkpoint: {fine['checkpoint']}" in out.stdout
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    names = {r.data.tags[TAG_RUN_NAME] for r in client.search_runs([client.get_experiment_by_name("dsl").experiment_id])}
    assert names == {"embedded-mdlm", "embedded-dsl"}


# ----------------------------------------------------------------------------------------------
# A driver joining a running cluster (RAY_ADDRESS), or starting a private one: what it leaves behind,
# the priority its workers run at, what it prints


PASSWORD = "pw-a81c33e0f4"  # distinctive: a scan for it cannot match by accident


def _driver(args: list[str], env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "finetune.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_joined_cluster_run_writes_only_where_pointed_at_driver_priority_without_secrets(
        ray_cluster, ray_env, postgres_url, tmp_path):
    """RAY_ADDRESS given: the driver joins that cluster (no private Ray); checkpoints go to
    service.storage and nothing else appears in the working directory; workers run at the driver's
    niceness; a bare postgresql:// tracking URI works, and neither its password nor the storage
    endpoint's credentials are printed or logged."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    tracking = "postgresql://" + postgres_url.split("://", 1)[1].replace("postgres@", f"postgres:{PASSWORD}@")
    env = {**ray_env, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(REPO)}
    endpoint = f"http://AKIAIOSFODNN7EXAMPLE:{PASSWORD}@127.0.0.1:{free_port()}"
    out = _driver(["train", *TINY, "train.steps=2", "name=joined", f"service.storage={tmp_path / 'ckpts'}",
                   f"service.storage_endpoint={endpoint}", "service.workers=2"], env, cwd)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "Started a local Ray instance" not in log and "Traceback" not in log
    assert (tmp_path / "ckpts" / "joined" / "step-2" / MANIFEST).is_file()
    assert list(cwd.iterdir()) == []                                         # no runs/_ray, no mlflow.db
    nice = int(re.search(r"starting at step 0 \(nice (-?\d+)\)", log).group(1))
    assert nice == os.getpriority(os.PRIO_PROCESS, 0)
    assert PASSWORD not in log and "AKIAIOSFODNN7EXAMPLE" not in log
    assert 'open the UI: mlflow ui --backend-store-uri "$MLFLOW_TRACKING_URI"' in log
    client = mlflow.MlflowClient(postgres_url)
    (run,) = runs_named(postgres_url, "joined")
    assert PASSWORD not in json.dumps({**run.data.params, **run.data.tags})
    assert run.data.params["service.storage_endpoint"].startswith("http://***@127.0.0.1:")
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.integration
def test_a_user_error_inside_a_worker_is_not_retried(ray_cluster, ray_env, tmp_path):
    """A corpus that only the workers read (bytes that are not UTF-8 on line 2): the run stops at the
    first attempt though service.max_failures=2, and the driver prints the worker's one line."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine words"}\n{"text": "broken \xff bytes"}\n')
    env = {**ray_env, "PYTHONPATH": str(REPO)}
    out = _driver(["train", *[a for a in TINY if not a.startswith("data.source")], f"data.source={corpus}",
                   "data.tokenizer=char", "train.steps=2", "name=bad-bytes", f"out={tmp_path / 'runs'}",
                   "service.max_failures=2", "service.mlflow=off"], env, tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 2, log[-4000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {corpus}:2: not UTF-8 text (byte 0xff")
    assert log.count("Attempting to start training worker group") == 1, log[-4000:]
    assert "Traceback" not in log, log[-4000:]


@pytest.mark.integration
def test_private_cluster_runs_at_driver_priority_quietly_and_leaves_no_temp_dir(ray_cluster, tmp_path):
    """No RAY_ADDRESS: a private Ray on 127.0.0.1 (another Ray, the test cluster, runs on this host),
    its workers at the driver's niceness, no state-API noise, its temp dir gone at exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API"))}
    env["PYTHONPATH"] = str(REPO)
    before = set(Path("/tmp").glob("ray-*"))
    out = _driver(["train", *TINY, "train.steps=2", "name=private", f"out={tmp_path / 'runs'}",
                   "service.mlflow=off"], env, tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    nice = int(re.search(r"starting at step 0 \(nice (-?\d+)\)", log).group(1))
    assert nice == os.getpriority(os.PRIO_PROCESS, 0)
    for noise in ("Found multiple active Ray instances", "Failed to query Ray Train Controller", "Traceback"):
        assert noise not in log, (noise, log[-4000:])
    assert set(Path("/tmp").glob("ray-*")) <= before   # the private cluster's temp dir is removed


@pytest.mark.integration
def test_out_of_memory_kills_are_retried_per_failure_config_then_one_line(tmp_path):
    """Ray's out-of-memory monitor at a threshold below any real use kills whatever the run starts, the
    Train controller included (which Ray Train does not retry): the driver retries the run
    service.max_failures times, one warning line each, then ends with one line naming the cause."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API"))}
    env.update(PYTHONPATH=str(REPO), RAY_memory_monitor_refresh_ms="200", RAY_memory_usage_threshold="0.01")
    out = _driver(["train", *TINY, "train.steps=2", "name=oom", f"out={tmp_path / 'runs'}", "service.max_failures=2",
                   "service.mlflow=off"], env, tmp_path)
    assert out.returncode == 1, (out.stdout + out.stderr)[-4000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(("warning: run oom", "error: "))]
    assert len(lines) == 3 and all("out-of-memory monitor" in ln for ln in lines), lines
    assert "retry 1 of service.max_failures=2" in lines[0] and "retry 2 of" in lines[1]
    assert lines[2].startswith("error: run oom failed after 3 attempt(s) (service.max_failures=2)")
    assert "Traceback" not in out.stdout + out.stderr
