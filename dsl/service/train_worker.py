"""Inside each Ray Train worker: build the core ``dsl.train.Trainer`` from a :class:`WorkerPlan`, resume
from the run's latest complete checkpoint, fit, and report to Ray and (rank 0) MLflow.

The driver (``dsl.service.ray_train``) fills the plan once; every worker of every attempt receives the
same plan, so what a worker does is fixed by it and the checkpoints in its storage.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from dsl.config import RunConfig
from dsl.errors import UserError, one_line
from dsl.redact import scrub


@dataclass(frozen=True)
class WorkerPlan:
    """What every training worker needs, decided by the driver before the workers start."""

    run: RunConfig               # the run's science config (what its checkpoints store)
    storage_root: str            # checkpoint root of the run: a directory or s3://bucket/prefix
    storage_endpoint: str        # S3 endpoint URL ('' = the default chain's)
    threads: int                 # torch CPU threads per worker
    gpus_per_worker: float       # > 0: each worker trains on its Ray-assigned GPU
    mlflow_run_id: str | None    # rank 0 logs metrics and checkpoints there (None = no tracking)
    tracking_uri: str | None
    system_metrics: bool         # MLflow system metrics from rank 0's node


def untrust_corrupt_after_latest(storage) -> list[int]:
    """Drop the manifest of every checkpoint newer than the latest one that verifies.

    Such a checkpoint (a missing, truncated or altered file) is never loaded; the run falls back to the
    previous complete one and must be able to train through and re-save those steps. Removing only the
    manifest leaves the files as debris that the next save of that step cleans up.
    """
    from dsl.checkpoint import MANIFEST, list_checkpoints, step_dir, verify_checkpoint

    dropped = []
    for step in reversed(list_checkpoints(storage)):
        key = f"{step_dir(step)}/{MANIFEST}"
        if not storage.exists(key):
            continue
        try:
            verify_checkpoint(storage, step_dir(step))
            break
        except UserError as exc:
            print(f"warning: not trusting {scrub(one_line(exc))}; falling back", flush=True)
            storage.delete(key)
            dropped.append(step)
    return dropped


def train_worker(plan: WorkerPlan) -> None:
    """Ray Train per-worker function: build the core Trainer, resume, fit, report to Ray and MLflow."""
    import ray.train
    import ray.train.torch
    import torch

    from dsl.checkpoint import latest_complete
    from dsl.train import Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, plan.threads))
    if plan.storage_endpoint:
        from dsl.service.storage_s3 import set_default_endpoint

        set_default_endpoint(plan.storage_endpoint)
    run_cfg = plan.run
    device = ray.train.torch.get_device() if plan.gpus_per_worker > 0 else torch.device("cpu")
    logger = None
    if rank == 0 and plan.mlflow_run_id:
        from dsl.service.tracking import RunLogger

        node = re.sub(r"[^A-Za-z0-9_.-]", "-", f"rank0-{socket.gethostname()}")  # MLflow metric-name chars
        logger = RunLogger(plan.mlflow_run_id, plan.tracking_uri, system_metrics=plan.system_metrics, node_id=node)

    def on_metrics(metrics: dict, step: int) -> None:
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"[{run_cfg.name}] step {step}/{run_cfg.train.steps} {shown}", flush=True)
        if logger is not None:
            logger.log_metrics(metrics, step)

    def on_checkpoint(uri: str, step: int) -> None:
        # no Ray report here: ranks may disagree on whether a final save is needed, and reports must
        # pair up across ranks
        if logger is not None:
            logger.log_checkpoint(uri, step)

    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if world > 1 else None
    trainer = Trainer(run_cfg, rank=rank, world_size=world, wrap_model=wrap, storage=plan.storage_root,
                      on_metrics=on_metrics, on_checkpoint=on_checkpoint, device=device)
    if rank == 0:
        untrust_corrupt_after_latest(trainer.storage)
    if world > 1:
        torch.distributed.barrier()  # every rank must see the same checkpoints before resuming
    trainer.resume()
    if rank == 0:
        # one point per (re)start of the worker group: where it resumed from (0 = fresh)
        print(f"[{run_cfg.name}] rank 0 of {world} starting at step {trainer.step_count} "
              f"(nice {os.getpriority(os.PRIO_PROCESS, 0)})", flush=True)
        if logger is not None:
            logger.log_metrics({"resumed_from_step": trainer.step_count}, trainer.step_count)
    try:
        final = trainer.fit()
    except BaseException:
        if logger is not None:
            logger.close()
        raise
    if logger is not None:
        logger.log_metrics({k: v for k, v in final.items() if k.startswith("valid_")}, trainer.step_count)
        logger.close()
    # one report per rank per attempt: the barrier that ends the attempt together
    ray.train.report({"step": trainer.step_count,
                      "checkpoint_uri": (latest_complete(trainer.storage) or "") if rank == 0 else ""})


__all__ = ["WorkerPlan", "train_worker", "untrust_corrupt_after_latest"]
