"""How a Ray Train run ends when something goes wrong: one line, and retries only where they can help.

- A user error (:class:`dsl.errors.UserError` or :class:`dsl.config.ConfigError`) raised inside a worker
  is deterministic: every attempt would fail the same way. :func:`stop_on_user_error` (a Ray Train
  ``UserCallback`` the controller calls when a worker raises) stops the run at the first attempt, and
  the driver prints the worker's line (:func:`user_error_in`).
- Any other worker failure — a process killed by Ray's out-of-memory monitor, a lost node — is retried
  up to ``FailureConfig(max_failures)`` by Ray Train; when the Train controller itself is killed (Ray's
  out-of-memory monitor does not spare it), Ray Train retries nothing, so the driver starts the run
  again from its checkpoints, within the same budget (:func:`retried_by_ray_train`). When the budget is
  spent, :func:`failure_cause` gives the one line the driver prints.
- The worker processes of a job drop what is noise on the terminal (:func:`quiet_worker`, their
  ``worker_process_setup_hook``): Ray Train's traceback of a user error (the driver prints its line
  once), and the controller's and failure policy's tracebacks of the stop it causes.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from dsl.config import ConfigError
from dsl.errors import UserError, one_line

_USER_ERROR_TEXT = re.compile(r"(?:dsl\.errors\.UserError|dsl\.config\.fields\.ConfigError|dsl\.config\.ConfigError|"
                              r"UserError|ConfigError): ([^\n]+)")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception inside it: causes, contexts, Ray's wrappers and per-worker failures."""
    seen: set[int] = set()
    out: list[BaseException] = []
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        out.append(e)
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "_base_exc", None),
                      getattr(e, "controller_failure", None), getattr(e, "health_check_failure", None)])
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
    return out


def user_error_in(exc: BaseException) -> str | None:
    """The one-line UserError/ConfigError message somewhere inside a Ray failure, if any."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, (UserError, ConfigError)):
            return one_line(e)
    for e in chain:  # a worker's exception may arrive only as its traceback text
        m = _USER_ERROR_TEXT.search(str(e))
        if m:
            return m.group(1).strip()
    return None


def retried_by_ray_train(exc: BaseException) -> bool:
    """Whether Ray Train's own failure policy already decided on ``exc`` (a failed worker group, within
    ``FailureConfig``; a controller error): not when the controller itself was killed under it."""
    return any(type(e).__name__ in ("WorkerGroupError", "ControllerError") for e in _chain(exc))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
    return lines[-1][:300] if lines else type(exc).__name__


def failure_cause(exc: BaseException) -> str:
    """One line naming why a Ray Train run failed for good (not a user error)."""
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    if "OutOfMemoryError" in names or re.search(r"memory monitor|memory pressure|out of memory|\bOOM\b", text, re.I):
        return ("Ray's out-of-memory monitor killed a process of the run (the node's memory use passed "
                "RAY_memory_usage_threshold, whoever held the memory); free memory on the node, lower "
                "train.micro_batch_size, or start the cluster with a higher threshold")
    for e in chain:
        if type(e).__name__ in ("ActorDiedError", "RayActorError", "WorkerHealthCheckFailedError", "NodeDiedError"):
            return f"a training worker died ({_first_line(e)})"
    leaves = [e for e in chain if not getattr(e, "worker_failures", None) and e is not exc] or [exc]
    return f"{type(leaves[-1]).__name__}: {_first_line(leaves[-1])}"


def stop_on_user_error() -> Any:
    """The Ray Train ``UserCallback`` that ends a run at the first user error (see the module docstring)."""
    import ray.train

    class StopOnUserError(ray.train.UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            for error in worker_exceptions.values():
                message = user_error_in(error)
                if message:
                    raise UserError(message)

    return StopOnUserError()


# Loggers whose records repeat, as tracebacks, a user error the driver prints once.
_NOISY_ON_USER_ERROR = ("ray.train.v2._internal.util",
                        "ray.train.v2._internal.execution.controller.controller",
                        "ray.train.v2._internal.execution.failure_handling.default")


def _not_a_user_error_echo(record: logging.LogRecord) -> bool:
    if record.exc_info and record.exc_info[1] is not None and user_error_in(record.exc_info[1]):
        return False
    return not _USER_ERROR_TEXT.search(record.getMessage())


# Warnings (with tracebacks) Ray Train itself calls harmless, by the logger that writes them: a cluster
# without a dashboard (a private one) has no state API, and the placement-group cleaner says so every
# second; on a loaded machine the autoscaling coordinator's resource request times out now and then
# (the run's resources are fixed: nothing waits on it).
_HARMLESS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": "Failed to query Ray Train Controller",
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": "Failed to send resource request",
}


def _harmless(prefix: str):
    return lambda record: not record.getMessage().startswith(prefix)


def quiet_worker() -> None:
    """Drop, in this Ray worker process, the log records that only echo a user error as a traceback,
    and the warnings Ray Train calls harmless (see above)."""
    for name in _NOISY_ON_USER_ERROR:
        logging.getLogger(name).addFilter(_not_a_user_error_echo)
    for name, prefix in _HARMLESS.items():
        logging.getLogger(name).addFilter(_harmless(prefix))




# The driver passes its CPU priority to every worker process of its job through this variable.
DRIVER_NICENESS_ENV = "DSL_DRIVER_NICENESS"


def worker_runtime_env() -> dict[str, Any]:
    """The ``runtime_env`` a driver gives its job: :func:`setup_worker` in every worker process, and the
    driver's niceness for it to match."""
    return {"worker_process_setup_hook": f"{__name__}.setup_worker",
            "env_vars": {DRIVER_NICENESS_ENV: str(os.getpriority(os.PRIO_PROCESS, 0))}}


def raise_priority_to(niceness: int) -> int:
    """Lower this process's niceness (every thread's: Linux keeps it per thread) to ``niceness`` if it is
    higher; returns the niceness it runs at (unchanged when the system refuses)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if current <= niceness:
        return current
    try:
        for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
            os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
    except (PermissionError, ProcessLookupError):
        return os.getpriority(os.PRIO_PROCESS, 0)
    return niceness


def setup_worker() -> None:
    """``worker_process_setup_hook`` of a job's Ray workers (training workers, the Train controller and
    its placement-group cleaner): run at the driver's CPU priority (Ray starts workers at nice 15,
    ``RAY_worker_niceness``, so anything else on the machine starves training); point Ray's state API at
    this cluster (it would otherwise look for "the" Ray on the host and fail, with a traceback, when
    several run there); drop the echoes of user errors (:func:`quiet_worker`)."""
    import ray

    quiet_worker()
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    wanted = os.environ.get(DRIVER_NICENESS_ENV)
    if wanted is not None and raise_priority_to(int(wanted)) > int(wanted):
        logging.getLogger(__name__).warning(
            "this Ray worker runs at nice %d, below its driver's %s, and may not raise its priority; start the "
            "cluster's nodes with RAY_worker_niceness=%s", os.getpriority(os.PRIO_PROCESS, 0), wanted, wanted)


__all__ = ["user_error_in", "failure_cause", "retried_by_ray_train", "stop_on_user_error", "quiet_worker", "setup_worker",
           "worker_runtime_env", "raise_priority_to", "DRIVER_NICENESS_ENV"]
