"""Likelihood through the path integral: exact oracles, a smoothed oracle's exact bound, text characters."""

from __future__ import annotations

import math

import pytest
import torch

from dsl.channel import spherical_embeddings
from dsl.data.tokenizers import CharTokenizer
from dsl.data.wrapping import wrap_documents
from dsl.errors import UserError
from dsl.eval.likelihood import count_text_characters, factorised_log_prob, path_integral_likelihood
from dsl.objectives import nll_to_bits
from dsl.sources import HMMSource, SmoothedPosterior
from dsl.sources.cyclic import CyclicSource


def test_characters_are_the_text_of_the_wrapped_blocks_not_the_special_tokens():
    tok = CharTokenizer()
    docs = ["hello world", "abc"]
    blocks = torch.tensor([b for b, _ in wrap_documents((tok.encode(d) for d in docs), 8, tok.bos_id, tok.eos_id)])
    # [BOS] "hello " [EOS] | [BOS] "world" [EOS] [EOS]: 11 characters; decoding them would count 36
    assert [tok.decode(b) for b in blocks.tolist()] == ["[BOS]hello [EOS]", "[BOS]world[EOS][EOS]"]
    assert count_text_characters(blocks, tok) == 11
    assert nll_to_bits(10.0, blocks.numel(), 11) == pytest.approx(10.0 / (11 * math.log(2)))  # 1.3115 bits/char


def test_exact_oracle_estimate_matches_the_exact_nll_within_its_stderr():
    source = HMMSource(states=6, words=20, seed=1, length=6)
    emb = spherical_embeddings(source.vocab_size, 8, source.mask_id, torch.Generator().manual_seed(0),
                               dtype=torch.float64)
    ids = source.sample(12, torch.Generator().manual_seed(2))
    res = path_integral_likelihood(lambda z: source.posterior_mean(z, emb), emb.__getitem__, ids, n_mc=48,
                                   gen=torch.Generator().manual_seed(3), batch_size=5, n_chars=ids.numel(),
                                   t_end=math.inf, exact_denoiser=True)
    assert res["estimator"].startswith("eq. 3")
    exact = float(-source.log_prob(ids).sum()) / ids.numel()
    assert res["n_tokens"] == 72 and res["n_sequences"] == 12
    assert res["stderr_per_token"] > 0
    assert abs(res["nll_per_token"] - exact) < 4 * res["stderr_per_token"]
    assert res["bits_per_char"] == pytest.approx(res["nll_per_token"] / math.log(2))


def test_stopped_path_with_the_exact_end_term_matches_too():
    source = HMMSource(states=6, words=20, seed=1, length=6)
    emb = spherical_embeddings(source.vocab_size, 8, source.mask_id, torch.Generator().manual_seed(0),
                               dtype=torch.float64)
    ids = source.sample(12, torch.Generator().manual_seed(2))
    res = path_integral_likelihood(lambda z: source.posterior_mean(z, emb), emb.__getitem__, ids, n_mc=48,
                                   gen=torch.Generator().manual_seed(4), batch_size=5, t_end=4.0, exact_denoiser=True,
                                   end_log_prob=lambda x_ids, z: source.log_posterior(x_ids, z, emb))
    exact = float(-source.log_prob(ids).sum()) / ids.numel()
    assert abs(res["nll_per_token"] - exact) < 4 * res["stderr_per_token"]


def test_factorised_end_term_is_the_sum_of_token_log_probs():
    table = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))  # logits per position

    def logits_fn(z):
        return table.expand(z.shape[0], 5, 3)

    ids = torch.tensor([[0, 1, 2, 1, 0]])
    expected = float(torch.log_softmax(table.double(), -1)[torch.arange(5), ids[0]].sum())
    got = factorised_log_prob(logits_fn)(ids, torch.zeros(1, 5, 2))
    assert float(got[0]) == pytest.approx(expected)


def test_a_smoothed_oracle_gets_a_finite_bound_by_default_and_eq3_is_refused():
    """A 0.1 %-smoothed exact oracle stands in for a learned model: never one-hot, so eq. 3 diverges for it.
    The default (eq. 4 to t* = γ_max = 50, factorised end term) matches its exact bound, computed by
    quadrature, on every seed, and no sequence blows up."""
    source = CyclicSource(7, 7)
    emb = source.circle_embeddings(torch.float64)
    model = SmoothedPosterior(source, emb, smoothing=1e-3)
    bound = source.circle_bound(50.0, smoothing=1e-3)
    assert math.log(7) < bound < math.log(7) + 0.01  # an upper bound on -log P(x), and a tight one
    for seed in range(4):
        ids = source.sample(32, torch.Generator().manual_seed(100 + seed))
        res = path_integral_likelihood(model.posterior_mean, emb.__getitem__, ids, n_mc=64,
                                       gen=torch.Generator().manual_seed(seed), batch_size=16,
                                       end_log_prob=model.factorised_log_prob)
        assert res["t_end"] == 50.0 and "upper bound" in res["estimator"]
        estimate, stderr = res["nll_per_sequence"], res["stderr_per_token"] * 7
        assert abs(estimate - bound) < 3 * stderr and stderr < 0.1 * bound, (seed, estimate, stderr, bound)
        assert res["nll_max_sequence"] < bound + 3.0, (seed, res["nll_max_sequence"])  # no sequence blows up
    with pytest.raises(UserError, match=r"t_end=inf .*exact denoiser.*allow_eq3"):
        path_integral_likelihood(model.posterior_mean, emb.__getitem__, ids, n_mc=4, gen=torch.Generator(),
                                 t_end=math.inf)


def test_the_quadrature_bound_is_exact_for_the_exact_oracle():
    # eq. 10 is an identity for the exact denoiser with the exact (joint) end term, at any t*
    for k, length, t_end in ((7, 7, 50.0), (7, 7, 2.0), (3, 5, 50.0)):
        assert CyclicSource(k, length).circle_bound(t_end, factorised=False) == pytest.approx(math.log(k), abs=1e-5)
