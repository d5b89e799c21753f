"""Prepared token stores: a corpus tokenized and wrapped once into fixed-size shards that every training
process reads (memory-mapped from a directory, streamed with read-ahead from an object store).

Layout under one root (a directory or an ``s3://`` prefix)::

    manifest.json                         written LAST: the store exists once it is there
    tokenizer/...                         the tokenizer's own files (reopened by ``load_tokenizer``)
    train/shard-00000-<sha256[:16]>.bin   ``blocks_per_shard`` blocks (the last shard of a split: fewer)
    valid/shard-00000-<sha256[:16]>.bin
    _work/...                             what an unfinished preparation has done so far (resume)

A shard is raw little-endian ``dtype`` ids of shape ``(blocks, L)`` (uint16 when every id fits, else
uint32); an unwrapped store follows them with each block's attended length as uint32. The manifest
lists every shard with its block count, byte size and sha256, the tokenizer files with theirs, L, the
wrapping rule, the corpus identity and each split's document, token and block counts.

How the blocks come out identical to the single-process wrapping (``dsl.data.wrapping``), whatever
the number of workers:

1. the corpus is read in *parts* (files; row ranges of a dataset) in corpus order; a document's split
   follows from its global index, so parts of a multi-file corpus first count their documents and a
   prefix sum gives each part its first index. Each split's documents are grouped into *chunks*
   ``(part, sub)`` of at most ``CHUNK_DOCS`` documents / ``CHUNK_CHARS`` characters.
2. every chunk is tokenized on its own into its token stream — each document followed by EOS — and
   saved under ``_work/``.
3. a prefix sum over the chunks' token counts, in (part, sub) order, places every token in the split's
   stream. Block k is ``[BOS] stream[k(L-2):(k+1)(L-2)] [EOS]``; the tail shorter than L-2 is dropped.
   Shard s holds blocks ``[sK, (s+1)K)`` and is cut out of the chunks that overlap its tokens, so the
   carry across documents, chunks and shards is exactly the sequential wrapping's carry.
   Unwrapped stores (``data.wrap=false``) have one block per document: ``[BOS] doc[:L-2] [EOS]`` + [PAD]s.
4. ``manifest.json`` is written after every shard, then ``_work/`` is removed.

Re-running a preparation into the same root resumes: chunks already tokenized and shards already
written are found by name and verified by their content hash, and only the rest is done. The steps
that touch many documents take a :class:`Executor`; :class:`InProcess` runs them here, and
``dsl.service.prepare_ray`` runs the same :class:`PrepWorker` methods on Ray Data.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dsl.checkpoint import LocalStorage, Storage, join_uri, open_storage
from dsl.data.order import BlockOrder
from dsl.data.tokenizers import load_tokenizer, tokenizer_fingerprint
from dsl.data.wrapping import pad_document
from dsl.errors import UserError

FORMAT = "dsl-prepared/1"
PREFIX = "prepared:"
MANIFEST = "manifest.json"
WORK = "_work"
SPLITS = ("train", "valid")
CHUNK_DOCS = 1024             # documents per tokenization chunk (the unit of work and of resume)
CHUNK_CHARS = 1 << 21         # ... or this many characters, whichever comes first
SHARD_BYTES = 64 << 20        # default shard size: blocks_per_shard = SHARD_BYTES // (L * itemsize)
LENGTH_DTYPE = np.dtype("<u4")
WRAP_RULE = ("mdlm-wrap: each document's tokens + EOS, concatenated in corpus order and cut into L-2 token "
             "chunks, each block [BOS] chunk [EOS]; the remainder carries over to the next document, the "
             "split's tail shorter than L-2 is dropped")
PAD_RULE = "one document per block: [BOS] doc[:L-2] [EOS] padded with [PAD]; attended length stored per block"
_SPILL = re.compile(r"^(\d+)-(\d+)\.d(\d+)\.u(\d+)\.t(\d+)\.([0-9a-f]{16})\.tok$")
_SHARD = re.compile(r"^shard-(\d+)-([0-9a-f]{16})\.bin$")


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _bar(progress: Callable[[str, int | None], Any] | None, desc: str, total: int | None) -> Iterator[Any]:
    """A progress bar from ``progress`` (e.g. tqdm), closed before an error propagates."""
    bar = progress(desc, total) if progress else _NoBar()
    try:
        yield bar
    finally:
        if progress:
            bar.close()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _where(storage: Storage, key: str) -> str:
    return join_uri(storage.uri, key)


# ----------------------------------------------------------------------------------------------
# Worker side: the steps that touch documents. Pure functions of (corpus, tokenizer, chunk/spec).


class PrepWorker:
    """Reads parts into chunks, tokenizes chunks into ``_work/``, cuts shards; one per process."""

    def __init__(self, ctx: dict) -> None:
        from dsl.config import DataConfig, from_dict

        self.ctx = ctx
        self.data_cfg = from_dict(DataConfig, ctx["data"])
        self.length, self.wrap = int(ctx["length"]), bool(ctx["wrap"])
        self.dtype = np.dtype(ctx["dtype"])
        self.chunk_docs, self.chunk_chars = int(ctx["chunking"]["docs"]), int(ctx["chunking"]["chars"])
        self._corpus: Any = None
        self._tok: Any = None
        self._storage: Storage | None = None
        self._spill_cache: tuple[str, np.ndarray, np.ndarray | None] | None = None

    @property
    def corpus(self) -> Any:
        if self._corpus is None:
            from dsl.data.corpora import open_corpus

            self._corpus = open_corpus(self.data_cfg.source, self.data_cfg, self.length)
        return self._corpus

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            self._tok = tokenizer_from_files(self.ctx["tokenizer_files"])
        return self._tok

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.ctx["out"])
        return self._storage

    # -- parts -> chunks ------------------------------------------------------------------------
    def count(self, part: dict) -> int:
        return self.corpus.count_documents(part)

    def chunks(self, item: dict) -> Iterator[dict]:
        """Chunks ``{split, part, sub, texts}`` of one part; ``item = {part, index, first_doc, skip}``."""
        texts: dict[str, list[str]] = {s: [] for s in SPLITS}
        chars = dict.fromkeys(SPLITS, 0)
        sub = dict.fromkeys(SPLITS, 0)
        skip = {tuple(x) for x in item.get("skip", [])}
        index = int(item["index"])

        def emit(split: str) -> Iterator[dict]:
            if texts[split] and (split, sub[split]) not in skip:
                yield {"split": split, "part": index, "sub": sub[split], "texts": texts[split]}
            sub[split] += 1
            texts[split], chars[split] = [], 0

        for split, text in self.corpus.part_documents(item["part"], int(item["first_doc"])):
            texts[split].append(text)
            chars[split] += len(text)
            if len(texts[split]) >= self.chunk_docs or chars[split] >= self.chunk_chars:
                yield from emit(split)
        for split in SPLITS:
            if texts[split]:
                yield from emit(split)

    # -- chunk -> token stream in _work/ ------------------------------------------------------------
    def encode(self, texts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        encode_batch = getattr(tok, "encode_batch", None)
        return encode_batch(texts) if encode_batch is not None else [tok.encode(t) for t in texts]

    def tokenize(self, chunk: dict) -> dict:
        """Tokenize one chunk, save its stream under ``_work/`` and return its record."""
        tok, L = self.tokenizer, self.length
        started = time.perf_counter()
        docs = self.encode(list(chunk["texts"]))
        tokens = sum(len(d) for d in docs)
        if self.wrap:  # each document's ids, then EOS
            lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
            eos_at = np.cumsum(lens + 1) - 1
            stream = np.full(tokens + len(docs), tok.eos_id, dtype=np.int64)
            body = np.ones(len(stream), dtype=bool)
            body[eos_at] = False
            stream[body] = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=tokens)
            data = _as_dtype(stream, self.dtype, tok.vocab_size).tobytes()
            units, tokens = len(stream), tokens + len(docs)
        else:
            rows, lengths = [], []
            for d in docs:
                ids, mask = pad_document(d, L, tok.bos_id, tok.eos_id, tok.pad_id)
                rows.append(ids)
                lengths.append(sum(mask))
            data = (_as_dtype(np.asarray(rows, dtype=np.int64).reshape(-1, L), self.dtype, tok.vocab_size).tobytes()
                    + np.asarray(lengths, dtype=LENGTH_DTYPE).tobytes())
            units = len(docs)
        sha = _sha256(data)
        split, part, sub = chunk["split"], int(chunk["part"]), int(chunk["sub"])
        key = f"{WORK}/{split}/{part:06d}-{sub:06d}.d{len(docs)}.u{units}.t{tokens}.{sha[:16]}.tok"
        self.storage.put_bytes(key, data)
        return {"split": split, "part": part, "sub": sub, "docs": len(docs), "units": units, "tokens": tokens,
                "key": key, "seconds": time.perf_counter() - started}

    # -- chunks -> shards -----------------------------------------------------------------------------
    def _spill(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        if self._spill_cache is not None and self._spill_cache[0] == key:
            return self._spill_cache[1], self._spill_cache[2]
        m = _SPILL.match(key.rsplit("/", 1)[-1])
        if m is None:
            raise UserError(f"{_where(self.storage, key)}: not a chunk file of this preparation")
        data = self.storage.get_bytes(key)
        if _sha256(data)[:16] != m.group(6):
            raise UserError(f"{_where(self.storage, key)}: content does not match its sha256 (corrupt); delete "
                            "it and run the preparation again")
        units = int(m.group(4))
        if self.wrap:
            ids, lengths = np.frombuffer(data, dtype=self.dtype), None
        else:
            cut = units * self.length * self.dtype.itemsize
            ids = np.frombuffer(data[:cut], dtype=self.dtype).reshape(units, self.length)
            lengths = np.frombuffer(data[cut:], dtype=LENGTH_DTYPE)
        self._spill_cache = (key, ids, lengths)
        return ids, lengths

    def shard_bytes(self, spec: dict) -> bytes:
        """The bytes of shard ``spec``: its blocks cut out of the chunks that overlap them."""
        tok, L = self.tokenizer, self.length
        ids_parts, len_parts = [], []
        for key, lo, hi in spec["pieces"]:
            ids, lengths = self._spill(key)
            ids_parts.append(ids[lo:hi])
            if lengths is not None:
                len_parts.append(lengths[lo:hi])
        blocks = int(spec["blocks"])
        if self.wrap:
            body = np.concatenate(ids_parts).reshape(blocks, L - 2)
            out = np.empty((blocks, L), dtype=self.dtype)
            out[:, 0], out[:, 1:-1], out[:, -1] = tok.bos_id, body, tok.eos_id
            return out.tobytes()
        rows = np.concatenate(ids_parts)
        assert rows.shape == (blocks, L), (rows.shape, blocks, L)
        return rows.tobytes() + np.concatenate(len_parts).astype(LENGTH_DTYPE).tobytes()

    def write_shard(self, spec: dict) -> dict:
        """Write shard ``spec`` unless a verified copy already exists; return its manifest entry."""
        split, index, size = spec["split"], int(spec["shard"]), int(spec["bytes"])
        for key in spec.get("existing", []):
            data = self.storage.get_bytes(key)
            m = _SHARD.match(key.rsplit("/", 1)[-1])
            if m and len(data) == size and _sha256(data)[:16] == m.group(2):
                return {"split": split, "shard": index, "file": key, "blocks": int(spec["blocks"]), "bytes": size,
                        "sha256": _sha256(data), "reused": True}
        data = self.shard_bytes(spec)
        if len(data) != size:
            raise RuntimeError(f"shard {split}/{index}: {len(data)} bytes, planned {size}")
        sha = _sha256(data)
        key = f"{split}/shard-{index:05d}-{sha[:16]}.bin"
        self.storage.put_bytes(key, data)
        return {"split": split, "shard": index, "file": key, "blocks": int(spec["blocks"]), "bytes": size,
                "sha256": sha, "reused": False}


def _as_dtype(arr: np.ndarray, dtype: np.dtype, vocab_size: int) -> np.ndarray:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        raise UserError(f"tokenizer produced id {int(arr.max())} outside its vocabulary of {vocab_size}")
    return arr.astype(dtype)


def tokenizer_from_files(files: dict[str, bytes]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            path = Path(tmp).joinpath(*name.split("/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return load_tokenizer(tmp)


def tokenizer_files(tok: Any) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        return {str(p.relative_to(tmp)).replace(os.sep, "/"): p.read_bytes()
                for p in sorted(Path(tmp).rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Planning: chunks' token counts -> which pieces of which chunks make each shard.


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


# ----------------------------------------------------------------------------------------------
# Driver side: recipe, resume, executors, manifest.


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
            raise UserError(f"out={self.out}: not writable ({' '.join(str(exc).split())})") from None
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
                                f"({', '.join(diff)}); use another out= or delete {_where(self.storage, WORK)}")
            files = {}
            for name, meta in work["tokenizer_files"].items():
                data = self.storage.get_bytes(f"tokenizer/{name}")
                if _sha256(data) != meta["sha256"]:
                    raise UserError(f"{_where(self.storage, 'tokenizer/' + name)}: sha256 differs from "
                                    f"{_where(self.storage, saved)}; delete {self.out} and prepare again")
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
                "tokenizer_files": {n: {"sha256": _sha256(d), "bytes": len(d)} for n, d in self.tok_files.items()}}
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
                m = _SPILL.match(key.rsplit("/", 1)[-1])
                if m:
                    part, sub, docs, units, tokens = (int(m.group(i)) for i in range(1, 6))
                    done[(split, part, sub)] = {"split": split, "part": part, "sub": sub, "docs": docs,
                                                "units": units, "tokens": tokens, "key": key}
        return done

    def existing_shards(self, split: str) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for key in self.storage.list(f"{split}/"):
            m = _SHARD.match(key.rsplit("/", 1)[-1])
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
        with _bar(self.progress, "tokenize (documents)", None) as bar:
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
        with _bar(self.progress, "shards", len(specs)) as bar:
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
                          "files": {f"tokenizer/{n}": {"sha256": _sha256(b), "bytes": len(b)}
                                    for n, b in self.tok_files.items()}},
            "length": self.length,
            "wrap": {"enabled": self.wrap, "rule": WRAP_RULE if self.wrap else PAD_RULE},
            "dtype": self.dtype.name,
            "byte_order": "little",
            "blocks_per_shard": self.blocks_per_shard,
            "splits": splits,
        }


# ----------------------------------------------------------------------------------------------
# Reading.


def read_manifest(storage: Storage) -> dict:
    where = _where(storage, MANIFEST)
    if not storage.exists(MANIFEST):
        raise UserError(f"{where}: missing (not a prepared store, or its preparation has not finished; "
                        "run jobs/prepare_data.py)")
    try:
        manifest = json.loads(storage.get_bytes(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{where}: not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{where}: format {got!r} is not {FORMAT!r}")
    return manifest


def _object_sizes(storage: Storage, prefix: str) -> dict[str, int | None]:
    if isinstance(storage, LocalStorage):
        base = storage.root / prefix
        if not base.is_dir():
            return {}
        return {f"{prefix}{p.name}": p.stat().st_size for p in base.iterdir() if p.is_file()}
    sizes = getattr(storage, "sizes", None)
    if callable(sizes):
        return sizes(prefix)
    return dict.fromkeys(storage.list(prefix))


class PreparedStore:
    """A prepared store, opened: its manifest read and every listed file present with its size."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.storage = open_storage(uri)
        self.manifest = read_manifest(self.storage)
        m = self.manifest
        self.length = int(m["length"])
        self.wrap = bool(m["wrap"]["enabled"])
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        for split in SPLITS:
            if split not in m["splits"]:
                raise UserError(f"{_where(self.storage, MANIFEST)}: no {split} split")
        self._check_present()

    def files(self) -> dict[str, dict]:
        out = dict(self.manifest["tokenizer"]["files"])
        for split in SPLITS:
            for s in self.manifest["splits"][split]["shards"]:
                out[s["file"]] = {"sha256": s["sha256"], "bytes": s["bytes"]}
        return out

    def _check_present(self) -> None:
        listed = self.files()
        sizes: dict[str, int | None] = {}
        for prefix in sorted({k.rsplit("/", 1)[0] + "/" for k in listed}):
            sizes.update(_object_sizes(self.storage, prefix))
        for key, meta in listed.items():
            if key not in sizes:
                raise UserError(f"{_where(self.storage, key)}: listed in the manifest but missing (the store is "
                                "incomplete; prepare it again)")
            if sizes[key] is not None and sizes[key] != meta["bytes"]:
                raise UserError(f"{_where(self.storage, key)}: {sizes[key]} bytes, the manifest says {meta['bytes']} "
                                "(partial or replaced shard; prepare the store again)")
        for split in SPLITS:
            info = self.manifest["splits"][split]
            row = self.length * self.dtype.itemsize + (0 if self.wrap else LENGTH_DTYPE.itemsize)
            blocks = sum(s["blocks"] for s in info["shards"])
            if not blocks or blocks != info["blocks"] or any(s["bytes"] != s["blocks"] * row for s in info["shards"]):
                raise UserError(f"{_where(self.storage, MANIFEST)}: the {split} shards do not add up to its "
                                f"{info['blocks']} blocks of {self.length} tokens")

    def tokenizer(self) -> Any:
        files = {}
        for key, meta in self.manifest["tokenizer"]["files"].items():
            data = self.storage.get_bytes(key)
            if _sha256(data) != meta["sha256"]:
                raise UserError(f"{_where(self.storage, key)}: sha256 mismatch with the manifest (corrupt file)")
            files[key.removeprefix("tokenizer/")] = data
        return tokenizer_from_files(files)

    def verify(self, progress: Callable[[str, int | None], Any] | None = None, threads: int = 4) -> None:
        """sha256 of every shard against the manifest; one UserError naming the first bad file."""
        shards = [s for split in SPLITS for s in self.manifest["splits"][split]["shards"]]
        def check(s: dict) -> None:
            data = self.storage.get_bytes(s["file"])
            if _sha256(data) != s["sha256"]:
                raise UserError(f"{_where(self.storage, s['file'])}: sha256 mismatch with the manifest (corrupt "
                                "shard; prepare the store again)")

        with ThreadPoolExecutor(max_workers=threads) as pool, _bar(progress, "verify shards", len(shards)) as bar:
            for fut in [pool.submit(check, s) for s in shards]:
                fut.result()
                bar.update(1)

    def local_path(self, key: str) -> Path | None:
        return self.storage.root / key if isinstance(self.storage, LocalStorage) else None


