"""MLflow tracking: SQLite default through SQLAlchemy, one run per training-run name, scrubbed params,
job runs linked to the training run of their checkpoint; the same against a real MLflow server."""

from __future__ import annotations

import mlflow
import pytest
import torch

from dsl.checkpoint import save_checkpoint
from dsl.config import RunConfig
from dsl.service import tracking
from dsl.service.job_runs import job_run
from dsl.service.tracking import (
    REDACTED,
    RunLogger,
    default_tracking_uri,
    ensure_training_run,
    find_run,
    flat_params,
    scrub,
)


@pytest.fixture
def sqlite_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri


def test_scrub_removes_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert scrub("s3://AKIAIOSFODNN7EXAMPLE:pw@bucket/x") == f"s3://{REDACTED}@bucket/x"
    assert scrub("key AKIAIOSFODNN7EXAMPLE here") == f"key {REDACTED} here"
    assert scrub("http://h/x?token=abc&b=1") == f"http://h/x?token={REDACTED}&b=1"
    assert scrub("v=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY") == f"v={REDACTED}"
    assert scrub("hunter22", key="service.aws_secret_access_key") == REDACTED
    assert scrub("hunter22", key="hf_token") == scrub("hunter22", key="auth_token_path") == REDACTED
    for key in ("data.tokenizer", "tokens_per_s", "tokenize_seconds", "max_tokens"):  # not secrets
        assert scrub("gpt2", key=key) == "gpt2", key
    assert scrub("s3://bucket/run") == "s3://bucket/run"


def test_flat_params_of_the_config_tree():
    cfg = RunConfig()
    cfg.init = "s3://AKIAIOSFODNN7EXAMPLE:x@b/ckpt"
    params = flat_params(cfg)
    assert params["train.lr"] == "0.0003" and params["model.hidden"] == "768"
    assert params["init"] == f"s3://{REDACTED}@b/ckpt"
    assert all("." in k or k in ("name", "seed", "objective", "init", "out_dir") for k in params)
    assert flat_params({"a": {"b": 1}, "c": "x" * 7000}) == {"a.b": "1", "c": "x" * 6000}


@pytest.mark.slow
def test_training_run_is_created_once_and_found_by_name(sqlite_uri):
    run_id, resumed = ensure_training_run("ft-abc", params={"train": {"lr": 1e-3}}, tags={"dsl.workers": "2"})
    assert not resumed
    again, resumed = ensure_training_run("ft-abc", params={"train": {"lr": 1e-3}, "extra": 1})
    assert resumed and again == run_id
    other, _ = ensure_training_run("ft-other", params={})
    assert other != run_id
    client = mlflow.MlflowClient(sqlite_uri)
    runs = client.search_runs([client.get_experiment_by_name("dsl").experiment_id])
    assert sorted(r.data.tags[tracking.TAG_RUN_NAME] for r in runs) == ["ft-abc", "ft-other"]
    run = client.get_run(run_id)
    assert run.data.params == {"train.lr": "0.001", "extra": "1"}
    assert run.data.tags["dsl.workers"] == "2" and run.data.tags["mlflow.source.git.commit"]


