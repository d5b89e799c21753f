"""The masked samplers' step rules: one small rule ``(t, s) -> StepRule`` per sampler (α_t, α_s and the
remask σ of one step, with its equations cited), and the choice of rule from the sampling config, made
once. Each rule is the σ of one branch of ReMDM's ``_ddpm_caching_update`` (kuleshov-group/remdm
``diffusion.py``); equation numbers are the paper's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dsl.config import ConfigError, SamplingConfig
from dsl.sampling.schedules import OFFICIAL_CAP_ETA, OFFICIAL_LOOP


@dataclass(frozen=True)
class StepRule:
    """One step's schedule: α_t, α_s (α = 1 − t unless a sampler warps it) and the remask σ."""

    alpha_t: float
    alpha_s: float
    sigma: float
    confidence: bool = False  # remdm-conf: σ is distributed over positions by confidence


Rule = Callable[[float, float], StepRule]

def _sigma_max(alpha_t: float, alpha_s: float) -> float:
    return 1.0 if alpha_t == 0 else min(1.0, (1 - alpha_s) / alpha_t)  # ReMDM posterior: σ_max = min(1, (1−α_s)/α_t)


def mdlm_rule() -> Rule:
    """MDLM (its ``_ddpm_caching_update``): P(z_s = v) = (t−s)/t·p_x0(v), P(z_s = m) = s/t; visible tokens
    are copied (σ = 0)."""
    return lambda t, s: StepRule(1 - t, 1 - s, 0.0)


def remdm_cap_rule(eta: float) -> Rule:
    """remdm-cap: σ = min(η, (1−α_s)/α_t) (η when α_t = 0, the first step, where nothing is visible)."""
    def rule(t: float, s: float) -> StepRule:
        a_t, a_s = 1 - t, 1 - s
        return StepRule(a_t, a_s, eta if a_t == 0 else min(eta, (1 - a_s) / a_t))
    return rule


def remdm_rescale_rule(eta: float) -> Rule:
    """remdm-rescale: σ = η·min(1, (1−α_s)/α_t)."""
    def rule(t: float, s: float) -> StepRule:
        a_t, a_s = 1 - t, 1 - s
        return StepRule(a_t, a_s, eta * _sigma_max(a_t, a_s))
    return rule


def forward_backward_rule() -> Rule:
    """forward-backward: σ = (α_s − α_t)/α_t, uncapped (1 when α_t = 0), as the official code has it; the
    masked branch is a distribution only while α_s ≤ (1+α_t)/2, which very coarse grids (T = 2) break."""
    def rule(t: float, s: float) -> StepRule:
        a_t, a_s = 1 - t, 1 - s
        return StepRule(a_t, a_s, 1.0 if a_t == 0 else (a_s - a_t) / a_t)
    return rule


def remdm_conf_rule() -> Rule:
    """remdm-conf: σ_ℓ = η_ℓ·σ_max with η_ℓ = softmax_ℓ(ψ) over the sequence, 0 at masked positions (no
    renormalisation); ψ = −p_x0(token) when it was revealed. Masked positions follow MDLM."""
    def rule(t: float, s: float) -> StepRule:
        a_t, a_s = 1 - t, 1 - s
        return StepRule(a_t, a_s, _sigma_max(a_t, a_s), confidence=True)
    return rule


def remdm_loop_rule(eta: float, t_on: float, t_off: float, alpha_on: float) -> Rule:
    """remdm-loop (its branch of the official code; the paper's eq. 22): three phases chosen from t with strict ``>`` and ``≤`` on the float grid.

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
        # Sec 6.1: "ReMDM-cap when T < L and ReMDM-loop when T ≥ L", with the official script values
        # (kuleshov-group/remdm scripts/remdm-cap.sh, remdm-loop.sh)
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
