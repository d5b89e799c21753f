"""The one way a driver starts or joins Ray: :func:`ray_session`.

    with ray_session(cfg.service.ray_address, cpus=4) as session:
        ...                      # Ray calls; session.address is the GCS address, session.owned says who stops it

- A process already connected (a caller further up opened a session): that connection is reused and
  left open for its owner.
- An address (the argument, else ``RAY_ADDRESS``): the driver joins that cluster; leaving disconnects.
- Neither: a private single-node Ray for this process only, on 127.0.0.1, under its own short temp dir,
  with its GCS on an explicitly chosen free port (never Ray's 6379: a Redis holds it on these
  machines) and no dashboard; leaving stops exactly the processes it started and removes the temp dir.

Failing to join or start is one line (:class:`~dsl.errors.UserError`) naming ``key`` and the address.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dsl.errors import UserError, one_line
from dsl.service.local_cluster import LOOPBACK_ENV, free_port

# Ray reads its GCS port for ``ray.init()``'s own head from this variable (ray/_private/node.py)
_GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"


@dataclass(frozen=True)
class RaySession:
    address: str             # the GCS address ("127.0.0.1:<port>" for a private one)
    owned: bool              # this session connected or started Ray, and disconnects/stops it on exit
    private: bool            # a private single-node Ray started here (not a joined cluster)
    temp_dir: str | None     # the private Ray's temp dir, removed on exit


def _private_env() -> None:
    """Environment a private Ray needs before its processes start (they inherit it)."""
    # the memory monitor kills workers on a shared machine whose other tenants it cannot see
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts workers at nice 15; they must not run below the driver that waits for them
    os.environ.setdefault("RAY_worker_niceness", str(os.getpriority(os.PRIO_PROCESS, 0)))


def _start_private(cpus: int, object_store_mb: int | None, init_kwargs: dict[str, Any],
                   temp_prefix: str, attempts: int) -> tuple[str, str]:
    import ray

    for attempt in range(attempts):
        # short, under /tmp: Ray's unix socket paths (inside the session dir) are limited to 107 bytes
        temp = tempfile.mkdtemp(prefix=temp_prefix, dir="/tmp")
        port = free_port()
        previous = os.environ.get(_GCS_PORT_ENV)
        os.environ[_GCS_PORT_ENV] = str(port)
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     _temp_dir=temp, object_store_memory=object_store_mb * 1024 * 1024 if object_store_mb else None,
                     **init_kwargs)
            return ray.get_runtime_context().gcs_address, temp
        except Exception:  # noqa: BLE001 - GCS start-up can time out on a loaded machine: retry on a new port
            if ray.is_initialized():
                ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
            if attempt == attempts - 1:
                raise
        finally:
            if previous is None:
                os.environ.pop(_GCS_PORT_ENV, None)
            else:
                os.environ[_GCS_PORT_ENV] = previous
    raise AssertionError("unreachable")


@contextmanager
def ray_session(address: str = "", *, cpus: int | None = None, object_store_mb: int | None = None,
                log_to_driver: bool = False, runtime_env: dict[str, Any] | None = None,
                key: str = "service.ray_address", temp_prefix: str = "ray-dsl-",
                attempts: int = 2) -> Iterator[RaySession]:
    """Join ``address`` (else ``RAY_ADDRESS``) or start a private Ray of ``cpus`` logical CPUs (default:
    the machine's); see the module docstring. ``log_to_driver`` echoes workers' output here;
    ``runtime_env`` is the job's (e.g. a ``worker_process_setup_hook``)."""
    # single-machine Ray otherwise advertises the host's network address instead of loopback, for a
    # private Ray and for a driver joining a loopback cluster (dsl.service.local_cluster) alike
    for name, value in LOOPBACK_ENV.items():
        os.environ.setdefault(name, value)
    import ray
    import ray._private.ray_constants as ray_constants

    # Ray read that variable when first imported, possibly before it was set (ray/_private/ray_constants.py)
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR].lower() in ("1", "true")

    if ray.is_initialized():
        yield RaySession(ray.get_runtime_context().gcs_address, owned=False, private=False, temp_dir=None)
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    init_kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": log_to_driver,
                                   "runtime_env": runtime_env}
    temp = None
    try:
        if address:
            ray.init(address=address, **init_kwargs)
            session = RaySession(ray.get_runtime_context().gcs_address, owned=True, private=False, temp_dir=None)
        else:
            _private_env()
            gcs, temp = _start_private(max(1, cpus or os.cpu_count() or 1), object_store_mb, init_kwargs,
                                       temp_prefix, attempts)
            session = RaySession(gcs, owned=True, private=True, temp_dir=temp)
    except Exception as exc:  # noqa: BLE001 - an unreachable cluster is bad input, reported in one line
        if ray.is_initialized():
            ray.shutdown()
        raise UserError(f"{key}={address or '(private local Ray)'}: cannot start or connect to Ray "
                        f"({one_line(exc)[:200]})") from None
    try:
        yield session
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


__all__ = ["RaySession", "ray_session"]
