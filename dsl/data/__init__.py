"""Data: tokenizers, corpora and MDLM wrapping behind one call, :func:`build_data`.

A batch is a deterministic function of (seed, split, step, global row index): row ``r`` of step ``s``
is sequence ``g = s·B + r`` of the split's stream (B = the global batch). Rank ``k`` of ``W`` workers
takes rows ``a·W·b + k·b … + b−1`` of accumulation slice ``a`` (b = its micro-batch), so the union over
ranks and slices is exactly the single-process batch, and a resumed run sees the same sequences.

- Synthetic sources (``hmm``, ``cyclic``): sequence g is ``source.sample(1, gen(seed, "data", split, g))``
  — an infinite stream that costs nothing to seek.
- Text corpora: the split's documents are tokenised and wrapped into L-token blocks (one pass = one
  epoch). Training blocks are shuffled inside windows of ``data.shuffle_window`` blocks by a generator
  keyed on (seed, split, epoch, window); validation blocks stay in corpus order. Loaded and streamed
  corpora follow the same order block for block; a stream seeks by (document, carried tokens) saved in
  the checkpoint instead of re-reading from the start.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsl.config import ConfigError, RunConfig
from dsl.data.corpora import HFCorpus, LocalCorpus, open_corpus
from dsl.data.order import READ_WINDOW_NO_SHUFFLE, BlockOrder, window_perm
from dsl.data.prepared.layout import PREFIX as PREPARED  # data.source=prepared:<dir or s3://...>
from dsl.data.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    SourceTokenizer,
    load_tokenizer,
)
from dsl.data.wrapping import WrapState, pad_document, wrap_documents
from dsl.errors import UserError
from dsl.seeding import sample_generator
from dsl.sources import SOURCE_NAMES

SYNTHETIC = SOURCE_NAMES
TOKENIZERS = "auto, char, gpt2, bpe or a saved tokenizer directory"
BPE_TRAIN_CHARS = 50_000_000  # a BPE is trained on at most this much training text (a prefix)
STREAM_WINDOW_NO_SHUFFLE = READ_WINDOW_NO_SHUFFLE  # blocks read at a time by a stream that does not shuffle


def global_rows(batch_size: int, rank: int, world: int, micro: int, accum: int) -> torch.Tensor:
    """Rows (within the step's global batch) that rank ``rank`` computes in accumulation slice ``accum``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must lie in [0, world={world})")
    start = accum * world * micro + rank * micro
    if micro < 1 or start + micro > batch_size:
        raise ValueError(f"micro={micro}, accum={accum}, rank={rank}/{world} reach past the global batch "
                         f"train.batch_size={batch_size}")
    return torch.arange(start, start + micro)


# ----------------------------------------------------------------------------------------------
# Block stores: ``get(split, g) -> (ids (L,), mask (L,))`` for the g-th sequence of a split.


class _SyntheticBlocks:
    def __init__(self, source: Any, seed: int, length: int) -> None:
        self.source, self.seed, self.length = source, seed, length

    def get(self, split: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.source.sample(1, sample_generator(self.seed, "data", split, g))[0]
        return ids.long(), torch.ones_like(ids, dtype=torch.long)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _TextStream:
    """Blocks of one split produced on the fly; shared by the in-memory store (one full pass) and streaming."""

    def __init__(self, corpus: Any, tokenizer: Any, split: str, length: int, wrap: bool) -> None:
        self.corpus, self.tok, self.split, self.length, self.wrap = corpus, tokenizer, split, length, wrap

    def _token_docs(self, start: int) -> Iterator[list[int]]:
        batch: list[str] = []
        encode_batch = getattr(self.tok, "encode_batch", None)
        for text in self.corpus.documents(self.split, start):
            if encode_batch is None:
                yield self.tok.encode(text)
                continue
            batch.append(text)
            if len(batch) == 256:
                yield from encode_batch(batch)
                batch = []
        if batch:
            yield from encode_batch(batch)

    def blocks(self, state: WrapState) -> Iterator[tuple[list[int], list[int], WrapState]]:
        """``(ids, mask, state after)`` from ``state`` to the end of the pass."""
        docs = self._token_docs(state.doc)
        if self.wrap:
            ones = [1] * self.length
            for block, after in wrap_documents(docs, self.length, self.tok.bos_id, self.tok.eos_id, state):
                yield block, ones, after
        else:
            for i, tokens in enumerate(docs, start=state.doc):
                ids, mask = pad_document(tokens, self.length, self.tok.bos_id, self.tok.eos_id, self.tok.pad_id)
                yield ids, mask, WrapState(i + 1, [])


class _MemoryBlocks:
    """All blocks of each split in memory (or a numpy memmap of the on-disk cache)."""

    def __init__(self, streams: dict[str, _TextStream], seed: int, window: int, cache: Path | None,
                 where: str) -> None:
        self.order = BlockOrder(seed, window)
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split, stream in streams.items():
            self.arrays[split] = self._load_or_build(stream, cache, where)

    @staticmethod
    def _load_or_build(stream: _TextStream, cache: Path | None, where: str) -> tuple[np.ndarray, np.ndarray]:
        if cache is not None:
            ids_path, mask_path = cache / f"{stream.split}.ids.npy", cache / f"{stream.split}.mask.npy"
            if ids_path.is_file() and mask_path.is_file():
                return np.load(ids_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r")
        rows = [(ids, mask) for ids, mask, _ in stream.blocks(WrapState())]
        if not rows:
            raise UserError(f"data.source={where}: the {stream.split} split yields no {stream.length}-token "
                            "blocks (empty corpus, or too little text for one block)")
        dtype = np.int32 if stream.tok.vocab_size < 2**31 else np.int64
        ids = np.asarray([r[0] for r in rows], dtype=dtype)
        mask = np.asarray([r[1] for r in rows], dtype=np.int8)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            for name, arr in ((f"{stream.split}.ids.npy", ids), (f"{stream.split}.mask.npy", mask)):
                tmp = cache / f".{name}.{os.getpid()}.tmp"
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
                os.replace(tmp, cache / name)
        return ids, mask

    def get(self, split: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.arrays[split]
        p, _, _ = self.order.locate(split, g, ids.shape[0])
        return torch.from_numpy(np.array(ids[p], dtype=np.int64)), torch.from_numpy(np.array(mask[p], dtype=np.int64))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _StreamReader:
    """One split read window by window; seeks back by restarting from the last saved window start."""

    def __init__(self, stream: _TextStream, seed: int, window: int, shuffle: bool, where: str) -> None:
        self.stream, self.seed, self.window, self.shuffle, self.where = stream, seed, window, shuffle, where
        self._resume = {"epoch": 0, "window": 0, "g_start": 0, "state": WrapState().to_json()}
        self._reset(self._resume)

    def _reset(self, point: dict) -> None:
        self.epoch, self.w, self.g_start = int(point["epoch"]), int(point["window"]), int(point["g_start"])
        self.start_state = WrapState.from_json(point["state"])
        self.rows: list[tuple[list[int], list[int]]] = []
        self.order: torch.Tensor | None = None
        self._it = self.stream.blocks(self.start_state)
        self._after = self.start_state
        self._fill()

    def _fill(self) -> None:
        """Read the window that starts at ``self.start_state``; roll over to a new epoch at the end."""
        while True:
            self.rows = []
            for ids, mask, after in self._it:
                self.rows.append((ids, mask))
                self._after = after
                if len(self.rows) == self.window:
                    break
            if self.rows:
                break
            if self.w == 0 and self.start_state.doc == 0 and not self.start_state.carry:
                raise UserError(f"data.source={self.where}: the {self.stream.split} split yields no "
                                f"{self.stream.length}-token blocks (empty corpus, or too little text)")
            self.epoch, self.w, self.start_state = self.epoch + 1, 0, WrapState()
            self._it = self.stream.blocks(self.start_state)
        self.order = (window_perm(self.seed, self.stream.split, self.epoch, self.w, len(self.rows))
                      if self.shuffle else None)
        self.ended = len(self.rows) < self.window

    def _next_window(self) -> None:
        self.g_start += len(self.rows)
        if self.ended:
            self.epoch, self.w, self.start_state = self.epoch + 1, 0, WrapState()
            self._it = self.stream.blocks(self.start_state)
        else:
            self.w, self.start_state = self.w + 1, self._after
        self._fill()

    def get(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        if g < self.g_start:
            point = self._resume if g >= self._resume["g_start"] else {
                "epoch": 0, "window": 0, "g_start": 0, "state": WrapState().to_json()}
            self._reset(point)
        while g >= self.g_start + len(self.rows):
            self._next_window()
        q = g - self.g_start
        if self.order is not None:
            q = int(self.order[q])
        ids, mask = self.rows[q]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def position(self) -> dict:
        return {"epoch": self.epoch, "window": self.w, "g_start": self.g_start,
                "state": self.start_state.to_json()}

    def seek(self, point: dict) -> None:
        self._resume = dict(point)
        self._reset(point)


class _StreamBlocks:
    def __init__(self, streams: dict[str, _TextStream], seed: int, window: int, where: str) -> None:
        self.readers = {
            split: _StreamReader(s, seed, window if (split == "train" and window > 0) else STREAM_WINDOW_NO_SHUFFLE,
                                 split == "train" and window > 0, where)
            for split, s in streams.items()}

    def get(self, split: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.readers[split].get(g)

    def state_dict(self) -> dict:
        return {"train": self.readers["train"].position()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("train"):
            self.readers["train"].seek(state["train"])


# ----------------------------------------------------------------------------------------------


class Data:
    """Tokenizer plus the deterministic batch function of a run."""

    def __init__(self, tokenizer: Any, store: Any, length: int, batch_size: int, source: str) -> None:
        self.tokenizer, self.store, self.length, self.batch_size, self.source = (
            tokenizer, store, length, batch_size, source)
        self.vocab_size = int(tokenizer.vocab_size)
        self.mask_id = int(tokenizer.mask_id)

    def batch(self, split: str, step: int, rank: int = 0, world: int = 1, micro: int | None = None,
              accum: int = 0) -> dict[str, torch.Tensor]:
        """``{"ids": (b, L) long, "mask": (b, L) long, "rows": (b,) rows within the global batch}``."""
        if split not in ("train", "valid"):
            raise ValueError(f"split={split!r}: expected train or valid")
        micro = self.batch_size // world if micro is None else micro
        rows = global_rows(self.batch_size, rank, world, micro, accum)
        pairs = [self.store.get(split, step * self.batch_size + int(r)) for r in rows]
        return {"ids": torch.stack([p[0] for p in pairs]), "mask": torch.stack([p[1] for p in pairs]),
                "rows": rows}

    def state_dict(self) -> dict:
        """Where a streamed corpus stands (empty for stores that seek for free)."""
        return self.store.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.store.load_state_dict(state or {})


def _cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def text_tokenizer(name: str, corpus: Any, data_cfg: Any) -> Any:
    if name == "char":
        return CharTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer.from_pretrained("gpt2")
    if name == "auto":
        if isinstance(corpus, HFCorpus) and corpus.name == "text8":
            return CharTokenizer()
        try:
            return GPT2Tokenizer.from_pretrained("gpt2")
        except UserError:
            pass  # offline: a BPE trained on the corpus is the documented fallback
        name = "bpe"
    if name == "bpe":
        cache = None
        if data_cfg.cache_dir:
            cache = Path(data_cfg.cache_dir) / f"tokenizer-bpe-{_cache_key(corpus.identity(), data_cfg.bpe_vocab)}"
            if (cache / "tokenizer.json").is_file():
                return BPETokenizer.load(cache)

        def texts() -> Iterator[str]:
            total = 0
            for text in corpus.documents("train"):
                yield text
                total += len(text)
                if total >= BPE_TRAIN_CHARS:
                    return

        tok = BPETokenizer.train(texts(), data_cfg.bpe_vocab)
        if cache is not None:
            tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
            tok.save(tmp)
            os.replace(tmp, cache)
        return tok
    if Path(name).is_dir():
        return load_tokenizer(name)
    raise ConfigError(f"data.tokenizer={name!r} is not one of: {TOKENIZERS} (no such directory)")


def check_source(run_cfg: RunConfig) -> None:
    """Cheap checks of ``data.source`` before anything is started: a local file or folder exists and has
    a readable type, an ``hf:`` name is known. Nothing is read or tokenized (a prepared store is checked
    by :func:`dsl.service.prepare_ray.check_prepared_data`)."""
    length = run_cfg.data.length or run_cfg.model.length
    if length > run_cfg.model.length:
        raise ConfigError(f"data.length={length} is longer than the model (model.length="
                          f"{run_cfg.model.length}); use data.length <= model.length")
    if run_cfg.data.source not in SYNTHETIC and not run_cfg.data.source.startswith(PREPARED):
        open_corpus(run_cfg.data.source, run_cfg.data, length)


def build_data(run_cfg: RunConfig, tokenizer: Any = None) -> Data:
    """The run's :class:`Data`; ``tokenizer`` (e.g. the one saved in a checkpoint) skips building one."""
    data_cfg = run_cfg.data
    length = data_cfg.length or run_cfg.model.length
    if length > run_cfg.model.length:
        raise ConfigError(f"data.length={length} is longer than the model (model.length="
                          f"{run_cfg.model.length}); use data.length <= model.length")
    batch_size = run_cfg.train.batch_size
    source = data_cfg.source
    if source in SYNTHETIC:
        if data_cfg.tokenizer not in ("auto", "source") and tokenizer is None:
            raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r}: synthetic source {source} has its own "
                              "word tokenizer; use data.tokenizer=auto")
        tok = tokenizer or SourceTokenizer.for_source(source, data_cfg, length)
        store = _SyntheticBlocks(tok.source, run_cfg.seed, length)
        seq_len = store.get("train", 0)[0].shape[0]
        if seq_len > run_cfg.model.length:
            raise UserError(f"data.source={source}: sequences of {seq_len} tokens are longer than the model "
                            f"(model.length={run_cfg.model.length})")
        return Data(tok, store, seq_len, batch_size, source)

    if source.startswith(PREPARED):
        from dsl.data.prepared.reader import PreparedBlocks, open_for_run

        store, tok, length = open_for_run(run_cfg, tokenizer)
        return Data(tok, PreparedBlocks(store, run_cfg.seed, data_cfg.shuffle_window), length, batch_size, source)
    corpus = open_corpus(source, data_cfg, length)
    tok = tokenizer or text_tokenizer(data_cfg.tokenizer, corpus, data_cfg)
    if tok.bos_id is None or tok.eos_id is None:
        raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r} has no BOS/EOS ids; text corpora need "
                          "char, gpt2, bpe or a saved text tokenizer")
    if not data_cfg.wrap and length < 3:
        raise ConfigError(f"model.length={length} is too short for [BOS] text [EOS] rows")
    streams = {split: _TextStream(corpus, tok, split, length, data_cfg.wrap) for split in ("train", "valid")}
    if data_cfg.streaming:
        store: Any = _StreamBlocks(streams, run_cfg.seed, data_cfg.shuffle_window, source)
    else:
        cache = None
        if data_cfg.cache_dir:
            tok_id = _cache_key(tok.kind, tok.vocab_size, tok.decode(range(min(tok.vocab_size, 512))))
            layout = "wrap" if data_cfg.wrap else f"pad-{tok.pad_id}"
            cache = Path(data_cfg.cache_dir) / f"blocks-{_cache_key(corpus.identity(), tok_id, length, layout)}"
        store = _MemoryBlocks(streams, run_cfg.seed, data_cfg.shuffle_window, cache, source)
    return Data(tok, store, length, batch_size, source)


def heldout_blocks(run_cfg: RunConfig, tokenizer: Any, path: str = "", limit: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` (N, L) of every held-out block, laid out exactly as the run's training blocks (MDLM
    wrapping, or one padded document per row), in corpus order: the run's own validation split, or the
    documents of the file ``path`` read the way the run's corpus is read (text8 runs cut it into
    L-character documents first, as MDLM does). ``limit`` > 0 keeps the first ``limit`` blocks; synthetic
    sources have no end, so they need it."""
    data_cfg = run_cfg.data
    length = data_cfg.length or run_cfg.model.length
    if data_cfg.source.startswith(PREPARED) and not path:  # the store's validation blocks, already laid out
        from dsl.data.prepared.reader import PreparedStore, read_blocks

        return read_blocks(PreparedStore(data_cfg.source[len(PREPARED):]), "valid", limit)
    if data_cfg.source in SYNTHETIC and not path:
        if limit < 1:
            raise ConfigError(f"data.source={data_cfg.source} is an endless synthetic stream: give how many "
                              "held-out sequences to score")
        tokenizer = tokenizer or SourceTokenizer.for_source(data_cfg.source, data_cfg, length)
        store = _SyntheticBlocks(tokenizer.source, run_cfg.seed, length)
        pairs = [store.get("valid", g) for g in range(limit)]
    else:
        from dsl.data.corpora import FileCorpus

        if tokenizer.bos_id is None:
            raise UserError(f"heldout={path}: the run's tokenizer ({tokenizer.kind}) has no BOS/EOS to lay out text")
        corpus = FileCorpus(path, data_cfg, length) if path else open_corpus(data_cfg.source, data_cfg, length)
        stream = _TextStream(corpus, tokenizer, "valid", length, data_cfg.wrap)
        pairs = []
        for ids, mask, _ in stream.blocks(WrapState()):
            pairs.append((torch.tensor(ids), torch.tensor(mask)))
            if len(pairs) == limit:
                break
        if not pairs:
            raise UserError(f"{f'heldout={path}' if path else f'data.source={data_cfg.source}'}: no held-out "
                            f"block of {length} tokens (too little text)")
    return torch.stack([p[0] for p in pairs]).long(), torch.stack([p[1] for p in pairs]).long()


__all__ = ["Data", "build_data", "check_source", "heldout_blocks", "text_tokenizer", "global_rows", "load_tokenizer", "CharTokenizer", "BPETokenizer",
           "GPT2Tokenizer", "SourceTokenizer", "LocalCorpus", "HFCorpus", "WrapState", "wrap_documents",
           "pad_document"]
