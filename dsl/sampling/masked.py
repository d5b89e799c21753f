"""Masked samplers: MDLM ancestral and the ReMDM family, exactly as the official code defines them.

Each sampler is one small rule ``(t, s) -> StepRule`` (α_t, α_s and the remask σ of one step, with its
equations cited); one loop, :func:`run_masked`, applies them through one transition helper. All
references are to ``shared/reference/mdlm-remdm.md`` (§3) unless they name the paper.

Transition (§3.2, the ReMDM posterior; σ = 0 is MDLM §3.1), per position, with α_t = 1 − t:

    visible z_t = v:  keep v with prob. 1 − σ, remask with prob. σ            (SUBS: p_x0 one-hot at v)
    masked:           q(v) = p_x0(v)·(α_s − (1−σ)α_t)/(1−α_t),   q(m) = (1 − α_s − σα_t)/(1−α_t)

Both coefficients are clipped to [0, 1]: the official code draws by Gumbel-max over unnormalised
weights, where a negative weight never wins, which is the same clipping (forward-backward σ > 1 on
coarse grids, pitfall 9). A masked position is revealed iff u₁ < P(unmask); its token is then drawn
from the nucleus-filtered p_x0 by a float64 inverse CDF with u₂ (exact categorical sampling, pitfall 1).

Per-sample determinism: sample i draws (u₁, u₂) (2, L) float64 from its own generator at every step, and
the p(x0) cache is decided per sample (a forward runs only for samples whose draft changed since their
last forward), so a sample never depends on its batch-mates and the cache never changes a sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsl.config import ConfigError, SamplingConfig
from dsl.sampling.denoiser import Denoiser
from dsl.sampling.diagnostics import StepRecorder
from dsl.sampling.nucleus import Implicit, Nucleus, top_p_filter
from dsl.sampling.schedules import OFFICIAL_CAP_ETA, OFFICIAL_LOOP, time_grid


@dataclass(frozen=True)
class StepRule:
    """One step's schedule: α_t, α_s (α = 1 − t unless a sampler warps it) and the remask σ."""

    alpha_t: float
    alpha_s: float
    sigma: float
    confidence: bool = False  # remdm-conf: σ is distributed over positions by confidence (§3.3)


Rule = Callable[[float, float], StepRule]


# ----------------------------------------------------------------------------------------------
# One rule per sampler.


def _sigma_max(alpha_t: float, alpha_s: float) -> float:
    return 1.0 if alpha_t == 0 else min(1.0, (1 - alpha_s) / alpha_t)  # §3.2: σ_max = min(1, (1−α_s)/α_t)


def mdlm_rule() -> Rule:
    """§3.1: P(z_s = v) = (t−s)/t·p_x0(v), P(z_s = m) = s/t; visible tokens are copied (σ = 0)."""
    return lambda t, s: StepRule(1 - t, 1 - s, 0.0)


def remdm_cap_rule(eta: float) -> Rule:
    """§3.3: σ = min(η, (1−α_s)/α_t) (η when α_t = 0, the first step, where nothing is visible)."""
    def rule(t: float, s: float) -> StepRule:
        a_t, a_s = 1 - t, 1 - s
        return StepRule(a_t, a_s, eta if a_t == 0 else min(eta, (1 - a_s) / a_t))
    return rule


def remdm_rescale_rule(eta: float) -> Rule:
    """§3.3: σ = η·min(1, (1−α_s)/α_t)."""
    def rule(t: float, s: float) -> StepRule:
        a_t, a_s = 1 - t, 1 - s
        return StepRule(a_t, a_s, eta * _sigma_max(a_t, a_s))
    return rule


def forward_backward_rule() -> Rule:
    """§3.3: σ = (α_s − α_t)/α_t, uncapped (1 when α_t = 0); valid only while α_s ≤ (1+α_t)/2 (pitfall 9)."""
    def rule(t: float, s: float) -> StepRule:
        a_t, a_s = 1 - t, 1 - s
        return StepRule(a_t, a_s, 1.0 if a_t == 0 else (a_s - a_t) / a_t)
    return rule


def remdm_conf_rule() -> Rule:
    """§3.3: σ_ℓ = η_ℓ·σ_max with η_ℓ = softmax_ℓ(ψ) over the sequence, 0 at masked positions (no
    renormalisation); ψ = −p_x0(token) when it was revealed. Masked positions follow MDLM."""
    def rule(t: float, s: float) -> StepRule:
        a_t, a_s = 1 - t, 1 - s
        return StepRule(a_t, a_s, _sigma_max(a_t, a_s), confidence=True)
    return rule