class _SplitReader:
    """Blocks of one split: memory-mapped shards (a directory) or downloaded ones with read-ahead.

    No block leaves a shard whose sha256 has not been checked in this process.
    """

    def __init__(self, store: PreparedStore, split: str, readahead_threads: int = 2) -> None:
        self.store, self.split = store, split
        self.shards = store.manifest["splits"][split]["shards"]
        self.starts = np.cumsum([0] + [s["blocks"] for s in self.shards]).tolist()
        self.blocks = self.starts[-1]
        self.L, self.dtype, self.wrap = store.length, store.dtype, store.wrap
        self.local = isinstance(store.storage, LocalStorage)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._pool = None if self.local else ThreadPoolExecutor(max_workers=readahead_threads,
                                                                thread_name_prefix=f"prepared-{split}")

    def shard_of(self, block: int) -> int:
        return bisect.bisect_right(self.starts, block) - 1

    def _load(self, s: int) -> tuple[np.ndarray, np.ndarray | None]:
        meta = self.shards[s]
        where = _where(self.store.storage, meta["file"])
        if self.local:
            path = self.store.local_path(meta["file"])
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for piece in iter(lambda: fh.read(1 << 22), b""):
                    h.update(piece)
            if h.hexdigest() != meta["sha256"]:
                raise UserError(f"{where}: sha256 mismatch with the manifest (corrupt shard; prepare the store again)")
            raw: Any = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))  # a plain view: rows 3x faster
        else:
            data = self.store.storage.get_bytes(meta["file"])
            if len(data) != meta["bytes"] or _sha256(data) != meta["sha256"]:
                raise UserError(f"{where}: sha256 mismatch with the manifest (corrupt shard; prepare the store again)")
            raw = np.frombuffer(data, dtype=np.uint8)
        n = meta["blocks"]
        cut = n * self.L * self.dtype.itemsize
        ids = raw[:cut].view(self.dtype).reshape(n, self.L)
        lengths = None if self.wrap else raw[cut:].view(LENGTH_DTYPE)
        return ids, lengths

    def _ensure(self, s: int, wait: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
        with self._lock:
            if s in self._arrays:
                return self._arrays[s]
            fut = self._pending.get(s)
            if fut is None:
                if self._pool is None:
                    fut = Future()
                    fut.set_result(self._load(s))
                else:
                    fut = self._pool.submit(self._load, s)
                self._pending[s] = fut
        if not wait:
            return None
        arrays = fut.result()  # re-raises the UserError of a corrupt shard
        with self._lock:
            self._arrays[s] = arrays
            self._pending.pop(s, None)
        return arrays

    def window(self, lo: int, hi: int) -> None:
        """Blocks [lo, hi) are being read: start fetching the next window's shards, drop the rest."""
        if self.local:
            return
        span = hi - lo
        nlo, nhi = (hi, min(self.blocks, hi + span)) if hi < self.blocks else (0, min(self.blocks, span))
        keep = set(range(self.shard_of(lo), self.shard_of(hi - 1) + 1))
        keep |= set(range(self.shard_of(nlo), self.shard_of(nhi - 1) + 1))
        for s in sorted(keep):
            self._ensure(s, wait=False)
        with self._lock:
            for s in [s for s in self._arrays if s not in keep]:
                del self._arrays[s]
            for s in [s for s in self._pending if s not in keep]:
                self._pending.pop(s).cancel()  # a running download finishes and is dropped

    def block(self, i: int) -> tuple[np.ndarray, int]:
        s = self.shard_of(i)
        ids, lengths = self._ensure(s, wait=True)
        r = i - self.starts[s]
        return ids[r], (self.L if lengths is None else int(lengths[r]))


class PreparedBlocks:
    """The block store of a run reading a prepared store (``get(split, g) -> (ids, mask)``)."""

    def __init__(self, store: PreparedStore, seed: int, window: int) -> None:
        self.store = store
        self.order = BlockOrder(seed, window)
        self.readers = {split: _SplitReader(store, split) for split in SPLITS}

    def get(self, split: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        reader = self.readers[split]
        p, lo, hi = self.order.locate(split, g, reader.blocks)
        reader.window(lo, hi)
        ids, n = reader.block(p)
        mask = torch.zeros(reader.L, dtype=torch.long)
        mask[:n] = 1
        return torch.from_numpy(ids.astype(np.int64)), mask

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def read_blocks(store: PreparedStore, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` (N, L) of the first ``limit`` blocks of ``split`` (all when 0), in corpus order."""
    reader = _SplitReader(store, split)
    n = min(limit, reader.blocks) if limit > 0 else reader.blocks
    ids = torch.empty(n, reader.L, dtype=torch.long)
    mask = torch.zeros(n, reader.L, dtype=torch.long)
    for i in range(n):
        row, attended = reader.block(i)
        ids[i] = torch.from_numpy(row.astype(np.int64))
        mask[i, :attended] = 1
    return ids, mask


def prepared_uri(source: str) -> str | None:
    """The store URI of ``data.source=prepared:<uri>`` (None for any other source)."""
    if not source.startswith(PREFIX):
        return None
    uri = source[len(PREFIX):]
    if not uri:
        raise UserError(f"data.source={source}: expected prepared:<directory or s3://bucket/prefix>")
    return uri


def open_for_run(run_cfg: Any, tokenizer: Any = None) -> tuple[PreparedStore, Any, int]:
    """Open the run's prepared store and check it fits the run: ``(store, tokenizer, L)``.

    ``tokenizer`` (the one saved with a checkpoint being resumed) must mean the same ids as the store's.
    """
    data_cfg = run_cfg.data
    source = data_cfg.source
    store = PreparedStore(prepared_uri(source))
    where = f"data.source={source}"
    length = data_cfg.length or run_cfg.model.length
    if store.length != length:
        key = f"data.length={data_cfg.length}" if data_cfg.length else f"model.length={run_cfg.model.length}"
        raise UserError(f"{where}: blocks of L={store.length} tokens, the run uses {key}; set data.length="
                        f"{store.length} (<= model.length) or prepare the corpus at L={length}")
    if store.wrap != data_cfg.wrap:
        raise UserError(f"{where}: the store is {'wrapped' if store.wrap else 'not wrapped'} but data.wrap="
                        f"{str(data_cfg.wrap).lower()}; set data.wrap={str(store.wrap).lower()}")
    info = store.manifest["tokenizer"]
    request = data_cfg.tokenizer
    if request not in ("auto", info["kind"]):
        if Path(request).is_dir():
            if tokenizer_fingerprint(load_tokenizer(request)) != info["fingerprint"]:
                raise UserError(f"data.tokenizer={request}: differs from the tokenizer the store was prepared "
                                f"with ({info['kind']}, V={info['vocab_size']}); use data.tokenizer=auto")
        else:
            raise UserError(f"data.tokenizer={request}: the store was prepared with {info['kind']} "
                            f"(V={info['vocab_size']}); use data.tokenizer=auto or {info['kind']}")
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != info["fingerprint"]:
        raise UserError(f"{where}: the store's tokenizer ({info['kind']}, V={info['vocab_size']}) differs from the "
                        f"model's ({tokenizer.kind}, V={tokenizer.vocab_size})")
    if run_cfg.model.vocab_size and run_cfg.model.vocab_size != info["vocab_size"]:
        raise UserError(f"{where}: the store's vocabulary has V={info['vocab_size']} ids but model.vocab_size="
                        f"{run_cfg.model.vocab_size}")
    return store, tokenizer or store.tokenizer(), store.length


__all__ = ["FORMAT", "PREFIX", "MANIFEST", "Preparation", "PrepWorker", "InProcess", "Executor", "PreparedStore",
           "PreparedBlocks", "plan_shards", "token_dtype", "prepared_uri", "read_blocks", "open_for_run", "read_manifest",
           "tokenizer_from_files", "tokenizer_files"]
