"""Denoiser wrappers: carry-over and p(mask) = 0 for real MDLM and DSL models, DSL draft → z, loading
checkpoints and oracles by spec."""

from __future__ import annotations

import pytest
import torch

from dsl.checkpoint import save_checkpoint
from dsl.config import ConfigError, DataConfig, RunConfig, SamplingConfig, apply_overrides, to_dict
from dsl.errors import UserError
from dsl.models import build_model
from dsl.sampling import generate, load_denoiser
from dsl.sampling.denoiser import DSLDenoiser, MDLMDenoiser, OracleDenoiser

torch.set_num_threads(1)
VOCAB, LENGTH = 11, 12  # ten words and the mask id 10


def _run_cfg(objective: str) -> RunConfig:
    cfg = apply_overrides(RunConfig(), [f"objective={objective}", "model=toy", f"model.length={LENGTH}",
                                        "channel.embed_dim=8"], presets={})
    return cfg


def _model(objective: str):
    cfg = _run_cfg(objective)
    model = build_model(cfg, VOCAB)
    with torch.no_grad():  # the DiT's output layer starts at zero: make the logits position dependent
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return cfg, model.eval()


DRAFT = torch.tensor([[10, 3, 10, 10, 7, 1, 10, 10, 10, 2, 10, 10], [10] * 12])


@pytest.mark.parametrize("objective", ["mdlm", "dsl"])
def test_carry_over_and_no_mask_mass(objective):
    _, model = _model(objective)
    den = MDLMDenoiser(model) if objective == "mdlm" else DSLDenoiser(model, gamma_vis=50.0)
    probs = den(DRAFT)
    assert probs.dtype == torch.float64 and probs.shape == (2, LENGTH, VOCAB)
    visible = DRAFT != 10
    assert torch.equal(probs[visible], torch.nn.functional.one_hot(DRAFT[visible], VOCAB).double())
    assert (probs[..., 10] == 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(2, LENGTH, dtype=torch.float64))
    with torch.no_grad():
        raw = model(DRAFT) if objective == "mdlm" else model(den.draft_to_z(DRAFT))
    raw = raw.double()
    raw[..., 10] = -float("inf")
    expected = torch.softmax(raw, -1)
    assert torch.allclose(probs[~visible], expected[~visible], atol=1e-6)
    if objective == "dsl":  # the DSL model predicts at visible positions too; the wrapper ignores it
        assert (expected[visible].max(-1).values < 1 - 1e-6).all()


def test_dsl_draft_enters_as_scaled_clean_embedding():
    _, model = _model("dsl")
    den = DSLDenoiser(model, gamma_vis=7.5)
    z = den.draft_to_z(DRAFT)
    emb = model.token_embeddings().detach()
    assert torch.allclose(z[0, 1], 7.5 * emb[3]) and torch.equal(z[0, 0], torch.zeros_like(z[0, 0]))
    assert den.embeddings.shape == (VOCAB, 8)
    assert torch.allclose(den.posterior(z).sum(-1), torch.ones(2, LENGTH, dtype=torch.float64))


@pytest.mark.parametrize("objective,sampler", [("mdlm", "remdm-conf"), ("dsl", "dsl-budget"), ("dsl", "sde")])
def test_checkpoint_spec_loads_and_samples(tmp_path, objective, sampler):
    cfg, model = _model(objective)
    uri = save_checkpoint(str(tmp_path / "run"), 5, config=to_dict(cfg), model_state=model.state_dict())
    scfg = SamplingConfig(sampler=sampler, steps=6, batch_size=2)
    den = load_denoiser(uri, scfg)
    assert isinstance(den, MDLMDenoiser if objective == "mdlm" else DSLDenoiser)
    assert den.max_length == LENGTH and den.mask_id == 10
    batch = generate(den, scfg, 3, LENGTH, seed=0)
    assert (batch.ids != 10).all() and batch.ids.max() < 10
    again = generate(load_denoiser(str(tmp_path / "run"), scfg), scfg, 3, LENGTH, seed=0)  # the run root
    assert torch.equal(batch.ids, again.ids)


def test_bad_specs():
    with pytest.raises(ConfigError, match="oracle:hmm, oracle:cyclic, oracle:topics"):
        load_denoiser("oracle:markov", SamplingConfig())
    with pytest.raises(UserError, match="checkpoint=/no/such/run: no such file or directory; accepted: oracle:hmm"):
        load_denoiser("/no/such/run", SamplingConfig())
    with pytest.raises(ConfigError, match="which checkpoint does not take"):
        load_denoiser("hf:kuleshov-group/mdlm-owt", SamplingConfig())
    den = load_denoiser("oracle:cyclic", SamplingConfig())
    assert isinstance(den, OracleDenoiser) and den.max_length == 7 and den.decode([0, 1, 7]) == "AB_"
    topics = load_denoiser("oracle:topics", SamplingConfig(), length=16, data_cfg=DataConfig(topics=3))
    assert isinstance(topics, OracleDenoiser) and topics.source.topics == 3 and topics.max_length == 16


def test_ar_checkpoint_is_refused(tmp_path):
    cfg = apply_overrides(RunConfig(), ["objective=ar", "model.arch=ar", "model=toy", f"model.length={LENGTH}"],
                          presets={})
    model = build_model(cfg, VOCAB)
    uri = save_checkpoint(str(tmp_path / "ar"), 1, config=to_dict(cfg), model_state=model.state_dict())
    with pytest.raises(UserError, match="objective=ar"):
        load_denoiser(uri, SamplingConfig())


@pytest.mark.parametrize("pattern", ["all", "none", "first visible", "alternating", "random", "last only"])
def test_front_rows_gives_the_masked_rows_in_order_whatever_the_chunking(pattern, monkeypatch):
    from dsl.sampling import denoiser

    n, vocab = 37, 11
    keep = {"all": torch.ones(n, dtype=torch.bool), "none": torch.zeros(n, dtype=torch.bool),
            "first visible": torch.arange(n) > 0, "alternating": torch.arange(n) % 2 == 1,
            "random": torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.6,
            "last only": torch.arange(n) == n - 1}[pattern]
    table = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1))
    for rows_per_move in (1, 3, 64):  # the scratch holds this many rows: one move, several, a partial last
        monkeypatch.setattr(denoiser, "_GATHER_BYTES", rows_per_move * vocab * 4)
        edited = table.clone()
        front = denoiser.front_rows(edited, keep)
        assert torch.equal(front, table[keep])
        if keep.any():  # (an empty view has no data pointer)
            assert front.data_ptr() == edited.data_ptr()  # in place: no fresh (R, V) buffer
