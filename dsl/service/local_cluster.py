"""A local multi-node Ray cluster on loopback: one head plus N worker-node processes.

Used by the test fixtures, ``cluster/local_cluster.sh`` and the embedded default of
``jobs/finetune.py``. Every port is chosen explicitly (6379 is usually a Redis on these machines and
Ray's fixed defaults such as 10001/52365 collide when several developers run clusters), and
``stop()`` ends only the processes of *this* cluster — found by its temp dir and GCS address —
because ``ray stop`` is machine-wide.

    python -m dsl.service.local_cluster start --workers 1 --cpus 2 --temp-dir /tmp/ray-dev
    python -m dsl.service.local_cluster stop --temp-dir /tmp/ray-dev
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dsl.errors import UserError, one_line

STATE_FILE = "dsl_cluster.json"
# Ray rewrites 127.0.0.1 (in --node-ip-address and in --address) to the machine's network address
# unless it believes it is on a single-machine platform, and then it refuses to add worker nodes.
# We start every node through `ray_cli_loopback`, which keeps loopback as given and lifts the refusal,
# with this variable exported so every Ray process and driver underneath resolves to loopback too.
# Clients (pytest, `ray job submit`, drivers) need it in their environment before importing ray.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Explicit free ports for the per-node services whose Ray defaults are fixed numbers."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@dataclass
class LocalCluster:
    """Handle on a running local cluster; ``env`` points child processes (and ``ray job``) at it."""

    address: str
    dashboard_url: str
    temp_dir: str
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        stop_cluster(self.temp_dir, self.address)


def _ray_cli() -> list[str]:
    return [sys.executable, "-m", "dsl.service.local_cluster", "ray"]


def ray_cli_loopback(argv: list[str]) -> None:
    """Run the ``ray`` CLI keeping 127.0.0.1 as given (see LOOPBACK_ENV)."""
    os.environ.update(LOOPBACK_ENV)
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main

    ray_constants.ENABLE_RAY_CLUSTER = True  # allow worker nodes; children still inherit LOOPBACK_ENV
    services.resolve_ip_for_localhost = lambda host: host
    sys.argv = ["ray", *argv]
    ray_main()


def _wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answered (401 without the cluster's auth token)
        except Exception:  # noqa: BLE001 - any other failure means "not up yet"
            time.sleep(0.5)
    return False


def start_cluster(temp_dir: str, *, head_cpus: int = 2, workers: int = 1, worker_cpus: int = 2,
                  object_store_mb: int = 200, extra_env: dict[str, str] | None = None,
                  timeout: float = 90.0) -> LocalCluster:
    """Start ``ray start --head`` plus ``workers`` worker-node processes, all on 127.0.0.1."""
    temp_dir = os.path.abspath(temp_dir)
    os.makedirs(temp_dir, exist_ok=True)
    port, dash_port, client_port = free_port(), free_port(), free_port()
    env = dict(os.environ)
    env.update(extra_env or {})
    # Ray's memory monitor kills workers on a shared 24 GiB box; it must be off for every `ray start`.
    env.setdefault("RAY_memory_monitor_refresh_ms", "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts worker processes at nice 15; training workers must not run below whoever starts the cluster
    env.setdefault("RAY_worker_niceness", str(os.getpriority(os.PRIO_PROCESS, 0)))
    env.update(LOOPBACK_ENV)
    env.pop("RAY_ADDRESS", None)
    # Ray 2.60 turns token auth on for a head when ~/.ray/auth_token exists (any local ray.init()
    # creates it) but not for joining workers; give each cluster its own token, readable by us only
    token_path = Path(temp_dir, "auth_token")
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(auth_env)
    obj = str(object_store_mb * 1024 * 1024)
    head = [*_ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}", f"--num-cpus={head_cpus}", "--num-gpus=0",
            f"--object-store-memory={obj}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}", f"--ray-client-server-port={client_port}",
            "--disable-usage-stats", *_node_ports()]
    address = f"127.0.0.1:{port}"
    try:
        _run_start(head, env, "head")
        for i in range(workers):
            _run_start([*_ray_cli(), "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                        f"--num-cpus={worker_cpus}", "--num-gpus=0", f"--object-store-memory={obj}",
                        # own temp dir per node: on one machine a shared one means shared runtime-env
                        # directories, which one node's agent deletes while the other's job runs in them
                        f"--temp-dir={os.path.join(temp_dir, f'w{i}')}", "--disable-usage-stats", *_node_ports()], env, f"worker {i}")
        dashboard_url = f"http://127.0.0.1:{dash_port}"
        if not _wait_http(dashboard_url + "/api/version", timeout):
            raise UserError(f"Ray dashboard at {dashboard_url} did not come up within {timeout:.0f}s "
                            f"(logs under {temp_dir}/session_latest/logs)")
    except BaseException:
        stop_cluster(temp_dir, address)
        raise
    child_env = {"RAY_ADDRESS": address, "RAY_API_SERVER_ADDRESS": dashboard_url, **LOOPBACK_ENV, **auth_env}
    cluster = LocalCluster(address=address, dashboard_url=dashboard_url, temp_dir=temp_dir, env=child_env)
    Path(temp_dir, STATE_FILE).write_text(json.dumps({"address": address, "dashboard_url": dashboard_url}))
    return cluster


def _run_start(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).split()[-40:])
        raise UserError(f"`ray start` for the {what} node failed (exit {proc.returncode}): {tail}")


def cluster_pids(temp_dir: str, address: str | None) -> list[int]:
    """PIDs of the processes that belong to the cluster rooted at ``temp_dir`` / GCS ``address``.

    A Ray process names its session dir (under ``temp_dir``) or the GCS address in its arguments;
    its children (dashboard modules, agents, workers) are included. The caller and its ancestors are
    never included, even when their own command line mentions the temp dir.
    """
    import psutil

    marks = [os.path.abspath(temp_dir) + os.sep]
    if address:
        marks.append(f"={address}")
    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    found: set[int] = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] in spared or not any(m in cmd for m in marks):
                continue
            found.add(proc.info["pid"])
            found.update(c.pid for c in proc.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(found - spared)


def stop_cluster(temp_dir: str, address: str | None = None, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, exactly this cluster's processes.

    The dashboard and its agents exit within about 2 s of SIGTERM; gcs_server, the raylets, the runtime-env
    agents and the autoscaler monitor were still alive 10 s after it (Ray 2.x), so a longer grace only waits
    for the SIGKILL. Nothing of a local cluster outlives it but its temp dir.
    """
    import psutil

    if address is None:
        state = Path(temp_dir, STATE_FILE)
        if state.exists():
            address = json.loads(state.read_text())["address"]
    pids = cluster_pids(temp_dir, address)
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    # raylets spawn workers late; a second sweep catches stragglers started during shutdown
    for pid in cluster_pids(temp_dir, address):
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ray"]:
        ray_cli_loopback(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m dsl.service.local_cluster", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start a head plus N worker-node processes on 127.0.0.1")
    st.add_argument("--temp-dir", default="/tmp/ray-dsl-dev")
    st.add_argument("--workers", type=int, default=1, help="extra worker-node processes")
    st.add_argument("--head-cpus", type=int, default=2)
    st.add_argument("--cpus", type=int, default=2, help="logical CPUs per worker node")
    st.add_argument("--object-store-mb", type=int, default=200)
    sp = sub.add_parser("stop", help="stop the cluster started with this --temp-dir (only it)")
    sp.add_argument("--temp-dir", default="/tmp/ray-dsl-dev")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            c = start_cluster(args.temp_dir, head_cpus=args.head_cpus, workers=args.workers,
                              worker_cpus=args.cpus, object_store_mb=args.object_store_mb)
            for k, v in c.env.items():
                print(f"export {k}={v}")
            print(f"# dashboard: {c.dashboard_url}   stop: python -m dsl.service.local_cluster stop "
                  f"--temp-dir {c.temp_dir}")
        else:
            stop_cluster(args.temp_dir)
            print(f"stopped the cluster under {os.path.abspath(args.temp_dir)}")
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
