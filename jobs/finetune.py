"""Fine-tune (or pretrain) with Ray Train: DDP workers each running the core trainer; checkpoints in a
directory or S3; every run tracked in MLflow; a re-used name resumes.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/finetune.py name=owt-dsl preset=owt-small workers=8 gpus_per_worker=1 \\
        storage=s3://bucket/runs init=hf:kuleshov-group/mdlm-owt
    python jobs/finetune.py objective=dsl model=tiny-cpu workers=2 train.steps=200   # local Ray
    python jobs/finetune.py            # offline demo: tiny MDLM on the synthetic HMM, then DSL fine-tune

Keys: every science key of the run (``train.lr=...``, ``model=tiny``, ``objective=dsl|mdlm|ar``,
``init=scratch|<dir>|s3://...|hf:kuleshov-group/mdlm-owt``) plus ``workers``, ``gpus_per_worker``,
``cpus_per_worker``, ``storage``, ``storage_endpoint``, ``tracking_uri``, ``experiment``, ``max_failures``
(``python jobs/finetune.py --help`` lists them all). ``train.batch_size`` is the global batch.
The last stdout line is a JSON summary. Bad input prints ``error: <one line>`` and exits 2.
"""

from __future__ import annotations

import os
import sys

# Loopback for any Ray this process starts or joins (see dsl.service.local_cluster.LOOPBACK_ENV);
# must precede the first `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from dsl.config import describe, load  # noqa: E402
from dsl.errors import UserError, run_cli  # noqa: E402
from dsl.service.ray_train import (  # noqa: E402
    ALIASES,
    FinetuneConfig,
    FinetuneResult,
    print_progress_note,
    resolve_name,
    run_finetune,
)

# the offline demo: pretrain, then DSL fine-tune from that checkpoint (App C.1 settings scaled down)
# (sized for a few minutes on 2 shared CPU cores: 16 x 64-token sequences per step)
EMBEDDED_PRETRAIN = ["preset=embedded", "objective=mdlm", "train.steps=200", "train.batch_size=16",
                     "train.eval_every=50", "train.ckpt_every=50"]
EMBEDDED_FINETUNE = ["preset=embedded", "objective=dsl", "train.steps=100", "train.batch_size=16",
                     "train.eval_every=50", "train.ckpt_every=50", "train.warmup_steps=0"]


def _summary(result: FinetuneResult) -> dict:
    return {"name": result.name, "step": result.step, "checkpoint": result.checkpoint,
            "mlflow_run_id": result.mlflow_run_id, "resumed": result.resumed,
            "valid_nll": result.metrics.get("valid_nll")}


def run_embedded(argv: list[str]) -> dict:
    from dsl.service.ray_train import _connect_ray

    base = load(FinetuneConfig, argv, aliases=ALIASES)
    stem = base.name or "embedded"
    pre = load(FinetuneConfig, [*EMBEDDED_PRETRAIN, *argv, f"name={stem}-mdlm"], aliases=ALIASES)
    started = _connect_ray(pre.service.ray_address, pre.service.workers * pre.service.cpus_per_worker)
    try:
        print(f"== 1/2 pretraining a tiny MDLM on the synthetic HMM language ({pre.train.steps} steps)", flush=True)
        first = run_finetune(pre)
        if first.checkpoint is None:
            raise UserError(f"{first.storage_root}: pretraining left no complete checkpoint")
        # the DSL model takes the MDLM backbone (+ converter from vocab_embed) via init_dsl_from_mdlm,
        # which reads a weights file; the checkpoint was verified (sha256) when it was listed as latest
        init = f"{first.checkpoint}/ema.safetensors" if not first.checkpoint.startswith("s3://") else first.checkpoint
        fine = load(FinetuneConfig, [*EMBEDDED_FINETUNE, *argv, f"name={stem}-dsl", f"init={init}"], aliases=ALIASES)
        print(f"== 2/2 DSL fine-tuning it ({fine.train.steps} steps, init={init})", flush=True)
        second = run_finetune(fine)
    finally:
        if started:
            import ray

            ray.shutdown()
    print_progress_note(second)
    return {"pretrain": _summary(first), "finetune": _summary(second)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(describe(FinetuneConfig))
        return 0
    def body() -> dict:
        if not argv or "embedded=true" in argv:
            return run_embedded([a for a in argv if a != "embedded=true"])
        cfg = load(FinetuneConfig, argv, aliases=ALIASES)
        name = resolve_name(cfg)
        print(f"run {name}: {cfg.objective} on {cfg.service.workers} worker(s), "
              f"global batch {cfg.train.batch_size}, {cfg.train.steps} steps", flush=True)
        result = run_finetune(cfg, name=name)
        print_progress_note(result)
        return _summary(result)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
