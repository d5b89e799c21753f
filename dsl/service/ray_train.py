"""Distributed fine-tuning on Ray Train (V2): ``TorchTrainer`` + DDP, the core ``dsl.train.Trainer``
unchanged inside every worker, checkpoints in our own storage, rank-0 MLflow logging.

Semantics that do not depend on the worker count W:
- ``train.batch_size`` is the GLOBAL batch in sequences; each rank takes its own rows of it
  (``Data.batch(..., rank, world)``), and the gradient is divided by the global token count, so
  ``train.lr`` means the same for any W (W workers == 1 process with the same global batch).
- Corruption noise is keyed by (seed, step, global row), so the data order and noise are identical.

Resume contract: a run has a stable name (``name=``, else the Ray job submission id, else a hash of
the config); its checkpoints live under ``<storage>/<name>/step-<N>/``. Any start of the worker group
— first run, a Ray ``FailureConfig`` restart after a lost worker, a re-submitted job — restores the
latest *complete* checkpoint there, and the driver re-opens the MLflow run tagged with that name.
Ray's own checkpoint machinery is not used for weights (``ray.train.report`` carries only metrics and
our checkpoint URI), so the run's state has one source of truth that sampling/eval jobs also read.
The workers run ``dsl.service.train_worker.train_worker`` on a typed ``WorkerPlan``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from dsl.config import ConfigError, JobConfig, RunConfig, from_dict, run_config_of, to_dict
from dsl.data import check_source
from dsl.errors import JobFailed, UserError
from dsl.outputs import RUNS_ROOT, output_dir
from dsl.redact import scrub
from dsl.service.ray_failures import (
    failure_cause,
    retried_by_ray_train,
    stop_on_user_error,
    user_error_in,
    worker_runtime_env,
)
from dsl.service.train_worker import WorkerPlan, train_worker

# The service keys a training run records as MLflow params (where and how it ran, not where it is tracked).
LOGGED_SERVICE_KEYS = ("workers", "gpus_per_worker", "cpus_per_worker", "threads_per_worker", "max_failures",
                       "storage", "storage_endpoint", "system_metrics")


def submission_id() -> str | None:
    """The Ray job submission id when running as a ``ray job submit`` entrypoint."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id") or None
    except ValueError:
        return None


def resolve_name(cfg: JobConfig) -> str:
    from dsl.train import run_name

    name = cfg.name or submission_id() or run_name(run_config_of(cfg))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name):
        raise ConfigError(f"name={name!r}: use letters, digits, '.', '_' and '-' (it becomes a storage prefix)")
    return name


def storage_root(cfg: JobConfig, name: str) -> str:
    """Absolute checkpoint root of run ``name`` (workers run in other directories than the driver)."""
    from dsl.storage import join_uri

    base = cfg.service.storage
    if base.startswith("s3://"):
        return join_uri(base, name)
    if "://" in base and not base.startswith("file://"):
        raise ConfigError(f"service.storage={base!r}: accepted: a directory, file://..., or s3://bucket/prefix")
    key = "service.storage" if base else "out"
    base = base.removeprefix("file://") or cfg.out or RUNS_ROOT
    return str(output_dir(base, key).resolve() / name)


def check_storage(root: str, endpoint: str) -> None:
    """Fail early with one line if the checkpoint storage cannot be listed."""
    from dsl.storage import open_storage

    if root.startswith("s3://"):
        from dsl.service.storage_s3 import set_default_endpoint

        set_default_endpoint(endpoint or None)
    open_storage(root).list("")


def check_init(init: str) -> None:
    """Resolve ``init`` before any worker starts, so a bad or offline source is one clear line."""
    from dsl.model_spec import INIT_KINDS, parse_model_spec

    spec = parse_model_spec(init, "init", INIT_KINDS)
    if spec.kind == "hf":
        from dsl.models.mdlm_weights import download_hub

        download_hub(spec.target)  # cached for the workers on this node; raises one line when offline
    elif spec.ours:
        from dsl.checkpoint import MANIFEST, latest_complete, read_manifest
        from dsl.storage import open_storage

        st = open_storage(spec.target)
        if st.exists(MANIFEST):
            read_manifest(st, "")  # one line for a malformed manifest; the workers verify the files
        elif latest_complete(st) is None:
            raise UserError(f"init={init}: no complete checkpoint there (expected {MANIFEST} or "
                            f"step-<N>/{MANIFEST})")


# Keys a re-run of the same name may change: how long and how it trains on, not what it trains.
RESUMABLE_CHANGES = ("name", "init", "out_dir", "train.", "data.cache_dir", "data.streaming")
# Values a checkpoint stores resolved (the tokenizer's V and mask id): a re-run leaving them automatic matches.
RESOLVED_LATER = {"model.vocab_size": 0, "model.mask_id": -1}


