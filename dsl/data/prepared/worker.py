"""The preparation steps that touch documents, as pure functions of (corpus, tokenizer, chunk or shard
plan): read a corpus part into chunks, tokenize a chunk into its token stream under ``_work/``, cut a
shard out of the chunks that overlap it. One :class:`PrepWorker` per process."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from dsl.data.prepared.layout import (
    CHUNK_FILE,
    LENGTH_DTYPE,
    SHARD_FILE,
    SPLITS,
    WORK,
    sha256_hex,
    tokenizer_from_files,
    uri_of,
)
from dsl.data.wrapping import pad_document
from dsl.errors import UserError
from dsl.storage import Storage, open_storage


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
        sha = sha256_hex(data)
        split, part, sub = chunk["split"], int(chunk["part"]), int(chunk["sub"])
        key = f"{WORK}/{split}/{part:06d}-{sub:06d}.d{len(docs)}.u{units}.t{tokens}.{sha[:16]}.tok"
        self.storage.put_bytes(key, data)
        return {"split": split, "part": part, "sub": sub, "docs": len(docs), "units": units, "tokens": tokens,
                "key": key, "seconds": time.perf_counter() - started}

    # -- chunks -> shards -----------------------------------------------------------------------------
    def _spill(self, key: str) -> tuple[np.ndarray, np.ndarray | None]:
        if self._spill_cache is not None and self._spill_cache[0] == key:
            return self._spill_cache[1], self._spill_cache[2]
        m = CHUNK_FILE.match(key.rsplit("/", 1)[-1])
        if m is None:
            raise UserError(f"{uri_of(self.storage, key)}: not a chunk file of this preparation")
        data = self.storage.get_bytes(key)
        if sha256_hex(data)[:16] != m.group(6):
            raise UserError(f"{uri_of(self.storage, key)}: content does not match its sha256 (corrupt); delete "
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
            m = SHARD_FILE.match(key.rsplit("/", 1)[-1])
            if m and len(data) == size and sha256_hex(data)[:16] == m.group(2):
                return {"split": split, "shard": index, "file": key, "blocks": int(spec["blocks"]), "bytes": size,
                        "sha256": sha256_hex(data), "reused": True}
        data = self.shard_bytes(spec)
        if len(data) != size:
            raise RuntimeError(f"shard {split}/{index}: {len(data)} bytes, planned {size}")
        sha = sha256_hex(data)
        key = f"{split}/shard-{index:05d}-{sha[:16]}.bin"
        self.storage.put_bytes(key, data)
        return {"split": split, "shard": index, "file": key, "blocks": int(spec["blocks"]), "bytes": size,
                "sha256": sha, "reused": False}


def _as_dtype(arr: np.ndarray, dtype: np.dtype, vocab_size: int) -> np.ndarray:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        raise UserError(f"tokenizer produced id {int(arr.max())} outside its vocabulary of {vocab_size}")
    return arr.astype(dtype)
