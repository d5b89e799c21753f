"""Generative perplexity: exact-source oracle, our AR oracle, and the ReMDM re-tokenisation protocol."""

from __future__ import annotations

import math

import pytest
import torch

from dsl.errors import UserError
from dsl.eval.genppl import ARCheckpointOracle, CausalLMOracle, ExactSourceOracle, genppl
from dsl.sources import HMMSource


def test_exact_oracle_genppl_is_exp_of_source_nll_per_token():
    source = HMMSource(states=8, words=30, seed=0, length=16)
    ids = source.sample(21, torch.Generator().manual_seed(3))
    direct = math.exp(float(-source.log_prob(ids).sum()) / ids.numel())
    # batches of 5 leave a remainder batch: every sample is scored, pooled over tokens
    r = genppl(ExactSourceOracle(source), ids.tolist(), batch_size=5)
    assert r["genppl"] == pytest.approx(direct, rel=1e-12)
    assert r["n_tokens"] == 21 * 16 and r["n_sequences"] == 21


def test_exact_oracle_pools_over_tokens_not_over_samples():
    source = HMMSource(states=8, words=30, seed=0, length=16)
    ids = source.sample(6, torch.Generator().manual_seed(4))
    per_sample = [genppl(ExactSourceOracle(source), [row])["genppl"] for row in ids.tolist()]
    pooled = genppl(ExactSourceOracle(source), ids.tolist(), batch_size=4)["genppl"]
    assert pooled == pytest.approx(math.exp(sum(math.log(p) for p in per_sample) / 6), rel=1e-12)


class Bigram(torch.nn.Module):
    """An exactly solvable 'AR checkpoint': logits at position j depend on token j only."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids):
        return self.table[ids]  # (B, L, V)


def test_ar_oracle_scores_next_tokens_and_skips_the_first():
    model = Bigram(7)
    ids = torch.randint(0, 7, (5, 9), generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(model.table.detach().double(), -1)
    nll = -sum(float(logp[r[j - 1], r[j]]) for r in ids.tolist() for j in range(1, 9))
    res = genppl(ARCheckpointOracle(model), ids.tolist(), batch_size=2)
    assert res["n_tokens"] == 5 * 8
    assert res["nll_per_token"] == pytest.approx(nll / 40, rel=1e-5)


@pytest.fixture(scope="module")
def tiny_causal_lm():
    """A word-level tokenizer with GPT-2's EOS string and a tiny random GPT-2, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "the", "cat", "sat", "on", "mat", "[UNK]"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", unk_token="[UNK]")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=16, n_layer=1, n_head=2))
    return model, tok


def test_retokenisation_weights_follow_remdm(tiny_causal_lm):
    model, tok = tiny_causal_lm
    oracle = CausalLMOracle(model, tok, max_length=8)
    ids, weight = oracle.encode(["<|endoftext|> the cat <|endoftext|> sat", "the cat sat on the mat on the mat"])
    # row 0: BOS-like EOS at 0 (unscored as first token), later EOS excluded, text after it scored, pads out
    assert ids[0].tolist() == [0, 1, 2, 0, 3, 0, 0, 0]
    assert weight[0].tolist() == [True, True, False, True, False, False, False]
    # row 1: right-truncated at max_length=8, every target after the first scored
    assert ids[1].tolist() == [1, 2, 3, 4, 1, 5, 4, 1] and weight[1].all()
    # a row without a leading EOS: its first EOS (the end) counts once, the pads after it do not
    _, w = oracle.encode(["the cat <|endoftext|>", "the cat sat on the mat"])
    assert w[0].tolist() == [True, True, False, False, False]
    # a text without EOS padded in a batch: no pad is scored (ReMDM would score the first one)
    _, w = oracle.encode(["the cat", "the cat sat on"])
    assert w[0].tolist() == [True, False, False]


def test_causal_lm_genppl_matches_a_direct_computation(tiny_causal_lm):
    model, tok = tiny_causal_lm
    texts = ["<|endoftext|> the cat sat", "the mat", "on the cat <|endoftext|> the"]
    total, count = 0.0, 0
    for t in texts:  # one text at a time: no padding at all
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        eos_seen = 1 if ids[0, 0] == 0 else 0
        for j in range(1, ids.shape[1]):
            is_eos = int(ids[0, j]) == 0
            eos_seen += is_eos
            if not is_eos or eos_seen == 1:
                total -= float(logp[0, j - 1, ids[0, j]])
                count += 1
    r = genppl(CausalLMOracle(model, tok), texts, batch_size=2)
    assert r["n_tokens"] == count
    assert r["genppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_impossible_samples_are_counted_and_left_out():
    source = HMMSource(states=8, words=30, seed=0, length=16)
    ids = source.sample(4, torch.Generator().manual_seed(3))
    logp = source.log_prob(ids)
    bad = ids[0].clone()
    bad[:] = 0  # "." repeated: impossible in this HMM (a sentence end is never followed by an end)
    assert torch.isinf(source.log_prob(bad[None])).all()
    r = genppl(ExactSourceOracle(source), [bad.tolist()] + ids.tolist(), batch_size=3)
    assert r["impossible"] == 1 and r["n_tokens"] == 4 * 16
    assert r["genppl"] == pytest.approx(math.exp(float(-logp.sum()) / (4 * 16)), rel=1e-12)
    with pytest.raises(UserError, match="impossible"):
        genppl(ExactSourceOracle(source, skip_impossible=False), [bad.tolist()])


def test_bad_inputs():
    source = HMMSource(states=8, words=30, seed=0, length=4)
    with pytest.raises(UserError, match="empty"):
        genppl(ExactSourceOracle(source), [])
    with pytest.raises(UserError, match="ids"):
        genppl(ExactSourceOracle(source), ["some text"])
    with pytest.raises(UserError, match="local model directory"):
        CausalLMOracle.load("/nonexistent/gpt2-large")
