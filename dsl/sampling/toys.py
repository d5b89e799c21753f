"""The cyclic toys of Fig 1b, Fig 3 and App B, run with exact oracle denoisers.

* :func:`recover_cyclic` (Sec 7.1, Fig 3): a K=7 draft with two masks and two visible-but-wrong tokens
  (``__CDBFD``, truth ``ABCDEFG``) is repaired by confidence-driven remasking within a fixed budget.
* :func:`sde_localization` (Fig 1b): the K=5 2-D localization paths of the SDE sampler (eq. 2).

Their figures are drawn by :mod:`dsl.sampling.figures`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsl.config import SamplingConfig
from dsl.sampling.candidates import dense_candidates
from dsl.sampling.denoiser import OracleDenoiser
from dsl.sampling.diagnostics import StepRecorder
from dsl.sampling.rules import StepRule
from dsl.sampling.schedules import time_grid
from dsl.sampling.sde import SDEResult, run_sde
from dsl.sampling.transition import apply_transition, transition_coefficients

FIG3_DRAFT = "__CDBFD"  # Fig 3: positions 1-2 masked, 5 (E→B) and 7 (G→D) visible but wrong
FIG3_TRUTH = "ABCDEFG"


def parse_draft(text: str, source: object) -> torch.Tensor:
    """Letters A.. for words and ``_`` for the mask → ids (1, L)."""
    ids = [source.mask_id if ch == "_" else ord(ch) - ord("A") for ch in text]
    if any(not 0 <= i <= source.mask_id for i in ids):
        raise ValueError(f"draft {text!r} holds letters outside A..{chr(ord('A') + source.mask_id - 1)} and _")
    return torch.tensor([ids], dtype=torch.long)


@dataclass
class Recovery:
    final: str
    timeline: list[str]  # the draft after each step, letters and _
    valid: bool
    remasks: int


def recover_cyclic(source: object, draft: torch.Tensor, steps: int, gen: torch.Generator,
                   visible_error: float = 0.1, eps: float = 1e-5, remask: bool = True) -> Recovery:
    """Confidence-driven remasking (Sec 7.1) on one draft (1, L) with the exact oracle.

    Each step is the shared ReMDM transition on the linear MDLM schedule α = 1 − t with a per-position
    remask probability σ_i = 1 − c_i, where c_i = p(x_i = draft_i | draft) is the oracle's confidence in
    a visible token when visible tokens are treated as noisy observations (``visible_error``): tokens
    that the rest of the draft contradicts are remasked, the rest are kept. Masked positions are revealed
    from the same posterior. The last step is followed by a greedy pass over anything still masked.
    ``remask=False`` is the control: plain MDLM steps, which can never touch a visible token.
    """
    denoiser = OracleDenoiser(source, visible_error=visible_error)
    grid = time_grid(steps, eps).tolist()
    timeline, remasks = [], 0
    for k in range(steps):
        t, s = grid[k], grid[k + 1]
        masked = draft == source.mask_id
        confidence = denoiser.visible_confidence(draft)  # (1, L), 1 at masked positions
        rule = StepRule(1 - t, 1 - s, 0.0)
        sigma = torch.where(masked | (not remask), torch.zeros_like(confidence), 1 - confidence)
        unmask, remask_prob = transition_coefficients(masked, rule, sigma)
        uniforms = torch.rand(1, 2, draft.shape[1], generator=gen, dtype=torch.float64)
        p_x0 = denoiser(draft)  # masked rows: the posterior given the visible tokens as noisy evidence
        new, _, _ = apply_transition(draft, dense_candidates(p_x0), unmask, remask_prob, uniforms,
                                     source.mask_id)
        remasks += int((~masked & (new == source.mask_id)).sum())
        draft = new
        timeline.append(source.decode(draft[0]))
    if bool((draft == source.mask_id).any()):
        draft = torch.where(draft == source.mask_id, denoiser(draft).argmax(-1), draft)
        timeline[-1] = source.decode(draft[0])
    final = source.decode(draft[0])
    return Recovery(final=final, timeline=timeline, valid=bool(torch.isfinite(source.log_prob(draft)).all()),
                    remasks=remasks)


def sde_localization(k: int = 5, steps: int = 128, n: int = 3, seed: int = 0, gamma_end: float = 50.0,
                     path: str = "linear") -> SDEResult:
    """Fig 1b: SDE (eq. 2) paths of the K-cyclic toy with its 2-D circle embeddings (App B)."""
    from dsl.sources import CyclicSource

    source = CyclicSource(k)
    denoiser = OracleDenoiser(source)
    cfg = SamplingConfig(sampler="sde", steps=steps, sde_gamma_end=gamma_end, sde_path=path)
    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]
    return run_sde(denoiser, cfg, gens, source.length, StepRecorder(steps, source.length), keep_path=True)


__all__ = ["FIG3_DRAFT", "FIG3_TRUTH", "Recovery", "parse_draft", "recover_cyclic", "sde_localization"]
