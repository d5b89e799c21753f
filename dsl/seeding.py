"""Deterministic generators keyed by (seed, *keys).

Corruption noise in training and per-sample randomness in sampling are drawn from generators keyed
by the global sample index, so a result never depends on batch composition, worker count or resume
point.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that is a stable hash of ``(seed, *keys)`` (independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(seed)).encode())
    for k in keys:
        h.update(b"\x1f")
        h.update(str(k).encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def sample_generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with :func:`derive_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def row_generators(seed: int, split: str, step: int, rows: torch.Tensor | list[int]) -> list[torch.Generator]:
    """One generator per row of a batch keyed by (seed, split, step, global row): a row's corruption noise
    is the same whichever micro-batch or worker it lands in. ``rows`` live on the host."""
    return [sample_generator(seed, split, step, int(r)) for r in rows]
