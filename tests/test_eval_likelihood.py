"""Likelihood through the path integral: text8-style chunks and the exact HMM oracle."""

from __future__ import annotations

import math

import pytest
import torch

from dsl.channel import spherical_embeddings
from dsl.data.tokenizers import CharTokenizer
from dsl.errors import UserError
from dsl.eval.likelihood import factorised_log_prob, path_integral_likelihood, text8_chunks
from dsl.sources import HMMSource


def test_text8_chunks_are_consecutive_and_drop_the_tail():
    tok = CharTokenizer()
    text = "abcdefghij klmnopqrst uvwxyz"  # 28 chars
    ids = text8_chunks(text, tok.encode, length=8)
    assert ids.shape == (3, 8)
    assert [tok.decode(r) for r in ids.tolist()] == [text[0:8], text[8:16], text[16:24]]
    with pytest.raises(UserError, match="fewer than one chunk"):
        text8_chunks("abc", tok.encode, length=8)


def test_exact_oracle_estimate_matches_the_exact_nll_within_its_stderr():
    source = HMMSource(states=6, words=20, seed=1, length=6)
    emb = spherical_embeddings(source.vocab_size, 8, source.mask_id, torch.Generator().manual_seed(0),
                               dtype=torch.float64)
    ids = source.sample(12, torch.Generator().manual_seed(2))
    res = path_integral_likelihood(lambda z: source.posterior_mean(z, emb), emb.__getitem__, ids, n_mc=48,
                                   gen=torch.Generator().manual_seed(3), batch_size=5, n_chars=ids.numel())
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
                                   gen=torch.Generator().manual_seed(4), batch_size=5, t_end=4.0,
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
