"""Held-out likelihood through the SNR path integral (eq. 3–4; Table 3 protocol, App C.3).

Each held-out sequence's -log P(x) is estimated by ``dsl.objectives.path_integral_nll`` from a
denoiser x̂(z) (a trained model's ``posterior_mean`` or an exact source's); the corpus figure pools
nats over all tokens, with the standard error of that pooled mean (per-sequence Monte Carlo errors are
independent, so their variances add). Text8-style: the character stream is cut into consecutive
non-overlapping chunks of 256 characters (App C.3: "short text chunks of length 256"), the tail that
does not fill a chunk dropped; with a character tokenizer bits per character = bits per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dsl.errors import UserError


def text8_chunks(text: str, encode: Callable[[str], list[int]], length: int = 256) -> torch.Tensor:
    """(N, length) ids of consecutive ``length``-character chunks of ``text``, each encoded alone."""
    if length < 1:
        raise UserError(f"chunk length={length}: must be >= 1")
    n = len(text) // length
    if n == 0:
        raise UserError(f"held-out text has {len(text)} characters, fewer than one chunk of {length}")
    rows = [encode(text[i * length:(i + 1) * length]) for i in range(n)]
    if any(len(r) != length for r in rows):
        raise UserError("text8-style chunks need a character-level tokenizer (one id per character)")
    return torch.tensor(rows, dtype=torch.long)


def factorised_log_prob(logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``(ids, z) -> Σ_i log p_θ(x_i | z)``: a model's end term of eq. 10 (factorised, so eq. 4's bound)."""

    def end_log_prob(ids: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits_fn(z).double(), dim=-1)  # (N, L, V)
        return logp.gather(-1, ids.to(logp.device).unsqueeze(-1)).squeeze(-1).sum(-1)

    return end_log_prob


def path_integral_likelihood(denoise_mean: Callable[[torch.Tensor], torch.Tensor],
                             embed: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, n_mc: int,
                             gen: torch.Generator, batch_size: int = 8, n_chars: int | None = None,
                             progress: bool = False, t_end: float | None = None,
                             end_log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                             ) -> dict[str, float]:
    """Pooled NLL of ``ids`` (N, L): ``{nll_per_token, stderr_per_token, bits_per_token, bits_per_char,
    nll_per_sequence, n_sequences, n_tokens}`` (nats unless named bits). ``n_chars`` defaults to the
    token count (character tokenizer).

    ``t_end=None``: eq. 3, the integral to ∞. ``t_end=t*`` with ``end_log_prob(ids, z) -> log P(ids | z)``:
    eq. 10, the integral to t* plus -E log P(x | z_t*) (with :func:`factorised_log_prob` of a model this is
    the upper bound of eq. 4, the "≤" of Table 3)."""
    if (t_end is None) != (end_log_prob is None):
        raise UserError("likelihood: t_end and end_log_prob go together (eq. 10) or not at all (eq. 3)")
    from dsl.objectives import nll_to_bits, path_integral_nll

    if ids.dim() != 2 or ids.numel() == 0:
        raise UserError(f"held-out ids must be a non-empty (N, L) tensor, got {tuple(ids.shape)}")
    starts = range(0, ids.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="likelihood", unit="batch")
    total, var = 0.0, 0.0
    for s in starts:
        batch = ids[s:s + batch_size]
        with torch.no_grad():
            x = embed(batch)  # (b, L, d)
        end = None
        if end_log_prob is not None:
            def end(z: torch.Tensor, rows: torch.Tensor, batch: torch.Tensor = batch) -> torch.Tensor:
                return end_log_prob(batch[rows.cpu()], z)
        nll, stderr = path_integral_nll(denoise_mean, x, n_mc, gen, t_end=t_end, end_log_prob=end)  # eq. 3 / 10
        total += float(nll.double().sum())
        var += float(stderr.double().pow(2).sum())
    n_tokens = ids.numel()
    n_chars = n_tokens if n_chars is None else n_chars
    return {"nll_per_token": total / n_tokens, "stderr_per_token": math.sqrt(var) / n_tokens,
            "bits_per_token": float(nll_to_bits(total, n_tokens)),
            "bits_per_char": float(nll_to_bits(total, n_tokens, n_chars)),
            "bits_per_char_stderr": float(nll_to_bits(math.sqrt(var), n_tokens, n_chars)),
            "nll_per_sequence": total / ids.shape[0], "n_sequences": int(ids.shape[0]), "n_tokens": n_tokens}


__all__ = ["factorised_log_prob", "path_integral_likelihood", "text8_chunks"]
