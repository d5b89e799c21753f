"""Corpus preparation on Ray Data: the :class:`dsl.data.prepared.worker.PrepWorker` steps as Ray Data stages.

    parts --flat_map(read)--> chunks --map_batches(tokenize, N actors)--> token streams in <out>/_work
    shard plans --map_batches(write, N actors)--> <out>/<split>/shard-*.bin      (driver: manifest last)

Every Ray worker process keeps one ``PrepWorker`` per preparation, so a corpus and a tokenizer are opened
once per process.
A chunk row is about ``chunking.chars`` bytes and Ray Data's target block size is set to that, so every
chunk is its own block and the tokenizer actors share the work at chunk granularity. Each tokenizer actor
gets ``cpus_per_worker`` CPUs and caps the Rust tokenizers' thread pool to them (``RAYON_NUM_THREADS``),
so ``workers=N`` means N tokenizing processes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsl.config import ConfigError
from dsl.data.prepared.preparation import Preparation
from dsl.data.prepared.worker import PrepWorker

_WORKERS: dict[str, PrepWorker] = {}  # one per preparation per Ray worker process (tasks reuse processes)


def _worker(ctx: dict, endpoint: str) -> PrepWorker:
    key = ctx["out"] + "|" + json.dumps(ctx["data"], sort_keys=True)
    if key not in _WORKERS:
        if endpoint:
            from dsl.service.storage_s3 import set_default_endpoint

            set_default_endpoint(endpoint)
        _WORKERS[key] = PrepWorker(ctx)
    return _WORKERS[key]


def _count(row: dict, ctx: dict, endpoint: str) -> dict:
    return {"index": row["index"], "count": _worker(ctx, endpoint).count(json.loads(row["part"]))}


def _read(row: dict, ctx: dict, endpoint: str) -> Iterator[dict]:
    yield from _worker(ctx, endpoint).chunks(json.loads(row["item"]))


def _columns(records: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in records] for k in records[0]}


def _write(batch: dict[str, np.ndarray], ctx: dict, endpoint: str) -> dict[str, list]:
    worker = _worker(ctx, endpoint)
    return _columns([worker.write_shard(json.loads(spec)) for spec in batch["spec"]])


class _Tokenize:
    """A tokenizer actor: its Rust thread pool is capped to the actor's CPUs before the first encode."""

    def __init__(self, ctx: dict, endpoint: str, threads: int) -> None:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        self.worker = _worker(ctx, endpoint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        return _columns([self.worker.tokenize({"split": str(s), "part": int(p), "sub": int(b),
                                               "texts": [str(t) for t in texts]})
                         for s, p, b, texts in zip(batch["split"], batch["part"], batch["sub"], batch["texts"])])


class RayDataExecutor:
    """:class:`dsl.data.prepared.preparation.Executor` on Ray Data (the caller holds the Ray connection).

    Tokenization runs on ``workers`` long-lived actors (one tokenizer each); reading parts, counting
    their documents and writing shards are light and run as tasks, at most ``workers`` at a time.
    """

    def __init__(self, ctx: dict, workers: int, cpus_per_worker: float = 1.0, endpoint: str = "") -> None:
        # Ray Data's usage collector polls a Prometheus on localhost:9090 and logs tracebacks when none runs
        os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
        import ray.data

        self.ctx, self.workers, self.cpus, self.endpoint = ctx, workers, cpus_per_worker, endpoint
        dctx = ray.data.DataContext.get_current()
        dctx.enable_progress_bars = False   # the job draws its own bars
        dctx.print_on_execution_start = False
        dctx.target_max_block_size = int(ctx["chunking"]["chars"])

    def _kwargs(self) -> dict:
        return {"ctx": self.ctx, "endpoint": self.endpoint}

    def _tasks(self, n: int) -> Any:
        import ray.data

        return ray.data.TaskPoolStrategy(size=max(1, min(self.workers, n)))

    def count(self, parts: list[dict]) -> list[int]:
        import ray.data

        rows = [{"index": i, "part": json.dumps(p)} for i, p in enumerate(parts)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            _count, fn_kwargs=self._kwargs(), num_cpus=self.cpus, compute=self._tasks(len(rows)))
        return [r["count"] for r in sorted(ds.take_all(), key=lambda r: r["index"])]

    def tokenize(self, items: list[dict]) -> Iterator[dict]:
        import ray.data

        rows = [{"item": json.dumps(it)} for it in items]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.flat_map(_read, fn_kwargs=self._kwargs(), num_cpus=min(self.cpus, 0.5), compute=self._tasks(len(rows)))
        ds = ds.map_batches(_Tokenize, batch_size=1, num_cpus=self.cpus,
                            fn_constructor_kwargs={**self._kwargs(), "threads": max(1, math.floor(self.cpus))},
                            compute=ray.data.ActorPoolStrategy(size=self.workers))
        for row in ds.iter_rows():
            yield {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}

    def write(self, specs: list[dict]) -> Iterator[dict]:
        import ray.data

        if not specs:
            return
        rows = [{"spec": json.dumps(s)} for s in specs]
        # a few shards per block: consecutive shards share chunks, read once per block
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * self.workers)).map_batches(
            _write, fn_kwargs=self._kwargs(), batch_size=None, num_cpus=self.cpus, compute=self._tasks(len(rows)))
        for row in ds.iter_rows():
            yield {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}


