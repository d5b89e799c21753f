"""Nucleus (top-p) filtering with the official ReMDM rule, plus the sharpness statistics of Sec 7.4.

Official rule (kuleshov-group/remdm, ``diffusion.py``, the nucleus step of the samplers): sort p descending,
keep the tokens whose cumulative mass is still ≤ p, and always keep the top-1. The token that crosses p is
dropped (unlike HF top-p).

Which probabilities: the denoiser's, in the precision of its logits — p = softmax(logits) in float32 for a
model (what the official code and a GPU run compute), float64 for probability rows — with the cumulative
sums and comparisons in float64. The reference is that rule through one stable full sort
(:func:`sort_top_p_filter` on ``p.double()``); :func:`top_p_filter` returns **exactly** its kept set, ties
and boundary cases included, without sorting the vocabulary:

1. the window: every token with p ≥ τ = max(p_max·2^-6, 2^-10) (at most 1,024; every other token is
   lighter, so the window is a prefix of the sorted row). A row whose crossings lie in it (most steps) is
   decided from the window's float64 cumulative sums;
2. a broad row (the first steps, nucleus ~10^4 in Table 6; rows of entropy above log 2^7 go straight
   here) gets one histogram of its probabilities over bins of 1/64 of an octave (the float bits' exponent
   and 6 mantissa bits, one ``scatter_add`` of float64 masses). The bins whose cumulative mass crosses p
   form a band of a few hundred tokens; every token above the band is kept without being listed (its
   mass and count are known), and only the band is sorted;
3. the sums agree with the reference's bit for bit: float32 probabilities ≥ 2^-30 are multiples of 2^-53,
   so every float64 partial sum below 1 is exact in any order. A row whose decisions would involve smaller
   probabilities (or float64 rows whose sums round: a cumulative sum within the summation's error bound of
   p) is handed to the reference sort.

All of it runs block by block of rows (~2^21 elements on a CPU, 2^28 on a GPU): each block's softmax,
statistics, window and band while it is in cache (the masks compare the float bits as integers, into reused
buffers; the band's places are in-place integer arithmetic, whose row sums count the tokens above it). When
the caller allows it, the probabilities of the rows read again later (a band's, the reference's) are written
over their logits.

The statistics come from the same passes: max p, the entropy H = log Z − Σ_v p_v l_v with
log Z = l_max − log p_max, and k_t = the smallest set with mass ≥ ``diag_p`` (Sec 7.4).

The result is sparse: per row the listed kept ids (a window row: all of them, by probability; a broad row:
the kept part of its band, the rest implicit in :class:`Implicit`) and their float64 probabilities
renormalised over the kept set (exact categorical sampling, in any order). A broad row's top-1 is looked up
only when asked for (:meth:`Nucleus.most_probable`: the samplers need it once, at the final noise
removal). With ``top_p >= 1`` nothing is filtered and the rows are returned dense (every id, float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_CUT = 2.0 ** -6           # the window: tokens with p ≥ p_max·2^-6 ...
_CUT_FLOOR = 2.0 ** -10    # ... and p ≥ 2^-10 (so at most 1,024 of them)
_CHUNK = 512              # ids per chunk when a draw searches a broad row's implicit mass
_BROAD_ENTROPY = math.log(2 ** 7)  # rows above this entropy (nats) skip the window for the histogram band
_KEY_MANTISSA = 6          # histogram bins: exponent and 6 mantissa bits, 1/64 of an octave wide ...
_KEY_FLOOR = 2.0 ** -32    # ... from here up (every lower probability shares the first bin)
_EXACT_FLOOR = 2.0 ** -30  # float32 probabilities from here up add exactly in float64 (below 1)
_U64 = 2.0 ** -53          # unit roundoff of float64
_BLOCK = 1 << 21           # elements per block of rows in the full-vocabulary passes (8 MB of float32)
_WIDE_BLOCK = 1 << 18      # ... and in the passes that work in float64 (2 MB: they stay in cache)
_ACCELERATOR_BLOCK = 1 << 28  # elements per block of rows on a GPU (1 GiB of float32)


@dataclass
class Implicit:
    """Rows whose kept set also holds, besides their listed ids, every token whose probability's
    histogram key (:func:`keys`) exceeds the row's threshold: the tokens above a broad row's band, kept
    without being listed (a broad nucleus has ~10^4 of them per row)."""

    rows: torch.Tensor       # (R,) long: rows of the nucleus
    p: torch.Tensor          # (R, V) their probabilities (the rule's own values)
    threshold: torch.Tensor  # (R,) keys above it are kept
    scale: torch.Tensor      # (R,) float64: 1 / the kept mass of the row
    mass: torch.Tensor       # (R,) float64: the exact sum of the implicitly kept probabilities (unscaled)

    def select(self, which: torch.Tensor) -> Implicit:
        return Implicit(self.rows[which], self.p[which], self.threshold[which], self.scale[which], self.mass[which])

    def floor(self) -> torch.Tensor:
        """(R,) the least probability kept implicitly: key > threshold ⟺ p ≥ it (keys never decrease with p)."""
        int_dtype, shift, _, _ = _key_layout(self.p.dtype)
        return ((self.threshold.to(int_dtype) + 1) << shift).view(self.p.dtype)

    def top1(self, which: torch.Tensor) -> torch.Tensor:
        """(R',) the most probable token (the lowest id among equals) of rows ``which``."""
        p = self.p[which]
        return _first_at_max(p, p.amax(-1))

    def probs(self) -> torch.Tensor:
        """(R, V) float64: the renormalised probabilities of the implicitly kept tokens, 0 elsewhere."""
        kept = self.p >= self.floor().unsqueeze(-1)
        return self.p.double() * kept * self.scale.unsqueeze(-1)

    def locate(self, target: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, renormalised probability) for rows ``which``: where the renormalised mass of the
        implicitly kept tokens, added in id order, first exceeds ``target`` (R',) float64, which must be
        below ``mass · scale``. The sums are those of the unscaled float64 probabilities (exact for float32
        probabilities), the target divided by the scale: first over chunks of ``_CHUNK`` ids, then inside
        the one chunk that crosses (no cumulative sum over the whole vocabulary); rows a few at a time, so
        that their float64 copy stays in cache (half the time of 8 MB blocks on a CPU)."""
        vocab, device = self.p.shape[1], self.p.device
        n_chunks = -(-vocab // _CHUNK)
        scale, mass = self.scale[which], self.mass[which]
        inside = torch.minimum(target / scale, torch.nextafter(mass, torch.zeros_like(mass)))
        floor = self.floor()[which].unsqueeze(-1)
        token = torch.empty(which.shape[0], dtype=torch.long, device=device)
        blocks = _row_blocks(which.shape[0], vocab, device, _WIDE_BLOCK)
        # the kept probabilities in float64, written by the masking product itself (a float64 sum of float32
        # chunks would first convert them into a fresh buffer)
        kept = torch.zeros(blocks[0][1] if blocks else 0, n_chunks * _CHUNK, dtype=torch.float64, device=device)
        for i, j in blocks:
            rows, part = self.p[which[i:j]], kept[: j - i]
            torch.mul(rows, rows >= floor[i:j], out=part[:, :vocab])
            chunks = part.view(j - i, n_chunks, _CHUNK)
            before = chunks.sum(-1).cumsum(-1)  # mass of the chunks ≤ c
            chunk = torch.searchsorted(before, inside[i:j].unsqueeze(-1), right=True).clamp(max=n_chunks - 1)
            start = torch.where(chunk > 0, before.gather(1, (chunk - 1).clamp(min=0)), 0.0)
            cdf = start + chunks.gather(1, chunk.unsqueeze(-1).expand(-1, -1, _CHUNK)).squeeze(1).cumsum(-1)
            token[i:j] = chunk.squeeze(-1) * _CHUNK + torch.searchsorted(
                cdf, inside[i:j].unsqueeze(-1), right=True).squeeze(-1)
        return token, self.p[which, token].double() * scale


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
    top1: torch.Tensor          # (N,) the most probable token (the lowest id among equals), or −1 for a row
                                #      of ``implicit`` (only found when asked for: :meth:`most_probable`)
    implicit: Implicit | None = None

    def most_probable(self) -> torch.Tensor:
        """(N,) the most probable token of every row (the lowest id among equals)."""
        top1 = self.top1.clone()
        if self.implicit is not None:
            lookup = (top1[self.implicit.rows] < 0).nonzero().squeeze(-1)
            top1[self.implicit.rows[lookup]] = self.implicit.top1(lookup)
        return top1

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


def _true_positions(flags: torch.Tensor) -> torch.Tensor:
    """Ascending positions of the True entries of a contiguous 1-D bool tensor. The masks here are sparse
    (a window, a band), so the scan reads them as 64-bit words (8 flags at a time) and only opens the
    words that hold a True: about 8× less to scan than ``nonzero`` over the flags."""
    body = flags.numel() - flags.numel() % 8
    words = flags[:body].view(torch.int64).nonzero().squeeze(-1)
    within = flags[:body].view(-1, 8)[words].nonzero()  # (word, flag) pairs in ascending order
    tail = flags[body:].nonzero().squeeze(-1) + body
    return torch.cat([words[within[:, 0]] * 8 + within[:, 1], tail])


def _first_at_max(p: torch.Tensor, max_prob: torch.Tensor) -> torch.Tensor:
    """(r,) the first (lowest) id of each row of ``p`` (r, V) whose probability is ``max_prob`` (r,): a sparse
    scan of integer flags (several times cheaper than ``argmax`` on a CPU)."""
    int_dtype = _key_layout(p.dtype)[0]
    flags = _at_least(p.view(int_dtype), max_prob.view(int_dtype), _Buffers(p.device))
    at_max = _true_positions(flags.view(-1))
    starts = torch.arange(p.shape[0], device=p.device) * p.shape[1]
    return at_max[torch.searchsorted(at_max, starts)] - starts


def _pack(mask: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The True entries of each row of ``mask`` (r, V) as (ids, float64 values) (r, W), sorted as the
    reference sorts them (p desc, then id; padding: id 0, value −1), W ≥ 1 the widest row.

    Flat (row-major) indices and per-row segments: (row, column) indexing is several times slower here.
    """
    r_count, vocab, device = mask.shape[0], mask.shape[1], mask.device
    flat = _true_positions(mask.view(-1))  # ascending: each row's ids in id order
    counts = torch.diff(torch.searchsorted(flat, torch.arange(r_count + 1, device=device) * vocab))
    row_of = torch.repeat_interleave(torch.arange(r_count, device=device), counts)
    width = max(int(counts.max()), 1) if r_count else 1
    slot = torch.arange(flat.numel(), device=device) + torch.repeat_interleave(
        torch.arange(r_count, device=device) * width - (counts.cumsum(0) - counts), counts)
    ids = torch.zeros(r_count * width, dtype=torch.long, device=device)
    ids.index_copy_(0, slot, flat - row_of * vocab)
    vals = torch.full((r_count * width,), -1.0, dtype=torch.float64, device=device)
    vals.index_copy_(0, slot, values.reshape(-1).index_select(0, flat).double())
    vals, order = vals.view(r_count, width).sort(dim=-1, descending=True, stable=True)  # ties stay in id order
    return ids.view(r_count, width).gather(1, order), vals


def _candidates(p: torch.Tensor, max_prob: torch.Tensor, buffers: _Buffers) -> _Window:
    """The tokens with p ≥ τ = max(p_max·2^-6, 2^-10) (at most 1,024 per row), in the reference's order.

    Every other token has p < τ, so the window is a prefix of the reference's sorted row: a row whose
    crossings lie in it (most steps: a sharp nucleus) is decided there.
    """
    tau = torch.clamp(max_prob * _CUT, min=_CUT_FLOOR).to(p.dtype)
    int_dtype = _key_layout(p.dtype)[0]
    ids, vals = _pack(_at_least(p.view(int_dtype), tau.view(int_dtype), buffers), p)
    beyond = torch.nextafter(tau, torch.zeros_like(tau)).double()  # every token outside: p ≤ the float below τ
    zero = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
    return _Window(ids=ids, p=vals, base_mass=zero.double(), base_count=zero, beyond=beyond)


class _Buffers:
    """Scratch tensors that every block of one call reuses: on a CPU a fresh (rows, V) buffer per block
    would fault in new pages each time."""

    def __init__(self, device: torch.device):
        self.device, self.held = device, {}

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype, name: str = "") -> torch.Tensor:
        numel, key = math.prod(shape), (name, dtype)
        if key not in self.held or self.held[key].numel() < numel:
            self.held[key] = torch.empty(numel, dtype=dtype, device=self.device)
        return self.held[key][:numel].view(shape)


def _at_least(values: torch.Tensor, low: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
    """Flags (r, V) bool: each integer of ``values`` (r, V) ≥ its row's ``low`` (r,), written into a reused
    buffer. The float bits of non-negative probabilities, read as integers, order like the probabilities,
    so this compares probabilities too. One comparison into a bool buffer: on a CPU about 1.6x faster than
    the integer subtract, clamp and cast to bool it replaced, and a quarter of the memory (torch 2.13)."""
    return torch.ge(values, low.to(values.dtype).unsqueeze(-1), out=buffers(values.shape, torch.bool, "flags"))


def _key_layout(dtype: torch.dtype) -> tuple[torch.dtype, int, int, int]:
    """(int view, right shift, lowest, top) of the histogram keys of probabilities of ``dtype``: the float
    bits without their lowest mantissa bits, from those of ``_KEY_FLOOR`` (``lowest``) to those of 1."""
    int_dtype, mantissa = (torch.int32, 23) if dtype == torch.float32 else (torch.int64, 52)
    shift = mantissa - _KEY_MANTISSA
    lowest, top = (int(torch.tensor([x], dtype=dtype).view(int_dtype)) >> shift for x in (_KEY_FLOOR, 1.0))
    return int_dtype, shift, lowest, top


def keys(p: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The histogram key of each probability (float32 or float64): never lower for a higher probability;
    every probability below ``_KEY_FLOOR`` shares the lowest key."""
    int_dtype, shift, lowest, _ = _key_layout(p.dtype)
    key = torch.bitwise_right_shift(p.view(int_dtype), shift, out=out)  # (``>>`` is several times slower)
    return key.clamp_(min=lowest)


def _band(p: torch.Tensor, targets: list[float], buffers: _Buffers) -> tuple[_Window, torch.Tensor]:
    """(window, threshold key) of broad rows ``p`` (r, V): a band of histogram bins (1/64 of an octave)
    that holds the bins where the cumulative mass crosses ``targets``, after a base of every token in
    higher bins (all kept).

    Every row's band is 2^m − 1 bins wide, from its lowest crossing bin up (one width for the block, so
    one integer pass finds all bands); bins above the highest crossing only move tokens from the base
    into the sorted band, which decides them the same way.

    The bin masses are float64 sums: exact for float32 probabilities ≥ 2^-30 (multiples of 2^-53, so
    every partial sum below 1 is exact in any order), so the base's mass is the reference's own sum.
    """
    r_count, device = p.shape[0], p.device
    int_dtype, _, lowest, top_key = _key_layout(p.dtype)
    key = keys(p, out=buffers(p.shape, int_dtype, "key"))
    # indexed by key: only the bins from ``lowest`` up are ever written, so only they are cleared
    hist = buffers((r_count, top_key + 1), torch.float64, "hist")
    hist[:, lowest:].zero_()
    # the float64 masses and int64 indices the scatter takes, a few rows at a time (while they are in cache)
    step = max(1, _WIDE_BLOCK // p.shape[1]) if device.type == "cpu" else r_count
    for a in range(0, r_count, step):
        rows = slice(a, min(a + step, r_count))
        shape = (rows.stop - a, p.shape[1])
        index = key[rows] if int_dtype == torch.int64 else buffers(shape, torch.int64, "index").copy_(key[rows])
        hist[rows].scatter_add_(1, index, buffers(shape, torch.float64, "mass").copy_(p[rows]))
    above = hist[:, lowest:].flip(-1).cumsum(-1).flip(-1)  # mass of the bins ≥ lowest + j
    n_bins = above.shape[1]
    crossing_top = (above > min(targets)).sum(-1) - 1  # the highest bin that the first crossing may lie in
    bottom = ((above > max(targets)).sum(-1) - 1).clamp(min=0)  # ... and the lowest the last one may
    width_log2 = (int((crossing_top - bottom).max()) + 1).bit_length()  # 2^m − 2 ≥ the widest span
    top = bottom + (1 << width_log2) - 2
    has_base = top + 1 < n_bins
    base_mass = torch.where(has_base, above.gather(1, (top + 1).clamp(max=n_bins - 1).unsqueeze(-1)).squeeze(-1),
                            0.0)
    bottom, top = bottom + lowest, top + lowest  # as keys
    # where each token lies (0 below the band, 1 … 2^m − 1 in it, 2^m above), in place of its key
    place = key.sub_((bottom - 1).to(int_dtype).unsqueeze(-1)).clamp_(0, 1 << width_log2)
    place_sum = place.sum(-1, dtype=int_dtype).long()
    ids, vals = _pack(place.bitwise_and_((1 << width_log2) - 1).bool(), p)
    listed = vals >= 0
    band_places = (keys(vals.clamp(min=0).to(p.dtype)).long() - bottom.unsqueeze(-1) + 1) * listed
    base_count = (place_sum - band_places.sum(-1)) >> width_log2  # the rest of the sum: 2^m per token above
    # everything below the band lies in lower bins: strictly less probable than every band token
    window = _Window(ids=ids, p=vals, base_mass=base_mass, base_count=base_count,
                     beyond=torch.full((r_count,), -1.0, dtype=torch.float64, device=device))
    return window, top.to(int_dtype)


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


def _row_blocks(n: int, vocab: int, device: torch.device, elements: int | None = None) -> list[tuple[int, int]]:
    """Row ranges of about ``elements`` (default ``_BLOCK``) elements on a CPU: every full-vocabulary pass
    runs block by block, so a block's temporaries stay cache-sized and are reused instead of paging in
    fresh (N, V) buffers. An accelerator takes ``_ACCELERATOR_BLOCK`` elements at a time: each pass is one
    kernel per block, large enough to fill the device, and a block's temporaries (its float64 masses and
    int64 histogram indices are twice its float32 size each) stay bounded at any batch: all 65,536 rows of a
    B = 64, L = 1,024 step at V = 50,258 at once would need about 53 GB for those two alone."""
    size = (_BLOCK if elements is None else elements) if device.type == "cpu" else _ACCELERATOR_BLOCK
    step = max(1, size // max(vocab, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a_v b_v per row. On a CPU one BLAS dot per row is several times faster than the batched
    (1, V)·(V, 1) ``bmm``; elsewhere the ``bmm`` is one kernel instead of a launch per row."""
    if a.device.type == "cpu":
        return torch.stack([torch.dot(x, y) for x, y in zip(a, b)])
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(-1)).view(-1)