def remdm_loop_rule(eta: float, t_on: float, t_off: float, alpha_on: float) -> Rule:
    """§3.4 / eq. 22: three phases chosen from t with strict ``>`` and ``≤`` on the float grid.

    t > t_on:           MDLM on α(t) = α_on(1−t)/(1−t_on)
    t_off < t ≤ t_on:   ReMDM at frozen α = α_on with σ = η (unmask prob ηα_on/(1−α_on))
    t ≤ t_off:          MDLM on α(t) = 1 − t(1−α_on)/t_off

    Eq. 23 of the paper writes the loop remask probability as min(1, η(t)/(1 − r(t))) with
    η(t) = η_cap α/(1−α); we follow the official code (σ = η), which is what reproduces Table 5's
    rewrite counts (see ``schedules.py``).
    """
    def rule(t: float, s: float) -> StepRule:
        if t > t_on:
            return StepRule(alpha_on * (1 - t) / (1 - t_on), alpha_on * (1 - s) / (1 - t_on), 0.0)
        if t > t_off:
            return StepRule(alpha_on, alpha_on, eta)
        return StepRule(1 - t * (1 - alpha_on) / t_off, 1 - s * (1 - alpha_on) / t_off, 0.0)
    return rule


def resolve_rule(cfg: SamplingConfig, length: int, eta_cap: float | None) -> tuple[Rule, dict]:
    """The choice of sampler, made once: the rule and the settings it actually uses."""
    name = cfg.sampler
    loop = {"t_on": cfg.t_on, "t_off": cfg.t_off, "alpha_on": cfg.alpha_on}
    if name == "mdlm":
        return mdlm_rule(), {"rule": "mdlm"}
    if name == "remdm-cap":
        return remdm_cap_rule(cfg.eta), {"rule": "remdm-cap", "eta": cfg.eta}
    if name == "remdm-rescale":
        return remdm_rescale_rule(cfg.eta), {"rule": "remdm-rescale", "eta": cfg.eta}
    if name == "remdm-conf":
        return remdm_conf_rule(), {"rule": "remdm-conf"}
    if name == "forward-backward":
        return forward_backward_rule(), {"rule": "forward-backward"}
    if name == "remdm-loop":
        return remdm_loop_rule(cfg.eta, **loop), {"rule": "remdm-loop", "eta": cfg.eta, **loop}
    if name == "remdm-official":
        # Sec 6.1: "ReMDM-cap when T < L and ReMDM-loop when T ≥ L", with the official script values (§3.7)
        if cfg.steps < length:
            return remdm_cap_rule(OFFICIAL_CAP_ETA), {"rule": "remdm-cap", "eta": OFFICIAL_CAP_ETA}
        return remdm_loop_rule(**OFFICIAL_LOOP), {"rule": "remdm-loop", **OFFICIAL_LOOP}
    if name == "dsl-budget":
        # Sec 5.2 / 6.1: ReMDM-loop for all T with η = η_cap(T); everything else as configured
        return remdm_loop_rule(eta_cap, **loop), {"rule": "remdm-loop", "eta": eta_cap, **loop}
    raise ConfigError(f"sampling.sampler={name!r} is not a masked sampler")


# The SamplingConfig fields only some samplers read (resolve_rule above; the SDE sampler: dsl.sampling.sde);
# every other field is read by every sampler. remdm-official uses the official script's values instead.
SAMPLER_FIELDS = {"remdm-cap": ("eta",), "remdm-rescale": ("eta",), "remdm-loop": ("eta", "t_on", "t_off", "alpha_on"),
                  "dsl-budget": ("eta_cap_table", "t_on", "t_off", "alpha_on"), "sde": ("sde_path", "sde_gamma_end")}


def unread_sampling_fields(sampler: str) -> set[str]:
    """The SamplingConfig fields ``sampler`` does not read."""
    optional = {f for fields in SAMPLER_FIELDS.values() for f in fields}
    return optional - set(SAMPLER_FIELDS.get(sampler, ()))


# ----------------------------------------------------------------------------------------------
# The shared transition helper.


