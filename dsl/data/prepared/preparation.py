"""The driver of a preparation: the recipe a resume must share, which chunks and shards already exist,
the shard plan (which pieces of which chunks make each shard), the executors that run the worker steps,
and the manifest written last."""

from __future__ import annotations

import bisect
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dsl.data.prepared.layout import (
    CHUNK_CHARS,
    CHUNK_DOCS,
    CHUNK_FILE,
    FORMAT,
    LENGTH_DTYPE,
    MANIFEST,
    PAD_RULE,
    SHARD_BYTES,
    SHARD_FILE,
    SPLITS,
    WORK,
    WRAP_RULE,
    progress_bar,
    read_manifest,
    sha256_hex,
    token_dtype,
    tokenizer_files,
    tokenizer_from_files,
    uri_of,
)
from dsl.data.prepared.reader import PreparedStore
from dsl.data.prepared.worker import PrepWorker
from dsl.data.tokenizers import tokenizer_fingerprint
from dsl.errors import UserError, one_line
from dsl.storage import open_storage


def plan_shards(chunks: Iterable[dict], length: int, wrap: bool, blocks_per_shard: int, itemsize: int
                ) -> dict[str, dict]:
    """Per split: ``{documents, tokens, blocks, dropped_tokens, specs}`` from the chunk records.

    Chunks are ordered by (part, sub) — corpus order — and their units (tokens when wrapped, documents
    otherwise) laid end to end; shard s takes blocks [s K, (s+1) K) of that stream.
    """
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for c in chunks:
        by_split[c["split"]].append(c)
    out = {}
    per_block = length - 2 if wrap else 1
    row_bytes = length * itemsize + (0 if wrap else LENGTH_DTYPE.itemsize)
    for split, recs in by_split.items():
        recs.sort(key=lambda c: (c["part"], c["sub"]))
        starts = np.cumsum([0] + [c["units"] for c in recs]).tolist()
        total = starts[-1]
        blocks = total // per_block
        specs = []
        for s in range(-(-blocks // blocks_per_shard)):
            b0, b1 = s * blocks_per_shard, min(blocks, (s + 1) * blocks_per_shard)
            u0, u1 = b0 * per_block, b1 * per_block
            pieces = []
            i = bisect.bisect_right(starts, u0) - 1
            while u0 < u1:
                lo = u0 - starts[i]
                hi = min(recs[i]["units"], u1 - starts[i])
                if hi > lo:
                    pieces.append([recs[i]["key"], lo, hi])
                    u0 += hi - lo
                i += 1
            specs.append({"split": split, "shard": s, "blocks": b1 - b0, "bytes": (b1 - b0) * row_bytes,
                          "pieces": pieces})
        out[split] = {"documents": sum(c["docs"] for c in recs), "tokens": sum(c["tokens"] for c in recs),
                      "blocks": blocks, "dropped_tokens": total - blocks * per_block if wrap else 0, "specs": specs}
    return out


class Executor(Protocol):
    """Runs the worker steps; results may arrive in any order."""

    def count(self, parts: list[dict]) -> list[int]: ...

    def tokenize(self, items: list[dict]) -> Iterator[dict]: ...

    def write(self, specs: list[dict]) -> Iterator[dict]: ...


class InProcess:
    """The steps one after the other in this process: the reference order, and enough for small corpora."""

    def __init__(self, ctx: dict) -> None:
        self.worker = PrepWorker(ctx)

    def count(self, parts: list[dict]) -> list[int]:
        return [self.worker.count(p) for p in parts]

    def tokenize(self, items: list[dict]) -> Iterator[dict]:
        for item in items:
            for chunk in self.worker.chunks(item):
                yield self.worker.tokenize(chunk)

    def write(self, specs: list[dict]) -> Iterator[dict]:
        for spec in specs:
            yield self.worker.write_shard(spec)


@dataclass
class PrepStats:
    documents: int = 0
    tokens: int = 0
    chunks: int = 0
    seconds: float = 0.0           # the whole run (counting, tokenizing, writing shards)
    tokenize_seconds: float = 0.0  # reading + tokenizing the chunks (wall clock)
    worker_seconds: float = 0.0    # summed over chunks: the time workers spent tokenizing and saving them
    reused_chunks: int = 0
    reused_shards: int = 0


class Preparation:
    """Prepare ``data_cfg``'s corpus at ``length`` into ``out``; :meth:`run` returns the manifest."""

    def __init__(self, data_cfg: Any, length: int, out: str, *, shard_blocks: int = 0,
                 chunk_docs: int = CHUNK_DOCS, chunk_chars: int = CHUNK_CHARS,
                 log: Callable[[str], None] | None = None,
                 progress: Callable[[str, int | None], Any] | None = None) -> None:
        from dsl.data.corpora import open_corpus

        if length < 3 and data_cfg.wrap:
            raise UserError(f"data.length={length}: wrapped blocks need L >= 3 (BOS, a token, EOS)")
        self.data_cfg, self.length, self.wrap = data_cfg, int(length), bool(data_cfg.wrap)
        self.out = out
        self.storage = open_storage(out)
        self.corpus = open_corpus(data_cfg.source, data_cfg, length)
        self.shard_blocks = int(shard_blocks)
        self.chunking = {"docs": int(chunk_docs), "chars": int(chunk_chars)}
        self.log = log or (lambda msg: None)
        self.progress = progress
        self.stats = PrepStats()
        self.tokenizer: Any = None
        self.tok_files: dict[str, bytes] = {}

    # -- recipe ---------------------------------------------------------------------------------
    def recipe(self) -> dict:
        """What a resumed preparation must share with the first attempt (the worker count is not part of it)."""
        d = self.data_cfg
        return {"format": FORMAT, "source": d.source, "corpus": self.corpus.identity(), "tokenizer": d.tokenizer,
                "bpe_vocab": d.bpe_vocab if d.tokenizer in ("auto", "bpe") else None, "length": self.length,
                "wrap": self.wrap, "shard_blocks": self.shard_blocks,
                "chunking": self.chunking}

    def _differences(self, other: dict) -> list[str]:
        mine = self.recipe()
        return [k for k in sorted(set(mine) | set(other)) if mine.get(k) != other.get(k)]

    # -- steps ----------------------------------------------------------------------------------
    def check_writable(self) -> None:
        key = f"{WORK}/.write-probe-{os.getpid()}-{time.time_ns()}"
        try:
            self.storage.put_bytes(key, b"probe")
            self.storage.delete(key)
        except UserError as exc:
            raise UserError(f"out={self.out}: not writable ({one_line(exc)})") from None
        except OSError as exc:
            raise UserError(f"out={self.out}: not writable ({type(exc).__name__}: {exc.strerror or exc}); "
                            "accepted: a writable directory or s3://bucket/prefix") from None

    def existing_manifest(self) -> dict | None:
        if not self.storage.exists(MANIFEST):
            return None
        manifest = read_manifest(self.storage)
        diff = self._differences(manifest.get("recipe", {}))
        if diff:
            raise UserError(f"out={self.out}: already holds a prepared store made differently ({', '.join(diff)}); "
                            "refusing to overwrite it: choose another out= or delete it")
        return manifest

    def load_or_build_tokenizer(self) -> None:
        from dsl.data import text_tokenizer

        saved = f"{WORK}/recipe.json"
        if self.storage.exists(saved):
            work = json.loads(self.storage.get_bytes(saved))
            diff = self._differences(work["recipe"])
            if diff:
                raise UserError(f"out={self.out}: holds an unfinished preparation made differently "
                                f"({', '.join(diff)}); use another out= or delete {uri_of(self.storage, WORK)}")
            files = {}
            for name, meta in work["tokenizer_files"].items():
                data = self.storage.get_bytes(f"tokenizer/{name}")
                if sha256_hex(data) != meta["sha256"]:
                    raise UserError(f"{uri_of(self.storage, 'tokenizer/' + name)}: sha256 differs from "
                                    f"{uri_of(self.storage, saved)}; delete {self.out} and prepare again")
                files[name] = data
            self.tok_files, self.tokenizer = files, tokenizer_from_files(files)
            self.log(f"resuming the unfinished preparation in {self.out}")
            return
        tok = text_tokenizer(self.data_cfg.tokenizer, self.corpus, self.data_cfg)
        if tok.bos_id is None or tok.eos_id is None:
            raise UserError(f"data.tokenizer={self.data_cfg.tokenizer!r} has no BOS/EOS ids; text corpora need "
                            "char, gpt2, bpe or a saved text tokenizer")
        self.tokenizer, self.tok_files = tok, tokenizer_files(tok)
        for name, data in self.tok_files.items():
            self.storage.put_bytes(f"tokenizer/{name}", data)
        work = {"recipe": self.recipe(),
                "tokenizer_files": {n: {"sha256": sha256_hex(d), "bytes": len(d)} for n, d in self.tok_files.items()}}
        self.storage.put_bytes(saved, json.dumps(work, indent=2, sort_keys=True).encode())

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.tokenizer.vocab_size)

    @property
    def blocks_per_shard(self) -> int:
        return self.shard_blocks or max(1, SHARD_BYTES // (self.length * self.dtype.itemsize))

    def worker_context(self) -> dict:
        from dsl.config import to_dict

        return {"data": to_dict(self.data_cfg), "length": self.length, "wrap": self.wrap, "out": self.storage.uri,
                "dtype": self.dtype.str, "tokenizer_files": self.tok_files, "chunking": self.chunking}

    def done_chunks(self) -> dict[tuple[str, int, int], dict]:
        done = {}
        for split in SPLITS:
            for key in self.storage.list(f"{WORK}/{split}/"):
                m = CHUNK_FILE.match(key.rsplit("/", 1)[-1])
                if m:
                    part, sub, docs, units, tokens = (int(m.group(i)) for i in range(1, 6))
                    done[(split, part, sub)] = {"split": split, "part": part, "sub": sub, "docs": docs,
                                                "units": units, "tokens": tokens, "key": key}
        return done

    def existing_shards(self, split: str) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for key in self.storage.list(f"{split}/"):
            m = SHARD_FILE.match(key.rsplit("/", 1)[-1])
            if m:
                found.setdefault(int(m.group(1)), []).append(key)
        return found

    def run(self, executor_for: Callable[[dict], Executor]) -> dict:
        """Prepare (or finish preparing) the store; returns its manifest. Idempotent once complete."""
        self.check_writable()
        manifest = self.existing_manifest()
        if manifest is not None:
            PreparedStore(self.out).verify()
            self.log(f"{self.out}: already prepared and verified; nothing to do")
            return manifest
        self.load_or_build_tokenizer()
        executor = executor_for(self.worker_context())
        start = time.perf_counter()

        parts = self.corpus.parts()
        first = [0] * len(parts)
        if self.corpus.needs_offsets and len(parts) > 1:
            counts = executor.count(parts[:-1])
            first = np.cumsum([0, *counts]).tolist()
        done = self.done_chunks()
        skip: dict[int, list] = {}
        for split, part, sub in done:
            skip.setdefault(part, []).append([split, sub])
        items = [{"part": p, "index": i, "first_doc": int(first[i]), "skip": skip.get(i, [])}
                 for i, p in enumerate(parts)]
        self.stats.reused_chunks = len(done)
        chunks = dict(done)
        t_tok = time.perf_counter()
        with progress_bar(self.progress, "tokenize (documents)", None) as bar:
            for rec in executor.tokenize(items):
                chunks[(rec["split"], rec["part"], rec["sub"])] = rec
                self.stats.documents += rec["docs"]
                self.stats.tokens += rec["tokens"]
                self.stats.chunks += 1
                self.stats.worker_seconds += rec.get("seconds", 0.0)
                bar.update(rec["docs"])
        self.stats.tokenize_seconds = time.perf_counter() - t_tok

        plan = plan_shards(chunks.values(), self.length, self.wrap, self.blocks_per_shard, self.dtype.itemsize)
        for split, p in plan.items():
            if p["blocks"] == 0:
                raise UserError(f"data.source={self.data_cfg.source}: the {split} split yields no {self.length}-token "
                                "blocks (empty corpus, or too little text for one block)")
        specs = []
        stale: list[str] = []
        for split, p in plan.items():
            existing = self.existing_shards(split)
            for spec in p["specs"]:
                spec["existing"] = existing.pop(spec["shard"], [])
                specs.append(spec)
            stale.extend(k for keys in existing.values() for k in keys)
        written: dict[tuple[str, int], dict] = {}
        with progress_bar(self.progress, "shards", len(specs)) as bar:
            for rec in executor.write(specs):
                written[(rec["split"], rec["shard"])] = rec
                self.stats.reused_shards += bool(rec["reused"])
                bar.update(1)
        missing = [f"{s['split']}/{s['shard']}" for s in specs if (s["split"], s["shard"]) not in written]
        if missing:
            raise RuntimeError(f"shards {', '.join(missing[:5])} were not written")
        for spec in specs:  # a shard replaced by a fresh copy leaves its damaged predecessor behind
            stale.extend(k for k in spec["existing"] if k != written[(spec["split"], spec["shard"])]["file"])
        for key in stale:
            self.storage.delete(key)
        self.stats.seconds = time.perf_counter() - start

        manifest = self.manifest(plan, written)
        self.storage.put_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())  # LAST
        self.storage.delete(WORK)
        return manifest

    def manifest(self, plan: dict, written: dict) -> dict:
        tok = self.tokenizer
        d = self.data_cfg
        splits = {}
        for split, p in plan.items():
            shards = [written[(split, s["shard"])] for s in p["specs"]]
            splits[split] = {"documents": p["documents"], "tokens": p["tokens"], "blocks": p["blocks"],
                             "dropped_tokens": p["dropped_tokens"],
                             "shards": [{k: r[k] for k in ("file", "blocks", "bytes", "sha256")} for r in shards]}
        return {
            "format": FORMAT,
            "recipe": self.recipe(),
            "corpus": {"source": d.source, "identity": self.corpus.identity(), "text_field": d.text_field,
                       "txt_split": d.txt_split, "valid_fraction": d.valid_fraction,
                       "split_rule": ("global document index i is valid iff hash(i) < valid_fraction"
                                      if self.corpus.needs_offsets else "the dataset's own train/valid splits")},
            "tokenizer": {"kind": tok.kind, "vocab_size": int(tok.vocab_size), "mask_id": int(tok.mask_id),
                          "bos_id": int(tok.bos_id), "eos_id": int(tok.eos_id), "pad_id": int(tok.pad_id),
                          "fingerprint": tokenizer_fingerprint(tok),
                          "files": {f"tokenizer/{n}": {"sha256": sha256_hex(b), "bytes": len(b)}
                                    for n, b in self.tok_files.items()}},
            "length": self.length,
            "wrap": {"enabled": self.wrap, "rule": WRAP_RULE if self.wrap else PAD_RULE},
            "dtype": self.dtype.name,
            "byte_order": "little",
            "blocks_per_shard": self.blocks_per_shard,
            "splits": splits,
        }
