"""Nucleus (top-p) filtering with the official ReMDM rule, plus the sharpness statistics of Sec 7.4.

Official rule (reference §3.0, pitfall 3): sort p descending, keep the tokens whose cumulative mass is
still ≤ p, and always keep the top-1. The token that crosses p is dropped (unlike HF top-p).

Cost matters at V = 50258 (``bench/bench_sampler.py``), so the filter works on the denoiser's raw rows in
their own precision and never sorts or densifies the vocabulary:

* one ``topk`` of growing width (×8 while the top-k mass is still ≤ p; past V/16 a full sort of the rows
  still pending) finds the nucleus, because once the top-k mass exceeds p every kept token is among
  them. Broad rows (the first steps, nucleus ~10^4 in Table 6) therefore cost one sort, like the
  baseline; sharp rows (most steps) cost one ``topk`` of width 64;
* for logits, one fused softmax pass in the logits' precision gives p; log Z = l_max − log p_max and
  one dot product Σ_v p_v l_v give the entropy H = log Z − Σ p l, without a float64 copy of the row;
* only the kept tokens are turned into float64 probabilities (exact categorical sampling, pitfall 1).
The result is sparse: per row the kept ids (most probable first) and their renormalised probabilities.
With ``top_p >= 1`` nothing is filtered and the rows are returned dense (every id, float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_FIRST_WIDTH = 64
_GROWTH = 8
_SORT_FRACTION = 16  # a topk wider than V/16 costs more than sorting the row: sort instead


@dataclass
class Nucleus:
    """Kept tokens per row, padded to the widest row (padding has probability 0), and row statistics."""

    ids: torch.Tensor           # (N, K) long, most probable first
    probs: torch.Tensor         # (N, K) float64, renormalised over the kept tokens
    max_prob: torch.Tensor      # (N,) max_v p(v) of the unfiltered row
    nucleus_size: torch.Tensor  # (N,) smallest set with mass ≥ diag_p (Sec 7.4's k_t), float64
    entropy: torch.Tensor       # (N,) −Σ p log p of the unfiltered row, nats
    kept: torch.Tensor          # (N,) tokens kept by the official rule

    def dense(self, vocab_size: int) -> torch.Tensor:
        """The filtered rows as (N, V) float64."""
        out = torch.zeros(self.ids.shape[0], vocab_size, dtype=torch.float64)
        return out.scatter_add_(1, self.ids, self.probs)


def top_p_filter(rows: torch.Tensor, top_p: float, diag_p: float = 0.9, kind: str = "probs") -> Nucleus:
    """Apply the official top-p rule to each row of ``rows`` (N, V).

    ``kind="probs"``: non-negative rows (any float dtype; normalised here). ``kind="logits"``: finite
    logits (a masked-out id should carry a large negative finite value, e.g. −1e30, not −inf, or the
    entropy of that row is NaN). ``diag_p`` only sets the nucleus-size statistic.
    """
    n, vocab = rows.shape
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return Nucleus(ids=torch.zeros(0, 1, dtype=torch.long), probs=torch.zeros(0, 1, dtype=torch.float64),
                       max_prob=empty, nucleus_size=empty, entropy=empty, kept=torch.zeros(0, dtype=torch.long))
    filter_rows = top_p < 1.0
    need = max(top_p if filter_rows else 0.0, diag_p)
    width = min(_FIRST_WIDTH, vocab)
    if kind == "logits":
        p = torch.softmax(rows, dim=-1)  # (N, V) in the rows' precision: the one full pass besides topk
        vals, idx = p.topk(width, dim=-1, sorted=True)
        max_prob = vals[:, 0].double()
        log_z = rows.gather(-1, idx[:, :1]).squeeze(-1).double() - max_prob.log()  # lse = l_max − log p_max
        dot = torch.bmm(p.unsqueeze(1), rows.unsqueeze(-1)).reshape(n).double()  # Σ_v p_v l_v
        entropy = log_z - dot  # H = log Z − Σ p l
    else:
        p = rows.double() / rows.sum(-1, keepdim=True, dtype=torch.float64)
        vals, idx = p.topk(width, dim=-1, sorted=True)
        max_prob = vals[:, 0]
        entropy = torch.special.entr(p).sum(-1)
    full = p.double() if not filter_rows else None

    size = torch.zeros(n, dtype=torch.float64)
    kept = torch.full((n,), vocab, dtype=torch.long)
    groups = []  # (row indices, ids, probs, keep mask) per width tried
    pending = torch.arange(n)
    while True:
        probs = vals.double()  # (n', width)
        cums = probs.cumsum(-1)
        done = (cums[:, -1] > need) | (width >= vocab)
        rows_done = pending[done]
        c = cums[done]
        size[rows_done] = ((c < diag_p).sum(-1) + 1).clamp(max=vocab).double()
        if filter_rows:
            keep = c <= top_p
            keep[:, 0] = True  # the top-1 is always kept
            kept[rows_done] = keep.sum(-1)
            groups.append((rows_done, idx[done], probs[done], keep))
        # sorted probabilities decrease, so mass(top-k) ≤ k/width · mass(top-width): a row needs at least
        # width · need / mass(top-width) tokens; jump there directly (and to a sort if that is wide)
        lower_bound = int((width * need / cums[~done, -1].clamp(min=1e-300)).max().ceil()) if (~done).any() else 0
        pending = pending[~done]
        if not pending.numel():
            break
        width = max(width * _GROWTH, lower_bound)
        if width * _SORT_FRACTION > vocab:
            width = vocab
        sub = p[pending]
        if width >= vocab:
            vals, idx = sub.sort(dim=-1, descending=True, stable=True)
        else:
            vals, idx = sub.topk(width, dim=-1, sorted=True)

    if not filter_rows:
        ids = torch.arange(vocab).expand(n, vocab)
        return Nucleus(ids=ids, probs=full, max_prob=max_prob, nucleus_size=size, entropy=entropy, kept=kept)
    k_max = int(kept.max())
    out_ids = torch.zeros(n, k_max, dtype=torch.long)
    out_p = torch.zeros(n, k_max, dtype=torch.float64)
    for rows_done, i, p, keep in groups:
        w = min(k_max, i.shape[1])
        out_ids[rows_done, :w] = i[:, :w]
        out_p[rows_done, :w] = (p * keep)[:, :w]
    out_p = out_p / out_p.sum(-1, keepdim=True)
    return Nucleus(ids=out_ids, probs=out_p, max_prob=max_prob, nucleus_size=size, entropy=entropy, kept=kept)


def sort_top_p_filter(rows: torch.Tensor, top_p: float) -> torch.Tensor:
    """The same rule through one full-vocabulary sort of (N, V) probabilities: the reference and baseline."""
    vals, idx = rows.sort(dim=-1, descending=True, stable=True)
    keep = vals.cumsum(-1) <= top_p
    keep[:, 0] = True
    out = torch.zeros_like(rows).scatter_(1, idx, vals * keep)
    return out / out.sum(-1, keepdim=True)


__all__ = ["Nucleus", "top_p_filter", "sort_top_p_filter"]
