"""The DSL denoiser: softmax converter + time-invariant DiT (Sec 4.2, 4.3, Alg 1 line 18).

    h = Convert(z)                      (B, L, hidden)      Sec 4.2
    ℓ = f_θ(h [, ‖z‖])                  (B, L, V)           Alg 1 line 18, Sec 4.3
    p_θ(· | z) = softmax(ℓ) with p(mask) = 0

Alg 1 line 18 writes ℓ ← f_θ(h, ‖z‖) while Sec 4.3 says the corruption level reaches the backbone only
through Convert(z). ``ModelConfig.znorm_input`` picks the reading: off (default) follows Sec 4.3; on adds a
zero-initialised linear map of log(1 + ‖z_i‖) to each position's converter output, so training starts from
the Sec 4.3 model and may learn to use the norm. (‖z_i‖ ≈ γ_i for large γ_i, so the log keeps its scale
comparable across SNRs.)
"""

from __future__ import annotations

import torch
from torch import nn

from dsl.config import ChannelConfig, ModelConfig
from dsl.converter import SoftmaxConverter
from dsl.models.dit import DiT, mask_logit_bias


class DSLModel(nn.Module):
    def __init__(self, cfg: ModelConfig, channel: ChannelConfig, gen: torch.Generator | None = None):
        super().__init__()
        if cfg.vocab_size < 2:
            raise ValueError(f"model.vocab_size={cfg.vocab_size}: resolve it from the tokenizer first")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.mask_id = cfg.mask_id if cfg.mask_id >= 0 else cfg.vocab_size - 1
        self.converter = SoftmaxConverter(cfg.vocab_size, channel.embed_dim, cfg.hidden, self.mask_id,
                                          channel.beta_init, channel.mask_bias, gen)
        self.backbone = DiT(cfg, with_embedding=False)
        if cfg.znorm_input:
            self.znorm_proj = nn.Linear(1, cfg.hidden)
            nn.init.zeros_(self.znorm_proj.weight)
            nn.init.zeros_(self.znorm_proj.bias)

    def token_embeddings(self) -> torch.Tensor:
        """W_token (V, d): unit rows, zero mask row (learned; shared by the channel and the converter)."""
        return self.converter.token_embeddings()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Clean embeddings x = W_token[ids] (B, L, d) (Alg 1 line 1); the mask id maps to 0."""
        return self.token_embeddings()[ids]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) of p_θ(x_i | z), in the backbone's output dtype (:meth:`DiT.forward`); the mask
        logit is −inf (never predicted)."""
        h = self.converter(z)  # (B, L, hidden)
        extra = None
        if self.cfg.znorm_input:
            # Alg 1 line 18 reading (see module docstring): f_θ(h, ‖z‖) = f_θ(h + A log(1 + ‖z_i‖))
            extra = self.znorm_proj(torch.log1p(z.float().norm(dim=-1, keepdim=True)))  # (B, L, hidden)
        # p(mask) = 0 through the output layer's bias (−inf at the mask id): filling the logits instead
        # costs (B, L, V) copies in backward
        logit_bias = mask_logit_bias(self.vocab_size, self.mask_id, float("-inf"), h.device)
        return self.backbone(inputs_embeds=h, extra=extra, logit_bias=logit_bias)  # (B, L, V)

    def posterior_mean(self, z: torch.Tensor) -> torch.Tensor:
        """x̂(z) = Σ_v p_θ(v | z) x_v (B, L, d): the MMSE denoiser of the path-integral NLL (eq. 3)."""
        probs = torch.softmax(self.forward(z).float(), dim=-1)  # (B, L, V)
        return probs @ self.token_embeddings().to(probs.dtype)


__all__ = ["DSLModel"]
