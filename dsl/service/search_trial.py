"""One trial of the η_cap(T) search: sample with ReMDM-loop at the suggested settings, score, report per rung.

This body runs inside a Ray Tune trial process. It is written as a plain function taking a ``report``
callable so the driver wires it to ``ray.tune.report`` and a test can call it directly.

Fidelity is the sample count: rung k adds ``rungs[k] - rungs[k-1]`` samples and reports MAUVE on all
samples so far, so ASHA (``time_attr="samples"``) can stop weak settings after few samples. Every trial
at a given T draws its rung-k samples from the same seed (common random numbers), so two trials differ
only by their settings, which makes the comparison between η_cap values much less noisy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsl.seeding import derive_seed
from dsl.service.search_results import band_distance, penalised_score

# Settings a trial may receive from the searcher, and the SamplingConfig field each one sets.
SEARCHABLE = {"eta_cap": "eta", "t_on": "t_on", "t_off": "t_off", "alpha_on": "alpha_on", "top_p": "top_p"}


@dataclass
class TrialSetup:
    """Everything a trial needs besides its suggested settings (sent once through the object store)."""

    checkpoint: str
    steps: int
    length: int
    rungs: tuple[int, ...]            # cumulative sample counts; the last one is full fidelity
    seed: int
    mauve_seeds: tuple[int, ...]
    band: tuple[float, float]
    penalty: float
    judge: str = ""                   # GenPPL judge: '' = exact source likelihood (oracles only), none = skip
    sampling: dict[str, Any] = field(default_factory=dict)   # base SamplingConfig as a dict


def sampling_config(setup: TrialSetup, params: dict[str, Any]):
    """The trial's SamplingConfig: the base settings, ReMDM-loop at T, with the suggested values."""
    from dsl.config import SamplingConfig, from_dict

    base = dict(setup.sampling)
    base.update(sampler="remdm-loop", steps=int(setup.steps))
    for name, value in params.items():
        base[SEARCHABLE[name]] = float(value)
    return from_dict(SamplingConfig, base, where=f"trial settings {params}")


def _decode(denoiser: Any, ids: np.ndarray) -> list[str]:
    source = getattr(denoiser, "source", None)
    decode = getattr(source, "decode", None) or getattr(denoiser, "decode", None)
    if decode is None:
        raise TypeError("the denoiser exposes neither .source.decode nor .decode; cannot make texts")
    return [decode(row) for row in ids]


_JUDGES: dict[str, Any] = {}


def _genppl(denoiser: Any, judge: str, ids: np.ndarray, texts: list[str]) -> dict[str, float]:
    """GenPPL under ``judge``: '' = the exact source likelihood of an oracle checkpoint (NaN for a model
    checkpoint: no AR judge is downloaded implicitly), else a local/hub causal LM scoring the texts.

    Parallel unmasking from exact per-position conditionals can still produce sequences the source
    cannot emit (log P = −∞). Their share is reported as ``impossible``; GenPPL is over the others,
    so one impossible sample does not make every trial's GenPPL infinite.
    """
    import torch

    from dsl.eval.genppl import CausalLMOracle, genppl

    if judge == "none":
        return {"genppl": math.nan}
    if not judge:
        source = getattr(denoiser, "source", None)
        if source is None or not hasattr(source, "log_prob"):
            return {"genppl": math.nan}
        logp = source.log_prob(torch.as_tensor(ids, dtype=torch.long)).double()   # (n,) exact, nats
        ok = torch.isfinite(logp)
        nll = float(-logp[ok].sum() / (int(ok.sum()) * ids.shape[1])) if ok.any() else math.inf
        return {"genppl": math.exp(nll), "impossible": float(1.0 - ok.double().mean())}
    if judge not in _JUDGES:
        _JUDGES[judge] = CausalLMOracle.load(judge)
    return {"genppl": float(genppl(_JUDGES[judge], texts)["genppl"])}