@pytest.mark.slow
def test_run_logger_metrics_and_checkpoint_tags(sqlite_uri):
    run_id, _ = ensure_training_run("ft-log", params={})
    log = RunLogger(run_id, system_metrics=True, sampling_interval_s=1.0)
    log.log_metrics({"loss": 2.5, "lr": 1e-3, "skip": float("nan"), "flag": True}, step=10)
    log.log_metrics({"loss": 2.0}, step=20)
    log.log_checkpoint("s3://b/run/step-20", 20)
    log.close("FINISHED")
    client = mlflow.MlflowClient(sqlite_uri)
    hist = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(10, 2.5), (20, 2.0)]
    run = client.get_run(run_id)
    assert "skip" not in run.data.metrics and "flag" not in run.data.metrics
    assert run.data.tags[tracking.TAG_CHECKPOINT] == "s3://b/run/step-20"
    assert run.data.tags["dsl.checkpoint.step-20"] == "s3://b/run/step-20"
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_job_run_links_to_the_training_run_of_its_checkpoint(sqlite_uri, tmp_path):
    train_id, _ = ensure_training_run("ft-link", params={})
    cfg = {"name": "ft-link"}
    uri = save_checkpoint(tmp_path / "ckpts", 3, config=cfg, model_state={"w": torch.zeros(2)})
    with job_run("sample", {"sampler": "mdlm", "steps": 8}, uri) as run:
        run.log_metrics({"nfe": 9}, step=0)
    with pytest.raises(RuntimeError), job_run("evaluate", {}, str(tmp_path / "ckpts")) as failing:
        raise RuntimeError("boom")
    client = mlflow.MlflowClient(sqlite_uri)
    sample = client.get_run(run.run_id)
    assert sample.data.tags[tracking.TAG_TRAINING_RUN] == train_id
    assert sample.data.tags[tracking.TAG_CHECKPOINT] == uri
    assert sample.data.tags[tracking.TAG_KIND] == "sample"
    assert sample.data.params == {"sampler": "mdlm", "steps": "8"}
    assert sample.info.status == "FINISHED"
    evaluated = client.get_run(failing.run_id)
    assert evaluated.data.tags[tracking.TAG_TRAINING_RUN] == train_id  # run root resolves to its latest
    assert evaluated.info.status == "FAILED"
    assert find_run("ft-link", kind="finetune") == train_id


@pytest.mark.integration
def test_against_mlflow_server_with_postgres_and_s3_artifacts(mlflow_server, s3_server, tmp_path):
    run_id, resumed = ensure_training_run("ft-server", params={"a": 1}, tracking_uri=mlflow_server.tracking_uri)
    again, resumed2 = ensure_training_run("ft-server", params={"a": 1}, tracking_uri=mlflow_server.tracking_uri)
    assert (again, resumed, resumed2) == (run_id, False, True)
    log = RunLogger(run_id, mlflow_server.tracking_uri, system_metrics=False)
    log.log_metrics({"loss": 1.5}, step=1)
    (tmp_path / "curve.txt").write_text("1.5")
    log.log_artifact(str(tmp_path / "curve.txt"))
    log.close("FINISHED")
    client = mlflow.MlflowClient(mlflow_server.tracking_uri)
    assert client.get_run(run_id).data.metrics == {"loss": 1.5}
    bucket, prefix = mlflow_server.artifacts_uri.removeprefix("s3://").split("/", 1)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/curve.txt") for k in keys), keys


@pytest.mark.slow
def test_sample_job_logs_one_run_per_invocation_when_tracking_is_on(tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "jobs/sample.py", "checkpoint=oracle:hmm", "sampling.num_samples=2", "sampling.steps=4",
           "sampler=mdlm", f"out={tmp_path / 's.jsonl'}", "name=first-draw"]
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dsl").experiment_id])
    assert run.data.tags[tracking.TAG_KIND] == "sample" and run.data.tags[tracking.TAG_CHECKPOINT] == "oracle:hmm"
    assert run.data.params["sampling.sampler"] == "mdlm" and run.info.status == "FINISHED"
    assert run.info.run_name == "first-draw" and "train.steps" not in run.data.params   # only keys it reads


def test_one_mlflow_switch(tmp_path, monkeypatch):
    """service.mlflow: off never logs; on always does; auto logs for training/search, and for the other
    jobs only when a store exists (a URI given or in the environment, or ./mlflow.db)."""
    from dsl.config import ServiceConfig

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    uri = tracking.resolve_tracking_uri
    assert uri(ServiceConfig(mlflow="off"), default_on=True) is None
    assert uri(ServiceConfig(mlflow="auto"), default_on=False) is None
    assert uri(ServiceConfig(mlflow="auto"), default_on=True) == local
    assert uri(ServiceConfig(mlflow="on"), default_on=False) == local
    assert uri(ServiceConfig(mlflow="auto", tracking_uri="http://h:5000"), default_on=False) == "http://h:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert uri(ServiceConfig(mlflow="auto"), default_on=False) == "http://env:5000"
    assert uri(ServiceConfig(mlflow="off"), default_on=False) is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert uri(ServiceConfig(mlflow="auto"), default_on=False) == local


PASSWORD = "pw-5e1f0c77d2"  # distinctive, so a scan cannot match by accident