def check_resume(root: str, run_cfg: RunConfig) -> None:
    """A re-used name continues the run under ``root``: refuse, before any worker starts, a config that
    differs from the run's checkpoints in what it trains (model, objective, channel, loss, data)."""
    from dsl.checkpoint import latest_complete, read_manifest
    from dsl.config import flatten
    from dsl.storage import open_storage

    latest = latest_complete(root)
    if latest is None:
        return
    saved = from_dict(RunConfig, read_manifest(open_storage(latest), "")["config"], where=latest)
    old, new = flatten(saved), flatten(run_cfg)
    diff = [k for k in new if old.get(k) != new[k] and not k.startswith(RESUMABLE_CHANGES)
            and not (k in RESOLVED_LATER and new[k] == RESOLVED_LATER[k])]
    if diff:
        shown = ", ".join(f"{k}={new[k]} (run: {old.get(k)})" for k in diff[:3]) + (" …" if len(diff) > 3 else "")
        raise UserError(f"name={run_cfg.name} continues the run at {latest}, trained with other settings: {shown}; "
                        f"give a new name= for a new run, or the run's own settings to continue it")


def check_worker_memory(run_cfg: RunConfig, svc: Any, private: bool) -> None:
    """Refuse a model/batch that cannot fit a training worker: on a private local cluster the workers
    share this machine's available memory; on a GPU the largest accelerator memory shipping bounds it."""
    from dsl.memory import available_bytes, check_training_memory

    if svc.gpus_per_worker > 0:
        check_training_memory(run_cfg, svc.workers, LARGEST_ACCELERATOR_BYTES, "of the largest accelerator")
    elif private:
        check_training_memory(run_cfg, svc.workers, available_bytes() / svc.workers,
                              f"available to each of {svc.workers} worker(s) on this machine")


# No accelerator ships with more memory than this (192 GiB); a model that exceeds it cannot train anywhere.
LARGEST_ACCELERATOR_BYTES = 192 * (1 << 30)


# ----------------------------------------------------------------------------------------------
# Driver side.


@dataclass
class FinetuneResult:
    name: str
    step: int
    checkpoint: str | None
    storage_root: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    resumed: bool
    metrics: dict = field(default_factory=dict)
    experiment: str | None = None


def training_ray(address: str, cpus_needed: float):
    """:func:`~dsl.service.ray_session.ray_session` for a training or preparation driver: workers' output
    echoed here and :func:`~dsl.service.ray_failures.setup_worker` in every worker; a private Ray gets
    ``cpus_needed`` plus one CPU (at least 2) and a 200 MB object store."""
    from dsl.service.ray_session import ray_session

    return ray_session(address, cpus=max(2, int(cpus_needed + 0.999) + 1), object_store_mb=200,
                       log_to_driver=True, runtime_env=worker_runtime_env(), temp_prefix="ray-train-")


