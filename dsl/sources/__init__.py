"""Exactly solvable sources: samplers, exact likelihoods and exact oracle denoisers.

Both sources reduce every oracle question to one primitive, the exact per-position marginals of
P(x) Π_i exp(e_i(x_i)) for a per-position log-evidence table e (B, L, W) over the W words:

* ``masked_posterior``: e_i(w) = log P(observed token at i | x_i = w) (0 at masked positions);
* ``dsl_posterior``: e_i(w) = x_w · z_i, the tilted distribution of App A.1, which is the exact
  posterior for any per-token SNRs γ (the γ-dependent Gaussian terms cancel on the unit sphere).

Token ids: words are 0..W-1 and the mask id is W (last), so ``vocab_size = W + 1``.
"""

from __future__ import annotations

import math

import torch

from dsl.config import ConfigError, DataConfig

# Log-likelihood of a visible token that disagrees with x_i when ``visible_error=0``: the ε → 0⁺ limit.
# Any draft that some sequence matches exactly gets the exact posterior (e^-1e5 vanishes in float64);
# a draft no sequence matches is explained by the sequences with the fewest disagreements.
_MISMATCH_LOG_LIMIT = -1.0e5


class ExactSource:
    """Shared oracle interface; subclasses set the sizes and implement ``_log_marginals``."""

    vocab_size: int
    mask_id: int
    length: int

    @property
    def n_words(self) -> int:
        return self.vocab_size - 1

    # -- subclass primitive -------------------------------------------------------------------
    def _log_marginals(self, log_evidence: torch.Tensor) -> torch.Tensor:
        """log p(x_i = w | evidence) (B, L, W) for the tilted distribution P(x) Π_i exp(e_i(x_i))."""
        raise NotImplementedError

    # -- oracles ------------------------------------------------------------------------------
    def masked_posterior(self, draft: torch.Tensor, visible_error: float = 0.0) -> torch.Tensor:
        """Exact p(x_i | visible tokens of ``draft``) at every position: (B, L, V) float64.

        ``draft`` (B, L) holds words and ``mask_id``. With ``visible_error=ε > 0`` a visible token is an
        observation that was replaced by a uniformly drawn word with probability ε, so drafts with
        visible-but-wrong tokens (e.g. the cyclic recovery draft ABCDBFD) have a proper posterior;
        ``ε = 0`` is exact conditioning (its ε → 0⁺ limit where no sequence matches the draft).
        The mask column is 0.
        """
        draft = self._check_ids(draft, allow_mask=True, what="draft")
        if not 0.0 <= visible_error < 1.0:
            raise ValueError(f"visible_error={visible_error} must lie in [0, 1)")
        w = self.n_words
        if visible_error > 0.0:
            match = math.log1p(-visible_error + visible_error / w)
            mismatch = math.log(visible_error / w)
        else:
            match, mismatch = 0.0, _MISMATCH_LOG_LIMIT
        visible = (draft != self.mask_id).unsqueeze(-1)  # (B, L, 1)
        same = torch.nn.functional.one_hot(draft.clamp(max=w - 1), w).bool()  # (B, L, W)
        log_ev = torch.where(same, match, mismatch).to(torch.float64)
        log_ev = torch.where(visible, log_ev, torch.zeros_like(log_ev))
        return self._with_mask_column(self._log_marginals(log_ev).exp())

    def dsl_posterior(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Exact p(x_i | z) ∝ Σ P(x) Π_j exp(x_j · z_j) marginals (App A.1): (B, L, V) float64.

        ``z`` (B, L, d) noisy embeddings at any per-token SNRs, ``emb`` (V, d) the token embeddings
        (unit word rows; the mask row is never a data token and gets probability 0).
        """
        if emb.shape[0] != self.vocab_size:
            raise ValueError(f"emb has {emb.shape[0]} rows; this source needs vocab_size={self.vocab_size}")
        word_emb = emb[: self.n_words].to(torch.float64)  # (W, d); the mask row is last
        log_ev = z.to(torch.float64) @ word_emb.T  # (B, L, W): App A.1, exp(x · z) evidence
        return self._with_mask_column(self._log_marginals(log_ev).exp())

    def log_posterior(self, ids: torch.Tensor, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Exact log P(x = ids | z) = log P(x) + Σ_i x_i · z_i - log Σ_x' P(x') e^{Σ_i x'_i · z_i}: (B,).

        The end term of eq. 10 (App A.2): -E log P(x | z_t*) closes a path integral stopped at t*.
        """
        ids = self._check_ids(ids, allow_mask=False, what="ids")
        log_ev = z.to(torch.float64) @ emb[: self.n_words].to(torch.float64).T  # (B, L, W)
        tilt = log_ev.gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)  # Σ_i x_i · z_i
        return self.log_prob(ids) + tilt - self._log_partition(log_ev)

    def _log_partition(self, log_evidence: torch.Tensor) -> torch.Tensor:
        """log Σ_x P(x) Π_i exp(e_i(x_i)): (B,)."""
        raise NotImplementedError

    def posterior_mean(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The exact DSL denoiser x̂(z) = E[x | z] = Σ_v p(v | z) x_v (Sec 3): (B, L, d) float64."""
        return self.dsl_posterior(z, emb) @ emb.to(torch.float64)

    # -- helpers ------------------------------------------------------------------------------
    def _with_mask_column(self, word_probs: torch.Tensor) -> torch.Tensor:
        word_probs = word_probs / word_probs.sum(-1, keepdim=True)
        zeros = word_probs.new_zeros(word_probs.shape[:-1] + (1,))
        return torch.cat([word_probs, zeros], dim=-1)  # the mask id is the last column

    def _check_ids(self, ids: torch.Tensor, *, allow_mask: bool, what: str) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.dim() != 2:
            raise ValueError(f"{what} must have shape (B, L), got {tuple(ids.shape)}")
        ids = ids.long()
        hi = self.vocab_size if allow_mask else self.n_words
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= hi):
            accepted = f"0..{hi - 1}" + (" (mask included)" if allow_mask else " (words only, no mask)")
            raise ValueError(f"{what} holds token ids outside {accepted}")
        return ids


class SmoothedPosterior:
    """An exact source's per-token posterior mixed with ``smoothing`` of the uniform distribution over words:
    p_θ(x_i | z) = (1 − ε) p(x_i | z) + ε/W. Like any learned softmax it is never exactly one-hot, so
    x̂_θ(z) ≠ x even as γ → ∞ (the integrand of eq. 3 tends to a positive constant), while its exact
    likelihood bound stays computable: the stand-in for a learned model in likelihood checks.
    """

    def __init__(self, source: ExactSource, emb: torch.Tensor, smoothing: float):
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing={smoothing} must lie in [0, 1)")
        self.source, self.emb, self.smoothing = source, emb.to(torch.float64), float(smoothing)

    def word_probs(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L, W) float64: the smoothed per-token posterior over the words."""
        exact = self.source.dsl_posterior(z, self.emb)[..., : self.source.n_words]
        return (1 - self.smoothing) * exact + self.smoothing / self.source.n_words

    def posterior_mean(self, z: torch.Tensor) -> torch.Tensor:
        """x̂_θ(z) = Σ_w p_θ(w | z) x_w: (B, L, d) float64."""
        return self.word_probs(z) @ self.emb[: self.source.n_words]

    def factorised_log_prob(self, ids: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Σ_i log p_θ(x_i | z): (B,), the end term of eq. 4's bound for this model."""
        return self.word_probs(z).log().gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)


SOURCE_NAMES = ("hmm", "cyclic", "topics")  # data.source=<name> and oracle:<name>


# the DataConfig fields each synthetic source reads (build_source below)
SOURCE_KEYS = {"hmm": ("hmm_states", "hmm_words", "hmm_seed"), "cyclic": ("cyclic_k",),
               "topics": ("topics", "topics_switch", "topics_smoothing", "topics_seed")}


def unread_source_keys(values: dict) -> set[str]:
    """The ``data.<field>`` keys of ``values`` (a flat ``{"data.hmm_seed": 0, ...}``) that belong to a
    synthetic source nothing in ``values`` uses: a source is used when ``data.source`` is its name or a
    value names ``oracle:<name>``."""
    named = " ".join(str(v) for v in values.values())
    used = {n for n in SOURCE_NAMES if values.get("data.source") == n or f"oracle:{n}" in named}
    return {f"data.{k}" for n, keys in SOURCE_KEYS.items() if n not in used for k in keys} & set(values)


def build_source(name: str, data_cfg: DataConfig, length: int) -> ExactSource:
    """The synthetic source ``name`` (one of ``SOURCE_NAMES``) with its parameters from ``data_cfg``."""
    if name == "hmm":
        return HMMSource(data_cfg.hmm_states, data_cfg.hmm_words, data_cfg.hmm_seed, length)
    if name == "topics":
        return TopicSource(data_cfg.topics, data_cfg.topics_seed, length, switch=data_cfg.topics_switch,
                           smoothing=data_cfg.topics_smoothing)
    if name == "cyclic":
        if data_cfg.cyclic_k > 26:
            raise ConfigError(f"data.cyclic_k={data_cfg.cyclic_k} is too large: the cyclic toy takes 2..26")
        return CyclicSource(data_cfg.cyclic_k, length=length)
    raise ConfigError(f"data.source={name!r} is not a synthetic source: expected {', '.join(SOURCE_NAMES)}")


from dsl.sources.cyclic import CyclicSource  # noqa: E402  (the subclasses need ExactSource above)
from dsl.sources.hmm import HMMSource  # noqa: E402
from dsl.sources.topics import TopicSource  # noqa: E402

__all__ = ["ExactSource", "CyclicSource", "HMMSource", "TopicSource", "SOURCE_NAMES", "SOURCE_KEYS", "build_source",
           "unread_source_keys"]