def test_ui_line_and_progress_note_never_print_the_password(monkeypatch, capsys):
    from dsl.service.ray_train import FinetuneResult, print_progress_note

    uri = f"postgresql+psycopg2://alice:{PASSWORD}@db.internal:5432/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = tracking.ui_command(uri)
    assert PASSWORD not in line and line.startswith('mlflow ui --backend-store-uri "$MLFLOW_TRACKING_URI"')
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert PASSWORD not in tracking.ui_command(uri) and "alice" not in tracking.ui_command(uri)
    local = "sqlite:////tmp/x/mlflow.db"
    assert tracking.ui_command(local) == f"mlflow ui --backend-store-uri {local} --host 127.0.0.1 --port 5000"
    result = FinetuneResult(name="r", step=4, checkpoint=f"s3://k:{PASSWORD}@bucket/r/step-4", storage_root="x",
                            mlflow_run_id="abc", tracking_uri=uri, resumed=False)
    print_progress_note(result)
    out = capsys.readouterr().out
    assert "open the UI: mlflow ui" in out and PASSWORD not in out


def test_credentials_in_the_storage_endpoint_never_reach_params():
    from dsl.config import ServiceConfig, to_dict
    from dsl.service.ray_train import LOGGED_SERVICE_KEYS

    svc = ServiceConfig(storage_endpoint=f"http://AKIAIOSFODNN7EXAMPLE:{PASSWORD}@minio.local:9000",
                        storage=f"s3://bucket/runs?X-Amz-Signature={PASSWORD}")
    params = flat_params({"service": {k: v for k, v in to_dict(svc).items() if k in LOGGED_SERVICE_KEYS}})
    assert PASSWORD not in repr(params) and "AKIAIOSFODNN7EXAMPLE" not in repr(params)
    assert params["service.storage_endpoint"] == f"http://{REDACTED}@minio.local:9000"


def test_error_lines_and_summaries_are_scrubbed(tmp_path, capsys):
    from dsl.errors import UserError, run_cli

    def bad():
        raise UserError(f"service.tracking_uri=postgresql://u:{PASSWORD}@h/db: cannot connect")

    assert run_cli(bad) == 2
    assert run_cli(lambda: {"storage": f"postgresql://u:{PASSWORD}@h/db", "n": [f"s3://a:{PASSWORD}@b"]}) == 0
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err and err.startswith("error: service.tracking_uri=postgresql://***@h/db")


@pytest.mark.integration
def test_a_bare_postgresql_uri_uses_the_installed_driver_for_mlflow_and_optuna(postgres_url, second_postgres_url,
                                                                              tmp_path):
    """``postgresql://`` alone means psycopg 3 to SQLAlchemy 2.1; with psycopg2 installed both stores work."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dsl.service.database_url import with_installed_driver
    from dsl.service.search import open_storage

    def bare_of(url: str) -> str:  # trust auth: the password is accepted and must never be shown
        return "postgresql://" + url.split("://", 1)[1].replace("postgres@", f"postgres:{PASSWORD}@")

    bare = bare_of(postgres_url)
    driver = with_installed_driver(bare).split("://")[0]
    assert driver.startswith("postgresql+") and importlib.util.find_spec(driver.split("+")[1]) is not None
    assert with_installed_driver("postgresql+pg8000://h/db") == "postgresql+pg8000://h/db"   # explicit stays
    open_storage(bare_of(second_postgres_url))  # Optuna's RDB storage through the same helper

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": bare}
    cmd = [sys.executable, "jobs/sample.py", "checkpoint=oracle:hmm", "sampling.num_samples=2", "sampling.steps=4",
           "sampler=mdlm", "sampling.length=8", f"out={tmp_path / 's.jsonl'}", "name=bare-uri"]
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "No module named" not in out.stderr and PASSWORD not in out.stdout + out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["n"] == 2
    client = mlflow.MlflowClient(with_installed_driver(bare))
    (run,) = client.search_runs([client.get_experiment_by_name("dsl").experiment_id])
    assert run.info.run_name == "bare-uri" and run.info.status == "FINISHED"
    assert PASSWORD not in json.dumps({**run.data.params, **run.data.tags})
