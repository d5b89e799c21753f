"""Held-out likelihood through the SNR path integral (eq. 3–4, 10; Table 3 protocol, App C.3).

Each held-out sequence's -log P(x) is estimated by ``dsl.objectives.path_integral_nll`` from a
denoiser x̂(z) (a trained model's ``posterior_mean`` or an exact source's); the corpus figure pools
nats over all tokens, with the standard error of that pooled mean (per-sequence Monte Carlo errors are
independent, so their variances add).

Which contour (:func:`resolve_t_end`):

- a learned model (the default): eq. 4 / eq. 10, the integral to t* (default: γ_max of the run's channel,
  the SNR at which training treats a token as clean) plus the end term -E Σ_i log p_θ(x_i | z_t*).
  The factorised end term makes this an **upper bound** on -log P_θ(x) (the "≤" of Table 3).
- eq. 3, the integral to γ = ∞, only for an exact denoiser: a learned softmax is never exactly one-hot,
  so ‖x − x̂(z_t)‖² tends to a positive constant, the integral diverges and the Monte Carlo estimate has
  no finite mean (a 0.1 %-smoothed exact oracle on the cyclic toy gives sequences at tens of nats
  against an exact 1.95). It stays reachable for a learned model only with ``allow_eq3``.

Bits per character divide the pooled nats by the number of *text* characters of what was scored
(:func:`count_text_characters`): BOS/EOS/mask/pad ids are not characters, their nats still count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from dsl.errors import UserError

DEFAULT_GAMMA_MAX = 50.0  # App C.1's γ_max, the channel default; a run's own channel overrides it


def resolve_t_end(t_end: str | float, gamma_max: float, *, exact_denoiser: bool = False,
                  allow_eq3: bool = False) -> float | None:
    """The contour's end t* from a setting: ``gamma_max`` (or 0) = the channel's γ_max (eq. 4 / 10),
    ``inf`` = eq. 3 (returns None), a positive number = that t*.

    Eq. 3 of a learned model is one :class:`UserError` unless ``allow_eq3`` (see the module docstring)."""
    raw = str(t_end).strip().lower()
    try:
        value = float(gamma_max) if raw in ("gamma_max", "0", "0.0") else float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise UserError(f"t_end={t_end}: expected gamma_max (the run's channel γ_max), a positive t* or inf (eq. 3)")
    if math.isinf(value):
        if not (exact_denoiser or allow_eq3):
            raise UserError("t_end=inf (eq. 3, the integral to γ=∞) needs an exact denoiser: a learned model is "
                            "never exactly one-hot, so the integral diverges; use t_end=gamma_max (eq. 4's upper "
                            "bound) or a finite t*, or set allow_eq3=true to ask anyway")
        return None
    return value


def count_text_characters(ids: torch.Tensor, tokenizer: Any) -> int:
    """Characters of text in the blocks ``ids`` (N, L): the denominator of bits per character.

    BOS, EOS, mask and pad ids are not text (decoding them as ``[BOS]`` would add 5 characters each).
    A character tokenizer (text8's) has one character per non-special id; any other tokenizer's text is
    what its non-special ids decode to, counted in Unicode characters. ``tokenizer=None``: one per token."""
    if tokenizer is None:
        return int(ids.numel())
    special = torch.tensor(sorted(tokenizer.special_ids), dtype=torch.long)
    text = ~torch.isin(ids, special)
    if tokenizer.kind == "char":
        return int(text.sum())
    return sum(len(tokenizer.decode(row[keep].tolist())) for row, keep in zip(ids, text))


def factorised_log_prob(logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``(ids, z) -> Σ_i log p_θ(x_i | z)``: a model's end term of eq. 10 (factorised, so eq. 4's bound)."""

    def end_log_prob(ids: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits_fn(z).double(), dim=-1)  # (N, L, V)
        return logp.gather(-1, ids.to(logp.device).unsqueeze(-1)).squeeze(-1).sum(-1)

    return end_log_prob


def path_integral_likelihood(denoise_mean: Callable[[torch.Tensor], torch.Tensor],
                             embed: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, n_mc: int,
                             gen: torch.Generator, batch_size: int = 8, n_chars: int | None = None,
                             progress: bool = False, *, t_end: str | float = "gamma_max",
                             gamma_max: float = DEFAULT_GAMMA_MAX,
                             end_log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                             exact_denoiser: bool = False, allow_eq3: bool = False) -> dict[str, Any]:
    """Pooled NLL of ``ids`` (N, L): ``{nll_per_token, stderr_per_token, bits_per_token, bits_per_char,
    nll_per_sequence, nll_max_sequence, n_sequences, n_tokens, n_chars, t_end, estimator}`` (nats unless
    named bits; the largest single-sequence estimate shows a diverging integral at once).
    ``n_chars`` (the text characters scored, :func:`count_text_characters`) defaults to the token count.

    ``t_end`` as in :func:`resolve_t_end` (default: t* = ``gamma_max``): eq. 10, the integral to t* plus
    -E log P(x | z_t*) with ``end_log_prob(ids, z) -> log P(ids | z)`` — :func:`factorised_log_prob` of a
    model (eq. 4's upper bound) or an exact source's ``log_posterior`` (exact). ``t_end=inf``: eq. 3, for
    ``exact_denoiser=True`` (or ``allow_eq3``); no end term."""
    from dsl.objectives import nll_to_bits, path_integral_nll

    t_star = resolve_t_end(t_end, gamma_max, exact_denoiser=exact_denoiser, allow_eq3=allow_eq3)
    if t_star is not None and end_log_prob is None:
        raise UserError(f"likelihood to t*={t_star:g} (eq. 10) needs the end term log P(x | z_t*): pass "
                        f"end_log_prob (a model's factorised_log_prob), or t_end=inf for an exact denoiser")
    if ids.dim() != 2 or ids.numel() == 0:
        raise UserError(f"held-out ids must be a non-empty (N, L) tensor, got {tuple(ids.shape)}")
    starts = range(0, ids.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="likelihood", unit="batch")
    total, var, worst = 0.0, 0.0, -math.inf
    for s in starts:
        batch = ids[s:s + batch_size]
        with torch.no_grad():
            x = embed(batch)  # (b, L, d)
        end = None
        if t_star is not None:
            def end(z: torch.Tensor, rows: torch.Tensor, batch: torch.Tensor = batch) -> torch.Tensor:
                return end_log_prob(batch[rows.cpu()], z)
        nll, stderr = path_integral_nll(denoise_mean, x, n_mc, gen, t_end=t_star, end_log_prob=end)  # eq. 3 / 10
        total += float(nll.double().sum())
        worst = max(worst, float(nll.max()))
        var += float(stderr.double().pow(2).sum())
    n_tokens = ids.numel()
    n_chars = n_tokens if n_chars is None else n_chars
    estimator = "eq. 3 (integral to γ=∞)" if t_star is None else (
        f"eq. 10 to t*={t_star:g} + end term" + ("" if exact_denoiser else " (eq. 4: an upper bound)"))
    return {"nll_per_token": total / n_tokens, "stderr_per_token": math.sqrt(var) / n_tokens,
            "bits_per_token": float(nll_to_bits(total, n_tokens)),
            "bits_per_char": float(nll_to_bits(total, n_tokens, n_chars)),
            "bits_per_char_stderr": float(nll_to_bits(math.sqrt(var), n_tokens, n_chars)),
            "nll_per_sequence": total / ids.shape[0], "nll_max_sequence": worst, "n_sequences": int(ids.shape[0]), "n_tokens": n_tokens,
            "n_chars": int(n_chars), "t_end": t_star, "estimator": estimator}


__all__ = ["DEFAULT_GAMMA_MAX", "count_text_characters", "factorised_log_prob", "path_integral_likelihood",
           "resolve_t_end"]