def run_finetune(cfg: JobConfig, *, name: str | None = None) -> FinetuneResult:
    """Run (or resume) one training run on Ray and return where its checkpoint and MLflow run are."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from dsl.checkpoint import latest_complete
    from dsl.service import tracking

    svc = cfg.service
    name = name or resolve_name(cfg)
    cfg.name = name
    run_cfg = run_config_of(cfg)
    if svc.workers > 1 and run_cfg.train.batch_size % svc.workers:
        raise ConfigError(f"train.batch_size={run_cfg.train.batch_size} must be divisible by "
                          f"service.workers={svc.workers} (it is the global batch)")
    root = storage_root(cfg, name)
    check_storage(root, svc.storage_endpoint)
    check_init(run_cfg.init)
    from dsl.service.prepare_ray import check_prepared_data

    check_prepared_data(run_cfg, svc.storage_endpoint)
    check_source(run_cfg)
    check_resume(root, run_cfg)
    check_worker_memory(run_cfg, svc, private=not (svc.ray_address or os.environ.get("RAY_ADDRESS")))

    run_id = None
    resumed = latest_complete(root) is not None
    tracking_uri = tracking.resolve_tracking_uri(svc, default_on=True)
    if tracking_uri:
        params = {**tracking.flat_params(run_cfg), **{f"service.{k}": v for k, v in tracking.flat_params(
            {k: v for k, v in to_dict(svc).items() if k in LOGGED_SERVICE_KEYS}).items()}}
        from dsl.sources import unread_source_keys

        for key in unread_source_keys(params):   # another source's settings: not read by this run
            del params[key]
        tags = {"dsl.storage_root": root, "dsl.workers": str(svc.workers)}
        if submission_id():
            tags["dsl.ray_submission_id"] = submission_id()
        run_id, _ = tracking.ensure_training_run(name, params=params, tags=tags, tracking_uri=tracking_uri,
                                                 experiment=cfg.experiment)

    threads = svc.threads_per_worker or max(1, int(round(svc.cpus_per_worker)))
    plan = WorkerPlan(run=run_cfg, storage_root=root, storage_endpoint=svc.storage_endpoint, threads=threads,
                      gpus_per_worker=svc.gpus_per_worker, mlflow_run_id=run_id, tracking_uri=tracking_uri,
                      system_metrics=svc.system_metrics)
    env_vars = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "OMP_NUM_THREADS": str(threads)}
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(key):  # endpoints and regions only: credentials come from each node's chain
            env_vars[key] = os.environ[key]

    # Ray Train's own run state (its controller snapshots): our checkpoints under ``root`` are the run's
    # record, so this lives in a temporary directory, never beside the user's outputs
    ray_state = tempfile.mkdtemp(prefix="dsl-ray-train-")
    session = contextlib.ExitStack()
    try:
        session.enter_context(training_ray(svc.ray_address, svc.workers * svc.cpus_per_worker))
        resources = {"CPU": svc.cpus_per_worker}
        if svc.gpus_per_worker > 0:
            resources["GPU"] = svc.gpus_per_worker
        retries = svc.max_failures if svc.max_failures >= 0 else math.inf
        attempt = 0
        while True:
            trainer = TorchTrainer(
                functools.partial(train_worker, plan),
                scaling_config=ray.train.ScalingConfig(num_workers=svc.workers, use_gpu=svc.gpus_per_worker > 0,
                                                       resources_per_worker=resources),
                run_config=ray.train.RunConfig(
                    name=name, storage_path=tempfile.mkdtemp(dir=ray_state),
                    failure_config=ray.train.FailureConfig(max_failures=svc.max_failures),
                    callbacks=[stop_on_user_error()], worker_runtime_env={"env_vars": env_vars}))
            try:
                trainer.fit()
                break
            except Exception as exc:
                msg = user_error_in(exc)
                if not msg and not retried_by_ray_train(exc) and attempt < retries:
                    # Ray Train retries a failed worker group itself; its controller killed (by the
                    # out-of-memory monitor, a lost node) it does not: start again from our checkpoints
                    attempt += 1
                    print(f"warning: run {name}: {failure_cause(exc)}; retrying from its latest checkpoint "
                          f"(retry {attempt} of service.max_failures={svc.max_failures})", file=sys.stderr, flush=True)
                    continue
                if msg:
                    raise UserError(msg) from None
                raise JobFailed(f"run {name} failed after {attempt + 1} attempt(s) (service.max_failures="
                                f"{svc.max_failures}): {failure_cause(exc)}") from exc
    except BaseException as exc:   # failed: FAILED; Ctrl-C or SIGTERM: KILLED (a resume reopens the run)
        if run_id:
            with contextlib.suppress(Exception):
                tracking.RunLogger(run_id, tracking_uri, system_metrics=False).close(tracking.end_status(exc))
        raise
    finally:
        session.close()
        shutil.rmtree(ray_state, ignore_errors=True)

    from dsl.checkpoint import load_checkpoint

    latest = latest_complete(root)
    step, metrics = 0, {}
    if latest:
        ckpt = load_checkpoint(latest)
        step, metrics = ckpt.step, ckpt.metrics
    if run_id:
        log = tracking.RunLogger(run_id, tracking_uri, system_metrics=False)
        if latest:
            log.log_checkpoint(latest, step)
        log.close("FINISHED")
    return FinetuneResult(name=name, step=step, checkpoint=latest, storage_root=root, mlflow_run_id=run_id,
                          tracking_uri=tracking_uri, resumed=resumed, metrics=metrics, experiment=cfg.experiment)


def print_progress_note(result: FinetuneResult, stream: Any = None) -> None:
    """Where the checkpoint and the MLflow run are, and the one command that opens the UI on them."""
    from dsl.service.tracking import ui_command

    out = stream or sys.stdout
    print(f"checkpoint: {scrub(result.checkpoint)}", file=out)
    if result.mlflow_run_id:
        print(f"mlflow run: {result.mlflow_run_id} (experiment tracked at {scrub(result.tracking_uri)})", file=out)
        print(f"open the UI: {ui_command(result.tracking_uri, result.experiment)}", file=out)


__all__ = ["FinetuneResult", "LOGGED_SERVICE_KEYS", "run_config_of", "resolve_name",
           "storage_root", "run_finetune", "submission_id", "user_error_in",
           "print_progress_note", "check_init", "check_storage"]
