"""Which block the g-th sequence of a split is: the one order every block store follows.

Pass ``epoch = g // n`` over the n blocks of a split reads them in corpus order, except that training
blocks are permuted inside consecutive windows of ``window`` blocks by a generator keyed on
(seed, split, epoch, window index). Validation blocks (and ``window = 0``) stay in corpus order. A store
that only knows (seed, window, n) therefore serves any (step, row) without reading what came before,
which is what makes resuming exact and sharding over ranks free.
"""

from __future__ import annotations

import torch

from dsl.seeding import sample_generator

READ_WINDOW_NO_SHUFFLE = 1024  # blocks read at a time where nothing is shuffled


def window_perm(seed: int, split: str, epoch: int, window: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=sample_generator(seed, "shuffle", split, epoch, window))


class BlockOrder:
    """``locate(split, g, n) -> (block, lo, hi)``: the block index and the window [lo, hi) it lies in."""

    def __init__(self, seed: int, window: int) -> None:
        self.seed, self.window = seed, window
        self._perm: dict[str, tuple[tuple[int, int, int], torch.Tensor]] = {}  # split -> (key, permutation)

    def shuffled(self, split: str) -> bool:
        return split == "train" and self.window > 0

    def locate(self, split: str, g: int, n: int) -> tuple[int, int, int]:
        epoch, p = divmod(g, n)
        size = self.window if self.shuffled(split) else READ_WINDOW_NO_SHUFFLE
        w, q = divmod(p, size)
        lo, hi = w * size, min(n, (w + 1) * size)
        if not self.shuffled(split):
            return p, lo, hi
        key = (epoch, w, hi - lo)
        cached = self._perm.get(split)
        if cached is None or cached[0] != key:
            cached = (key, window_perm(self.seed, split, epoch, w, hi - lo))
            self._perm[split] = cached
        return lo + int(cached[1][q]), lo, hi


__all__ = ["BlockOrder", "window_perm", "READ_WINDOW_NO_SHUFFLE"]
