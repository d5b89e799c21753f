"""Featurizers: exact pooling against a direct transformers forward, batch planning, local model dirs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsl.errors import UserError
from dsl.eval.featurizers import MINILM_LAYER, get_featurizer, resolve_spec

TEXTS = ["A short one.", "The cat sat on the mat, and then it sat on the hat for a while.",
         "Numbers 1 2 3 and words.", "one more text to make a second batch"]


def test_minilm_features_are_the_mean_of_content_tokens_of_layer_3_of_the_full_model():
    from transformers import AutoModel, AutoTokenizer

    spec = resolve_spec("minilm")
    fz = get_featurizer("minilm", max_length=32, batch_size=3)
    ours = fz.featurize(TEXTS)
    tok = AutoTokenizer.from_pretrained(spec.model_path)
    full = AutoModel.from_pretrained(spec.model_path).eval()  # all 6 layers
    assert full.config.num_hidden_layers == 6 and MINILM_LAYER == 3
    for i, text in enumerate(TEXTS):
        enc = tok(text, return_tensors="pt", truncation=True, max_length=32)
        with torch.no_grad():
            h = full(**enc, output_hidden_states=True).hidden_states[3][0]  # (T, d)
        direct = h[1:-1].mean(0).numpy()  # without [CLS] and [SEP]
        np.testing.assert_allclose(ours[i], direct, rtol=1e-4, atol=1e-5)


def test_batch_plan_is_longest_first_and_covers_every_text_once():
    fz = get_featurizer("minilm", max_length=32, batch_size=3)
    plan = fz.batch_plan(TEXTS)
    assert sorted(i for b in plan for i in b) == list(range(len(TEXTS)))
    assert [len(b) for b in plan] == [3, 1]
    lengths = fz.token_lengths(TEXTS)
    flat = [i for b in plan for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    words = ["<|endoftext|>", "[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", unk_token="[UNK]")
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=len(words), n_positions=16, n_embd=8, n_layer=2, n_head=2))
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), model.eval(), tok


def test_local_decoder_dir_uses_the_last_layer_at_the_last_real_token(tiny_gpt2_dir):
    path, model, tok = tiny_gpt2_dir
    fz = get_featurizer(path, max_length=16, batch_size=2)
    assert fz.spec.pooling == "last" and fz.spec.layer == -1
    texts = ["the cat sat on the mat", "a dog", "the dog sat"]
    ours = fz.featurize(texts)
    for i, text in enumerate(texts):  # one text at a time, no padding
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            direct = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
        np.testing.assert_allclose(ours[i], direct, rtol=1e-4, atol=1e-5)
    assert fz.truncate(["the cat sat on the mat"], 2) == ["the cat"]


def test_unknown_names_and_bad_dirs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown featurizer"):
        get_featurizer("no-such-model")
    with pytest.raises(UserError, match="config.json"):
        get_featurizer(str(tmp_path))
    with pytest.raises(UserError, match="batch_size"):
        get_featurizer("minilm", batch_size=0)
    with pytest.raises(UserError, match="exceeds"):
        get_featurizer("minilm", max_length=100000)
