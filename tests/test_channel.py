"""dsl.channel: spherical embeddings, the mixed SNR sampler (Alg 1) and z = γx + √γε."""

import math

import pytest
import torch
from scipy import stats

from dsl.channel import corrupt, corrupt_rows, sample_snr, sample_snr_rows, spherical_embeddings
from dsl.config import ChannelConfig
from dsl.seeding import sample_generator

torch.set_num_threads(1)  # small ops: threads only add overhead on a shared machine

N = 200_000


def gen(*keys):
    return sample_generator(0, "test-channel", *keys)


def test_spherical_embeddings_unit_rows_zero_mask_and_seeded():
    emb = spherical_embeddings(11, 16, 10, gen("emb"))
    assert emb.shape == (11, 16)
    torch.testing.assert_close(emb[:10].norm(dim=-1), torch.ones(10))
    assert torch.equal(emb[10], torch.zeros(16))
    assert torch.equal(emb, spherical_embeddings(11, 16, 10, gen("emb")))
    emb64 = spherical_embeddings(11, 16, 10, gen("emb"), dtype=torch.float64)
    torch.testing.assert_close(emb64[:10].norm(dim=-1), torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-15)
    assert not torch.equal(emb, spherical_embeddings(11, 16, 10, gen("other")))
    with pytest.raises(ValueError, match="mask_id"):
        spherical_embeddings(11, 16, 11, gen("emb"))


def _binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_roar_fraction_and_each_branch_matches_its_distribution():
    cfg = ChannelConfig()
    gamma, is_roar = sample_snr((N,), cfg, gen("snr"))
    gamma = gamma.double()
    assert _binomial_ok(int(is_roar.sum()), N, cfg.p_roar)
    roar = gamma[is_roar]
    low = roar[roar < cfg.gamma_min]
    high = roar[roar >= cfg.c * cfg.gamma_max]
    assert len(low) + len(high) == len(roar)  # nothing in between: the two smoothed endpoints only
    assert _binomial_ok(len(high), len(roar), 0.5)
    # KS: U(0, γ_min), U(cγ_max, γ_max), LogNormal(μ, σ)
    assert stats.kstest(low.numpy(), "uniform", args=(0.0, cfg.gamma_min)).pvalue > 1e-3
    width = (1 - cfg.c) * cfg.gamma_max
    assert stats.kstest(high.numpy(), "uniform", args=(cfg.c * cfg.gamma_max, width)).pvalue > 1e-3
    cont = gamma[~is_roar].log().numpy()
    assert stats.kstest(cont, "norm", args=(cfg.lognormal_mu, cfg.lognormal_sigma)).pvalue > 1e-3
    # the same KS test has the power to reject a slightly wrong σ
    assert stats.kstest(cont, "norm", args=(cfg.lognormal_mu, 0.95 * cfg.lognormal_sigma)).pvalue < 1e-6


