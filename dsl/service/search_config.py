"""What a search is asked to do: the checks across config sections, the Optuna search space, and the
resources each trial gets on the cluster it finds."""

from __future__ import annotations

import math
from typing import Any

from dsl.config import ConfigError, JobConfig
from dsl.errors import UserError
from dsl.service.search_trial import SEARCHABLE

# GenPPL judges a trial can use: the exact source of checkpoint=oracle:*, none, or a causal LM
SEARCH_JUDGE_KINDS = ("source", "none", "hf_dir", "hub")


def check_search(cfg: JobConfig, mode: str = "search") -> None:
    """The checks across sections a search needs (each section validates itself)."""
    sr, sp = cfg.search, cfg.sampling
    t_on = sr.t_on_range or (sp.t_on,) * 2
    t_off = sr.t_off_range or (sp.t_off,) * 2
    if max(t_off) >= min(t_on):
        off_key = "search.t_off_range" if sr.t_off_range else "sampling.t_off"
        on_key = "search.t_on_range" if sr.t_on_range else "sampling.t_on"
        raise ConfigError(f"{off_key}={_fmt(t_off[:len(sr.t_off_range) or 1])} overlaps {on_key}="
                          f"{_fmt(t_on[:len(sr.t_on_range) or 1])}: every t_off must be < every t_on")
    if sp.sampler not in ("dsl-budget", "remdm-loop"):
        raise ConfigError(f"sampling.sampler={sp.sampler}: the search always samples with "
                          f"remdm-loop (η = the trial's η_cap); leave sampling.sampler unset")
    if sr.min_samples > sp.num_samples:
        raise ConfigError(f"search.min_samples={sr.min_samples} > sampling.num_samples={sp.num_samples}")
    if cfg.eval.references < sp.num_samples:
        raise ConfigError(f"eval.references={cfg.eval.references} < sampling.num_samples={sp.num_samples}: MAUVE "
                          f"needs at least as many reference texts as samples")
    if cfg.eval.workers < 1:
        raise ConfigError("eval.workers=0: the search scores every trial on a pool of MAUVE actors; give "
                          "eval.workers >= 1")
    from dsl.model_spec import parse_model_spec

    parse_model_spec(cfg.eval.judge, "eval.judge", SEARCH_JUDGE_KINDS)


def _fmt(values: tuple) -> str:
    return ",".join(f"{v:g}" for v in values) or "''"


def search_space(cfg: JobConfig) -> dict[str, Any]:
    """Optuna distributions: η_cap log-uniform (it spans decades), the optional windows uniform."""
    import optuna

    space: dict[str, Any] = {"eta_cap": optuna.distributions.FloatDistribution(*cfg.search.eta_cap_range, log=True)}
    for name in ("t_on", "t_off", "alpha_on", "top_p"):
        rng = getattr(cfg.search, f"{name}_range")
        if rng:
            space[name] = optuna.distributions.FloatDistribution(*rng)
    assert set(space) <= set(SEARCHABLE)
    return space


def trial_resources(cluster: dict[str, float], pool_cpus: float, cfg: JobConfig) -> tuple[dict, int]:
    """(resources per trial, max concurrent trials) from the cluster's totals.

    GPU clusters: one GPU per trial, as many trials as GPUs. CPU clusters: the CPUs the MAUVE actors do
    not hold, ``trial_cpus`` each; if fewer than ``trial_cpus`` are free a trial takes what is left,
    so a 2-CPU machine never waits for a CPU that no trial can ever get (no deadlock).
    """
    gpus = float(cluster.get("GPU", 0.0))
    free_cpus = float(cluster.get("CPU", 0.0)) - pool_cpus
    if gpus >= 1:
        res, slots = {"cpu": min(1.0, max(free_cpus / gpus, 0.01)), "gpu": 1}, int(gpus)
    else:
        if free_cpus <= 0.0:
            raise UserError(f"the Ray cluster has {cluster.get('CPU', 0):g} CPUs and eval.workers="
                            f"{cfg.eval.workers} hold {pool_cpus:g}: no CPU is left for trials; lower "
                            f"eval.workers or add CPUs")
        per = min(float(cfg.search.trial_cpus), free_cpus)
        res, slots = {"cpu": per}, max(1, int(math.floor(free_cpus / per + 1e-9)))
    if cfg.search.max_concurrent:
        slots = min(slots, cfg.search.max_concurrent)
    return res, slots


__all__ = ["SEARCH_JUDGE_KINDS", "check_search", "search_space", "trial_resources"]
