"""How a failed Ray Train run is told: the user error inside Ray's wrappers, or one line naming the cause."""

from __future__ import annotations

import logging

from ray.exceptions import ActorDiedError, OutOfMemoryError
from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

from dsl.config import ConfigError
from dsl.errors import JobFailed, UserError, run_cli
from dsl.service.ray_failures import _not_a_user_error_echo, failure_cause, user_error_in


def _worker_failure(exc: BaseException) -> WorkerGroupError:
    tb = f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{type(exc).__module__}.{type(exc).__name__}: {exc}"
    return WorkerGroupError("Training failed due to worker errors", {0: UserExceptionWithTraceback(exc, tb),
                                                                     1: UserExceptionWithTraceback(exc, tb)})


def test_a_user_error_is_found_inside_every_wrapper_ray_puts_around_it():
    bad = UserError("data.source=/x.jsonl: no such file or directory")
    assert user_error_in(_worker_failure(bad)) == str(bad)
    assert user_error_in(ControllerError(UserError(str(bad)))) == str(bad)       # stopped by the callback
    assert user_error_in(ControllerError(_worker_failure(ConfigError("model.hidden=3: bad")))) == "model.hidden=3: bad"
    text_only = WorkerGroupError("x", {0: RuntimeError("...\ndsl.errors.UserError: init=/y: no such file\n")})
    assert user_error_in(text_only) == "init=/y: no such file"
    assert user_error_in(_worker_failure(RuntimeError("CUDA error"))) is None


def test_other_failures_end_with_one_line_naming_the_cause():
    oom = WorkerGroupError("Training failed", {0: OutOfMemoryError("Task was killed due to the node running low "
                                                                    "on memory.\nMemory on the node was 23.1GB")})
    line = failure_cause(oom)
    assert "out-of-memory monitor killed a process of the run" in line and "\n" not in line
    died = WorkerGroupError("Training failed", {1: ActorDiedError()})
    assert failure_cause(died).startswith("a training worker died (")
    other = failure_cause(_worker_failure(RuntimeError("NCCL timeout on rank 1")))
    assert "NCCL timeout on rank 1" in other and "\n" not in other


def test_job_failed_is_one_line_and_exit_1(capsys):
    def body():
        raise JobFailed("run r failed after its retries (service.max_failures=2): a training worker died (x)")

    assert run_cli(body) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "error: run r failed after its retries (service.max_failures=2): a training " \
                                "worker died (x)\n"


def test_worker_logs_drop_only_the_echoes_of_a_user_error():
    def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        return logging.LogRecord("ray.train", logging.ERROR, "f", 1, msg, None,
                                 (type(exc), exc, None) if exc else None)

    echo = record("Error in training function:\nTraceback ...\ndsl.errors.UserError: data.source=x: missing")
    stopped = record("Error in control loop iteration: %s", ControllerError(UserError("data.source=x: missing")))
    assert not _not_a_user_error_echo(echo) and not _not_a_user_error_echo(stopped)
    assert _not_a_user_error_echo(record("Error in training function:\nRuntimeError: CUDA out of memory"))


def test_ray_trains_own_verdicts_are_not_retried_again_by_the_driver():
    from dsl.service.ray_failures import retried_by_ray_train

    assert retried_by_ray_train(_worker_failure(RuntimeError("x")))
    assert retried_by_ray_train(ControllerError(RuntimeError("x")))
    assert not retried_by_ray_train(OutOfMemoryError("1 worker(s) were killed due to the node running low on memory"))
