"""Masked samplers: each ReMDM transition against the reference's closed form, exactly and by Monte Carlo;
loop phases; the p(x0) cache; per-sample independence; carry-over; rewrites and the masked ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsl.config import SamplingConfig
from dsl.sampling import generate
from dsl.sampling.candidates import dense_candidates
from dsl.sampling.denoiser import Denoiser
from dsl.sampling.rules import (
    forward_backward_rule,
    mdlm_rule,
    remdm_cap_rule,
    remdm_conf_rule,
    remdm_loop_rule,
    remdm_rescale_rule,
)
from dsl.sampling.schedules import time_grid
from dsl.sampling.transition import (
    apply_transition,
    confidence_sigma,
    transition_coefficients,
    transition_probs,
)

torch.set_num_threads(1)

V, MASK, L = 6, 5, 7  # five words and the mask id last


class ContextDenoiser(Denoiser):
    """A small hand-made, time-invariant denoiser whose prediction depends on the visible tokens."""

    def __init__(self, vocab: int = V, scramble_visible: bool = False):
        self.vocab_size, self.mask_id = vocab, vocab - 1
        self.scramble_visible = scramble_visible
        self.calls = 0
        gen = torch.Generator().manual_seed(7)
        self.table = torch.randn(vocab, vocab - 1, generator=gen, dtype=torch.float64)

    def _scores(self, draft):
        self.calls += 1
        left = torch.roll(draft, 1, dims=1)  # the left neighbour (masked → the mask row)
        logits = self.table[left] + 0.3 * torch.arange(draft.shape[1], dtype=torch.float64)[None, :, None]
        logits = torch.cat([logits, torch.zeros(*draft.shape, 1, dtype=torch.float64)], dim=-1)
        if self.scramble_visible:
            logits = logits + 5.0  # irrelevant: carry-over must still make visible rows one-hot
        return logits, "logits"


def _fixed_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(1, L, V, generator=gen, dtype=torch.float64)
    p[..., MASK] = 0
    p = p / p.sum(-1, keepdim=True)
    draft = torch.tensor([[MASK, 2, MASK, 0, 4, MASK, 1]])
    visible = draft != MASK
    p[visible] = torch.nn.functional.one_hot(draft[visible], V).double()  # SUBS carry-over
    return p, draft


def _closed_form(p, draft, t, s, sigma):
    """The ReMDM posterior (kuleshov-group/remdm diffusion.py _ddpm_caching_update), written out
    independently: α_t = 1 − t, α_s = 1 − s."""
    a_t, a_s = 1 - t, 1 - s
    q = torch.zeros_like(p)
    for i in range(L):
        sig = float(sigma[0, i])
        if draft[0, i] == MASK:
            q[0, i] = p[0, i] * (a_s - (1 - sig) * a_t) / (1 - a_t)
            q[0, i, MASK] = (1 - a_s - sig * a_t) / (1 - a_t)
        else:
            q[0, i, draft[0, i]] = 1 - sig
            q[0, i, MASK] = sig
    return q


T_MID, S_MID = 0.6, 0.55
CASES = {
    # name: (rule, reference σ per position at t=T_MID, s=S_MID), from the official code's sampler branches
    "mdlm": (mdlm_rule(), 0.0),
    "remdm-cap": (remdm_cap_rule(0.05), min(0.05, (1 - (1 - S_MID)) / (1 - T_MID))),
    "remdm-rescale": (remdm_rescale_rule(0.3), 0.3 * min(1.0, S_MID / (1 - T_MID))),
    "forward-backward": (forward_backward_rule(), ((1 - S_MID) - (1 - T_MID)) / (1 - T_MID)),
}


def _sigma_full(value):
    return torch.full((1, L), value, dtype=torch.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_transition_equals_closed_form(name):
    rule, sigma_ref = CASES[name]
    p, draft = _fixed_inputs()
    step = rule(T_MID, S_MID)
    assert step.sigma == pytest.approx(sigma_ref, abs=1e-12)
    q = transition_probs(p, draft, MASK, step, _sigma_full(step.sigma))
    ref = _closed_form(p, draft, T_MID, S_MID, _sigma_full(sigma_ref))
    assert (q - ref).abs().max() < 1e-6
    assert torch.allclose(q.sum(-1), torch.ones(1, L, dtype=torch.float64))


def test_mdlm_transition_is_reference_3_1():
    p, draft = _fixed_inputs()
    q = transition_probs(p, draft, MASK, mdlm_rule()(T_MID, S_MID), _sigma_full(0.0))
    masked = draft[0] == MASK
    # MDLM: P(v) = (t−s)/t·p(v), P(m) = s/t at masked positions; visible tokens are copied
    assert torch.allclose(q[0, masked, :MASK], (T_MID - S_MID) / T_MID * p[0, masked, :MASK])
    assert torch.allclose(q[0, masked, MASK], torch.full((3,), S_MID / T_MID, dtype=torch.float64))
    assert torch.equal(q[0, ~masked].argmax(-1), draft[0, ~masked])


def test_conf_transition_closed_form():
    p, draft = _fixed_inputs()
    scores = torch.tensor([[-math.inf, -0.9, -math.inf, -0.2, -0.5, -math.inf, -0.7]], dtype=torch.float64)
    step = remdm_conf_rule()(T_MID, S_MID)
    sigma_max = min(1.0, S_MID / (1 - T_MID))
    sigma = confidence_sigma(scores, draft == MASK, step.sigma)
    # remdm-conf: softmax over all L positions (−∞ at masked ones), no renormalisation over visible ones
    w = torch.exp(scores[0]) / torch.exp(scores[0]).sum()
    ref_sigma = torch.where(draft[0] == MASK, torch.zeros(L, dtype=torch.float64), w * sigma_max)
    assert torch.allclose(sigma[0], ref_sigma)
    q = transition_probs(p, draft, MASK, step, sigma)
    masked_sigma0 = torch.where(draft == MASK, torch.zeros_like(sigma), sigma)  # masked: MDLM
    assert (q - _closed_form(p, draft, T_MID, S_MID, masked_sigma0)).abs().max() < 1e-6


@pytest.mark.parametrize("t,s,phase", [(0.8, 0.79, 1), (0.3, 0.29, 2), (0.04, 0.03, 3)])
def test_loop_phases_closed_form(t, s, phase):
    eta, t_on, t_off, a_on = 0.02, 0.55, 0.05, 0.9
    step = remdm_loop_rule(eta, t_on, t_off, a_on)(t, s)
    p, draft = _fixed_inputs()
    q = transition_probs(p, draft, MASK, step, _sigma_full(step.sigma))
    masked = draft[0] == MASK
    if phase == 1:  # MDLM on α(t) = α_on(1−t)/(1−t_on)
        a_t, a_s = a_on * (1 - t) / (1 - t_on), a_on * (1 - s) / (1 - t_on)
        unmask, remask = (a_s - a_t) / (1 - a_t), 0.0
    elif phase == 2:  # frozen α_on, σ = η: unmask ηα_on/(1−α_on)
        unmask, remask = eta * a_on / (1 - a_on), eta
    else:  # MDLM on α(t) = 1 − t(1−α_on)/t_off
        a_t, a_s = 1 - t * (1 - a_on) / t_off, 1 - s * (1 - a_on) / t_off
        unmask, remask = (a_s - a_t) / (1 - a_t), 0.0
    assert torch.allclose(q[0, masked, :MASK], unmask * p[0, masked, :MASK], atol=1e-12)
    assert torch.allclose(q[0, masked, MASK], torch.full((3,), 1 - unmask, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q[0, ~masked, MASK], torch.full((4,), remask, dtype=torch.float64), atol=1e-12)


def test_loop_phase_split_matches_reference_at_T1024():
    rule = remdm_loop_rule(0.02, 0.55, 0.05, 0.9)
    grid = time_grid(1024, 1e-5).tolist()
    phases = []
    for k in range(1024):
        step = rule(grid[k], grid[k + 1])
        phases.append(2 if step.alpha_t == step.alpha_s == 0.9 else (1 if grid[k] > 0.55 else 3))
    assert [phases.count(i) for i in (1, 2, 3)] == [461, 512, 51]  # the official loop's split at T = 1024


MC_DRAWS = 20_000


@pytest.mark.parametrize("name", list(CASES) + ["remdm-conf", "loop-phase-2"])
def test_transition_monte_carlo(name):
    p, draft = _fixed_inputs(seed=3)
    if name == "remdm-conf":
        step = remdm_conf_rule()(T_MID, S_MID)
        scores = torch.tensor([[-math.inf, -0.9, -math.inf, -0.2, -0.5, -math.inf, -0.7]], dtype=torch.float64)
        sigma = confidence_sigma(scores, draft == MASK, step.sigma)
    elif name == "loop-phase-2":
        step = remdm_loop_rule(0.05, 0.55, 0.05, 0.9)(0.3, 0.29)
        sigma = _sigma_full(step.sigma)
    else:
        step = CASES[name][0](T_MID, S_MID)
        sigma = _sigma_full(step.sigma)
    q = transition_probs(p, draft, MASK, step, sigma)[0]  # (L, V)
    gen = torch.Generator().manual_seed(11)
    drafts = draft.expand(MC_DRAWS, L)
    unmask, remask = transition_coefficients(drafts == MASK, step, sigma.expand(MC_DRAWS, L))
    uniforms = torch.rand(MC_DRAWS, 2, L, generator=gen, dtype=torch.float64)
    new, _, _ = apply_transition(drafts, dense_candidates(p.expand(MC_DRAWS, L, V)), unmask, remask, uniforms,
                                 MASK)
    freq = torch.nn.functional.one_hot(new, V).double().mean(0)  # (L, V)
    se = (q * (1 - q) / MC_DRAWS).sqrt()
    assert ((freq - q).abs() <= 4.5 * se + 1e-12).all(), (freq - q).abs().max()
    # chi-square over every position's categories with positive mass
    pos = q > 0
    chi2 = float((((freq - q)[pos] ** 2) / q[pos]).sum() * MC_DRAWS)
    dof = int(pos.sum()) - L
    assert chi2 < dof + 5 * math.sqrt(2 * dof)


def test_forward_backward_clips_coarse_grid_like_gumbel():
    # forward-backward's σ is uncapped: at T = 2 the masked-branch mask weight is negative; Gumbel-max never picks it
    step = forward_backward_rule()(0.5, 1e-5)
    p, draft = _fixed_inputs()
    q = transition_probs(p, draft, MASK, step, _sigma_full(step.sigma))
    assert (q >= 0).all() and torch.allclose(q.sum(-1), torch.ones(1, L, dtype=torch.float64))
    assert torch.allclose(q[0, draft[0] == MASK, MASK], torch.zeros(3, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Whole runs with a hand-made denoiser.


def _cfg(**kw):
    base = dict(steps=24, top_p=0.9, batch_size=4)
    base.update(kw)
    return SamplingConfig(**base)


@pytest.mark.parametrize("sampler", ["mdlm", "remdm-cap", "remdm-loop", "remdm-conf", "dsl-budget"])
def test_cache_gives_identical_samples_with_fewer_forwards(sampler):
    den_on, den_off = ContextDenoiser(), ContextDenoiser()
    on = generate(den_on, _cfg(sampler=sampler, steps=40, cache=True), 8, L, seed=5)
    off = generate(den_off, _cfg(sampler=sampler, steps=40, cache=False), 8, L, seed=5)
    assert torch.equal(on.ids, off.ids)
    assert torch.equal(on.rewrites, off.rewrites)
    assert on.nfe.sum() < off.nfe.sum()
    assert int(on.nfe.sum()) <= den_on.calls * 4  # NFE counts real forward passes (≤ batch rows per call)


def test_samples_do_not_depend_on_batch_mates():
    den = ContextDenoiser()
    big = generate(den, _cfg(sampler="remdm-cap", eta=0.05, batch_size=6), 6, L, seed=9)
    single = generate(den, _cfg(sampler="remdm-cap", eta=0.05, batch_size=1), 6, L, seed=9)
    shifted = generate(den, _cfg(sampler="remdm-cap", eta=0.05, batch_size=2), 3, L, seed=9, first_index=3)
    assert torch.equal(big.ids, single.ids) and torch.equal(big.nfe, single.nfe)
    assert torch.equal(big.ids[3:], shifted.ids) and torch.equal(big.seeds[3:], shifted.seeds)


def test_carry_over_is_enforced_for_any_denoiser():
    den = ContextDenoiser(scramble_visible=True)
    draft = torch.tensor([[MASK, 2, MASK, 0, 4, MASK, 1]])
    probs = den(draft)
    visible = draft[0] != MASK
    assert torch.equal(probs[0, visible], torch.nn.functional.one_hot(draft[0, visible], V).double())
    assert (probs[..., MASK] == 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(1, L, dtype=torch.float64))


@pytest.mark.parametrize("sampler,count", [("remdm-loop", "remask"), ("remdm-cap", "change"),
                                           ("remdm-conf", "remask"), ("forward-backward", "change")])
def test_rewrites_equal_recount_from_trajectory(sampler, count):
    den = ContextDenoiser()
    batch = generate(den, _cfg(sampler=sampler, eta=0.1, steps=30, rewrite_count=count), 5, L, seed=2,
                     keep_trajectory=True)
    traj = batch.trajectory.numpy()  # (T, n, L)
    assert traj.shape == (30, 5, L)
    prev = np.concatenate([np.full((1, 5, L), MASK), traj[:-1]])  # the all-mask prior before step 0
    if count == "remask":
        expected = ((prev != MASK) & (traj == MASK)).sum(0)
    else:  # eq. 25: Σ_{k=1}^{T-1} 1[x^(k) ≠ x^(k-1)]
        expected = (traj[1:] != traj[:-1]).sum(0)
    assert np.array_equal(batch.rewrites.numpy(), expected)
    assert np.allclose(batch.mean_rewrites.numpy(), expected.mean(-1))
    assert torch.equal(batch.ids, batch.trajectory[-1])


@pytest.mark.parametrize("sampler", ["mdlm", "remdm-cap", "remdm-loop", "remdm-official", "dsl-budget"])
def test_masked_ratio_ends_at_zero_and_diagnostics_are_per_step(sampler):
    batch = generate(ContextDenoiser(), _cfg(sampler=sampler, steps=20), 4, L, seed=1)
    d = batch.diagnostics
    assert all(len(v) == 20 for v in d.values())
    assert d["masked_ratio"][-1] == 0.0 and (batch.ids != MASK).all()
    assert d["t"][0] == 1.0 and np.all(np.diff(d["t"]) < 0)
    np.testing.assert_allclose(d["mean_max_prob"], 1 - d["uncertainty"])
    assert np.all(d["nucleus_size"][~np.isnan(d["nucleus_size"])] >= 1)
    # eq. 21 (net): the reveal fractions add up to the whole sequence
    assert d["reveal_fraction"].sum() == pytest.approx(1.0)


def test_official_protocol_switches_at_length():
    cap = generate(ContextDenoiser(), _cfg(sampler="remdm-official", steps=L - 1), 2, L, seed=0)
    loop = generate(ContextDenoiser(), _cfg(sampler="remdm-official", steps=L), 2, L, seed=0)
    assert cap.settings["resolved"] == {"rule": "remdm-cap", "eta": 0.008}
    assert loop.settings["resolved"] == {"rule": "remdm-loop", "eta": 0.02, "t_on": 0.55, "t_off": 0.05,
                                         "alpha_on": 0.9}


def test_dsl_budget_uses_eta_cap_and_says_so():
    batch = generate(ContextDenoiser(), _cfg(sampler="dsl-budget", steps=256), 1, L, seed=0)
    assert batch.eta_cap == pytest.approx(0.008) and batch.eta_cap_source == "default:sec6.1"
    assert batch.settings["resolved"]["eta"] == pytest.approx(0.008)
    other = generate(ContextDenoiser(), _cfg(sampler="dsl-budget", steps=1024, eta_cap_table="eq24"), 1, L, 0)
    assert other.eta_cap == pytest.approx(0.004) and other.eta_cap_source == "builtin:eq24"


def test_noise_removal_counts_one_forward_only_when_needed():
    # loop with T small leaves masks (no phase-3 step); the greedy pass fills them, +1 NFE
    with_nr = generate(ContextDenoiser(), _cfg(sampler="remdm-loop", eta=0.5, steps=4), 8, L, 3)
    without = generate(ContextDenoiser(), _cfg(sampler="remdm-loop", eta=0.5, steps=4, noise_removal=False), 8, L, 3)
    assert (with_nr.ids != MASK).all()
    still = (without.ids == MASK).any(-1)
    assert still.any() and not still.all()
    assert torch.equal(with_nr.nfe - without.nfe, still.long())


# ------------------------------------------------------------------------------------------------
# The p(x0) cache with broad rows: tokens above a threshold are kept without being listed.


def _broad_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(rows, vocab, generator=gen), dim=-1).float() + 1
    logits = -ranks.log()  # Zipf: a nucleus of ~10^3 tokens at V = 6000, decided by the histogram band
    logits[:, -1] = -1.0e30
    return logits


def test_cache_draws_broad_rows_from_their_whole_kept_set():
    from dsl.sampling.candidates import NucleusCache
    from dsl.sampling.nucleus import top_p_filter

    vocab, n, length = 6000, 2, 3
    logits = _broad_logits(n * length, vocab, seed=0)
    nuc = top_p_filter(logits, 0.9, kind="logits")
    assert nuc.implicit is not None and (nuc.kept > 10 * nuc.ids.shape[1]).all()  # mostly unlisted
    cache = NucleusCache(n, length)
    cache.write(torch.arange(n), torch.ones(n, length, dtype=torch.bool), nuc)
    dense = nuc.dense(vocab)
    draws = 2_000
    reveal = torch.zeros(n, length, dtype=torch.bool)
    reveal[1, 2] = True
    grid = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    drawn = [cache.draw(reveal, g.reshape(1)) for g in grid]
    tokens = torch.stack([token for token, _ in drawn]).squeeze(-1)
    probs = torch.stack([prob for _, prob in drawn]).squeeze(-1)
    row = dense[1 * length + 2]
    assert (row[tokens] > 0).all()  # only kept tokens are drawn
    assert torch.equal(probs, row[tokens])  # with their renormalised probability
    # the quantile grid visits the kept tokens in cumulative order: token v gets ≈ draws·p(v) draws
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert (counts - draws * row).abs().max() <= 1.0 + 1e-9
    assert torch.equal(cache.top1()[1, 2], logits[1 * length + 2].argmax())


def test_cache_keeps_broad_rows_of_samples_that_were_not_refreshed():
    from dsl.sampling.candidates import NucleusCache
    from dsl.sampling.nucleus import top_p_filter

    vocab, n, length, draws = 6000, 3, 2, 2_000
    first = _broad_logits(n * length, vocab, seed=1)
    cache = NucleusCache(n, length)
    cache.write(torch.arange(n), torch.ones(n, length, dtype=torch.bool), top_p_filter(first, 0.9, kind="logits"))
    # sample 1 is refreshed with one position still masked and a sharp prediction; 0 and 2 keep theirs
    masked = torch.tensor([[True, False]])
    second = _broad_logits(1, vocab, seed=2) * 8
    cache.write(torch.tensor([1]), masked, top_p_filter(second, 0.9, kind="logits"))
    grid = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws

    def tokens_of(sample, position):
        reveal = torch.zeros(n, length, dtype=torch.bool)
        reveal[sample, position] = True
        return torch.cat([cache.draw(reveal, g.reshape(1))[0] for g in grid])

    for sample, position, logits in ((0, 1, first[1]), (2, 0, first[4]), (1, 0, second[0])):
        expected = top_p_filter(logits.unsqueeze(0), 0.9, kind="logits").dense(vocab)[0]
        counts = torch.bincount(tokens_of(sample, position), minlength=vocab).double()
        assert (counts - draws * expected).abs().max() <= 1.0 + 1e-9, (sample, position)


def test_cache_looks_up_a_broad_rows_top1_only_when_asked_lowest_id_among_ties():
    from dsl.sampling.candidates import NucleusCache
    from dsl.sampling.nucleus import top_p_filter

    vocab, n, length = 6000, 2, 3
    logits = _broad_logits(n * length, vocab, seed=1)
    best = logits.argmax(-1)
    logits[4, 17] = logits[4, best[4]]  # a tie at the top: the lower id is the official argmax
    nuc = top_p_filter(logits, 0.9, kind="logits")
    assert (nuc.top1 < 0).all()  # broad rows: not looked up while filtering
    cache = NucleusCache(n, length)
    cache.write(torch.arange(n), torch.ones(n, length, dtype=torch.bool), nuc)
    expected = torch.softmax(logits, -1).argmax(-1)  # torch's argmax: the first maximal index
    assert int(expected[4]) == min(17, int(best[4]))
    assert torch.equal(cache.top1().reshape(-1), expected)
    assert torch.equal(nuc.most_probable(), expected)
