"""Loading official MDLM weights: a state dict in MDLM's exact layout (names/shapes from the reference,
written here, not taken from our modules), as a Lightning .ckpt with EMA and pickled foreign objects and as
an HF directory; logits must equal an independent functional forward pass written in this file."""

import json
import math
import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from dsl.config import ChannelConfig, ModelConfig
from dsl.errors import UserError
from dsl.models import DiT, DSLModel
from dsl.models import mdlm_weights as W
from dsl.models.restricted_unpickle import Unloaded, load_pickled_checkpoint

torch.set_num_threads(1)

V, D, HEADS, BLOCKS, COND, MLP = 23, 32, 2, 2, 16, 4
DH = D // HEADS

# ---------------------------------------------------------------------------------------------------
# The MDLM layout (kuleshov-group/mdlm models/dit.py DIT), in backbone.parameters() order, the order of the
# EMA shadow list its Lightning checkpoints store.


def mdlm_layout(vocab=V, dim=D, blocks=BLOCKS, cond=COND, mlp=MLP):
    layout = OrderedDict()
    layout["vocab_embed.embedding"] = (vocab, dim)
    layout["sigma_map.mlp.0.weight"], layout["sigma_map.mlp.0.bias"] = (cond, 256), (cond,)
    layout["sigma_map.mlp.2.weight"], layout["sigma_map.mlp.2.bias"] = (cond, cond), (cond,)
    for i in range(blocks):
        p = f"blocks.{i}."
        layout[p + "norm1.weight"] = (dim,)
        layout[p + "attn_qkv.weight"] = (3 * dim, dim)
        layout[p + "attn_out.weight"] = (dim, dim)
        layout[p + "norm2.weight"] = (dim,)
        layout[p + "mlp.0.weight"], layout[p + "mlp.0.bias"] = (mlp * dim, dim), (mlp * dim,)
        layout[p + "mlp.2.weight"], layout[p + "mlp.2.bias"] = (dim, mlp * dim), (dim,)
        layout[p + "adaLN_modulation.weight"] = (6 * dim, cond)
        layout[p + "adaLN_modulation.bias"] = (6 * dim,)
    layout["output_layer.norm_final.weight"] = (dim,)
    layout["output_layer.linear.weight"], layout["output_layer.linear.bias"] = (vocab, dim), (vocab,)
    layout["output_layer.adaLN_modulation.weight"] = (2 * dim, cond)
    layout["output_layer.adaLN_modulation.bias"] = (2 * dim,)
    return layout


def random_params(seed):
    gen = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for name, shape in mdlm_layout().items():
        if name == "vocab_embed.embedding":
            scale = 1.0
        else:
            scale = 0.5 / math.sqrt(shape[1]) if len(shape) == 2 else 0.1
        t = torch.randn(shape, generator=gen) * scale
        if name.endswith(("norm1.weight", "norm2.weight", "norm_final.weight")):
            t = t + 1.0
        out[name] = t
    return out


def inv_freq(dh=DH):
    return 1.0 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)


# ---------------------------------------------------------------------------------------------------
# Independent functional forward (kuleshov-group/mdlm models/dit.py: DIT.forward, rotary), float64, no
# modules of ours.


