"""Nucleus (top-p) filtering with the official ReMDM rule, plus the sharpness statistics of Sec 7.4.

Official rule (kuleshov-group/remdm, ``diffusion.py``, the nucleus step of the samplers): sort p descending,
keep the tokens whose cumulative mass is still ≤ p, and always keep the top-1. The token that crosses p is
dropped (unlike HF top-p).

Which probabilities: the denoiser's, in the precision of its logits — p = softmax(logits) in float32 for a
model (what the official code and a GPU run compute), float64 for probability rows — with the cumulative
sums and comparisons in float64. The reference is that rule through one stable full sort
(:func:`sort_top_p_filter` on ``p.double()``); :func:`top_p_filter` returns **exactly** its kept set, ties
and boundary cases included, without sorting the vocabulary:

1. one ``topk`` of width 64: a row whose crossings lie in that window (most steps) is decided from the
   window's float64 cumulative sums;
2. a broad row (the first steps, nucleus ~10^4 in Table 6) gets one histogram of its probabilities over
   bins of 1/16 of an octave (the float bits' exponent and 4 mantissa bits, one ``bincount``). The bins
   whose cumulative mass crosses p form a band of a few hundred tokens; every token above the band is
   kept, and only the band is sorted;
3. the sums agree with the reference's bit for bit: float32 probabilities ≥ 2^-30 are multiples of 2^-53,
   so every float64 partial sum below 1 is exact in any order. A row whose decisions would involve smaller
   probabilities (or float64 rows whose sums round: a cumulative sum within the summation's error bound of
   p) is handed to the reference sort.

The statistics come from the same passes: max p, the entropy H = log Z − Σ_v p_v l_v with
log Z = l_max − log p_max, and k_t = the smallest set with mass ≥ ``diag_p`` (Sec 7.4).

The result is sparse: per row the kept ids, the top-1 first (rows decided in the window or by the sort are
ordered by probability; rows decided by the histogram list the tokens above the band in id order, then the
band sorted) and their float64 probabilities renormalised over the kept set (exact categorical sampling,
in any order). With ``top_p >= 1`` nothing is filtered and the rows are returned dense (every id, float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_WINDOW = 64               # the topk width that decides rows with a narrow nucleus
_KEY_MANTISSA = 4          # histogram bins: exponent and 4 mantissa bits, 1/16 of an octave wide
_EXACT_FLOOR = 2.0 ** -30  # float32 probabilities from here up add exactly in float64 (below 1)
_U64 = 2.0 ** -53          # unit roundoff of float64


@dataclass
class Implicit:
    """Rows whose kept set also holds, besides their listed ids, every token whose probability's
    histogram key (:func:`keys`) exceeds the row's threshold: the tokens above a broad row's band, kept
    without being listed (a broad nucleus has ~10^4 of them per row)."""

    rows: torch.Tensor       # (R,) long: rows of the nucleus
    p: torch.Tensor          # (R, V) their probabilities (the rule's own values)
    threshold: torch.Tensor  # (R,) keys above it are kept
    scale: torch.Tensor      # (R,) float64: 1 / the kept mass of the row

    def probs(self, which: torch.Tensor | None = None) -> torch.Tensor:
        """(R', V) float64: the renormalised probabilities of the implicitly kept tokens, 0 elsewhere."""
        p, threshold, scale = ((self.p, self.threshold, self.scale) if which is None else
                               (self.p[which], self.threshold[which], self.scale[which]))
        kept = keys(p) > threshold.unsqueeze(-1)
        return torch.where(kept, p.double() * scale.unsqueeze(-1), torch.zeros((), dtype=torch.float64,
                                                                                device=p.device))


@dataclass
class Nucleus:
    """Kept tokens per row and row statistics.

    Listed tokens: ``ids``/``probs`` padded to the widest row (padding has probability 0). A row in
    ``implicit`` also keeps the tokens above its threshold, which are not listed; the probabilities of
    both parts are renormalised over the whole kept set.
    """

    ids: torch.Tensor           # (N, K) long: listed kept tokens
    probs: torch.Tensor         # (N, K) float64
    max_prob: torch.Tensor      # (N,) max_v p(v) of the unfiltered row
    nucleus_size: torch.Tensor  # (N,) smallest set with mass ≥ diag_p (Sec 7.4's k_t), float64
    entropy: torch.Tensor       # (N,) −Σ p log p of the unfiltered row, nats
    kept: torch.Tensor          # (N,) tokens kept by the official rule (listed or not)
    top1: torch.Tensor          # (N,) the most probable token (the lowest id among equals)
    implicit: Implicit | None = None

    def dense(self, vocab_size: int) -> torch.Tensor:
        """The filtered rows as (N, V) float64."""
        out = torch.zeros(self.ids.shape[0], vocab_size, dtype=torch.float64, device=self.ids.device)
        out.scatter_add_(1, self.ids, self.probs)
        if self.implicit is not None:
            out[self.implicit.rows] += self.implicit.probs()
        return out


@dataclass
class _Window:
    """Candidates of some rows sorted as the reference sorts them (p desc, then id), after a base.

    The base (possibly empty) holds tokens more probable than the whole window, all of them kept; only its
    mass and count enter the decisions. Every token outside base and window has p ≤ ``beyond``.
    """

    ids: torch.Tensor         # (R, W) long
    p: torch.Tensor           # (R, W) float64, −1 where padded
    base_mass: torch.Tensor   # (R,) float64
    base_count: torch.Tensor  # (R,) long
    beyond: torch.Tensor      # (R,) float64, −1 if no token is outside

    def select(self, keep: torch.Tensor) -> _Window:
        return _Window(self.ids[keep], self.p[keep], self.base_mass[keep], self.base_count[keep], self.beyond[keep])


def _decide(win: _Window, top_p: float | None, diag_p: float, exact_sums: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept count, k_t, decided) per row from the window's float64 cumulative sums.

    A row is decided when the window holds both crossings, every counted token is more probable than any
    token outside, and our sums are the reference's: exactly so for float32 probabilities ≥ 2^-30
    (``exact_sums``), else when no sum lies within the two summations' rounding bound of a threshold.
    """
    valid = win.p >= 0
    p = win.p.clamp(min=0)
    width = p.shape[1]
    cums = win.base_mass.unsqueeze(-1) + p.cumsum(-1)
    targets = [diag_p] + ([top_p] if top_p is not None else [])
    last_valid = (valid.sum(-1) - 1).clamp(min=0).unsqueeze(-1)
    decided = cums.gather(1, last_valid).squeeze(-1) > max(targets)  # both crossings inside
    decided &= (win.base_mass <= min(targets)) | (win.base_count == 0)
    size = win.base_count + (valid & (cums < diag_p)).sum(-1) + 1
    kept = torch.zeros_like(win.base_count)
    counted = size
    if top_p is not None:
        kept = (win.base_count + (valid & (cums <= top_p)).sum(-1)).clamp(min=1)  # the top-1 is always kept
        counted = torch.maximum(size, kept)
    lightest = p.gather(1, (counted - win.base_count - 1).clamp(min=0, max=width - 1).unsqueeze(-1)).squeeze(-1)
    decided &= lightest > win.beyond  # a tie with a token outside would reorder the sums
    if exact_sums:
        decided &= lightest >= _EXACT_FLOOR
    else:  # both sums lie within (count + 8)·u·c of the exact one
        counts = win.base_count.unsqueeze(-1) + torch.arange(1, width + 1, device=p.device)
        tol = 2 * (counts + 8) * _U64 * cums
        for q in targets:
            decided &= ~(valid & ((cums - q).abs() <= tol)).any(-1)
    return kept, size.double(), decided


def _top_window(p: torch.Tensor, idx: torch.Tensor) -> _Window:
    """The topk window re-sorted by (p desc, id asc): topk orders tied values arbitrarily."""
    by_id = idx.sort(-1).values
    vals, order = p.gather(1, by_id).double().sort(dim=-1, descending=True, stable=True)
    beyond = vals[:, -1].clone() if idx.shape[1] < p.shape[1] else torch.full_like(vals[:, 0], -1.0)
    return _Window(ids=by_id.gather(1, order), p=vals, base_mass=torch.zeros_like(vals[:, 0]),
                   base_count=torch.zeros_like(by_id[:, 0]), beyond=beyond)


def _key_layout(dtype: torch.dtype) -> tuple[torch.dtype, int, int]:
    """(int view, right shift, bins) of the histogram keys of probabilities of ``dtype``: the float bits
    without their lowest mantissa bits, so a key never decreases with the probability."""
    int_dtype, mantissa = (torch.int32, 23) if dtype == torch.float32 else (torch.int64, 52)
    shift = mantissa - _KEY_MANTISSA
    top = int(torch.tensor([1.0], dtype=dtype).view(int_dtype)) >> shift
    return int_dtype, shift, top + 1


def keys(p: torch.Tensor) -> torch.Tensor:
    """The histogram key of each probability (float32 or float64): never lower for a higher probability."""
    int_dtype, shift, _ = _key_layout(p.dtype)
    return p.view(int_dtype) >> shift


@dataclass
class _Band:
    """Band windows of broad rows; every token with a key above ``top_key`` is kept (the base)."""

    window: _Window
    top_key: torch.Tensor  # (R,) the band's highest key
    p: torch.Tensor        # (R, V) the rows' probabilities


def _band(p: torch.Tensor, rows: torch.Tensor, targets: list[float]) -> _Band:
    """The band of ``rows`` where the cumulative mass crosses ``targets``, proposed by one histogram.

    Flat (row-major) indices and per-row segments throughout: (row, column) indexing is several times
    slower at this size.
    """
    r_count, vocab, device = rows.numel(), p.shape[1], p.device
    sub = p if r_count == p.shape[0] else p[rows]
    int_dtype, shift, n_bins = _key_layout(sub.dtype)
    key = keys(sub)
    key += (torch.arange(r_count, dtype=int_dtype, device=device) * n_bins).unsqueeze(-1)  # row r: bins [r·n, r·n + n)
    # float64 bin masses: exact for float32 probabilities ≥ 2^-30 (the only ones the decisions add)
    flat_key = key.view(-1)
    hist = torch.bincount(flat_key, weights=sub.reshape(-1).double(), minlength=r_count * n_bins)
    above = hist.view(r_count, n_bins).flip(-1).cumsum(-1).flip(-1)  # mass of the bins ≥ j
    band_top = (above > min(targets)).sum(-1) - 1  # the highest bin that the first crossing may lie in
    band_bottom = ((above > max(targets)).sum(-1) - 1).clamp(min=0)  # ... and the last one
    take_above = (band_top + 1).clamp(max=n_bins - 1).unsqueeze(-1)
    base_mass = torch.where(band_top + 1 < n_bins, above.gather(1, take_above).squeeze(-1), 0.0)
    count_above = torch.bincount(flat_key, minlength=r_count * n_bins).view(r_count, n_bins)
    count_above = count_above.flip(-1).cumsum(-1).flip(-1)
    base_counts = torch.where(band_top + 1 < n_bins, count_above.gather(1, take_above).squeeze(-1), 0)
    offset = torch.arange(r_count, device=device) * n_bins
    in_band = (key >= (band_bottom + offset).to(int_dtype).unsqueeze(-1))
    in_band &= key <= (band_top + offset).to(int_dtype).unsqueeze(-1)
    del key, flat_key
    row_start = torch.arange(r_count + 1, device=device) * vocab
    band_flat = in_band.view(-1).nonzero().squeeze(-1)
    band_counts = torch.diff(torch.searchsorted(band_flat, row_start))
    band_rows = torch.repeat_interleave(torch.arange(r_count, device=device), band_counts)
    width = max(int(band_counts.max()), 1)
    slot = torch.arange(band_flat.numel(), device=device) + torch.repeat_interleave(
        torch.arange(r_count, device=device) * width - (band_counts.cumsum(0) - band_counts), band_counts)
    ids = torch.zeros(r_count * width, dtype=torch.long, device=device)
    ids.index_copy_(0, slot, band_flat - band_rows * vocab)
    vals = torch.full((r_count * width,), -1.0, dtype=torch.float64, device=device)
    vals.index_copy_(0, slot, sub.reshape(-1).index_select(0, band_flat).double())
    vals, order = vals.view(r_count, width).sort(dim=-1, descending=True, stable=True)  # ties stay in id order
    # everything below the band lies in lower bins: strictly less probable than every band token
    window = _Window(ids=ids.view(r_count, width).gather(1, order), p=vals, base_mass=base_mass,
                     base_count=base_counts,
                     beyond=torch.full((r_count,), -1.0, dtype=torch.float64, device=device))
    return _Band(window, band_top.to(int_dtype), sub)


def _reference_rows(p: torch.Tensor, top_p: float | None, diag_p: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rule through the full stable sort of float64 rows: (ids sorted, kept probs, kept, k_t)."""
    vals, idx = p.sort(dim=-1, descending=True, stable=True)
    cums = vals.cumsum(-1)
    size = ((cums < diag_p).sum(-1) + 1).clamp(max=p.shape[1]).double()
    if top_p is None:
        return idx, vals, torch.full((p.shape[0],), p.shape[1], device=p.device), size
    keep = cums <= top_p
    keep[:, 0] = True
    return idx, vals * keep, keep.sum(-1), size


TOP, BAND, REFERENCE = 0, 1, 2


def top_p_filter(rows: torch.Tensor, top_p: float, diag_p: float = 0.9, kind: str = "probs") -> Nucleus:
    """Apply the official top-p rule to each row of ``rows`` (N, V).

    ``kind="probs"``: non-negative rows (any float dtype; normalised here in float64). ``kind="logits"``:
    finite logits (a masked-out id should carry a large negative finite value, e.g. −1e30, not −inf, or
    the entropy of that row is NaN); p = softmax in their own precision. ``diag_p`` only sets the
    nucleus-size statistic.
    """
    n, vocab = rows.shape
    device = rows.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        none = torch.zeros(0, dtype=torch.long, device=device)
        return Nucleus(ids=none.view(0, 1), probs=empty.view(0, 1), max_prob=empty, nucleus_size=empty,
                       entropy=empty, kept=none, top1=none)
    filter_p = top_p if top_p < 1.0 else None
    targets = [diag_p] + ([filter_p] if filter_p is not None else [])
    if kind == "logits":
        p = torch.softmax(rows, dim=-1)  # (N, V): the one exp pass over the vocabulary
        vals, idx = p.topk(min(_WINDOW, vocab), dim=-1, sorted=True)
        max_prob = vals[:, 0].double()
        log_z = rows.gather(-1, idx[:, :1]).squeeze(-1).double() - max_prob.log()  # lse = l_max − log p_max
        dot = torch.bmm(p.unsqueeze(1), rows.unsqueeze(-1)).reshape(n).double()  # Σ_v p_v l_v
        entropy = log_z - dot  # H = log Z − Σ p l
    else:
        p = rows.double() / rows.sum(-1, keepdim=True, dtype=torch.float64)
        vals, idx = p.topk(min(_WINDOW, vocab), dim=-1, sorted=True)
        max_prob = vals[:, 0].clone()
        entropy = torch.special.entr(p).sum(-1)
    exact_sums = p.dtype == torch.float32

    kept = torch.ones(n, dtype=torch.long, device=device)
    size = torch.zeros(n, dtype=torch.float64, device=device)
    source = torch.full((n,), REFERENCE, dtype=torch.long, device=device)

    def settle(rows_s, k, s, ok, how):
        kept[rows_s[ok]], size[rows_s[ok]], source[rows_s[ok]] = k[ok], s[ok], how
        return ok

    all_rows = torch.arange(n, device=device)
    top = _top_window(p, idx)
    ok = settle(all_rows, *_decide(top, filter_p, diag_p, exact_sums), TOP)
    broad, band = all_rows[~ok], None
    if broad.numel():
        band = _band(p, broad, targets)
        settle(broad, *_decide(band.window, filter_p, diag_p, exact_sums), BAND)
    last = all_rows[source == REFERENCE]
    ref = None
    if last.numel():  # the last resort: the reference sort itself
        ref = _reference_rows(p[last].double(), filter_p, diag_p)
        kept[last], size[last] = ref[2], ref[3]

    # the top-1 (lowest id among the most probable) is the window's first unless ties fill the whole window
    top1 = top.ids[:, 0].clone()
    crowded = (top.beyond >= 0) & (top.p[:, 0] == top.p[:, -1])
    if crowded.any():
        top1[crowded] = p[crowded].argmax(-1)
    stats = dict(max_prob=max_prob, nucleus_size=size, entropy=entropy, top1=top1)
    if filter_p is None:
        return Nucleus(ids=torch.arange(vocab, device=device).expand(n, vocab), probs=p.double(),
                       kept=torch.full((n,), vocab, dtype=torch.long, device=device), **stats)
    return _assemble(p, kept, source, top, broad, band, last, ref, stats)


def _assemble(p: torch.Tensor, kept: torch.Tensor, source: torch.Tensor, top: _Window, broad: torch.Tensor,
              band: _Band | None, last: torch.Tensor, ref, stats: dict) -> Nucleus:
    """The listed ids (window rows: all kept; band rows: the band's kept part; sorted rows: the kept part
    of the last kept token's bin) with renormalised probabilities, and the implicit rows."""
    n, device = p.shape[0], p.device
    listed = torch.zeros(n, dtype=torch.long, device=device)  # listed count per row
    first = torch.zeros(n, dtype=torch.long, device=device)  # where the listed part starts in the row's window
    mass = torch.zeros(n, dtype=torch.float64, device=device)  # Σ of the kept probabilities, per row
    windows = []  # (rows, window ids, window probabilities)

    def prefix_sum(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        sums = values.clamp(min=0).cumsum(-1).gather(1, (count - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(count > 0, sums, torch.zeros_like(sums))

    from_top = (source == TOP).nonzero().squeeze(-1)
    win = top.select(source == TOP)
    listed[from_top] = kept[from_top]
    mass[from_top] = prefix_sum(win.p, kept[from_top])
    windows.append((from_top, win.ids, win.p))
    implicit = []  # (rows, probabilities, threshold)
    if band is not None:
        local = source[broad] == BAND
        rows_b = broad[local]
        win = band.window.select(local)
        take = kept[rows_b] - win.base_count
        listed[rows_b] = take
        mass[rows_b] = win.base_mass + prefix_sum(win.p, take)
        windows.append((rows_b, win.ids, win.p))
        implicit.append((rows_b, band.p if bool(local.all()) else band.p[local], band.top_key[local]))
    if ref is not None:  # sorted rows: everything above the last kept token's bin is implicit
        ref_ids, ref_p = ref[0], ref[1]
        k = kept[last]
        sorted_keys = keys(p[last]).gather(1, ref_ids)
        threshold = sorted_keys.gather(1, (k - 1).unsqueeze(-1))
        in_bin = ((sorted_keys == threshold) & (torch.arange(ref_ids.shape[1], device=device) < k.unsqueeze(-1)))
        listed[last] = in_bin.sum(-1)
        first[last] = k - listed[last]
        mass[last] = prefix_sum(ref_p, k)
        windows.append((last, ref_ids, ref_p))
        implicit.append((last, p[last], threshold.squeeze(-1)))

    width = max(int(listed.max()), 1)
    out_ids = torch.zeros(n, width, dtype=torch.long, device=device)
    out_p = torch.zeros(n, width, dtype=torch.float64, device=device)
    for rows, ids, probs in windows:
        rr, jj = (torch.arange(width, device=device) < listed[rows].unsqueeze(-1)).nonzero(as_tuple=True)
        src = first[rows][rr] + jj
        out_ids[rows[rr], jj] = ids[rr, src]
        out_p[rows[rr], jj] = probs[rr, src] / mass[rows][rr]
    imp = None
    if implicit:
        rows = torch.cat([r for r, _, _ in implicit])
        imp = Implicit(rows=rows, p=implicit[0][1] if len(implicit) == 1 else torch.cat([x for _, x, _ in implicit]),
                       threshold=torch.cat([t for _, _, t in implicit]), scale=1.0 / mass[rows])
    return Nucleus(ids=out_ids, probs=out_p, kept=kept, implicit=imp, **stats)


def sort_top_p_filter(rows: torch.Tensor, top_p: float) -> torch.Tensor:
    """The same rule through one full-vocabulary stable sort of (N, V) probabilities: the reference."""
    vals, idx = rows.sort(dim=-1, descending=True, stable=True)
    keep = vals.cumsum(-1) <= top_p
    keep[:, 0] = True
    out = torch.zeros_like(rows).scatter_(1, idx, vals * keep)
    return out / out.sum(-1, keepdim=True)


__all__ = ["Nucleus", "Implicit", "keys", "top_p_filter", "sort_top_p_filter"]
