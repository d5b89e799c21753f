"""Where :func:`dsl.sampling.transition.apply_transition` draws a revealed position's token from: the
nucleus-filtered p_x0 of each sample's last forward (:class:`NucleusCache`), or a dense p_x0
(:func:`dense_candidates`). A draw is a float64 inverse CDF with the step's u₂ (exact categorical
sampling)."""

from __future__ import annotations

import torch

from dsl.sampling.nucleus import Implicit, Nucleus


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index (R,) of the first column of ``cdf`` (R, K) above ``target`` (R,) (the last one at most)."""
    return torch.searchsorted(cdf, target.unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


class _DenseCandidates:
    def __init__(self, p_x0: torch.Tensor):
        self.p_x0 = p_x0

    def draw(self, reveal: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.p_x0[reveal]  # (R, V): only the rows that reveal pay for a cumulative sum
        cdf = rows.cumsum(-1)
        pick = _search(cdf, u * cdf[:, -1])
        return pick, rows.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def dense_candidates(p_x0: torch.Tensor) -> _DenseCandidates:
    """Candidates for :func:`apply_transition` from a dense p_x0 (B, L, V): every id is a candidate."""
    return _DenseCandidates(p_x0)


class NucleusCache:
    """Per-sample nucleus-filtered p_x0 of each sample's last forward, as :func:`top_p_filter` gives it.

    Listed tokens: ids and probabilities (n, L, K), K = the widest cached list; the top-1 (n, L), −1 where
    it is still to be looked up in a stored row. A broad
    row also keeps every token above its threshold without listing it: its probability row sits in a store
    (M, V) that ``implicit`` (n, L) indexes (−1: none), and a draw from it reads that one row. Positions
    that were visible at a sample's last forward are never read: the cache is only used while that
    sample's draft is unchanged (time-invariant denoiser: the official code's p(x0) caching).
    """

    def __init__(self, n: int, length: int, device: torch.device | str = "cpu"):
        self.ids = torch.zeros(n, length, 1, dtype=torch.long, device=device)
        self.probs = torch.zeros(n, length, 1, dtype=torch.float64, device=device)
        self.best = torch.zeros(n, length, dtype=torch.long, device=device)
        self.implicit = torch.full((n, length), -1, dtype=torch.long, device=device)
        self.store: Implicit | None = None

    def write(self, rows: torch.Tensor, masked: torch.Tensor, nuc: Nucleus) -> None:
        b, length = masked.shape
        width = nuc.ids.shape[1]
        device = masked.device
        if bool(masked.all()):  # every position masked (the first steps): the nucleus rows are the layout
            ids = nuc.ids.reshape(b, length, width).contiguous()  # (a copy only of expanded ids, top_p = 1)
            probs = nuc.probs.reshape(b, length, width).contiguous()
        else:
            ids = torch.zeros(b, length, width, dtype=torch.long, device=device)
            probs = torch.zeros(b, length, width, dtype=torch.float64, device=device)
            ids[masked], probs[masked] = nuc.ids, nuc.probs
        best = torch.zeros(b, length, dtype=torch.long, device=device)
        best[masked] = nuc.top1
        implicit = torch.full((b, length), -1, dtype=torch.long, device=device)
        store = nuc.implicit
        if store is not None:  # nucleus row i is the i-th masked position, row-major
            where = masked.nonzero()[store.rows]
            implicit[where[:, 0], where[:, 1]] = torch.arange(store.rows.numel(), device=device)
        if rows.numel() == self.ids.shape[0]:  # every sample replaced: nothing of the old cache survives
            self.ids, self.probs, self.best, self.implicit, self.store = ids, probs, best, implicit, store
        else:
            full = max(width, self.ids.shape[2])
            self.ids, self.probs = _widen(self.ids, full), _widen(self.probs, full)
            self.ids[rows], self.probs[rows], self.best[rows] = _widen(ids, full), _widen(probs, full), best
            self._merge_store(rows, implicit, store)
        need = max(int((self.probs > 0).sum(-1).max()), 1)
        if need < self.ids.shape[2]:  # a broad early list no longer cached: free its width
            self.ids = self.ids[:, :, :need].contiguous()
            self.probs = self.probs[:, :, :need].contiguous()

    def _merge_store(self, rows: torch.Tensor, implicit: torch.Tensor, store: Implicit | None) -> None:
        """Keep the stored rows of the samples not replaced, add ``store``'s for ``rows``."""
        replaced = torch.zeros(self.implicit.shape[0], dtype=torch.bool, device=implicit.device)
        replaced[rows] = True
        self.implicit[replaced] = -1
        keep = self.implicit >= 0
        parts, offset = [], 0
        merged = torch.full_like(self.implicit, -1)
        if bool(keep.any()):
            old = self.implicit[keep]
            parts.append(self.store.select(old))
            merged[keep] = torch.arange(old.numel(), device=old.device)
            offset = old.numel()
        if store is not None:
            fresh = implicit >= 0
            sub = merged[rows]
            sub[fresh] = implicit[fresh] + offset
            merged[rows] = sub
            parts.append(store)
        self.implicit = merged
        self.store = None if not parts else parts[0] if len(parts) == 1 else Implicit(
            *(torch.cat([getattr(x, name) for x in parts]) for name in ("rows", "p", "threshold", "scale", "mass")))

    def top1(self) -> torch.Tensor:
        """(n, L) the most probable token at each cached position (a broad row's is looked up in its stored
        probabilities only now: the samplers ask for it once, at the final noise removal)."""
        lookup = (self.best < 0) & (self.implicit >= 0)
        if bool(lookup.any()):
            self.best[lookup] = self.store.top1(self.implicit[lookup])
        return self.best

    def draw(self, reveal: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, probability) at the revealed positions (row-major) by float64 inverse CDF with u: the
        implicitly kept tokens of a row first (ids ascending), then its listed tokens. A broad row reads its
        stored probabilities only when u lands among its implicit tokens (their mass is known)."""
        listed = self.probs[reveal]  # (R, K): only the rows that reveal pay for a cumulative sum
        cdf = listed.cumsum(-1)
        total = cdf[:, -1].clone()
        implied = torch.zeros_like(total)
        index = self.implicit[reveal]
        broad = (index >= 0).nonzero().squeeze(-1)
        if broad.numel():
            implied[broad] = self.store.mass[index[broad]] * self.store.scale[index[broad]]
            total[broad] += implied[broad]
        target = u * total
        column = _search(cdf, target - implied).unsqueeze(-1)
        token = self.ids[reveal].gather(-1, column).squeeze(-1)
        prob = listed.gather(-1, column).squeeze(-1)
        inside = broad[target[broad] < implied[broad]]
        if inside.numel():
            token[inside], prob[inside] = self.store.locate(target[inside], index[inside])
        return token, prob


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """x (n, L, K) zero-padded to K = width (itself when already that wide)."""
    return x if x.shape[2] == width else torch.nn.functional.pad(x, (0, width - x.shape[2]))
