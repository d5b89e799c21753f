"""Tokenize and wrap a corpus once, in parallel on Ray Data, into a sharded token store that every
training worker reads (``data.source=prepared:<out>``); re-running the same command resumes.

    python jobs/prepare_data.py data.source=hf:openwebtext data.tokenizer=gpt2 data.length=1024 \\
        workers=32 out=s3://bucket/prepared/owt-gpt2-1024
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/prepare_data.py ...
    python jobs/finetune.py preset=owt-small data.source=prepared:s3://bucket/prepared/owt-gpt2-1024 ...

Keys: every ``data.*`` key of the run config (``data.source``, ``data.tokenizer``, ``data.length`` (required),
``data.wrap``, ``data.valid_fraction``, ``data.text_field`` ...) plus ``out``, ``workers``, ``cpus_per_worker``,
``shard_blocks``, ``storage_endpoint``, ``ray_address``, ``tracking_uri``, ``experiment``
(``--help`` lists them). The last stdout line is a JSON summary; bad input is one ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import os
import sys

# Loopback for any Ray this process starts or joins; must precede the first `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from dsl.config import describe, load  # noqa: E402
from dsl.errors import run_cli  # noqa: E402
from dsl.service.prepare_ray import ALIASES, PrepareConfig, prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(describe(PrepareConfig))
        return 0

    def body() -> dict:
        cfg = load(PrepareConfig, argv, aliases=ALIASES)
        print(f"preparing {cfg.data.source} ({cfg.data.tokenizer}, L={cfg.data.length}) into {cfg.out} "
              f"with {cfg.workers} Ray worker(s)", flush=True)
        return prepare(cfg).summary()

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
