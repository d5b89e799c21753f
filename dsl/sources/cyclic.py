"""The cyclic toy of App B: the K cyclic shifts of 0, 1, ..., K-1, each with probability 1/K.

Sequences may be longer (or shorter) than K: position j of shift i holds (j - i) mod K, which is
``torch.roll(arange(K), i)`` for length K (App B, footnote 3) and the same periodic pattern otherwise;
there are still exactly K equally likely sequences, so every oracle is an enumeration over K.
"""

from __future__ import annotations

import math

import torch

from dsl.sources import ExactSource

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class CyclicSource(ExactSource):
    """Words 0..K-1 (rendered A, B, C, ...), mask id K."""

    def __init__(self, k: int, length: int | None = None):
        if not 2 <= k <= len(_LETTERS):
            raise ValueError(f"cyclic k={k} must lie in [2, {len(_LETTERS)}]")
        length = k if length is None or length <= 0 else length
        self.k = k
        self.length = int(length)
        self.vocab_size = k + 1
        self.mask_id = k

    def sequences(self, length: int | None = None) -> torch.Tensor:
        """All K sequences (K, L): row i is shift i, x_j = (j - i) mod K (App B: roll(x⁽⁰⁾, i))."""
        length = self.length if length is None else length
        return (torch.arange(length)[None, :] - torch.arange(self.k)[:, None]) % self.k

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        shifts = torch.randint(self.k, (n,), generator=gen)
        return self.sequences()[shifts]  # (n, L)

    def log_prob(self, ids: torch.Tensor) -> torch.Tensor:
        """log(1/K) for a cyclic shift, -inf otherwise: (n,) float64."""
        ids = self._check_ids(ids, allow_mask=False, what="ids")
        offsets = torch.arange(ids.shape[1])
        is_shift = ((ids[:, :1] + offsets) % self.k == ids).all(dim=1)
        out = torch.full((ids.shape[0],), -math.inf, dtype=torch.float64)
        out[is_shift] = -math.log(self.k)
        return out

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Letters for words and ``_`` for the mask: shift 0 of K=7 is ``ABCDEFG``."""
        return "".join("_" if t == self.mask_id else _LETTERS[t] for t in torch.as_tensor(ids).tolist())

    def circle_embeddings(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """App B: e(k) = (cos 2πk/K, sin 2πk/K) on the unit circle, plus the zero mask row: (K+1, 2)."""
        if self.k > 7:
            raise ValueError(f"circle embeddings are for K <= 7 (App B); this source has K={self.k}")
        angle = 2 * math.pi * torch.arange(self.k, dtype=torch.float64) / self.k
        word_rows = torch.stack([angle.cos(), angle.sin()], dim=-1)
        return torch.cat([word_rows, torch.zeros(1, 2, dtype=torch.float64)]).to(dtype)

    def _shift_scores(self, log_evidence: torch.Tensor) -> torch.Tensor:
        """score[b, i] = log P(shift i) + Σ_j e_j(x_j of shift i): (B, K)."""
        b, length, k = log_evidence.shape
        seqs = self.sequences(length)  # (K, L)
        per_pos = torch.gather(log_evidence, 2, seqs.T.unsqueeze(0).expand(b, length, k))  # (B, L, K)
        return per_pos.sum(1) - math.log(k)

    def _log_partition(self, log_evidence: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self._shift_scores(log_evidence), dim=-1)

    def _log_marginals(self, log_evidence: torch.Tensor) -> torch.Tensor:
        seqs = self.sequences(log_evidence.shape[1])  # (K, L)
        log_post = torch.log_softmax(self._shift_scores(log_evidence), dim=-1)  # (B, K) over shifts
        one_hot = torch.nn.functional.one_hot(seqs, self.k).to(torch.float64)  # (K, L, W)
        return torch.einsum("bs,slw->blw", log_post.exp(), one_hot).log()