TOP, BAND, REFERENCE = 0, 1, 2  # how a row was decided


@dataclass
class _Decided:
    """Rows settled by one kind of window: global row ids, their window, and (band rows) threshold keys."""

    rows: torch.Tensor
    window: _Window
    threshold: torch.Tensor | None = None


def top_p_filter(rows: torch.Tensor, top_p: float, diag_p: float = 0.9, kind: str = "probs",
                 overwrite: bool = False) -> Nucleus:
    """Apply the official top-p rule to each row of ``rows`` (N, V).

    ``kind="probs"``: non-negative rows (any float dtype; normalised here in float64). ``kind="logits"``:
    finite logits (a masked-out id should carry a large negative finite value, e.g. −1e30, not −inf, or
    the entropy of that row is NaN); p = softmax in their own precision. ``diag_p`` only sets the
    nucleus-size statistic. ``overwrite=True`` lets the result keep probabilities in ``rows``' own memory
    (the samplers hand over a forward's output they no longer need: no second (N, V) buffer to page in);
    only the rows it reads later are written (a band's or the reference's, or all of them when
    ``top_p >= 1``), the others are left as they were.

    One pass over the rows, block by block (each block's softmax, statistics, window and band while it is
    in cache); rows neither window nor band decides go to the reference sort at the end.
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
    logits = kind == "logits"
    if logits:
        p = rows if overwrite else torch.empty_like(rows)
    else:
        p = rows.double() / rows.sum(-1, keepdim=True, dtype=torch.float64)
    exact_sums = p.dtype == torch.float32

    kept = torch.ones(n, dtype=torch.long, device=device)
    size = torch.zeros(n, dtype=torch.float64, device=device)
    source = torch.full((n,), REFERENCE, dtype=torch.long, device=device)
    max_prob = torch.empty(n, dtype=p.dtype, device=device)
    top1 = torch.empty(n, dtype=torch.long, device=device)
    entropy = torch.empty(n, dtype=torch.float64, device=device)
    decided: dict[int, list[_Decided]] = {TOP: [], BAND: []}
    blocks = _row_blocks(n, vocab, device)
    scratch = torch.empty(blocks[0][1] - blocks[0][0], vocab, dtype=p.dtype, device=device) if logits else None
    buffers = _Buffers(device)

    def settle(block_rows, win, how, threshold=None):
        k, s, ok = _decide(win, filter_p, diag_p, exact_sums)
        kept[block_rows[ok]], size[block_rows[ok]], source[block_rows[ok]] = k[ok], s[ok], how
        if bool(ok.any()):
            decided[how].append(_Decided(block_rows[ok], win.select(ok),
                                         None if threshold is None else threshold[ok]))
        return ok

    for i, j in blocks:
        block_rows = torch.arange(i, j, device=device)
        if logits:
            block, probs = rows[i:j], scratch[: j - i]
            torch.ops.aten._softmax.out(block, -1, False, out=probs)
            log_z = block.amax(-1).double()  # l_max; lse = l_max − log p_max below
            dot = _row_dots(probs, block).double()  # Σ_v p_v l_v
        else:
            probs = p[i:j]
        torch.amax(probs, -1, out=max_prob[i:j])
        if logits:
            entropy[i:j] = log_z - max_prob[i:j].double().log() - dot  # H = log Z − Σ p l
        else:
            entropy[i:j] = torch.special.entr(probs).sum(-1)
        # a row whose entropy exceeds log(2^7) has a nucleus too broad for the window (speed only: a row
        # the window does not decide goes to the band anyway)
        narrow = (entropy[i:j] <= _BROAD_ENTROPY).nonzero().squeeze(-1)
        rest = torch.ones(j - i, dtype=torch.bool, device=device)
        top1[i:j] = -1
        if narrow.numel():
            window = _candidates(probs if narrow.numel() == j - i else probs[narrow], max_prob[i:j][narrow],
                                    buffers)
            # the window holds every token with p ≥ p_max when p_max ≥ 2^-10: its first is the top-1
            has_top = window.p[:, 0] == max_prob[i:j][narrow].double()
            top1[i + narrow[has_top]] = window.ids[has_top, 0]
            rest[narrow[settle(block_rows[narrow], window, TOP)]] = False
        if logits:  # probabilities are kept where they are read again: every row unfiltered, else the rest
            stored = rest if filter_p is not None else torch.ones_like(rest)
            if bool(stored.all()):
                p[i:j].copy_(probs)
            elif bool(stored.any()):
                p[i:j][stored] = probs[stored]
        if bool(rest.any()):
            broad = rest.nonzero().squeeze(-1)
            window, threshold = _band(probs if broad.numel() == j - i else probs[broad], targets, buffers)
            settle(block_rows[broad], window, BAND, threshold)
    last = (source == REFERENCE).nonzero().squeeze(-1)
    ref = None
    if last.numel():  # the last resort: the reference sort itself
        ref = _reference_rows(p[last].double(), filter_p, diag_p)
        kept[last], size[last] = ref[2], ref[3]

    stats = dict(max_prob=max_prob.double(), nucleus_size=size, entropy=entropy, top1=top1)
    if filter_p is None:
        lone = (top1 < 0).nonzero().squeeze(-1)
        top1[lone] = _first_at_max(p[lone], max_prob[lone])
        return Nucleus(ids=torch.arange(vocab, device=device).expand(n, vocab), probs=p.double(),
                       kept=torch.full((n,), vocab, dtype=torch.long, device=device), **stats)
    return _assemble(p, kept, decided, last, ref, stats)


def _assemble(p: torch.Tensor, kept: torch.Tensor, decided: dict[int, list[_Decided]], last: torch.Tensor,
              ref, stats: dict) -> Nucleus:
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

    for part in decided[TOP]:
        listed[part.rows] = kept[part.rows]
        mass[part.rows] = prefix_sum(part.window.p, kept[part.rows])
        windows.append((part.rows, part.window.ids, part.window.p))
    implicit = []  # (rows, probabilities, threshold)
    for part in decided[BAND]:
        win = part.window
        take = kept[part.rows] - win.base_count
        listed[part.rows] = take
        mass[part.rows] = win.base_mass + prefix_sum(win.p, take)
        windows.append((part.rows, win.ids, win.p))
        implicit.append((part.rows, part.threshold, win.base_mass))
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
        implicit.append((last, threshold.squeeze(-1), prefix_sum(ref_p, first[last])))

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
        every = rows.numel() == n and bool((rows == torch.arange(n, device=device)).all())
        imp = Implicit(rows=rows, p=p if every else p[rows], threshold=torch.cat([t for _, t, _ in implicit]),
                       scale=1.0 / mass[rows], mass=torch.cat([m for _, _, m in implicit]))
    return Nucleus(ids=out_ids, probs=out_p, kept=kept, implicit=imp, **stats)


def sort_top_p_filter(rows: torch.Tensor, top_p: float) -> torch.Tensor:
    """The same rule through one full-vocabulary stable sort of (N, V) probabilities: the reference."""
    vals, idx = rows.sort(dim=-1, descending=True, stable=True)
    keep = vals.cumsum(-1) <= top_p
    keep[:, 0] = True
    out = torch.zeros_like(rows).scatter_(1, idx, vals * keep)
    return out / out.sum(-1, keepdim=True)


__all__ = ["Nucleus", "Implicit", "keys", "top_p_filter", "sort_top_p_filter"]
