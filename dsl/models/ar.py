"""Autoregressive transformer of the DiT's shape: the AR reference row and a trainable oracle LM.

It is :class:`~dsl.models.dit.DiT` with causal attention (same blocks, rotary, adaLN at the constant
σ = 0 conditioning, same parameter names), so its size matches the diffusion model it is compared with.
Logits at position i predict token i+1.
"""

from __future__ import annotations

import torch

from dsl.config import ModelConfig
from dsl.models.dit import DiT


class ARTransformer(DiT):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, causal=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Next-token logits (B, L, V) float32: row i depends on ids[:, :i+1] only."""
        return super().forward(ids)


__all__ = ["ARTransformer"]