def test_custom_branch_parameters_are_used():
    cfg = ChannelConfig(p_roar=0.5, gamma_min=0.2, gamma_max=10.0, c=0.5, lognormal_mu=0.0,
                        lognormal_sigma=0.5)
    gamma, is_roar = sample_snr((N // 4,), cfg, gen("custom"))
    assert _binomial_ok(int(is_roar.sum()), N // 4, 0.5)
    roar = gamma[is_roar].double()
    assert set(((roar < 0.2) | ((roar >= 5.0) & (roar <= 10.0))).tolist()) == {True}
    cont = gamma[~is_roar].double().log().numpy()
    assert stats.kstest(cont, "norm", args=(0.0, 0.5)).pvalue > 1e-3


def test_atomic_endpoints_are_exactly_zero_and_gamma_max():
    cfg = ChannelConfig(roar="atomic")
    gamma, is_roar = sample_snr((N // 4,), cfg, gen("atomic"))
    roar = gamma[is_roar]
    assert set(roar.tolist()) == {0.0, cfg.gamma_max}
    assert _binomial_ok(int((roar == 0).sum()), len(roar), 0.5)
    assert (gamma[~is_roar] > 0).all()


def test_lognormal_clip_on_and_off():
    off, roar_off = sample_snr((N,), ChannelConfig(lognormal_clip=False), gen("clip"))
    on, roar_on = sample_snr((N,), ChannelConfig(lognormal_clip=True), gen("clip"))
    assert torch.equal(roar_off, roar_on)  # same stream: only the continuous branch changes
    cont_off, cont_on = off[~roar_off], on[~roar_on]
    assert (cont_off > 50.0).sum() > 100  # P(LogNormal(1.65, 0.9) > 50) ≈ 0.6 %
    assert cont_on.min() >= 1e-3 and cont_on.max() <= 50.0
    assert torch.equal(cont_on, cont_off.clamp(1e-3, 50.0))


def test_p_roar_zero_and_one():
    _, none = sample_snr((1000,), ChannelConfig(p_roar=0.0), gen("p0"))
    _, every = sample_snr((1000,), ChannelConfig(p_roar=1.0), gen("p1"))
    assert not none.any() and every.all()


def test_rows_use_only_their_own_generator():
    cfg = ChannelConfig()
    gens = [gen("row", b) for b in range(3)]
    gamma, is_roar = sample_snr_rows(gens, 9, cfg)
    assert gamma.shape == (3, 9)
    single, single_roar = sample_snr((9,), cfg, gen("row", 1))
    assert torch.equal(gamma[1], single) and torch.equal(is_roar[1], single_roar)

    x = spherical_embeddings(6, 4, 5, gen("x"))[torch.randint(5, (3, 9), generator=gen("ids"))]
    batch = corrupt_rows(x, gamma, [gen("noise", b) for b in range(3)])
    alone = corrupt_rows(x[2:], gamma[2:], [gen("noise", 2)])
    assert torch.equal(batch[2:], alone)


def test_corrupt_is_gamma_x_plus_sqrt_gamma_noise():
    x = spherical_embeddings(8, 5, 7, gen("x"))[torch.arange(7)].unsqueeze(0).repeat(4000, 1, 1)
    gamma = torch.tensor([0.0, 0.01, 0.5, 1.0, 4.0, 20.0, 50.0]).expand(4000, 7)
    expected_eps = torch.randn(x.shape, generator=gen("noise"))  # the same stream corrupt() draws
    z = corrupt(x, gamma, gen("noise"))
    torch.testing.assert_close(z, gamma[..., None] * x + gamma[..., None].sqrt() * expected_eps)
    assert torch.equal(z[:, 0], torch.zeros_like(z[:, 0]))  # γ = 0 is the mask point
    resid = (z[:, 1:] - gamma[:, 1:, None] * x[:, 1:]) / gamma[:, 1:, None].sqrt()
    assert abs(float(resid.mean())) < 0.01 and abs(float(resid.var()) - 1.0) < 0.02


@pytest.mark.parametrize("gamma", [0.05, 0.7, 3.0, 25.0])
def test_uniform_prior_posterior_is_softmax_z_w_for_every_snr(gamma):
    """App A.1: p(x = v | z) ∝ N(z; γx_v, γI) equals softmax(z·x_v), whatever γ > 0."""
    emb = spherical_embeddings(9, 6, 8, gen("a1"), dtype=torch.float64)
    words = emb[:8]
    ids = torch.randint(8, (64, 1), generator=gen("a1-ids"))
    z = corrupt(emb[ids], torch.full((64, 1), gamma, dtype=torch.float64), gen("a1-noise"))[:, 0]
    # Gaussian log density of z under each candidate token, up to a v-independent constant
    log_density = -((z[:, None, :] - gamma * words[None]) ** 2).sum(-1) / (2 * gamma)
    bayes = torch.softmax(log_density, dim=-1)  # uniform prior
    torch.testing.assert_close(bayes, torch.softmax(z @ words.T, dim=-1), rtol=1e-9, atol=1e-12)
