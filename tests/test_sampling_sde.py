"""The continuous DSL sampler (eq. 2) with the exact DSL denoiser of the cyclic toy."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from dsl.config import SamplingConfig
from dsl.sampling import generate
from dsl.sampling.denoiser import OracleDenoiser
from dsl.sampling.sde import snr_path
from dsl.sources import CyclicSource

torch.set_num_threads(1)


@pytest.mark.parametrize("path", ["linear", "left-to-right", "random-order"])
def test_cyclic_samples_are_valid_and_uniform(path):
    source = CyclicSource(7)
    n = 1400 if path == "linear" else 700
    cfg = SamplingConfig(sampler="sde", sde_path=path, batch_size=700)  # the default step count
    batch = generate(OracleDenoiser(source), cfg, n, source.length, seed=4)
    valid = torch.isfinite(source.log_prob(batch.ids))
    assert valid.double().mean() >= 0.99
    shift_counts = torch.bincount(batch.ids[valid][:, 0], minlength=7)  # x_0 identifies the shift
    assert chisquare(shift_counts.numpy()).pvalue > 1e-3, shift_counts
    assert (batch.nfe == cfg.steps + 1).all()  # T drift evaluations + the final posterior


def test_sde_is_exactly_reproducible_per_sample():
    source = CyclicSource(5)
    cfg = SamplingConfig(sampler="sde", steps=16, sde_path="random-order", batch_size=3)
    a = generate(OracleDenoiser(source), cfg, 6, 5, seed=1)
    b = generate(OracleDenoiser(source), SamplingConfig(sampler="sde", steps=16, sde_path="random-order",
                                                        batch_size=6), 6, 5, seed=1)
    assert torch.equal(a.ids, b.ids)
    assert len(a.diagnostics["entropy"]) == 16
    assert a.diagnostics["entropy"][0] > a.diagnostics["entropy"][-1]  # the posterior sharpens


def test_snr_paths():
    gen = torch.Generator().manual_seed(0)
    for path in ("linear", "left-to-right", "random-order"):
        g = snr_path(path, 20, 6, 50.0, gen)  # (T+1, L)
        assert g.shape == (21, 6)
        assert (g[0] == 0).all() and torch.allclose(g[-1], torch.full((6,), 50.0, dtype=torch.float64))
        assert (g.diff(dim=0) >= 0).all()  # admissible: non-decreasing (Sec 3)
    ltr = snr_path("left-to-right", 20, 6, 50.0)
    assert (ltr[10].diff() <= 0).all() and ltr[10, 0] > ltr[10, -1]  # token 0 localises first
    rnd = snr_path("random-order", 20, 6, 50.0, torch.Generator().manual_seed(3))
    assert torch.equal(rnd[10].sort().values, ltr[10].sort().values)  # the same windows, reordered


def test_masked_only_denoiser_is_refused():
    from dsl.config import ConfigError
    from dsl.sampling.denoiser import Denoiser

    class MaskedOnly(Denoiser):
        vocab_size, mask_id = 3, 2

    with pytest.raises(ConfigError, match="sampler=sde"):
        generate(MaskedOnly(), SamplingConfig(sampler="sde", steps=2), 1, 3, seed=0)
