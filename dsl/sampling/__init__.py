"""Samplers: MDLM / ReMDM masked samplers, the DSL step-budget protocol and the continuous SDE sampler.

Public surface::

    batch = generate(denoiser, cfg, n, length, seed)       # SampleBatch
    denoiser = load_denoiser("oracle:hmm" | "oracle:cyclic" | <checkpoint dir> | "s3://...", cfg)
    schedule = load_eta_cap(spec); schedule(steps) -> η_cap; schedule.source
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from dsl.config import SamplingConfig, to_dict
from dsl.sampling.denoiser import Denoiser, DSLDenoiser, MDLMDenoiser, OracleDenoiser, load_denoiser
from dsl.sampling.diagnostics import StepRecorder, diagnostics_to_records
from dsl.sampling.masked import run_masked
from dsl.sampling.rules import resolve_rule
from dsl.sampling.schedules import EtaCapSchedule, load_eta_cap
from dsl.sampling.sde import run_sde
from dsl.seeding import derive_seed


@dataclass
class SampleBatch:
    """Samples with everything needed to reproduce and judge them."""

    ids: torch.Tensor                   # (n, L) long
    seeds: torch.Tensor                 # (n,) the per-sample seeds (sample i: derive_seed(seed, "sample", i))
    nfe: torch.Tensor                   # (n,) int: real denoiser forward passes
    rewrites: torch.Tensor              # (n, L) int: R_i (eq. 25, reading = settings["rewrite_count"])
    mean_rewrites: torch.Tensor         # (n,) float: (1/L) Σ_i R_i (Table 5's "rewrites per token")
    diagnostics: dict[str, np.ndarray]  # per-step arrays, one entry per step, means over the n samples
    eta_cap: float | None
    eta_cap_source: str
    eta_cap_extrapolation: str | None   # one line when η_cap was used outside what it was measured on
    settings: dict
    trajectory: torch.Tensor | None = field(default=None, repr=False)  # (T, n, L) if requested
    recorder: StepRecorder | None = field(default=None, repr=False)   # the per-step sums behind diagnostics

    def diagnostics_records(self) -> list[dict]:
        return diagnostics_to_records(self.diagnostics)


def sample_seed(seed: int, index: int) -> int:
    """The seed of global sample ``index`` of a run seeded ``seed`` (independent of batching)."""
    return derive_seed(seed, "sample", index)


# Bytes per position of one sample in the batch being drawn (draft, forward draft, rewrite and change
# counts, confidence scores, uniforms, unmask/remask probabilities, σ; int64/float64) and per position of
# every drawn sample (ids and rewrite counts of the result).
BATCH_BYTES_PER_TOKEN = 128
RESULT_BYTES_PER_TOKEN = 32


def sampling_memory(denoiser: Denoiser, cfg: SamplingConfig, n: int, length: int,
                    keep_trajectory: bool = False) -> int:
    """Estimated peak bytes of :func:`generate`: one batch's (B, L, V) predictions (the raw scores, the
    rows at masked positions and the nucleus filter's work copy), the network's activations, the
    per-sample bookkeeping, the result and the optional (T, n, L) trajectory."""
    batch = min(cfg.batch_size, n)
    per_token = 3 * denoiser.vocab_size * denoiser.score_bytes + denoiser.hidden_bytes_per_token
    need = batch * length * (per_token + BATCH_BYTES_PER_TOKEN) + n * length * RESULT_BYTES_PER_TOKEN
    if keep_trajectory:
        need += cfg.steps * n * length * 8
    return need


def check_sampling_memory(denoiser: Denoiser, cfg: SamplingConfig, n: int, length: int,
                          keep_trajectory: bool = False, limit: float | None = None) -> None:
    """One UserError line, before anything is allocated, when :func:`sampling_memory` exceeds ``limit``
    (default: this machine's available memory), naming the largest length and batch that would fit."""
    from dsl.memory import available_bytes, check_fits, largest_fitting

    limit = available_bytes() if limit is None else limit
    need = sampling_memory(denoiser, cfg, n, length, keep_trajectory)
    if need <= limit:
        return

    def with_batch(b: int) -> SamplingConfig:
        return dataclasses.replace(cfg, batch_size=b)

    max_len = largest_fitting(lambda L: sampling_memory(denoiser, cfg, n, L, keep_trajectory), limit)
    max_batch = largest_fitting(lambda b: sampling_memory(denoiser, with_batch(b), n, length, keep_trajectory),
                                limit, hi=n)
    advice = (f"at sampling.batch_size={cfg.batch_size} at most sampling.length={max_len} fits" if max_len else
              f"no length fits at sampling.batch_size={cfg.batch_size} and sampling.num_samples={n}")
    advice += (f"; at sampling.length={length}, sampling.batch_size={max_batch} fits" if max_batch else
               f"; sampling.length={length} does not fit even one sample at a time")
    if keep_trajectory:
        advice += " (sampling.trajectory keeps every step: T x n x L ids)"
    check_fits(f"sampling {n} x {length} tokens (V={denoiser.vocab_size})", need, advice, limit)


def generate(denoiser: Denoiser, cfg: SamplingConfig, n: int, length: int, seed: int, progress: bool = False,
             *, first_index: int = 0, keep_trajectory: bool = False) -> SampleBatch:
    """Draw ``n`` sequences of ``length`` tokens with ``cfg.sampler``.

    Sample i uses its own generator seeded ``sample_seed(seed, first_index + i)``, so a sample is the same
    whatever the batch size, the batch it lands in or the worker that draws it (``first_index`` lets
    workers split one run). ``keep_trajectory`` also returns the draft after every step.
    """
    if n < 1 or length < 1:
        raise ValueError(f"n={n} and length={length} must be >= 1")
    check_sampling_memory(denoiser, cfg, n, length, keep_trajectory)
    eta_cap, eta_source, eta_note = None, "none", None
    if cfg.sampler == "dsl-budget":
        schedule: EtaCapSchedule = load_eta_cap(cfg.eta_cap_table)
        eta_cap, eta_source = schedule(cfg.steps), schedule.source
        eta_note = schedule.extrapolation(cfg.steps, length)
    if cfg.sampler == "sde":
        resolved = {"rule": "sde", "sde_path": cfg.sde_path, "sde_gamma_end": cfg.sde_gamma_end}
        rule = None
    else:
        rule, resolved = resolve_rule(cfg, length, eta_cap)
        if cfg.sampler == "remdm-official":
            eta_source = "official:" + resolved["rule"]
    seeds = [sample_seed(seed, first_index + i) for i in range(n)]
    recorder = StepRecorder(cfg.steps, length)
    parts = []
    for start in range(0, n, cfg.batch_size):
        gens = []
        for s in seeds[start:start + cfg.batch_size]:
            g = torch.Generator()
            g.manual_seed(s)
            gens.append(g)
        if rule is None:
            parts.append(run_sde(denoiser, cfg, gens, length, recorder, keep_trajectory, progress=progress))
        else:
            parts.append(run_masked(denoiser, rule, cfg, gens, length, recorder, keep_trajectory, progress))
    rewrites = torch.cat([p.rewrites for p in parts])
    settings = {**to_dict(cfg), "resolved": resolved, "length": length, "seed": seed,
                "first_index": first_index, "eta_cap": eta_cap, "eta_cap_source": eta_source,
                "eta_cap_extrapolation": eta_note}
    return SampleBatch(
        ids=torch.cat([p.ids for p in parts]),
        seeds=torch.tensor(seeds, dtype=torch.long),
        nfe=torch.cat([p.nfe for p in parts]),
        rewrites=rewrites,
        mean_rewrites=rewrites.double().mean(-1),
        diagnostics=recorder.finalize(),
        eta_cap=eta_cap,
        eta_cap_source=eta_source,
        eta_cap_extrapolation=eta_note,
        settings=settings,
        trajectory=torch.cat([p.trajectory for p in parts], dim=1) if keep_trajectory else None,
        recorder=recorder,
    )


__all__ = ["SampleBatch", "generate", "sampling_memory", "check_sampling_memory", "sample_seed", "load_denoiser", "load_eta_cap", "EtaCapSchedule",
           "Denoiser", "MDLMDenoiser", "DSLDenoiser", "OracleDenoiser"]