def _progress(desc: str, total: int | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc" if total is None else "shard", file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


@dataclass
class PrepareResult:
    out: str
    manifest: dict
    workers: int
    documents: int
    tokens: int
    seconds: float
    tokenize_seconds: float
    worker_seconds: float
    reused_chunks: int
    reused_shards: int

    def summary(self) -> dict:
        splits = self.manifest["splits"]

        def rate(n: int, seconds: float) -> float | None:
            return round(n / seconds, 1) if seconds else None

        return {"out": self.out, "workers": self.workers, "documents": self.documents, "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "tokenize_seconds": round(self.tokenize_seconds, 3),
                "worker_seconds": round(self.worker_seconds, 3),
                "documents_per_s": rate(self.documents, self.seconds), "tokens_per_s": rate(self.tokens, self.seconds),
                "train_blocks": splits["train"]["blocks"], "valid_blocks": splits["valid"]["blocks"],
                "shards": sum(len(s["shards"]) for s in splits.values()), "length": self.manifest["length"],
                "dtype": self.manifest["dtype"], "reused_chunks": self.reused_chunks,
                "reused_shards": self.reused_shards}


def check_prepare(cfg: Any) -> None:
    """Before anything is written: a store location, a length and a text corpus that exists (one line)."""
    if not cfg.out:
        raise ConfigError("out= is required: the token store's directory (shared by the nodes) or "
                          "s3://bucket/prefix")
    if cfg.data.length == 0:
        raise ConfigError("data.length=0: give the block length L the model trains with (e.g. data.length=1024)")
    from dsl.data import PREPARED, SYNTHETIC

    if cfg.data.source in SYNTHETIC or cfg.data.source.startswith(PREPARED):
        raise ConfigError(f"data.source={cfg.data.source}: preparation takes a text corpus (a .txt/.jsonl/.parquet "
                          "file or folder, or hf:<dataset>)")
    from dsl.data.corpora import open_corpus

    open_corpus(cfg.data.source, cfg.data, cfg.data.length)  # a missing file or unknown dataset: one line
    if "://" not in cfg.out:
        from dsl.outputs import output_dir

        output_dir(cfg.out)  # a file in the way: one line now, not after Ray has started


def prepare(cfg: Any) -> PrepareResult:
    """Prepare ``cfg.data``'s corpus into ``cfg.out`` on Ray Data, resuming an unfinished preparation
    (``cfg`` is a :class:`dsl.config.JobConfig`: ``data``, ``out``, ``prepare`` and ``service`` keys)."""
    from dsl.service.ray_train import training_ray

    check_prepare(cfg)
    workers, cpus = cfg.prepare.workers, cfg.prepare.cpus_per_worker
    endpoint = cfg.service.storage_endpoint
    if endpoint:
        from dsl.service.storage_s3 import set_default_endpoint

        set_default_endpoint(endpoint)
    prep = Preparation(cfg.data, cfg.data.length, cfg.out, shard_blocks=cfg.prepare.shard_blocks,
                       log=lambda msg: print(msg, file=sys.stderr, flush=True),
                       progress=_progress if cfg.progress else None)
    with training_ray(cfg.service.ray_address, workers * cpus + 0.5):
        manifest = prep.run(lambda ctx: RayDataExecutor(ctx, workers, cpus, endpoint))
    s = prep.stats
    if s.seconds:
        print(f"prepared {s.documents:,} documents, {s.tokens:,} tokens in {s.seconds:.1f} s with {workers} Ray "
              f"worker(s): {s.documents / s.seconds:,.1f} documents/s, {s.tokens / s.seconds:,.0f} tokens/s "
              f"(reused {s.reused_chunks} chunks, {s.reused_shards} shards)", flush=True)
    return PrepareResult(out=prep.storage.uri, manifest=manifest, workers=workers, documents=s.documents,
                         tokens=s.tokens, seconds=s.seconds, tokenize_seconds=s.tokenize_seconds,
                         worker_seconds=s.worker_seconds,
                         reused_chunks=s.reused_chunks, reused_shards=s.reused_shards)


def log_manifest(logger: Any, summary: dict) -> None:
    """Into the preparation's MLflow run: the store's ``manifest.json`` as an artifact."""
    import tempfile
    from pathlib import Path

    from dsl.data.prepared.layout import MANIFEST
    from dsl.storage import open_storage

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MANIFEST
        path.write_bytes(open_storage(summary["out"]).get_bytes(MANIFEST))
        logger.log_artifact(str(path))


def _check_init_tokenizer(init: str, store: Any) -> None:
    """A checkpoint training starts from must have been trained on the store's ids (same tokenizer)."""
    from dsl.checkpoint import MANIFEST, latest_complete, read_tokenizer
    from dsl.data.tokenizers import tokenizer_fingerprint
    from dsl.errors import UserError
    from dsl.model_spec import INIT_KINDS, parse_model_spec
    from dsl.storage import open_storage

    spec = parse_model_spec(init, "init", INIT_KINDS)
    if not spec.ours:
        return  # scratch, or MDLM's own weights (GPT-2 ids: their vocabulary size is checked on load)
    uri = spec.target if open_storage(spec.target).exists(MANIFEST) else latest_complete(spec.target)
    tok = read_tokenizer(uri) if uri else None
    info = store.manifest["tokenizer"]
    if tok is not None and tokenizer_fingerprint(tok) != info["fingerprint"]:
        raise UserError(f"init={init}: the checkpoint's tokenizer ({tok.kind}, V={tok.vocab_size}) differs from the "
                        f"one the store was prepared with ({info['kind']}, V={info['vocab_size']}); prepare the "
                        "corpus with the checkpoint's tokenizer (data.tokenizer=<its tokenizer directory>)")


def check_prepared_data(run_cfg: Any, endpoint: str = "") -> None:
    """Before a training run starts: a prepared ``data.source`` fits the model (L, tokenizer, layout, the
    ``init`` checkpoint's tokenizer), is complete, and every shard's sha256 matches its manifest — so bad
    data is one line, never a step."""
    from dsl.data.prepared.layout import prepared_uri
    from dsl.data.prepared.reader import open_for_run

    if prepared_uri(run_cfg.data.source) is None:
        return
    if endpoint:
        from dsl.service.storage_s3 import set_default_endpoint

        set_default_endpoint(endpoint)
    started = time.perf_counter()
    store, _, _ = open_for_run(run_cfg)
    _check_init_tokenizer(run_cfg.init, store)
    store.verify(progress=_progress)
    print(f"data.source={run_cfg.data.source}: every shard verified ({time.perf_counter() - started:.1f} s)",
          file=sys.stderr, flush=True)


__all__ = ["RayDataExecutor", "PrepareResult", "check_prepare", "prepare", "log_manifest", "check_prepared_data"]
