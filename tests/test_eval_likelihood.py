"""Likelihood through the path integral: text8-style chunks and the exact HMM oracle."""

from __future__ import annotations

import math

import pytest
import torch

from dsl.channel import spherical_embeddings
from dsl.data.tokenizers import CharTokenizer
from dsl.errors import UserError
from dsl.eval.likelihood import path_integral_likelihood, text8_chunks
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
