"""The one transition every masked sampler applies: ReMDM's posterior as its ``_ddpm_caching_update``
(kuleshov-group/remdm ``diffusion.py``) computes it.

Transition (the ReMDM posterior; σ = 0 is MDLM's update), per position, with α_t = 1 − t:

    visible z_t = v:  keep v with prob. 1 − σ, remask with prob. σ            (SUBS: p_x0 one-hot at v)
    masked:           q(v) = p_x0(v)·(α_s − (1−σ)α_t)/(1−α_t),   q(m) = (1 − α_s − σα_t)/(1−α_t)

Both coefficients are clipped to [0, 1]: the official code draws by Gumbel-max over unnormalised
weights, where a negative weight never wins, which is the same clipping (forward-backward's uncapped σ
makes the masked weight negative on coarse grids, e.g. T = 2). A masked position is revealed iff
u₁ < P(unmask); its token is then drawn from the nucleus-filtered p_x0 by a float64 inverse CDF with u₂
(exact categorical sampling: ReMDM casts its Gumbel-max weights to float64 because lower precision
sharpens the distribution); the *candidates* (:mod:`dsl.sampling.candidates`) do that draw.
"""

from __future__ import annotations

import torch

from dsl.sampling.rules import StepRule


def transition_coefficients(masked: torch.Tensor, rule: StepRule, sigma: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(unmask) at masked positions, P(remask) at visible positions), each (B, L) float64.

    ``sigma`` (B, L) is the per-position σ (a constant for every sampler but remdm-conf).
    """
    a_t, a_s = rule.alpha_t, rule.alpha_s
    sigma_masked = torch.zeros_like(sigma) if rule.confidence else sigma  # conf: masked positions are MDLM
    unmask = (a_s - (1 - sigma_masked) * a_t) / (1 - a_t)  # masked branch, mass on p_x0
    unmask = torch.where(masked, unmask.clamp(0, 1), torch.zeros_like(unmask))
    remask = torch.where(masked, torch.zeros_like(sigma), sigma.clamp(0, 1))  # visible branch
    return unmask, remask


def transition_probs(p_x0: torch.Tensor, draft: torch.Tensor, mask_id: int, rule: StepRule,
                     sigma: torch.Tensor) -> torch.Tensor:
    """The full transition q(z_s | z_t) (B, L, V) float64 that :func:`apply_transition` samples from."""
    masked = draft == mask_id
    unmask, remask = transition_coefficients(masked, rule, sigma)
    q = torch.where(masked.unsqueeze(-1), p_x0 * unmask.unsqueeze(-1),
                    torch.nn.functional.one_hot(draft, p_x0.shape[-1]).double() * (1 - remask).unsqueeze(-1))
    q[..., mask_id] = torch.where(masked, 1 - unmask, remask)
    return q


def apply_transition(draft: torch.Tensor, candidates, unmask: torch.Tensor, remask: torch.Tensor,
                     uniforms: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One draw from :func:`transition_probs` given uniforms (B, 2, L) float64.

    p_x0 at masked positions comes from ``candidates.draw(reveal, u)`` -> (token, its probability) for
    the revealed positions in row-major order, by float64 inverse CDF with u: a :class:`NucleusCache`, or
    :func:`dense_candidates` around a dense p_x0. Returns (new draft, revealed (B, L) bool, p_x0 of each
    revealed token (B, L), 0 elsewhere).
    """
    masked = draft == mask_id
    reveal = masked & (uniforms[:, 0] < unmask)
    remasked = ~masked & (uniforms[:, 0] < remask)
    new = draft.clone()
    new[remasked] = mask_id
    chosen_prob = torch.zeros(draft.shape, dtype=torch.float64, device=draft.device)
    if reveal.any():
        new[reveal], chosen_prob[reveal] = candidates.draw(reveal, uniforms[:, 1][reveal])
    return new, reveal, chosen_prob


def confidence_sigma(scores: torch.Tensor, masked: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """remdm-conf: σ_ℓ = softmax_ℓ(ψ)·σ_max, set to 0 at masked positions without renormalising."""
    eta = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all −∞ (step 0) gives NaN: no visible token yet
    return torch.where(masked, torch.zeros_like(eta), eta) * sigma_max
