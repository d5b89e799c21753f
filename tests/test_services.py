"""The real services the integration tests stand on: each fixture starts what it claims, on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_ray_cluster_has_two_nodes_on_loopback_and_accepts_jobs(ray_cluster, ray_env, tmp_path):
    probe = ("import json, ray; ray.init(); "
             "print('NODES=' + json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])));"
             "print('CPUS=' + str(ray.cluster_resources().get('CPU')))")
    (tmp_path / "probe.py").write_text(probe)
    out = subprocess.run([sys.executable, "-m", "dsl.service.local_cluster", "ray", "job", "submit",
                          "--address", ray_cluster.dashboard_url, "--working-dir", str(tmp_path), "--",
                          "python", "probe.py"], env=ray_env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    nodes = json.loads(out.stdout.split("NODES=")[1].splitlines()[0])
    assert nodes == ["127.0.0.1", "127.0.0.1"]
    assert float(out.stdout.split("CPUS=")[1].splitlines()[0]) == 4.0
    assert ray_cluster.address.startswith("127.0.0.1:") and not ray_cluster.address.endswith(":6379")


def test_s3_server_round_trip(s3_server, s3_bucket):
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello"
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")


def test_postgres_url_is_a_fresh_database(postgres_url):
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        tables = conn.execute(sqlalchemy.text(
            "select count(*) from information_schema.tables where table_schema='public'")).scalar()
    engine.dispose()
    assert tables == 0


def test_mlflow_server_stores_runs_in_postgres_and_artifacts_in_s3(mlflow_server, s3_server, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    exp = client.create_experiment("fixture-check")
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "p", "1")
    (tmp_path / "note.txt").write_text("x")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    assert client.get_run(run.info.run_id).data.params == {"p": "1"}
    bucket, prefix = mlflow_server.artifacts_uri.removeprefix("s3://").split("/", 1)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.startswith(prefix) and k.endswith("note.txt") for k in keys), keys
