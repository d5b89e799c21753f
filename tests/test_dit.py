"""Time-invariant DiT (Sec 4.3): MDLM's names/sizes, σ=0 conditioning and its cache, causal AR masking."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dsl.config import MODEL_PRESETS, ModelConfig
from dsl.errors import UserError
from dsl.models.ar import ARTransformer
from dsl.models.dit import DiT

torch.set_num_threads(1)


def cfg_of(preset="toy", vocab=31, **kw):
    return dataclasses.replace(ModelConfig(), **{**MODEL_PRESETS[preset], "vocab_size": vocab,
                                                "mask_id": vocab - 1, **kw})


def randomised(model, seed=0, scale=0.2):
    """Every parameter random (the zero-initialised adaLN would hide the conditioning otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def count_on_meta(preset, vocab=50258):
    with torch.device("meta"):
        model = DiT(cfg_of(preset, vocab))
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_mdlm_sizes():
    # kuleshov-group/mdlm configs/model/{small,tiny,medium}.yaml with GPT-2's V = 50258: 169.63 M, 80.06 M, 424.5 M
    assert count_on_meta("small") == 169_627_218
    assert round(count_on_meta("small") / 1e6, 2) == 169.63
    assert round(count_on_meta("tiny") / 1e6, 2) == 80.06
    assert round(count_on_meta("medium") / 1e6, 1) == 424.5


def test_parameter_names_and_order_follow_mdlm():
    with torch.device("meta"):
        model = DiT(cfg_of("small", 50258))
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 130  # the EMA shadow list length of MDLM's small checkpoint
    assert names[:5] == ["vocab_embed.embedding", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias",
                         "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias"]
    assert names[5:15] == [f"blocks.0.{n}" for n in (
        "norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight", "mlp.0.bias",
        "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias")]
    assert names[-5:] == ["output_layer.norm_final.weight", "output_layer.linear.weight",
                          "output_layer.linear.bias", "output_layer.adaLN_modulation.weight",
                          "output_layer.adaLN_modulation.bias"]
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert shapes["rotary_emb.inv_freq"] == (32,)
    assert shapes["blocks.11.attn_qkv.weight"] == (2304, 768)
    assert shapes["blocks.0.adaLN_modulation.weight"] == (4608, 128)
    assert shapes["output_layer.adaLN_modulation.weight"] == (1536, 128)


def test_zero_init_gives_zero_logits_and_fp32_output():
    model = DiT(cfg_of()).eval()
    out = model(torch.randint(0, 31, (2, 9)))
    assert out.shape == (2, 9, 31) and out.dtype == torch.float32
    assert out.abs().max() == 0
    assert (model.vocab_size, model.mask_id) == (31, 30)


def test_conditioning_is_silu_of_sigma_map_at_sigma_zero():
    model = randomised(DiT(cfg_of()))
    phi = torch.cat([torch.ones(128), torch.zeros(128)])  # [cos(0·ω)] ++ [sin(0·ω)]
    mlp = model.sigma_map.mlp
    expected = F.silu(mlp[2](F.silu(mlp[0](phi))))
    assert torch.allclose(model.conditioning()[0], expected, atol=1e-6)


def test_time_invariant_output_is_the_same_in_train_and_cached_eval():
    model = randomised(DiT(cfg_of(dropout=0.0)))
    ids = torch.randint(0, 31, (2, 12), generator=torch.Generator().manual_seed(1))
    model.train()
    train_out = model(ids)
    model.eval()
    with torch.no_grad():
        first = model(ids)
        assert model._cond_cache is not None
        second = model(ids)  # served from the cached c
    assert torch.equal(first, second)
    assert torch.allclose(train_out, first, atol=1e-6)


def test_cached_conditioning_follows_in_place_weight_changes():
    model = randomised(DiT(cfg_of(dropout=0.0))).eval()
    ids = torch.randint(0, 31, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids)
        model.sigma_map.mlp[2].bias.add_(0.5)  # as an EMA swap or optimizer step would
        after = model(ids)
        model._cond_cache = None
        fresh = model(ids)
    assert not torch.allclose(before, after)
    assert torch.equal(after, fresh)


def test_sigma_map_gets_gradients_in_training():
    model = randomised(DiT(cfg_of(dropout=0.0))).train()
    model(torch.randint(0, 31, (2, 6))).square().mean().backward()
    assert model.sigma_map.mlp[0].weight.grad.abs().sum() > 0


def test_inputs_embeds_and_extra_match_the_ids_path():
    model = randomised(DiT(cfg_of())).eval()
    ids = torch.randint(0, 31, (2, 7))
    emb = model.vocab_embed.embedding[ids]
    extra = torch.randn(2, 7, 32)
    assert torch.allclose(model(ids), model(inputs_embeds=emb), atol=1e-6)
    assert torch.allclose(model(inputs_embeds=emb + extra), model(inputs_embeds=emb, extra=extra), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=emb)


def test_bidirectional_dit_sees_the_future_and_ar_does_not():
    ids = torch.randint(0, 31, (1, 10), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 31
    ar = randomised(ARTransformer(cfg_of())).eval()
    dit = randomised(DiT(cfg_of())).eval()
    a, b = ar(ids), ar(changed)
    assert torch.equal(a[0, :6], b[0, :6])  # rows before the change are untouched
    assert not torch.allclose(a[0, 6:], b[0, 6:])
    d1, d2 = dit(ids), dit(changed)
    assert not torch.allclose(d1[0, :6], d2[0, :6])


def test_sequence_longer_than_model_length_is_one_clear_error():
    model = DiT(cfg_of(length=8))
    with pytest.raises(UserError, match=r"9 tokens is longer than model.length=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
