"""DSLModel (converter + DiT) and build_model: never predicts the mask, posterior mean, ‖z‖ option."""

import math

import pytest
import torch

from dsl.config import ConfigError, RunConfig, load
from dsl.models import ARTransformer, DiT, DSLModel, build_model

torch.set_num_threads(1)

VOCAB = 21


def run_cfg(*args):
    return load(RunConfig, ["model=toy", *args])


def randomise_backbone(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def noisy(model, ids, gamma, seed=1):
    x = model.embed(ids)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return gamma * x + math.sqrt(gamma) * eps


def test_build_model_picks_the_class_and_resolves_vocab():
    cfg = run_cfg()
    model = build_model(cfg, VOCAB)
    assert isinstance(model, DSLModel)
    assert (cfg.model.vocab_size, cfg.model.mask_id) == (VOCAB, VOCAB - 1)
    assert type(build_model(run_cfg("objective=mdlm"), VOCAB)) is DiT
    assert isinstance(build_model(run_cfg("objective=ar", "model.arch=ar"), VOCAB), ARTransformer)


def test_build_model_vocab_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.vocab_size=0"):
        build_model(run_cfg())
    with pytest.raises(ConfigError, match="model.vocab_size=30 but the tokenizer has 21"):
        build_model(run_cfg("model.vocab_size=30"), VOCAB)


def test_build_model_init_depends_on_seed_only():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = build_model(run_cfg("seed=4"), VOCAB).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(999)
    b = build_model(run_cfg("seed=4"), VOCAB).state_dict()
    c = build_model(run_cfg("seed=5"), VOCAB).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["converter.token_embed"], c["converter.token_embed"])


def test_dsl_model_never_puts_mass_on_the_mask():
    model = randomise_backbone(build_model(run_cfg(), VOCAB)).eval()
    ids = torch.randint(0, VOCAB - 1, (3, 10))
    for gamma in (0.0, 2.0, 50.0):  # γ = 0 is where the converter input is most mask-like
        logits = model(noisy(model, ids, gamma))
        probs = torch.softmax(logits, -1)
        assert torch.isneginf(logits[..., model.mask_id]).all()
        assert probs[..., model.mask_id].max() == 0
        assert torch.allclose(probs.sum(-1), torch.ones(3, 10))


def test_the_mask_bias_in_the_output_layer_trains_like_filling_the_logits():
    # p(mask) = 0 is folded into the output layer's bias; the same loss and gradients as a model whose
    # logits get −inf at the mask column afterwards (and nothing flows into the mask column's weights)
    model = randomise_backbone(build_model(run_cfg(), VOCAB))
    ids = torch.randint(0, VOCAB - 1, (2, 10), generator=torch.Generator().manual_seed(5))
    z = noisy(model, ids, 3.0).detach()

    def loss_and_grads(logits_of):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_of(z).flatten(0, 1), ids.flatten())
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    def filled(z):
        logits = model.backbone(inputs_embeds=model.converter(z))
        return logits.index_fill(-1, torch.tensor([model.mask_id]), float("-inf"))

    loss, grads = loss_and_grads(model)
    ref_loss, ref_grads = loss_and_grads(filled)
    assert torch.isfinite(loss) and torch.allclose(loss, ref_loss, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert torch.allclose(grad, ref_grads[name], rtol=1e-5, atol=1e-7), name
    output = model.backbone.output_layer.linear
    assert output.bias.grad[model.mask_id] == 0 and (output.weight.grad[model.mask_id] == 0).all()


def test_embed_and_posterior_mean():
    model = randomise_backbone(build_model(run_cfg(), VOCAB)).eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    ids[0, 0] = model.mask_id
    x = model.embed(ids)
    assert x.shape == (2, 8, 64)
    assert x[0, 0].abs().max() == 0
    norms = x.norm(dim=-1)
    assert torch.allclose(norms[ids != model.mask_id], torch.ones(()))
    z = noisy(model, ids, 3.0)
    mean = model.posterior_mean(z)
    expected = torch.softmax(model(z), -1) @ model.token_embeddings()
    assert torch.allclose(mean, expected, atol=1e-6)
    assert (mean.norm(dim=-1) <= 1 + 1e-5).all()  # a convex combination of unit rows


def test_every_dsl_parameter_gets_a_gradient():
    # no unused parameters (the DiT's vocab_embed is dropped), so DDP needs no find_unused_parameters
    model = randomise_backbone(build_model(run_cfg("model.dropout=0"), VOCAB)).train()
    ids = torch.randint(0, VOCAB - 1, (2, 6))
    logits = model(noisy(model, ids, 2.0))
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1)).backward()
    assert "backbone.vocab_embed.embedding" not in dict(model.named_parameters())
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_znorm_input_starts_as_the_plain_model_and_then_uses_the_norm():
    plain = build_model(run_cfg("seed=1"), VOCAB)
    with_norm = build_model(run_cfg("seed=1", "model.znorm_input=true"), VOCAB)
    randomise_backbone(plain), randomise_backbone(with_norm)
    assert set(dict(with_norm.named_parameters())) - set(dict(plain.named_parameters())) == {
        "znorm_proj.weight", "znorm_proj.bias"}
    ids = torch.randint(0, VOCAB - 1, (2, 6))
    z = noisy(plain, ids, 4.0)
    assert torch.allclose(plain(z), with_norm(z), atol=1e-6)  # zero-initialised projection
    with_norm(z).logsumexp(-1).sum().backward()
    assert with_norm.znorm_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        with_norm.znorm_proj.weight.normal_()
        h = with_norm.converter(z)
        log_norm = torch.log1p(z.norm(dim=-1, keepdim=True))  # Alg 1 line 18 reading: log(1 + ‖z_i‖)
        expected = with_norm.backbone(inputs_embeds=h + with_norm.znorm_proj(log_norm))
        out = with_norm(z)
    assert torch.allclose(out[..., :-1], expected[..., :-1], atol=1e-5)
    assert not torch.allclose(out[..., :-1], plain(z)[..., :-1], atol=1e-3)
