"""Block stores: ``get(split, g) -> (ids (L,), mask (L,))`` for the g-th sequence of a split, and the
state a resumed run needs to seek back (``state_dict``/``load_state_dict``).

- :class:`SyntheticBlocks` (``hmm``, ``cyclic``, ...): sequence g is ``source.sample(1, gen(seed, "data",
  split, g))`` — an infinite stream that costs nothing to seek.
- :class:`MemoryBlocks` and :class:`StreamBlocks` read a text corpus through one :class:`TextStream`
  (tokenised, then MDLM-wrapped or padded into L-token blocks; one pass = one epoch) and follow the same
  order block for block: training blocks shuffled inside windows of ``data.shuffle_window`` blocks by a
  generator keyed on (seed, split, epoch, window), validation blocks in corpus order. A stream seeks by
  (document, carried tokens) saved in the checkpoint instead of re-reading from the start.

Prepared stores have their own: :class:`dsl.data.prepared.reader.PreparedBlocks`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsl.atomic import atomic_path
from dsl.data.order import READ_WINDOW_NO_SHUFFLE, BlockOrder, window_perm
from dsl.data.wrapping import WrapState, pad_document, wrap_documents
from dsl.errors import UserError
from dsl.seeding import sample_generator

STREAM_WINDOW_NO_SHUFFLE = READ_WINDOW_NO_SHUFFLE  # blocks read at a time by a stream that does not shuffle


class SyntheticBlocks:
    def __init__(self, source: Any, seed: int, length: int) -> None:
        self.source, self.seed, self.length = source, seed, length

    def get(self, split: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.source.sample(1, sample_generator(self.seed, "data", split, g))[0]
        return ids.long(), torch.ones_like(ids, dtype=torch.long)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TextStream:
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


class MemoryBlocks:
    """All blocks of each split in memory (or a numpy memmap of the on-disk cache)."""

    def __init__(self, streams: dict[str, TextStream], seed: int, window: int, cache: Path | None,
                 where: str) -> None:
        self.order = BlockOrder(seed, window)
        self.arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split, stream in streams.items():
            self.arrays[split] = self._load_or_build(stream, cache, where)

    @staticmethod
    def _load_or_build(stream: TextStream, cache: Path | None, where: str) -> tuple[np.ndarray, np.ndarray]:
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
                with atomic_path(cache / name) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, arr)
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

    def __init__(self, stream: TextStream, seed: int, window: int, shuffle: bool, where: str) -> None:
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


class StreamBlocks:
    def __init__(self, streams: dict[str, TextStream], seed: int, window: int, where: str) -> None:
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
