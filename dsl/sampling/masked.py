"""Masked samplers: MDLM ancestral and the ReMDM family, exactly as the official code defines them.

Each sampler is one small rule (:mod:`dsl.sampling.rules`); one loop, :func:`run_masked`, applies them
through one transition (:mod:`dsl.sampling.transition`) that draws revealed tokens from the p(x0) cache
(:mod:`dsl.sampling.candidates`). The loop follows ReMDM's ``_sample`` (kuleshov-group/remdm ``diffusion.py``):
an all-masked prior, the time grid of :func:`dsl.sampling.schedules.time_grid`, p(x0) reused while a draft
is unchanged, and a final greedy noise removal.

Per-sample determinism: sample i draws (u₁, u₂) (2, L) float64 from its own generator at every step, and
the p(x0) cache is decided per sample (a forward runs only for samples whose draft changed since their
last forward), so a sample never depends on its batch-mates and the cache never changes a sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsl.config import SamplingConfig
from dsl.sampling.candidates import NucleusCache
from dsl.sampling.denoiser import Denoiser
from dsl.sampling.diagnostics import StepRecorder
from dsl.sampling.nucleus import Nucleus, top_p_filter
from dsl.sampling.rules import Rule
from dsl.sampling.schedules import time_grid
from dsl.sampling.transition import apply_transition, confidence_sigma, transition_coefficients


@dataclass
class MaskedResult:
    ids: torch.Tensor        # (n, L)
    nfe: torch.Tensor        # (n,) real forward passes
    rewrites: torch.Tensor   # (n, L)
    trajectory: torch.Tensor | None  # (T, n, L): the draft after each step (the last includes noise removal)


def run_masked(denoiser: Denoiser, rule: Rule, cfg: SamplingConfig, gens: list[torch.Generator], length: int,
               recorder: StepRecorder, keep_trajectory: bool = False, progress: bool = False) -> MaskedResult:
    """Sample len(gens) sequences of ``length`` tokens with ``rule`` for ``cfg.steps`` steps."""
    n, mask_id, steps = len(gens), denoiser.mask_id, cfg.steps
    device = denoiser.device  # every per-step tensor lives where the denoiser computes
    grid = time_grid(steps, cfg.eps).tolist()
    use_cache = cfg.cache and denoiser.time_invariant
    draft = torch.full((n, length), mask_id, dtype=torch.long, device=device)  # the prior: all masked, position 0 too
    cache = NucleusCache(n, length, device)  # the nucleus-filtered p_x0 of each sample's last forward
    stats = torch.full((n, 3), float("nan"), dtype=torch.float64, device=device)  # per-sample u, H, k
    forward_draft = torch.full_like(draft, -1)
    nfe = torch.zeros(n, dtype=torch.long, device=device)
    remask_count = torch.zeros(n, length, dtype=torch.long, device=device)
    change_count = torch.zeros_like(remask_count)
    scores = torch.full((n, length), -torch.inf, dtype=torch.float64, device=device)  # remdm-conf's ψ
    trajectory = [] if keep_trajectory else None
    uniforms_of = _UniformBlocks(gens, length, device)

    iterator = range(steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"{cfg.sampler} T={steps}", leave=False)
    for k in iterator:
        t, s = grid[k], grid[k + 1]
        step_rule = rule(t, s)
        masked = draft == mask_id
        stale = (draft != forward_draft).any(-1) if use_cache else torch.ones(n, dtype=torch.bool, device=device)
        stale &= masked.any(-1)  # nothing masked: the transition never reads p_x0
        if stale.any():
            rows = stale.nonzero().squeeze(-1)
            sub_masked, raw, kind = denoiser.masked_rows(draft[rows])  # one forward for the stale samples
            nfe[rows] += 1
            nuc = top_p_filter(raw, cfg.top_p, cfg.diag_top_p, kind, overwrite=True)  # raw: ours, unused after
            del raw
            cache.write(rows, sub_masked, nuc)
            stats[rows] = per_sample_means(sub_masked, nuc)
            forward_draft[rows] = draft[rows]
        if step_rule.confidence:
            sigma = confidence_sigma(scores, masked, step_rule.sigma)
        else:
            sigma = torch.full((n, length), step_rule.sigma, dtype=torch.float64, device=device)
        unmask, remask = transition_coefficients(masked, step_rule, sigma)
        uniforms = uniforms_of(k)
        new, reveal, chosen = apply_transition(draft, cache, unmask, remask, uniforms, mask_id)
        if k == steps - 1 and cfg.noise_removal:
            new = _remove_noise(denoiser, new, cache, forward_draft, nfe, use_cache)
        remasked = ~masked & (new == mask_id)
        scores = torch.where(reveal, -chosen, scores)  # remdm-conf: ψ = −p_x0(token) where revealed
        scores = torch.where(remasked, torch.full_like(scores, -torch.inf), scores)
        changed = new != draft
        remask_count += remasked.long()
        if k >= 1:
            change_count += changed.long()  # eq. 25 sums k = 1..T−1
        recorder.record(k, t, masked=masked, new_masked=new == mask_id, changed=changed, remasked=remasked,
                        remask_prob=remask, stats=stats, forwards=stale)
        draft = new
        if trajectory is not None:
            trajectory.append(draft.clone())
    rewrites = remask_count if cfg.rewrite_count == "remask" else change_count
    traj = torch.stack(trajectory).cpu() if trajectory is not None else None
    return MaskedResult(ids=draft.cpu(), nfe=nfe.cpu(), rewrites=rewrites.cpu(), trajectory=traj)


class _UniformBlocks:
    """Sample i's (u₁, u₂) (2, L) float64 of step k from its own generator, drawn ``block`` steps at a time.

    One ``rand`` of (block, 2, L) per sample and block gives the same numbers as one (2, L) draw per step
    (a CPU generator fills a tensor in order), so a sample's stream does not depend on the block size or
    on its batch-mates; the per-sample loop runs once per block, and one copy moves the block to the
    denoiser's device.
    """

    def __init__(self, gens: list[torch.Generator], length: int, device: torch.device, block: int = 32):
        self.gens, self.length, self.device, self.block = gens, length, device, block
        self.first, self.values = 0, None

    def __call__(self, k: int) -> torch.Tensor:
        if self.values is None or k >= self.first + self.block:
            self.first = k
            self.values = torch.stack([torch.rand(self.block, 2, self.length, generator=g, dtype=torch.float64)
                                       for g in self.gens], dim=1).to(self.device)  # (block, n, 2, L)
        return self.values[k - self.first]


def per_sample_means(masked: torch.Tensor, nuc: Nucleus) -> torch.Tensor:
    """(b, 3): per-sample means over its masked positions of u = 1 − max p, H and the nucleus size.

    Visible rows are one-hot by carry-over and would only dilute these (see ``diagnostics.py``).
    """
    owner = masked.nonzero()[:, 0]  # (N,) which sample each masked row belongs to
    sums = torch.zeros(masked.shape[0], 3, dtype=torch.float64, device=masked.device)
    sums.index_add_(0, owner, torch.stack([1 - nuc.max_prob, nuc.entropy, nuc.nucleus_size], dim=-1))
    return sums / masked.sum(-1).clamp(min=1).double().unsqueeze(-1)


def _remove_noise(denoiser: Denoiser, draft: torch.Tensor, cache: NucleusCache, forward_draft: torch.Tensor,
                  nfe: torch.Tensor, use_cache: bool) -> torch.Tensor:
    """The official final noise removal (``sampling.noise_removal``): one greedy pass x ← argmax_v p(v | x) (no nucleus), +1 forward.

    Skipped for samples with nothing masked (carry-over makes it the identity); a sample whose draft
    did not change since its last forward reuses that prediction (its top-1 survives the nucleus).
    """
    masked = draft == denoiser.mask_id
    todo = masked.any(-1)
    if not todo.any():
        return draft
    out = draft.clone()
    reuse = todo & (draft == forward_draft).all(-1) if use_cache else torch.zeros_like(todo)
    fresh = todo & ~reuse
    if fresh.any():
        rows = fresh.nonzero().squeeze(-1)
        sub_masked, raw, _ = denoiser.masked_rows(draft[rows])
        nfe[rows] += 1
        sub = out[rows]
        sub[sub_masked] = raw.argmax(-1)  # the mask id's row entry is MASK_LOGIT or 0: never chosen
        out[rows] = sub
    if reuse.any():
        rows = reuse.nonzero().squeeze(-1)
        out[rows] = torch.where(masked[rows], cache.top1()[rows], draft[rows])
    return out
