"""Tokenize and wrap a corpus once, in parallel on Ray Data, into a sharded token store that every training
worker reads (``data.source=prepared:<out>``); re-running the same command resumes an interrupted run.

    python jobs/prepare_data.py data.source=hf:openwebtext data.tokenizer=gpt2 data.length=1024 \\
        prepare.workers=32 out=s3://bucket/prepared/owt-gpt2-1024
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/prepare_data.py ...
    python jobs/finetune.py preset=owt-small data.source=prepared:s3://bucket/prepared/owt-gpt2-1024 ...

``data.length`` (L) is required; the store holds L-token blocks exactly as training from the raw corpus
makes them. The store's manifest goes into the job's MLflow run.
"""

from __future__ import annotations

import os
import sys

# Loopback for any Ray this process starts or joins; must precede the first `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from dsl.cli import Job, Mode, main  # noqa: E402
from dsl.config import JobConfig  # noqa: E402
from dsl.service.prepare_ray import check_prepare, log_manifest, prepare  # noqa: E402


def run_prepare(cfg: JobConfig) -> dict:
    print(f"preparing {cfg.data.source} ({cfg.data.tokenizer}, L={cfg.data.length}) into {cfg.out} with "
          f"{cfg.prepare.workers} Ray worker(s)", flush=True)
    return prepare(cfg).summary()


JOB = Job(
    script="jobs/prepare_data.py", doc=__doc__,
    modes={"prepare_data": Mode(run_prepare, "tokenize and wrap data.source into the token store at out=", tracked=True,
                           check=check_prepare, tags=lambda cfg: {"dsl.prepared_store": cfg.out},
                           after=log_manifest)},
    uses=("name", "experiment", "out", "progress", "data", "prepare", "service.storage_endpoint",
          "service.ray_address", "service.mlflow", "service.tracking_uri"),
    ignores=("data.streaming", "data.shuffle_window", "data.hmm_states", "data.hmm_words", "data.hmm_seed",
             "data.cyclic_k"),
    tracks_by_default=True,
)


if __name__ == "__main__":
    sys.exit(main(JOB))
