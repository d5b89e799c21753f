"""Nucleus (top-p) filtering with the official ReMDM rule, plus the sharpness statistics of Sec 7.4.

Official rule (reference §3.0, pitfall 3): sort p descending, keep the tokens whose cumulative mass is
still ≤ p, and always keep the top-1. The token that crosses p is dropped (unlike HF top-p).

We never sort the whole vocabulary: a partial ``topk`` of growing width is enough, because once the
cumulative mass of the top-k exceeds p every kept token is among them. Rows whose posterior is broad
(early steps) widen k by ×8 until that holds; the last resort is k = V, a full sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FIRST_WIDTH = 64
_GROWTH = 8


@dataclass
class NucleusResult:
    """Filtered rows and the per-row statistics the diagnostics need."""

    probs: torch.Tensor          # (N, V) float64, renormalised over the kept tokens
    max_prob: torch.Tensor       # (N,) max_v p(v) of the unfiltered row
    nucleus_size: torch.Tensor   # (N,) smallest set with mass ≥ diag_p (Sec 7.4's k_t), float64
    kept: torch.Tensor           # (N,) tokens kept by the official rule


def top_p_filter(rows: torch.Tensor, top_p: float, diag_p: float = 0.9) -> NucleusResult:
    """Apply the official top-p rule to each row of ``rows`` (N, V) (non-negative, summing to 1).

    ``top_p >= 1`` leaves the rows untouched (no cumulative-sum round-off can drop tail tokens).
    ``diag_p`` only sets the nucleus-size statistic (Sec 7.4 defines it as the smallest set whose mass
    is at least p, which counts the crossing token the filter drops).
    """
    n, vocab = rows.shape
    filter_rows = top_p < 1.0
    need = max(top_p if filter_rows else 0.0, diag_p)
    out = torch.zeros_like(rows) if filter_rows else rows
    max_prob = torch.zeros(n, dtype=torch.float64)
    size = torch.zeros(n, dtype=torch.float64)
    kept = torch.full((n,), vocab, dtype=torch.long)
    pending = torch.arange(n)
    width = min(_FIRST_WIDTH, vocab)
    while pending.numel():
        sub = rows[pending]
        if width >= vocab:
            vals, idx = sub.sort(dim=-1, descending=True, stable=True)
        else:
            vals, idx = sub.topk(width, dim=-1, sorted=True)
        cums = vals.cumsum(-1)  # (n', width)
        done = (cums[:, -1] > need) | (width >= vocab)
        rows_done = pending[done]
        v, i, c = vals[done], idx[done], cums[done]
        max_prob[rows_done] = v[:, 0].double()
        size[rows_done] = ((c < diag_p).sum(-1) + 1).clamp(max=vocab).double()
        if filter_rows:
            keep = c <= top_p
            keep[:, 0] = True  # the top-1 is always kept
            kept[rows_done] = keep.sum(-1)
            out[rows_done] = torch.zeros_like(sub[done]).scatter_(1, i, v * keep)
        pending = pending[~done]
        width = min(vocab, width * _GROWTH)
    if filter_rows:
        out = out / out.sum(-1, keepdim=True)
    return NucleusResult(probs=out, max_prob=max_prob, nucleus_size=size, kept=kept)


def sort_top_p_filter(rows: torch.Tensor, top_p: float) -> torch.Tensor:
    """The same rule through one full-vocabulary sort: the baseline ``bench/bench_sampler.py`` times."""
    vals, idx = rows.sort(dim=-1, descending=True, stable=True)
    keep = vals.cumsum(-1) <= top_p
    keep[:, 0] = True
    out = torch.zeros_like(rows).scatter_(1, idx, vals * keep)
    return out / out.sum(-1, keepdim=True)


__all__ = ["NucleusResult", "top_p_filter", "sort_top_p_filter"]