def transition_coefficients(masked: torch.Tensor, rule: StepRule, sigma: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(unmask) at masked positions, P(remask) at visible positions), each (B, L) float64.

    ``sigma`` (B, L) is the per-position σ (a constant for every sampler but remdm-conf).
    """
    a_t, a_s = rule.alpha_t, rule.alpha_s
    sigma_masked = torch.zeros_like(sigma) if rule.confidence else sigma  # conf: masked positions are MDLM
    unmask = (a_s - (1 - sigma_masked) * a_t) / (1 - a_t)  # §3.2 masked branch, mass on p_x0
    unmask = torch.where(masked, unmask.clamp(0, 1), torch.zeros_like(unmask))
    remask = torch.where(masked, torch.zeros_like(sigma), sigma.clamp(0, 1))  # §3.2 visible branch
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


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index (R,) of the first column of ``cdf`` (R, K) above ``target`` (R,) (the last one at most)."""
    return torch.searchsorted(cdf, target.unsqueeze(-1), right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


class _DenseCandidates:
    def __init__(self, p_x0: torch.Tensor):
        self.p_x0 = p_x0

    def draw(self, reveal: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.p_x0[reveal]  # (R, V): only the rows that reveal pay for a cumulative sum
        cdf = rows.cumsum(-1)
        pick = _search(cdf, u * cdf[:, -1])
        return pick, rows.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def dense_candidates(p_x0: torch.Tensor) -> _DenseCandidates:
    """Candidates for :func:`apply_transition` from a dense p_x0 (B, L, V): every id is a candidate."""
    return _DenseCandidates(p_x0)


def confidence_sigma(scores: torch.Tensor, masked: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """remdm-conf (§3.3): σ_ℓ = softmax_ℓ(ψ)·σ_max, set to 0 at masked positions without renormalising."""
    eta = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all −∞ (step 0) gives NaN: no visible token yet
    return torch.where(masked, torch.zeros_like(eta), eta) * sigma_max


# ----------------------------------------------------------------------------------------------
# The loop.


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
    draft = torch.full((n, length), mask_id, dtype=torch.long, device=device)  # the prior: all masked (§3.0)
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
            nuc = top_p_filter(raw, cfg.top_p, cfg.diag_top_p, kind)
            del raw
            cache.write(rows, sub_masked, nuc)
            stats[rows] = _per_sample_means(sub_masked, nuc)
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
        scores = torch.where(reveal, -chosen, scores)  # §3.3: ψ = −p_x0(token) where revealed
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


class NucleusCache:
    """Per-sample nucleus-filtered p_x0 of each sample's last forward, as :func:`top_p_filter` gives it.

    Listed tokens: ids and probabilities (n, L, K), K = the widest cached list; the top-1 (n, L). A broad
    row also keeps every token above its threshold without listing it: its probability row sits in a store
    (M, V) that ``implicit`` (n, L) indexes (−1: none), and a draw from it reads that one row. Positions
    that were visible at a sample's last forward are never read: the cache is only used while that
    sample's draft is unchanged (time-invariant denoiser, §3.0 caching).
    """

    def __init__(self, n: int, length: int, device: torch.device | str = "cpu"):
        self.ids = torch.zeros(n, length, 1, dtype=torch.long, device=device)
        self.probs = torch.zeros(n, length, 1, dtype=torch.float64, device=device)
        self.best = torch.zeros(n, length, dtype=torch.long, device=device)
        self.implicit = torch.full((n, length), -1, dtype=torch.long, device=device)
        self.store: Implicit | None = None

    def write(self, rows: torch.Tensor, masked: torch.Tensor, nuc: Nucleus) -> None:
        b, length = masked.shape
        width = nuc.ids.shape[1]
        device = masked.device
        if bool(masked.all()):  # every position masked (the first steps): the nucleus rows are the layout
            ids = nuc.ids.reshape(b, length, width).contiguous()  # (a copy only of expanded ids, top_p = 1)
            probs = nuc.probs.reshape(b, length, width).contiguous()
        else:
            ids = torch.zeros(b, length, width, dtype=torch.long, device=device)
            probs = torch.zeros(b, length, width, dtype=torch.float64, device=device)
            ids[masked], probs[masked] = nuc.ids, nuc.probs
        best = torch.zeros(b, length, dtype=torch.long, device=device)
        best[masked] = nuc.top1
        implicit = torch.full((b, length), -1, dtype=torch.long, device=device)
        store = nuc.implicit
        if store is not None:  # nucleus row i is the i-th masked position, row-major
            where = masked.nonzero()[store.rows]
            implicit[where[:, 0], where[:, 1]] = torch.arange(store.rows.numel(), device=device)
        if rows.numel() == self.ids.shape[0]:  # every sample replaced: nothing of the old cache survives
            self.ids, self.probs, self.best, self.implicit, self.store = ids, probs, best, implicit, store
        else:
            full = max(width, self.ids.shape[2])
            self.ids, self.probs = _widen(self.ids, full), _widen(self.probs, full)
            self.ids[rows], self.probs[rows], self.best[rows] = _widen(ids, full), _widen(probs, full), best
            self._merge_store(rows, implicit, store)
        need = max(int((self.probs > 0).sum(-1).max()), 1)
        if need < self.ids.shape[2]:  # a broad early list no longer cached: free its width
            self.ids = self.ids[:, :, :need].contiguous()
            self.probs = self.probs[:, :, :need].contiguous()

    def _merge_store(self, rows: torch.Tensor, implicit: torch.Tensor, store: Implicit | None) -> None:
        """Keep the stored rows of the samples not replaced, add ``store``'s for ``rows``."""
        replaced = torch.zeros(self.implicit.shape[0], dtype=torch.bool, device=implicit.device)
        replaced[rows] = True
        self.implicit[replaced] = -1
        keep = self.implicit >= 0
        parts, offset = [], 0
        merged = torch.full_like(self.implicit, -1)
        if bool(keep.any()):
            old = self.implicit[keep]
            parts.append(Implicit(old, self.store.p[old], self.store.threshold[old], self.store.scale[old]))
            merged[keep] = torch.arange(old.numel(), device=old.device)
            offset = old.numel()
        if store is not None:
            fresh = implicit >= 0
            sub = merged[rows]
            sub[fresh] = implicit[fresh] + offset
            merged[rows] = sub
            parts.append(store)
        self.implicit = merged
        self.store = None if not parts else parts[0] if len(parts) == 1 else Implicit(
            torch.cat([x.rows for x in parts]), torch.cat([x.p for x in parts]),
            torch.cat([x.threshold for x in parts]), torch.cat([x.scale for x in parts]))

    def top1(self) -> torch.Tensor:
        return self.best

    def draw(self, reveal: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, probability) at the revealed positions (row-major) by float64 inverse CDF with u: the
        implicitly kept tokens of a row first (ids ascending), then its listed tokens."""
        listed = self.probs[reveal]  # (R, K): only the rows that reveal pay for a cumulative sum
        cdf = listed.cumsum(-1)
        total = cdf[:, -1].clone()
        implied = torch.zeros_like(total)
        index = self.implicit[reveal]
        broad = (index >= 0).nonzero().squeeze(-1)
        if broad.numel():
            dense = self.store.probs(index[broad])  # (R', V): the implicitly kept tokens, renormalised
            dense_cdf = dense.cumsum(-1)
            implied[broad] = dense_cdf[:, -1]
            total[broad] += dense_cdf[:, -1]
        target = u * total
        token = self.ids[reveal].gather(-1, _search(cdf, target - implied).unsqueeze(-1)).squeeze(-1)
        prob = listed.gather(-1, _search(cdf, target - implied).unsqueeze(-1)).squeeze(-1)
        if broad.numel():
            inside = target[broad] < implied[broad]
            pick = _search(dense_cdf, target[broad])
            token[broad] = torch.where(inside, pick, token[broad])
            prob[broad] = torch.where(inside, dense.gather(-1, pick.unsqueeze(-1)).squeeze(-1), prob[broad])
        return token, prob


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """x (n, L, K) zero-padded to K = width (itself when already that wide)."""
    return x if x.shape[2] == width else torch.nn.functional.pad(x, (0, width - x.shape[2]))


def _per_sample_means(masked: torch.Tensor, nuc: Nucleus) -> torch.Tensor:
    """(b, 3): per-sample means over its masked positions of u = 1 − max p, H and the nucleus size.

    Visible rows are one-hot by carry-over and would only dilute these (see ``diagnostics.py``).
    """
    owner = masked.nonzero()[:, 0]  # (N,) which sample each masked row belongs to
    sums = torch.zeros(masked.shape[0], 3, dtype=torch.float64, device=masked.device)
    sums.index_add_(0, owner, torch.stack([1 - nuc.max_prob, nuc.entropy, nuc.nucleus_size], dim=-1))
    return sums / masked.sum(-1).clamp(min=1).double().unsqueeze(-1)


def _remove_noise(denoiser: Denoiser, draft: torch.Tensor, cache: NucleusCache, forward_draft: torch.Tensor,
                  nfe: torch.Tensor, use_cache: bool) -> torch.Tensor:
    """§3.0 final noise removal: one greedy pass x ← argmax_v p(v | x) (no nucleus), +1 forward.

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


__all__ = ["StepRule", "mdlm_rule", "remdm_cap_rule", "remdm_rescale_rule", "forward_backward_rule",
           "remdm_conf_rule", "remdm_loop_rule", "resolve_rule", "transition_coefficients",
           "transition_probs", "apply_transition", "dense_candidates", "confidence_sigma", "run_masked",
           "MaskedResult", "NucleusCache", "SAMPLER_FIELDS", "unread_sampling_fields"]
