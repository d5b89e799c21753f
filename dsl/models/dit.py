"""MDLM's DiT backbone with the time conditioning held at σ = 0 (Sec 4.3; kuleshov-group/mdlm
``models/dit.py`` ``DIT``).

The module tree and parameter names are MDLM's (``vocab_embed.embedding``, ``sigma_map.mlp.0.weight``,
``rotary_emb.inv_freq``, ``blocks.i.attn_qkv.weight``, ``output_layer.adaLN_modulation.bias`` ...), and
parameters are registered in MDLM's order, so an official state dict or EMA list maps on one to one.

Differences from the official code, none of which change the function computed in fp32:
  * attention is ``torch.nn.functional.scaled_dot_product_attention`` (no flash-attn), rotary is applied
    with plain tensor ops (half-split, as flash-attn's ``apply_rotary_emb_qkv_`` with interleaved=False);
  * σ is fixed at 0 (MDLM's ``time_conditioning=False``, Sec 4.3: "a DiT with a constant t = 0"). The
    adaLN conditioning c = SiLU(sigma_map(φ(0))) is still computed from ``sigma_map``'s weights (it is
    trained); outside training it is cached and recomputed whenever those weights change;
  * autocast is left to the caller (MDLM forces bf16 inside the forward). Logits come back in fp32, except
    under half-precision autocast, where they stay in the output layer's dtype as in MDLM's ``DIT.forward``:
    an fp32 copy would be 4 more bytes per logit (13 GB at batch 64 × 1,024 × 50,258), and the loss head
    (``dsl.objectives``) upcasts them a block at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsl.config import ModelConfig
from dsl.errors import UserError

FREQ_EMBED_DIM = 256  # MDLM's TimestepEmbedder frequency_embedding_size
ROTARY_BASE = 10_000


class EmbeddingLayer(nn.Module):
    """A raw (V, d) parameter named ``embedding`` (MDLM's name; not ``weight``)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids]


def timestep_features(sigma: torch.Tensor, dim: int = FREQ_EMBED_DIM, max_period: float = 10_000.0):
    """φ(σ) = [cos(σ ω_k)]_k ++ [sin(σ ω_k)]_k, ω_k = max_period^(−k/(dim/2)) (cos half first). (N, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device)
                      / half)
    args = sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """``sigma_map``: φ(σ) -> Linear(256, cond) -> SiLU -> Linear(cond, cond) (the outer SiLU is in DiT)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(sigma).to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Holds ``inv_freq`` (d_h/2,) = base^(−2j/d_h) as a persistent buffer, as MDLM does."""

    def __init__(self, head_dim: int):
        super().__init__()
        inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq)

    def cos_sin(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos θ, sin θ (L, d_h/2) with θ_{p,j} = p · inv_freq_j."""
        pos = torch.arange(length, device=device, dtype=self.inv_freq.dtype)
        angles = pos[:, None] * self.inv_freq[None]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation of x (B, H, L, d_h), pairs (x_j, x_{j+d/2}) for j < d/2:
    (x_j, x_{j+d/2}) -> (x_j cos θ − x_{j+d/2} sin θ, x_{j+d/2} cos θ + x_j sin θ)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # MDLM casts cos/sin to the qkv dtype
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LayerNorm(nn.Module):
    """Layer norm without affine, eps 1e-5, in fp32 (autocast off), then times the learned ``weight``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [self.dim])
        return x * self.weight[None, None, :]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """One MDLM ``DDiTBlock``; submodules in MDLM's registration order (the EMA list relies on it)."""

    def __init__(self, dim: int, heads: int, cond_dim: int, mlp_ratio: int, dropout: float, causal: bool):
        super().__init__()
        self.heads, self.dropout, self.causal = heads, dropout, causal
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def _residual(self, h: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        # MDLM's bias_dropout_add_scale: h + gate * dropout(update)
        return h + gate * F.dropout(update, p=self.dropout, training=self.training)

    def forward(self, h: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, D = h.shape
        # chunk order fixed by MDLM: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)  # each (B|1, 1, D)

        u = modulate(self.norm1(h), sh1, sc1)
        qkv = self.attn_qkv(u).view(B, L, 3, self.heads, D // self.heads)  # [q heads | k heads | v heads]
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, d_h)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # scale 1/√d_h, no dropout
        attn = attn.transpose(1, 2).reshape(B, L, D)
        h = self._residual(h, g1, self.attn_out(attn))

        u2 = modulate(self.norm2(h), sh2, sc2)
        return self._residual(h, g2, self.mlp(u2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        for p in (*self.linear.parameters(), *self.adaLN_modulation.parameters()):
            nn.init.zeros_(p)

    def forward(self, h: torch.Tensor, c: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        bias = self.linear.bias if logit_bias is None else self.linear.bias + logit_bias
        return F.linear(modulate(self.norm_final(h), shift, scale), self.linear.weight, bias)


def mask_logit_bias(vocab_size: int, mask_id: int, value: float, device: torch.device | str) -> torch.Tensor:
    """A ``logit_bias`` (V,) for :meth:`DiT.forward`: ``value`` on the mask logit, 0 elsewhere. Made on the
    device (a copy of a host-built vector would wait for the queued kernels)."""
    mask_col = torch.full((1,), mask_id, dtype=torch.long, device=device)
    return torch.zeros(vocab_size, device=device).index_fill_(0, mask_col, value)


class DiT(nn.Module):
    """Time-invariant DiT (Sec 4.3). ``causal=True`` gives the AR transformer of the same shape.

    ``with_embedding=False`` drops ``vocab_embed`` for models that always feed ``inputs_embeds`` (the DSL
    model): a parameter that never gets a gradient would stall distributed data parallel.
    """

    def __init__(self, cfg: ModelConfig, causal: bool = False, *, with_embedding: bool = True):
        super().__init__()
        if cfg.vocab_size < 2:
            raise ValueError(f"model.vocab_size={cfg.vocab_size}: resolve it from the tokenizer first "
                             "(dsl.models.build_model does)")
        cfg.validate()
        self.cfg, self.causal = cfg, causal
        if with_embedding:
            self.vocab_embed = EmbeddingLayer(cfg.hidden, cfg.vocab_size)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.hidden // cfg.heads)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden, cfg.heads, cfg.cond_dim, cfg.mlp_ratio, cfg.dropout, causal)
            for _ in range(cfg.blocks))
        self.output_layer = FinalLayer(cfg.hidden, cfg.vocab_size, cfg.cond_dim)
        self._cond_cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def mask_id(self) -> int:
        return self.cfg.mask_id if self.cfg.mask_id >= 0 else self.cfg.vocab_size - 1

    def conditioning(self) -> torch.Tensor:
        """c = SiLU(sigma_map(φ(σ=0))) (1, cond_dim): constant (MDLM's ``time_conditioning=False``
        zeroes σ), cached outside training."""
        params = list(self.sigma_map.parameters())
        # A cached c must not hide a gradient path to sigma_map, and must follow in-place weight changes
        # (optimizer steps, EMA swaps, load_state_dict all bump the parameters' version counters).
        cacheable = not self.training and not (torch.is_grad_enabled() and params[0].requires_grad)
        key = tuple((id(p), p._version, p.data_ptr(), p.device, p.dtype) for p in params)
        if cacheable and self._cond_cache is not None and self._cond_cache[0] == key:
            return self._cond_cache[1]
        sigma = torch.zeros(1, device=params[0].device)
        c = F.silu(self.sigma_map(sigma))  # outer SiLU, as in MDLM's DIT.forward
        if cacheable:
            self._cond_cache = (key, c.detach())
        return c

    def forward(self, ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                extra: torch.Tensor | None = None, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) from ids (B, L) or inputs_embeds (B, L, hidden): float32, or the autocast dtype
        (bf16/fp16) under half-precision autocast.

        ``extra`` (B, L, hidden), if given, is added to the input embeddings (the DSL model's ‖z‖ input);
        ``logit_bias`` (V,), if given, to the output layer's bias (a constant folded into its GEMM: no pass
        over the (B, L, V) logits, forward or backward).
        """
        if (ids is None) == (inputs_embeds is None):
            raise ValueError("DiT.forward takes exactly one of ids or inputs_embeds")
        if ids is not None:
            if not hasattr(self, "vocab_embed"):
                raise ValueError("this DiT was built with_embedding=False; pass inputs_embeds")
            h = self.vocab_embed(ids)  # (B, L, D)
        else:
            h = inputs_embeds
        if extra is not None:
            h = h + extra
        length = h.shape[1]
        if length > self.cfg.length:
            raise UserError(f"sequence of {length} tokens is longer than model.length={self.cfg.length}; "
                            "shorten the data or raise model.length")
        c = self.conditioning()  # (1, cond)
        cos, sin = self.rotary_emb.cos_sin(length, h.device)
        for block in self.blocks:
            h = block(h, c, cos, sin)
        logits = self.output_layer(h, c, logit_bias)
        return logits if logits.dtype in (torch.bfloat16, torch.float16) else logits.float()


__all__ = ["DiT", "mask_logit_bias", "DiTBlock", "FinalLayer", "LayerNorm", "Rotary", "TimestepEmbedder", "EmbeddingLayer",
           "apply_rotary", "timestep_features"]
