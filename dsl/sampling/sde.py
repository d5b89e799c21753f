"""Continuous DSL sampler: Euler–Maruyama on the unconditional SDE with per-token SNR paths (Sec 3, eq. 2).

    eq. 2:  dz_i = x̂_i(z) γ̇_i dt + √γ̇_i dW_i,   z(0) = 0,   x̂(z) = E[x | z] (SNR-invariant, Sec 3)

With the path written in its own SNR increments Δγ_i = γ_i(τ_{k+1}) − γ_i(τ_k) over a uniform grid
τ_k = k/T on [0, 1], one Euler–Maruyama step is z_i ← z_i + x̂_i(z) Δγ_i + √Δγ_i ε_i. The run ends at
γ_i = ``sde_gamma_end`` for every token with a final argmax of the posterior p(x_i | z).

Paths (γ_i(τ) = γ_end·g_i(τ)):
    linear          g_i(τ) = τ for every token (Fig 1b's γ_i(t) = t, rescaled to [0, γ_end]);
    left-to-right   token i ramps linearly over its own window [a_i, a_i + w], a_i = i/(L−1)·(1−w),
                    w = 1/2, so neighbouring windows overlap and token 0 localises first;
    random-order    the same windows assigned to positions in a random order (per sample).
The window width is our choice (the paper only requires continuous non-decreasing paths, Sec 3).

NFE = denoiser calls = T drift evaluations + 1 final posterior.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsl.config import SamplingConfig
from dsl.sampling.denoiser import Denoiser
from dsl.sampling.diagnostics import StepRecorder
from dsl.sampling.nucleus import top_p_filter

WINDOW = 0.5


def snr_path(path: str, steps: int, length: int, gamma_end: float, gen: torch.Generator | None = None
             ) -> torch.Tensor:
    """γ_i(τ_k) for k = 0..T (T+1, L) float64; ``gen`` orders the positions of ``random-order``."""
    tau = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).unsqueeze(-1)  # (T+1, 1)
    if path == "linear":
        return gamma_end * tau.expand(steps + 1, length).clone()
    if path not in ("left-to-right", "random-order"):
        raise ValueError(f"sde_path={path!r} is not one of linear, left-to-right, random-order")
    rank = torch.arange(length, dtype=torch.float64)
    if path == "random-order":
        rank = torch.randperm(length, generator=gen).double()
    start = rank / max(length - 1, 1) * (1 - WINDOW)  # (L,)
    return gamma_end * ((tau - start) / WINDOW).clamp(0.0, 1.0)


@dataclass
class SDEResult:
    ids: torch.Tensor                 # (n, L)
    nfe: torch.Tensor                 # (n,)
    rewrites: torch.Tensor            # (n, L): changes of the per-step argmax (eq. 25 on argmax drafts)
    trajectory: torch.Tensor | None   # (T, n, L) argmax of the posterior after each step
    z_path: torch.Tensor | None       # (T+1, n, L, d)
    mean_path: torch.Tensor | None    # (T+1, n, L, d): x̂(z) along the path


def run_sde(denoiser: Denoiser, cfg: SamplingConfig, gens: list[torch.Generator], length: int,
            recorder: StepRecorder, keep_trajectory: bool = False, keep_path: bool = False,
            progress: bool = False) -> SDEResult:
    """Integrate eq. 2 for len(gens) samples from z = 0; see the module docstring."""
    n, steps = len(gens), cfg.steps
    emb = denoiser.embeddings  # (V, d) float64, zero mask row
    dim = emb.shape[1]
    gammas = torch.stack([snr_path(cfg.sde_path, steps, length, cfg.sde_gamma_end, g) for g in gens])  # (n,T+1,L)
    z = torch.zeros(n, length, dim, dtype=torch.float64)
    previous = None
    rewrites = torch.zeros(n, length, dtype=torch.long)
    trajectory, z_path, mean_path = [], [z.clone()], []
    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"sde T={steps}", leave=False)
    for k in iterator:
        probs = denoiser.posterior(z)  # (n, L, V)
        x_hat = probs @ emb  # (n, L, d): the SNR-invariant denoiser
        d_gamma = (gammas[:, k + 1] - gammas[:, k]).unsqueeze(-1)  # (n, L, 1)
        noise = torch.stack([torch.randn(length, dim, generator=g, dtype=torch.float64) for g in gens])
        z = z + x_hat * d_gamma + d_gamma.sqrt() * noise  # eq. 2, one Euler–Maruyama step
        draft = probs.argmax(-1)
        changed = torch.zeros_like(draft, dtype=torch.bool) if previous is None else draft != previous
        if k >= 1:
            rewrites += changed.long()
        previous = draft
        nuc = top_p_filter(probs.reshape(-1, probs.shape[-1]), 1.0, cfg.diag_top_p)
        entropy = torch.special.entr(probs).sum(-1).mean(-1)
        recorder.record_values(k, float(gammas[:, k].mean()), {
            "uncertainty": (1 - nuc.max_prob).reshape(n, length).mean(-1),
            "entropy": entropy,
            "nucleus_size": nuc.nucleus_size.reshape(n, length).mean(-1),
            "change_rate": changed.double().mean(-1),
            "forward_rate": torch.ones(n, dtype=torch.float64),
        })
        if keep_trajectory:
            trajectory.append(draft)
        if keep_path:
            z_path.append(z.clone())
            mean_path.append(x_hat)
    final = denoiser.posterior(z)
    ids = final.argmax(-1)
    if keep_path:
        mean_path.append(final @ emb)
    return SDEResult(ids=ids, nfe=torch.full((n,), steps + 1, dtype=torch.long), rewrites=rewrites,
                     trajectory=torch.stack(trajectory) if keep_trajectory else None,
                     z_path=torch.stack(z_path) if keep_path else None,
                     mean_path=torch.stack(mean_path) if keep_path else None)


__all__ = ["snr_path", "run_sde", "SDEResult", "WINDOW"]