def reference_logits(p, ids, heads=HEADS):
    p = {k: v.double() for k, v in p.items()}
    h = p["vocab_embed.embedding"][ids]  # (B, L, D)
    B, L, dim = h.shape
    dh = dim // heads
    k = torch.arange(128, dtype=torch.float64)
    omega = 10000.0 ** (-k / 128)
    sigma = 0.0
    phi = torch.cat([torch.cos(sigma * omega), torch.sin(sigma * omega)])  # cos half first
    silu = lambda x: x * torch.sigmoid(x)  # noqa: E731
    c = silu(p["sigma_map.mlp.2.weight"] @ silu(p["sigma_map.mlp.0.weight"] @ phi + p["sigma_map.mlp.0.bias"])
             + p["sigma_map.mlp.2.bias"])  # outer SiLU

    def ln(x, w):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w

    j = torch.arange(dh // 2, dtype=torch.float64)
    theta = torch.arange(L, dtype=torch.float64)[:, None] * 10000.0 ** (-2 * j / dh)[None]  # (L, dh/2)
    cos, sin = theta.cos()[:, None, :], theta.sin()[:, None, :]  # broadcast over heads

    def rotate(x):  # x (B, L, H, dh); pair (x_j, x_{j+dh/2})
        a, b = x[..., : dh // 2], x[..., dh // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    for i in range(BLOCKS):
        q_ = f"blocks.{i}."
        mod = p[q_ + "adaLN_modulation.weight"] @ c + p[q_ + "adaLN_modulation.bias"]
        sh1, sc1, g1, sh2, sc2, g2 = (mod[n * dim:(n + 1) * dim] for n in range(6))
        u = ln(h, p[q_ + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = u @ p[q_ + "attn_qkv.weight"].T  # (B, L, 3D): [q heads | k heads | v heads]
        q = rotate(qkv[..., :dim].reshape(B, L, heads, dh))
        kk = rotate(qkv[..., dim:2 * dim].reshape(B, L, heads, dh))
        v = qkv[..., 2 * dim:].reshape(B, L, heads, dh)
        scores = torch.einsum("blhd,bmhd->bhlm", q, kk) / math.sqrt(dh)
        att = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(B, L, dim)
        h = h + g1 * (att @ p[q_ + "attn_out.weight"].T)
        u2 = ln(h, p[q_ + "norm2.weight"]) * (1 + sc2) + sh2
        m = gelu_tanh(u2 @ p[q_ + "mlp.0.weight"].T + p[q_ + "mlp.0.bias"])
        h = h + g2 * (m @ p[q_ + "mlp.2.weight"].T + p[q_ + "mlp.2.bias"])
    fmod = p["output_layer.adaLN_modulation.weight"] @ c + p["output_layer.adaLN_modulation.bias"]
    shift, scale = fmod[:dim], fmod[dim:]
    u = ln(h, p["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return u @ p["output_layer.linear.weight"].T + p["output_layer.linear.bias"]


# ---------------------------------------------------------------------------------------------------
# Files in the official formats.

TRIGGERED = []


def _trigger(tag):
    TRIGGERED.append(tag)
    return tag


class ReduceTrap:
    """Unpickling runs ``_trigger`` (as a malicious __reduce__ would)."""

    def __reduce__(self):
        return (_trigger, ("reduce",))


class StateTrap:
    """Stands in for omegaconf/tokenizer objects: unpickling instantiates the class and calls __setstate__."""

    def __init__(self):
        self.payload = {"tokenizer": "gpt2"}

    def __setstate__(self, state):
        TRIGGERED.append("setstate")
        self.__dict__.update(state)


@pytest.fixture(autouse=True)
def _clear_trigger():
    TRIGGERED.clear()


@pytest.fixture
def raw_params():
    return random_params(1)


@pytest.fixture
def ema_params():
    return random_params(2)


def write_lightning_ckpt(path, raw, ema, *, with_ema=True):
    state_dict = OrderedDict()
    for name, t in raw.items():
        state_dict["backbone." + name] = t
        if name == "sigma_map.mlp.2.bias":  # the buffer sits between sigma_map and blocks in state_dict()
            state_dict["backbone.rotary_emb.inv_freq"] = inv_freq()
    ckpt = {"epoch": 60, "global_step": 1000000, "state_dict": state_dict,
            "hyper_parameters": {"config": StateTrap(), "tokenizer": ReduceTrap()},
            "loops": {"fit_loop": {"state_dict": {}}}}
    if with_ema:
        ckpt["ema"] = {"decay": 0.9999, "num_updates": 1000000,
                       "shadow_params": [t.clone() for t in ema.values()]}
    torch.save(ckpt, path)
    return path


def write_hf_dir(directory, params, *, fmt="safetensors", with_buffer=False):
    directory.mkdir()
    tensors = {"backbone." + k: v.contiguous() for k, v in params.items()}
    if with_buffer:
        tensors["backbone.rotary_emb.inv_freq"] = inv_freq()
    if fmt == "safetensors":
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        torch.save(tensors, directory / "pytorch_model.bin")
    config = {"vocab_size": V, "model_length": 64, "hidden_dim": D, "cond_dim": COND, "n_blocks": BLOCKS,
              "n_heads": HEADS, "dropout": 0.1, "time_conditioning": False}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


IDS = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(9))


def model_cfg(**kw):
    base = dict(hidden=D, blocks=BLOCKS, heads=HEADS, cond_dim=COND, mlp_ratio=MLP, dropout=0.0, length=64,
                vocab_size=V, mask_id=V - 1)
    return ModelConfig(**{**base, **kw})


def assert_matches_reference(model, params):
    with torch.no_grad():
        out = model.eval()(IDS)
    ref = reference_logits(params, IDS)
    assert ref.abs().max() > 0.5  # a non-trivial forward pass
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0), (out.double() - ref).abs().max()


# ---------------------------------------------------------------------------------------------------


def test_restricted_pickle_trap_is_live_under_plain_pickle():
    # proves the traps below would fire if the loader executed pickled code
    pickle.loads(pickle.dumps({"a": ReduceTrap(), "b": StateTrap()}))
    assert TRIGGERED == ["reduce", "setstate"]


def test_lightning_ckpt_loads_ema_weights_without_running_pickled_code(tmp_path, raw_params, ema_params):
    path = write_lightning_ckpt(tmp_path / "mdlm.ckpt", raw_params, ema_params)
    model = W.load_mdlm_dit(path)
    assert TRIGGERED == []
    shape = (model.cfg.hidden, model.cfg.blocks, model.cfg.heads, model.cfg.vocab_size)
    assert shape == (D, BLOCKS, HEADS, V)
    assert torch.equal(model.vocab_embed.embedding, ema_params["vocab_embed.embedding"])
    assert_matches_reference(model, ema_params)
    ckpt = load_pickled_checkpoint(path)
    assert isinstance(ckpt["hyper_parameters"]["config"], Unloaded)
    assert isinstance(ckpt["hyper_parameters"]["tokenizer"], Unloaded)
    assert TRIGGERED == []


def test_lightning_ckpt_raw_weights_with_use_ema_false(tmp_path, raw_params, ema_params):
    path = write_lightning_ckpt(tmp_path / "mdlm.ckpt", raw_params, ema_params)
    model = W.load_mdlm_dit(path, use_ema=False)
    assert_matches_reference(model, raw_params)
    assert TRIGGERED == []


def test_lightning_ckpt_without_ema_falls_back_to_raw_with_a_warning(tmp_path, raw_params, ema_params):
    path = write_lightning_ckpt(tmp_path / "mdlm.ckpt", raw_params, ema_params, with_ema=False)
    with pytest.warns(UserWarning, match="no EMA weights"):
        weights = W.read_mdlm_weights(path)
    assert weights.ema is False
    assert torch.equal(weights.state["blocks.1.mlp.2.bias"], raw_params["blocks.1.mlp.2.bias"])


def test_ema_list_of_the_wrong_length_is_one_error(tmp_path, raw_params, ema_params):
    ema_params.pop("output_layer.adaLN_modulation.bias")
    path = write_lightning_ckpt(tmp_path / "mdlm.ckpt", raw_params, ema_params)
    # 5 + 2 blocks × 10 + 5 = 30 parameters in the DiT
    with pytest.raises(UserError, match=r"shadow_params'\] has 29 tensors but .* 30 parameters"):
        W.read_mdlm_weights(path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_directory_loads_and_matches_reference(tmp_path, raw_params, fmt):
    directory = write_hf_dir(tmp_path / "mdlm-owt", raw_params, fmt=fmt)
    model = W.load_mdlm_dit(directory)
    assert (model.cfg.heads, model.cfg.length, model.cfg.dropout) == (HEADS, 64, 0.1)  # from config.json
    assert_matches_reference(model, raw_params)


def test_config_inferred_from_shapes_alone(raw_params):
    state = {**raw_params, "rotary_emb.inv_freq": inv_freq()}
    cfg = W.dit_config_from_state(state)
    assert (cfg.vocab_size, cfg.hidden, cfg.blocks, cfg.heads, cfg.cond_dim, cfg.mlp_ratio, cfg.mask_id) == \
        (V, D, BLOCKS, HEADS, COND, MLP, V - 1)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, raw_params):
    dit = DiT(model_cfg())
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    bad = dict(raw_params)
    del bad["blocks.1.mlp.2.bias"]
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    bad["vocab_embed.embedding"] = torch.zeros(V + 1, D)
    with pytest.raises(UserError) as err:
        W.load_into_dit(dit, bad, "mdlm.ckpt")
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing 1: blocks.1.mlp.2.bias" in msg
    assert "unexpected 1: blocks.0.extra.weight" in msg
    assert "mis-shaped 1 (file vs model): vocab_embed.embedding (24, 32) vs (23, 32)" in msg
    # all-or-nothing: nothing was copied
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())


def test_wrong_shapes_in_a_file_are_one_error(tmp_path, raw_params):
    directory = write_hf_dir(tmp_path / "mdlm-owt", raw_params, with_buffer=True)
    small_heads = DiT(model_cfg(heads=4))  # d_h = 8: rotary buffer (4,) instead of (8,)
    weights = W.read_mdlm_weights(directory)
    with pytest.raises(UserError, match=r"mis-shaped 1 .*rotary_emb.inv_freq \(8,\) vs \(4,\)"):
        W.load_into_dit(small_heads, weights.state, weights.source)


def test_hub_unreachable_is_one_line_pointing_to_a_local_directory(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError) as err:
        W.read_mdlm_weights("hf:kuleshov-group/mdlm-owt")
    msg = str(err.value)
    assert msg.startswith("hf:kuleshov-group/mdlm-owt: the Hugging Face hub is unreachable")
    assert "local directory" in msg and "\n" not in msg


def test_bad_sources_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file or directory; accepted: a Lightning .ckpt"):
        W.read_mdlm_weights(tmp_path / "nope.ckpt")
    with pytest.raises(UserError, match="expected hf:<owner>/<name>"):
        W.read_mdlm_weights("hf:mdlm-owt")
    truncated = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"backbone.x": torch.zeros(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UserError, match="cut.ckpt: not a readable torch checkpoint"):
        W.read_mdlm_weights(truncated)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        W.read_mdlm_weights(tmp_path / "empty")


def test_dsl_init_from_mdlm_reproduces_pretrained_logits_at_high_snr(tmp_path, raw_params, ema_params):
    path = write_lightning_ckpt(tmp_path / "mdlm.ckpt", raw_params, ema_params)
    dsl = DSLModel(model_cfg(), ChannelConfig(embed_dim=64), gen=torch.Generator().manual_seed(0))
    W.init_from_mdlm(dsl, path)
    assert TRIGGERED == []
    assert torch.equal(dsl.converter.trans, ema_params["vocab_embed.embedding"])
    assert torch.equal(dsl.backbone.blocks[1].attn_qkv.weight, ema_params["blocks.1.attn_qkv.weight"])
    # at high SNR the converter is one-hot on the token: the backbone sees MDLM's own input embeddings
    ids = IDS.clamp_max(V - 2)
    x = dsl.embed(ids)
    z = 400.0 * x + 20.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = dsl.eval()(z)
    ref = reference_logits(ema_params, ids)
    assert torch.allclose(out[..., :-1].double(), ref[..., :-1], atol=1e-3)


def test_dsl_init_names_mismatches(raw_params):
    dsl = DSLModel(model_cfg(vocab_size=V + 2, mask_id=V + 1), ChannelConfig(embed_dim=8))
    with pytest.raises(UserError, match=r"mis-shaped 3 .*output_layer.linear.weight"):
        W.init_dsl_from_mdlm(dsl, {"backbone." + k: v for k, v in raw_params.items()}, "mdlm-owt")


def test_heads_are_never_guessed_without_config_json_or_rotary_buffer(tmp_path):
    # d_h = 16, not MDLM's 64: a hidden // 64 guess would build a 2-head model with no error
    cfg = model_cfg(hidden=128, heads=8)
    source = DiT(cfg).eval()
    state = {k: v for k, v in source.state_dict().items() if k != W.ROTARY_KEY}
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError) as err:
        W.load_mdlm_dit(path)
    msg = str(err.value)
    assert "\n" not in msg and "config.json" in msg and W.ROTARY_KEY in msg and "model.heads" in msg
    model = W.load_mdlm_dit(path, heads=8)
    assert model.cfg.heads == 8
    with torch.no_grad():
        assert torch.equal(model.eval()(IDS), source(IDS))


def test_init_refuses_a_model_whose_heads_differ_from_config_json(tmp_path, raw_params):
    directory = write_hf_dir(tmp_path / "mdlm-owt", raw_params)  # config.json: n_heads=2, no rotary buffer
    with pytest.raises(UserError, match=r"n_heads=2 .*model.heads=4"):
        W.init_from_mdlm(DiT(model_cfg(heads=4)), directory)
    W.init_from_mdlm(DiT(model_cfg(heads=HEADS)), directory)  # the matching shape loads
