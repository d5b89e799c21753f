"""Session fixtures for REAL services started by the tests, all on 127.0.0.1 and free ports.

- ``ray_cluster``: a Ray head plus one worker-node process (``ray start``), dashboard on loopback
  (``ray job submit`` talks to it), dedicated temp dir; teardown stops exactly that cluster.
- ``s3_server`` (+ function fixture ``s3_bucket`` → ``"s3://<fresh bucket>"``): moto in server mode,
  its own process; fake credentials exported to child processes through ``.env``.
- ``postgres_url``: a fresh database on the machine's PostgreSQL, dropped after the test.
- ``mlflow_server``: ``mlflow server`` with a PostgreSQL backend store and S3 (moto) artifacts.
- ``chromium``: headless Chromium (Debian's ``chromium``) that renders a page, runs its scripts for a
  virtual-time budget and returns the DOM (``.dom(url)``), its visible text (``.text(url)``) or a PNG
  (``.screenshot(url, path)``): what a person would see, for pages people look at.

Every handle has ``.env``: the variables a subprocess (a job, ``ray job submit``) needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Ray rewrites 127.0.0.1 to the machine's address unless told this is one machine; must be set before
# ray is imported anywhere in the session (see dsl.service.local_cluster.LOOPBACK_ENV).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One torch/OpenMP thread for this process and every process it starts (jobs, ray start and so Ray's workers),
# set before torch is imported: the tests' tensors are small, and on 2 shared cores (the Ray nodes and servers
# of these fixtures run alongside) a second spin-waiting thread made them many times slower (an HMM-oracle
# draw, 8 samples of L=16 at T=8: 0.4 s with one thread, 5 s with two). Code that sets its own count
# (Ray Train workers, MAUVE actors, a test's torch.set_num_threads) still does.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
# Distinctive fake credentials so that a scan for leaked secrets cannot match by accident.
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-9f3c1e",
            "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    from dsl.service.local_cluster import free_port

    return free_port()


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{url}: server process exited with {proc.returncode}\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ----------------------------------------------------------------------------------------------
# S3 (moto server mode)


@dataclass
class S3Server:
    endpoint_url: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    with open(log, "w") as fh:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **FAKE_AWS})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_http(endpoint + "/moto-api/", 60, proc, log)
        env = {**FAKE_AWS, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}
        yield S3Server(endpoint_url=endpoint, env=env)
    finally:
        _stop(proc)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket as ``"s3://<name>"``; this test's process env points boto3 at the server."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    yield f"s3://{name}"


# ----------------------------------------------------------------------------------------------
# PostgreSQL


def _create_database() -> str:
    import psycopg2

    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = psycopg2.connect(**PG_ADMIN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return name


def _drop_database(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(**PG_ADMIN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def _pg_url(name: str) -> str:
    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"


@pytest.fixture
def postgres_url():
    name = _create_database()
    try:
        yield _pg_url(name)
    finally:
        _drop_database(name)


@pytest.fixture
def second_postgres_url():
    """Another fresh database: MLflow and Optuna each migrate their own schema (never share one)."""
    name = _create_database()
    try:
        yield _pg_url(name)
    finally:
        _drop_database(name)


# ----------------------------------------------------------------------------------------------
# MLflow tracking server (PostgreSQL backend store, S3 artifacts)


@dataclass
class MLflowServer:
    tracking_uri: str
    artifacts_uri: str
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    db = _create_database()
    port = _free_port()
    log = tmp_path_factory.mktemp("mlflow") / "server.log"
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    # no job-execution consumers (MLflow's server-side jobs, which no test uses): two fewer processes polling
    # all session long on 2 cores
    env = {**os.environ, **s3_server.env, "MLFLOW_S3_IGNORE_TLS": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [exe, "server", "--backend-store-uri", _pg_url(db), "--artifacts-destination",
           f"s3://{bucket}/mlartifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(uri + "/health", 120, proc, log)
        yield MLflowServer(tracking_uri=uri, artifacts_uri=f"s3://{bucket}/mlartifacts",
                           env={"MLFLOW_TRACKING_URI": uri})
    finally:
        _stop(proc)
        _drop_database(db)


# ----------------------------------------------------------------------------------------------
# Ray: a head plus one worker-node process


@dataclass
class RayCluster:
    address: str
    dashboard_url: str
    temp_dir: str
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """Head (2 CPUs) + one worker node (2 CPUs): 2 training workers + driver + 2 MAUVE actors fit.

    The nodes are started with the S3 server's fake credentials and endpoint in their environment
    (as a cloud node would have an instance role), so jobs reach the bucket without passing secrets.
    """
    from dsl.service.local_cluster import start_cluster

    # short path: Ray's unix socket paths must stay under ~107 characters
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    cluster = start_cluster(temp_dir, head_cpus=2, workers=1, worker_cpus=2, object_store_mb=150,
                            extra_env=s3_server.env)
    env = {**cluster.env, **s3_server.env}
    try:
        yield RayCluster(address=cluster.address, dashboard_url=cluster.dashboard_url, temp_dir=temp_dir,
                         env=env)
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_env(ray_cluster):
    """Environment for a subprocess that talks to ``ray_cluster`` (``ray job submit``, a driver)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(ray_cluster.env)
    return env


# ----------------------------------------------------------------------------------------------
# Headless Chromium: pages a person looks at are checked as rendered


@dataclass
class Chromium:
    """Debian's ``chromium`` in headless mode, one fresh profile per page load (no state between loads)."""

    exe: str
    budget_ms: int = 15000        # virtual time the page's scripts get before the DOM is read

    def _run(self, url: str, *mode: str, budget_ms: int | None = None, timeout: float = 240) -> str:
        profile = tempfile.mkdtemp(prefix="chromium-")
        cmd = [self.exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms or self.budget_ms}", *mode, url]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        if out.returncode != 0:
            raise RuntimeError(f"chromium exited {out.returncode} on {url}: {out.stderr[-1500:]}")
        return out.stdout

    def dom(self, url: str, budget_ms: int | None = None) -> str:
        """The DOM after the page's scripts ran (``--dump-dom``), as HTML."""
        return self._run(url, "--dump-dom", budget_ms=budget_ms)

    def text(self, url: str, budget_ms: int | None = None) -> str:
        """The visible text of the rendered page, whitespace-collapsed (scripts and styles dropped)."""
        return visible_text(self.dom(url, budget_ms))

    def screenshot(self, url: str, path: str | os.PathLike, size: str = "1400,900",
                   budget_ms: int | None = None) -> Path:
        self._run(url, f"--screenshot={path}", f"--window-size={size}", budget_ms=budget_ms)
        return Path(path)


def visible_text(html: str) -> str:
    """Text a reader sees in ``html``: tags, scripts and styles removed, whitespace collapsed."""
    from html.parser import HTMLParser

    class _Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts: list[str] = []
            self.skip = 0

        def handle_starttag(self, tag, attrs):
            if tag in ("script", "style", "noscript"):
                self.skip += 1

        def handle_endtag(self, tag):
            if tag in ("script", "style", "noscript") and self.skip:
                self.skip -= 1

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)

    parser = _Text()
    parser.feed(html)
    return " ".join(" ".join(parser.parts).split())


@pytest.fixture(scope="session")
def chromium():
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if exe is None:
        pytest.fail("headless Chromium is needed for the page tests: apt-get install chromium (.ci/run does)")
    return Chromium(exe=exe)
