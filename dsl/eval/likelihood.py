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


def path_integral_likelihood(denoise_mean: Callable[[torch.Tensor], torch.Tensor],
                             embed: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, n_mc: int,
                             gen: torch.Generator, batch_size: int = 8, n_chars: int | None = None,
                             progress: bool = False) -> dict[str, float]:
    """Pooled NLL of ``ids`` (N, L): ``{nll_per_token, stderr_per_token, bits_per_token, bits_per_char,
    nll_per_sequence, n_sequences, n_tokens}`` (nats unless named bits). ``n_chars`` defaults to the
    token count (character tokenizer)."""
    from dsl.objectives import nll_to_bits, path_integral_nll

    if ids.dim() != 2 or ids.numel() == 0:
        raise UserError(f"held-out ids must be a non-empty (N, L) tensor, got {tuple(ids.shape)}")
    starts = range(0, ids.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="likelihood", unit="batch")
    total, var = 0.0, 0.0
    for s in starts:
        with torch.no_grad():
            x = embed(ids[s:s + batch_size])  # (b, L, d)
        nll, stderr = path_integral_nll(denoise_mean, x, n_mc, gen)  # (b,), (b,): eq. 3
        total += float(nll.double().sum())
        var += float(stderr.double().pow(2).sum())
    n_tokens = ids.numel()
    n_chars = n_tokens if n_chars is None else n_chars
    return {"nll_per_token": total / n_tokens, "stderr_per_token": math.sqrt(var) / n_tokens,
            "bits_per_token": float(nll_to_bits(total, n_tokens)),
            "bits_per_char": float(nll_to_bits(total, n_tokens, n_chars)),
            "bits_per_char_stderr": float(nll_to_bits(math.sqrt(var), n_tokens, n_chars)),
            "nll_per_sequence": total / ids.shape[0], "n_sequences": int(ids.shape[0]), "n_tokens": n_tokens}


__all__ = ["path_integral_likelihood", "text8_chunks"]
