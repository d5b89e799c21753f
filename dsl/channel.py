"""The DSL noise channel: spherical token embeddings, the mixed SNR sampler and z = γx + √γ ε.

Paper: Sec 3 (channel), Sec 4.1 and Alg 1 (token-wise mixed SNR with smoothed ROAR endpoints),
Sec 7.5 (atomic endpoints), App C.1 (defaults). Every random draw comes from an explicit
``torch.Generator``; the ``*_rows`` helpers draw row b from ``gens[b]`` only, so the corruption of one
sequence depends on its own generator and not on which other sequences share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsl.config import ChannelConfig
from dsl.devices import to_device


def spherical_embeddings(vocab_size: int, dim: int, mask_id: int, gen: torch.Generator,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random unit-norm token embeddings ``(V, d)`` with an all-zero row at ``mask_id``.

    Sec 3: x = enc(s) lies on the unit sphere, ‖x‖ = 1; the mask is the zero vector, the point every
    γ = 0 corruption sits at (Sec 4.2: "an additional zero row for the mask token").
    """
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must lie in [0, vocab_size={vocab_size})")
    emb = torch.randn(vocab_size, dim, generator=gen, dtype=torch.float64)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    emb[mask_id] = 0.0
    return emb.to(dtype)


def sample_snr(shape: Sequence[int] | torch.Size | int, cfg: ChannelConfig,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise SNRs γ and the ROAR-endpoint indicator (Alg 1 lines 2-15).

    Every position draws the same four uniforms/normals whatever branch it lands in, so the stream
    consumed from ``gen`` depends only on ``shape`` (not on the config or on the outcomes).
    Returns ``gamma`` (float32, ``shape``) and ``is_roar`` (bool, ``shape``).
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    in_roar = torch.rand(shape, generator=gen, dtype=torch.float64)
    high_end = torch.rand(shape, generator=gen, dtype=torch.float64)
    uniform = torch.rand(shape, generator=gen, dtype=torch.float64)
    normal = torch.randn(shape, generator=gen, dtype=torch.float64)

    # Alg 1 line 2: i ∈ M independently with probability 1/k (eq. 17: p_ROAR = 1/k = 0.1)
    is_roar = in_roar < cfg.p_roar
    # Alg 1 line 5: b_i ~ Bernoulli(1/2)
    is_high = high_end < 0.5
    if cfg.roar == "atomic":
        # Sec 7.5 ablation: endpoints are the atoms {0 (mask), γ_max (clean)}
        endpoint = torch.where(is_high, torch.full_like(uniform, cfg.gamma_max), torch.zeros_like(uniform))
    else:
        # Alg 1 lines 7 and 9: γ ~ U(0, γ_min) if b_i = 0, γ ~ U(cγ_max, γ_max) if b_i = 1
        low = uniform * cfg.gamma_min
        high = cfg.c * cfg.gamma_max + uniform * (1.0 - cfg.c) * cfg.gamma_max
        endpoint = torch.where(is_high, high, low)
    # Alg 1 line 12, eq. 18: γ ~ LogNormal(μ, σ²), i.e. log γ ~ N(μ, σ²)
    continuous = torch.exp(cfg.lognormal_mu + cfg.lognormal_sigma * normal)
    if cfg.lognormal_clip:
        # Alg 1 line 13 (optional; App C.1 leaves it off)
        continuous = continuous.clamp(cfg.gamma_min, cfg.gamma_max)
    gamma = torch.where(is_roar, endpoint, continuous)
    return gamma.float(), is_roar


def sample_snr_rows(gens: Sequence[torch.Generator], length: int,
                    cfg: ChannelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_snr`` for a batch: row b (``length`` positions) is drawn from ``gens[b]`` alone."""
    rows = [sample_snr((length,), cfg, g) for g in gens]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def corrupt(x: torch.Tensor, gamma: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """z = γx + √γ ε with ε ~ N(0, I) (Sec 3; Alg 1 line 17).

    x: (B, L, d) clean embeddings; gamma: (B, L) per-token SNR (γ = 0 gives z = 0, the mask point).
    """
    eps = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=gen.device).to(x.device)
    return _channel(x, gamma, eps)


def corrupt_rows(x: torch.Tensor, gamma: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """``corrupt`` with the noise of row b drawn from ``gens[b]`` alone (x: (B, L, d))."""
    if len(gens) != x.shape[0]:
        raise ValueError(f"corrupt_rows got {len(gens)} generators for a batch of {x.shape[0]} rows")
    eps = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device) for g in gens])
    return _channel(x, gamma, to_device(eps, x.device))


def _channel(x: torch.Tensor, gamma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    gamma = to_device(gamma, x.device).to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    # Alg 1 line 17: z_i = γ_i x_i + √γ_i ε_i
    return gamma * x + gamma.sqrt() * eps


__all__ = ["spherical_embeddings", "sample_snr", "sample_snr_rows", "corrupt", "corrupt_rows"]