def _summarise_diagnostics(diagnostics: dict[str, Any]) -> dict[str, float]:
    """Mean of each per-step diagnostic trace (Sec 7.4, eq. 20-25) so it fits in one metric."""
    out = {}
    for name, values in (diagnostics or {}).items():
        arr = np.asarray(values, dtype=np.float64)
        if arr.size and np.isfinite(arr).any():
            out[f"diag_{name}"] = float(np.nanmean(arr))
    return out


def run_trial(params: dict[str, Any], setup: TrialSetup, denoiser: Any, mauve: Callable[..., dict],
              reference: Any, report: Callable[[dict[str, Any]], None], progress: bool = False) -> dict:
    """Sample rung by rung, score with ``mauve(texts, reference, seeds)`` and ``report`` each rung.

    Returns the last reported metrics. ``params`` holds the searched settings (``eta_cap`` and any of
    ``t_on, t_off, alpha_on, top_p``).
    """
    import torch

    from dsl.eval.entropy import sentence_entropy
    from dsl.sampling import generate

    cfg = sampling_config(setup, params)
    ids_parts, rewrites_parts, nfe_parts, diag_parts = [], [], [], []
    drawn = 0
    metrics: dict[str, Any] = {}
    for rung, target in enumerate(setup.rungs):
        n_new = target - drawn
        # Same seed for every trial at this T and rung: common random numbers across settings.
        seed = derive_seed(setup.seed, "search-samples", setup.steps, rung) % (2**31)
        batch = generate(denoiser, cfg, n_new, setup.length, seed, progress=progress)
        ids_parts.append(np.asarray(torch.as_tensor(batch.ids).cpu()))
        rewrites_parts.append(np.asarray(torch.as_tensor(batch.mean_rewrites).cpu(), dtype=np.float64))
        nfe_parts.append(np.asarray(torch.as_tensor(batch.nfe).cpu(), dtype=np.float64))
        diag_parts.append(_summarise_diagnostics(batch.diagnostics))
        drawn = target

        ids = np.concatenate(ids_parts)                      # (n, L)
        texts = _decode(denoiser, ids)
        scored = mauve(texts, reference, list(setup.mauve_seeds))
        mean_rewrites = float(np.concatenate(rewrites_parts).mean())   # eq. 25, averaged over samples
        metrics = {
            "score": penalised_score(scored["mean"], mean_rewrites, setup.band, setup.penalty),
            "mauve": float(scored["mean"]),
            "mauve_std": float(scored["std"]),
            "mean_rewrites": mean_rewrites,
            "band_distance": band_distance(mean_rewrites, setup.band),
            **_genppl(denoiser, setup.judge, ids, texts),
            "entropy": float(sentence_entropy(ids.tolist())),
            "nfe": float(np.concatenate(nfe_parts).mean()),
            "samples": int(target),
            "steps": int(setup.steps),
            "eta_cap_used": float(cfg.eta),
        }
        # diagnostics: sample-weighted mean over the rungs drawn so far
        weights = np.diff((0,) + tuple(setup.rungs[: rung + 1])).astype(np.float64)
        for key in sorted(set().union(*diag_parts)):
            vals = np.array([d.get(key, np.nan) for d in diag_parts])
            ok = np.isfinite(vals)
            if ok.any():
                metrics[key] = float(np.average(vals[ok], weights=weights[ok]))
        report(metrics)
    return metrics


def rungs_for(samples: int, min_samples: int, reduction: int) -> tuple[int, ...]:
    """Cumulative sample counts min·r^k below ``samples``, then ``samples`` (ASHA's milestones)."""
    if min_samples >= samples or reduction < 2:
        return (int(samples),)
    out, n = [], int(min_samples)
    while n < samples:
        out.append(n)
        n *= reduction
    return tuple(out) + (int(samples),)


__all__ = ["SEARCHABLE", "TrialSetup", "run_trial", "rungs_for", "sampling_config"]
