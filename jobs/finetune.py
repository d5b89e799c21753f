"""Fine-tune (or pretrain) with Ray Train: DDP workers each running the core trainer; checkpoints in a
directory or S3; every run tracked in MLflow; a re-used name resumes.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/finetune.py name=owt-dsl preset=owt-small service.workers=8 service.gpus_per_worker=1 \\
        service.storage=s3://bucket/runs
    python jobs/finetune.py objective=dsl model=tiny-cpu service.workers=2 train.steps=200   # local Ray
    python jobs/finetune.py            # the offline demo: tiny MDLM on the synthetic HMM, then DSL fine-tune

``train.batch_size`` is the global batch whatever ``service.workers`` is. The run lives under
``<service.storage or out>/<name>``; re-using ``name`` resumes it.
"""

from __future__ import annotations

import os
import sys

# Loopback for any Ray this process starts or joins (see dsl.service.local_cluster.LOOPBACK_ENV);
# must precede the first `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from dsl.cli import Job, Mode, Renamed, changed_keys, main, renamed  # noqa: E402
from dsl.config import JobConfig, run_config_of, set_key, split_override, validate  # noqa: E402
from dsl.config.fields import parse_bool  # noqa: E402
from dsl.errors import UserError  # noqa: E402
from dsl.service.ray_train import (  # noqa: E402
    FinetuneResult,
    print_progress_note,
    resolve_name,
    run_finetune,
)

# the offline demo: pretrain, then DSL fine-tune from that checkpoint (App C.1 settings scaled down)
# (sized for a few minutes on 2 shared CPU cores: 16 x 64-token sequences per step)
DEMO_PRETRAIN = ["objective=mdlm", "train.steps=200", "train.batch_size=16", "train.eval_every=50",
                 "train.ckpt_every=50"]
DEMO_FINETUNE = ["objective=dsl", "train.steps=100", "train.batch_size=16", "train.eval_every=50",
                 "train.ckpt_every=50", "train.warmup_steps=0"]


def _summary(result: FinetuneResult) -> dict:
    return {"name": result.name, "step": result.step, "checkpoint": result.checkpoint,
            "mlflow_run_id": result.mlflow_run_id, "resumed": result.resumed,
            **{k: v for k, v in result.metrics.items() if k.startswith("valid_")}}


def run_train(cfg: JobConfig) -> dict:
    name = resolve_name(cfg)
    print(f"run {name}: {cfg.objective} on {cfg.service.workers} worker(s), "
          f"global batch {cfg.train.batch_size}, {cfg.train.steps} steps", flush=True)
    result = run_finetune(cfg, name=name)
    print_progress_note(result)
    return _summary(result)


def _phase(cfg: JobConfig, words: list[str], keep: set[str]) -> JobConfig:
    """A demo phase: the phase's settings, except for the keys in ``keep`` (what the user changed)."""
    import copy

    phase = copy.deepcopy(cfg)
    for key, raw in (split_override(w) for w in words):
        if key not in keep:
            set_key(phase, key, raw)
    validate(phase)
    validate(run_config_of(phase))
    return phase


def run_demo(cfg: JobConfig) -> dict:
    from dsl.service.ray_train import training_ray

    stem = cfg.name or "embedded"
    # phase settings give way to what the command line changed; name, objective and init are the phases'
    keep = changed_keys(JOB, "demo", cfg) - {"name", "objective", "init"}
    pre = _phase(cfg, [*DEMO_PRETRAIN, f"name={stem}-mdlm"], keep)
    with training_ray(pre.service.ray_address, pre.service.workers * pre.service.cpus_per_worker):
        print(f"== 1/2 pretraining a tiny MDLM on the synthetic HMM language ({pre.train.steps} steps)", flush=True)
        first = run_finetune(pre)
        if first.checkpoint is None:
            raise UserError(f"{first.storage_root}: pretraining left no complete checkpoint")
        # the DSL model takes the MDLM backbone (+ converter from vocab_embed) via init_dsl_from_mdlm,
        # which reads a weights file; the checkpoint was verified (sha256) when it was listed as latest
        init = f"{first.checkpoint}/ema.safetensors" if not first.checkpoint.startswith("s3://") else first.checkpoint
        fine = _phase(cfg, [*DEMO_FINETUNE, f"name={stem}-dsl", f"init={init}"], keep)
        print(f"== 2/2 DSL fine-tuning it ({fine.train.steps} steps, init={init})", flush=True)
        second = run_finetune(fine)
    print_progress_note(second)
    return {"pretrain": _summary(first), "finetune": _summary(second)}


def _validate(cfg: JobConfig, mode: str) -> None:
    validate(run_config_of(cfg))


def _embedded(raw: str) -> tuple[list[str], str | None]:
    return [], ("demo" if parse_bool("embedded", raw) else "train")


def _mlflow_switch(raw: str) -> tuple[list[str], str | None]:
    return [f"service.mlflow={'on' if parse_bool('service.log_to_mlflow', raw) else 'off'}"], None


RENAMED = {
    **{k: renamed(f"service.{k}") for k in ("workers", "gpus_per_worker", "cpus_per_worker", "storage",
                                            "storage_endpoint", "tracking_uri", "max_failures", "ray_address")},
    "steps": renamed("train.steps"), "batch_size": renamed("train.batch_size"), "out_dir": renamed("out"),
    "service.experiment": renamed("experiment"),
    "service.log_to_mlflow": Renamed("service.mlflow=on|off", convert=_mlflow_switch),
    "embedded": Renamed("the first word: python jobs/finetune.py demo ...", convert=_embedded),
}

JOB = Job(
    script="jobs/finetune.py", doc=__doc__,
    modes={"train": Mode(run_train, "train one run (the default when keys are given)"),
           "demo": Mode(run_demo, "offline demo: pretrain a tiny MDLM on the synthetic HMM, then DSL-fine-tune "
                                  "it (the default with no arguments)", defaults=("preset=embedded",))},
    uses=("name", "experiment", "seed", "objective", "init", "out", "model", "channel", "mdlm", "data", "train",
          "service"),
    ignores=("service.ray_cpus", "service.device"),
    defaults=("out=runs",),
    renamed=RENAMED, validate=_validate, bare="demo", tracks_by_default=True,
)


if __name__ == "__main__":
    sys.exit(main(JOB))
