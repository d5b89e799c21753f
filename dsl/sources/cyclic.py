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

    def circle_bound(self, t_end: float, smoothing: float = 0.0, factorised: bool = True,
                     nodes: tuple[int, int] = (96, 64)) -> float:
        """Eq. 10 on the contour γ_i = t for circle embeddings, evaluated by quadrature (nats per sequence):

            ½ ∫₀^{t*} E‖x − x̂_θ(z_t)‖² dt − E log P_θ(x | z_t*),

        for the posterior smoothed by ε = ``smoothing`` (:class:`~dsl.sources.SmoothedPosterior`), with
        the factorised end term Σ_i log p_θ(x_i | z) (eq. 4's bound) or, ``factorised=False``, the exact
        joint log P(x | z) (then ε must be 0 and the value is −log P(x) = log K, eq. 10's identity).

        Why it is exact: with e(w) = e^{2πiw/K} as complex numbers, the score of shift s is
        Re(e^{2πis/K} C) with C = Σ_j e^{−2πij/K} z_j = tL + √(tL) g for shift 0 and g a standard complex
        Gaussian, so every posterior (and x̂_θ, whose error is L|1 − (1−ε) Σ_s p_s e^{−2πis/K}|² since the
        word embeddings sum to 0) depends on z only through g ∈ R². The z-expectation is a 2-d Gauss–Hermite
        rule and the t-integral a Gauss–Legendre rule in log t; all K shifts give the same value.
        ``nodes`` = (t nodes, Hermite nodes per axis); with ε = 0 the default gives log K to ~1e-6.
        """
        import numpy as np

        if self.k > 7:
            raise ValueError(f"circle embeddings are for K <= 7 (App B); this source has K={self.k}")
        if not factorised and smoothing != 0.0:
            raise ValueError("the joint end term is the exact source's; smoothing needs factorised=True")
        k, length, eps = self.k, self.length, float(smoothing)
        herm_x, herm_w = np.polynomial.hermite_e.hermegauss(nodes[1])  # weight e^{-x²/2}
        g1, g2 = (torch.tensor(a, dtype=torch.float64) for a in np.meshgrid(herm_x, herm_x, indexing="ij"))
        weight = torch.tensor(np.outer(herm_w, herm_w) / (2 * math.pi), dtype=torch.float64).reshape(-1)
        g1, g2 = g1.reshape(-1), g2.reshape(-1)
        angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k  # (K,)

        def log_post(t: torch.Tensor) -> torch.Tensor:  # (T, G, K): log p(shift | z_t), shift 0 the truth
            tl = (t * length)[:, None, None]
            noise = g1[:, None] * angle.cos() - g2[:, None] * angle.sin()  # (G, K)
            return torch.log_softmax(tl * angle.cos() + tl.sqrt() * noise, dim=-1)

        t_lo = 1e-9  # below it the integrand is its t = 0 value, L (no information yet)
        leg_x, leg_w = (torch.tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(nodes[0]))
        lo, hi = math.log(t_lo), math.log(t_end)
        t = torch.exp(lo + (hi - lo) * (leg_x + 1) / 2)  # (T,)
        p = log_post(t).exp()
        re, im = (p * angle.cos()).sum(-1), -(p * angle.sin()).sum(-1)  # Σ_s p_s e^{−2πis/K}
        mean_error = (length * ((1 - (1 - eps) * re) ** 2 + ((1 - eps) * im) ** 2)) @ weight  # (T,)
        integral = length * t_lo + float(((hi - lo) / 2 * leg_w * t * mean_error).sum())
        lp = log_post(torch.tensor([float(t_end)], dtype=torch.float64))[0, :, 0]
        if factorised:  # every position's marginal of the true word is p(shift 0 | z)
            end_term = length * torch.log((1 - eps) * lp.exp() + eps / k)
        else:
            end_term = lp
        return 0.5 * integral - float(end_term @ weight)

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
