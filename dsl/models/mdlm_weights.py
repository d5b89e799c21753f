"""Official MDLM weights -> :class:`~dsl.models.dit.DiT` / :class:`~dsl.models.dsl_model.DSLModel`.

Accepted sources (the layout of kuleshov-group/mdlm ``models/dit.py`` ``DIT`` and its checkpoints):
  * a Lightning ``.ckpt`` (the ``mdlm.ckpt`` ReMDM downloads): EMA weights from ``ckpt['ema']
    ['shadow_params']``, a list in ``backbone.parameters()`` order (the rotary buffer is not in it), mapped
    by order onto the DiT's named parameters; ``use_ema=False`` (or a checkpoint without EMA) takes the raw
    ``ckpt['state_dict']['backbone.*']``. The file also pickles the omegaconf config and the tokenizer, so
    it is read with :mod:`dsl.models.restricted_unpickle`: only tensor-rebuild functions are resolved,
    every other class or function becomes an inert stand-in object, and no pickled code runs;
  * a Hugging Face ``kuleshov-group/mdlm-owt`` directory (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``, read with ``weights_only=True``), or the hub id ``hf:kuleshov-group/mdlm-owt``;
  * a bare ``.safetensors`` state dict.
Keys may carry the ``backbone.`` prefix. Any mismatch is one :class:`~dsl.errors.UserError` that lists the
missing, unexpected and mis-shaped keys (first few of each, with counts).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsl.config import ModelConfig
from dsl.errors import UserError, one_line
from dsl.models.dit import DiT
from dsl.models.restricted_unpickle import load_pickled_checkpoint

HUB_PREFIX = "hf:"
ACCEPTED = ("a Lightning .ckpt, a directory with config.json + model.safetensors (or pytorch_model.bin), "
            "a .safetensors file, or hf:kuleshov-group/mdlm-owt")
ROTARY_KEY = "rotary_emb.inv_freq"
EMBED_KEY = "vocab_embed.embedding"
SHOW = 5  # keys listed per category in a mismatch error


# ---------------------------------------------------------------------------------------------------
# Reading a source into a DiT-named state dict.


@dataclass
class MDLMWeights:
    """A DiT state dict (MDLM names, no ``backbone.`` prefix) and the HF config.json when there is one."""

    state: dict[str, torch.Tensor]
    hf_config: dict | None
    source: str
    ema: bool


def strip_backbone_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in state.items()}


def _dit_param_names(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the DiT's parameters in ``parameters()`` order, without allocating."""
    with torch.device("meta"):
        model = DiT(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def read_lightning_ckpt(path: str | Path, *, use_ema: bool = True) -> MDLMWeights:
    ckpt = load_pickled_checkpoint(path)
    raw = ckpt.get("state_dict")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: no 'state_dict' in the checkpoint; accepted: {ACCEPTED}")
    raw = {k.removeprefix("backbone."): v for k, v in raw.items()
           if k.startswith("backbone.") and isinstance(v, torch.Tensor)}
    if not raw:
        raise UserError(f"{path}: 'state_dict' has no backbone.* tensors (is this an MDLM checkpoint?)")
    ema = ckpt.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not use_ema:
        return MDLMWeights(raw, None, str(path), ema=False)
    if not isinstance(shadow, (list, tuple)):
        warnings.warn(f"{path}: no EMA weights (ckpt['ema']['shadow_params']); using the raw state_dict",
                      stacklevel=2)
        return MDLMWeights(raw, None, str(path), ema=False)
    # The EMA list follows backbone.parameters(); name it with a DiT of the raw weights' shape.
    names = _dit_param_names(_shape_from_state(raw, heads=1))  # heads change no shape
    if len(shadow) != len(names):
        raise UserError(f"{path}: ckpt['ema']['shadow_params'] has {len(shadow)} tensors but a DiT of this "
                        f"shape has {len(names)} parameters; pass use_ema=False to load the raw weights")
    state = {name: t for (name, _), t in zip(names, shadow)}
    bad = [f"{n} {tuple(state[n].shape)} vs {s}" for n, s in names if tuple(state[n].shape) != s]
    if bad:
        raise UserError(f"{path}: EMA shadow_params do not follow the DiT parameter order; mis-shaped "
                        f"({len(bad)}): {', '.join(bad[:SHOW])}")
    if ROTARY_KEY in raw:
        state[ROTARY_KEY] = raw[ROTARY_KEY]
    return MDLMWeights(state, None, str(path), ema=True)


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: unreadable weights file ({type(exc).__name__}: "
                        f"{one_line(exc)[:160]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def read_hf_dir(directory: str | Path, source: str | None = None) -> MDLMWeights:
    """An HF ``kuleshov-group/mdlm-owt`` snapshot: config.json + model.safetensors | pytorch_model.bin."""
    directory = Path(directory)
    label = source or str(directory)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            weights = directory / name
            break
    else:
        raise UserError(f"{label}: no model.safetensors or pytorch_model.bin in the directory; "
                        f"accepted: {ACCEPTED}")
    hf_config = None
    if (directory / "config.json").is_file():
        try:
            hf_config = json.loads((directory / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{directory / 'config.json'}: not valid JSON ({exc})") from None
    state = strip_backbone_prefix(_read_tensor_file(weights))
    return MDLMWeights(state, hf_config, label, ema=False)


def download_hub(repo_id: str) -> Path:
    """``huggingface_hub.snapshot_download`` of the config and weights; one clear line when offline."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        raise UserError(f"{HUB_PREFIX}{repo_id}: huggingface_hub is not installed; download the repository "
                        "elsewhere and pass its local directory (config.json + model.safetensors)") from None
    try:
        path = snapshot_download(repo_id=repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except RepositoryNotFoundError:
        raise UserError(f"{HUB_PREFIX}{repo_id}: no such Hugging Face repository (expected e.g. "
                        "hf:kuleshov-group/mdlm-owt)") from None
    except Exception as exc:
        raise UserError(f"{HUB_PREFIX}{repo_id}: the Hugging Face hub is unreachable ({type(exc).__name__}); "
                        "download the repository on a machine with access and pass its local directory "
                        "(config.json + model.safetensors) instead, e.g. init=/path/to/mdlm-owt") from None
    return Path(path)


def read_mdlm_weights(source: str | Path, *, use_ema: bool = True) -> MDLMWeights:
    """Read any accepted source (see the module docstring) into a DiT-named state dict."""
    source = str(source)
    if source.startswith(HUB_PREFIX):
        repo_id = source[len(HUB_PREFIX):]
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            raise UserError(f"{source}: expected hf:<owner>/<name>, e.g. hf:kuleshov-group/mdlm-owt")
        return read_hf_dir(download_hub(repo_id), source)
    path = Path(source)
    if path.is_dir():
        return read_hf_dir(path)
    if not path.is_file():
        raise UserError(f"{source}: no such file or directory; accepted: {ACCEPTED}")
    if path.suffix in (".safetensors", ".bin"):
        return MDLMWeights(strip_backbone_prefix(_read_tensor_file(path)), None, source, ema=False)
    return read_lightning_ckpt(path, use_ema=use_ema)


# ---------------------------------------------------------------------------------------------------
# Shapes, matching and loading.


def dit_config_from_state(state: dict[str, torch.Tensor], hf_config: dict | None = None, *,
                          heads: int | None = None) -> ModelConfig:
    """The DiT shape of a state dict: V, hidden, blocks, cond_dim, mlp_ratio from tensor shapes. Heads
    change no tensor shape, so they come from ``heads`` (``model.heads=``), else config.json's ``n_heads``,
    else the rotary buffer (d_h = 2·len(inv_freq)); with none of these it is an error, never a guess.
    Length and dropout come from config.json when given (else 1024 and 0.1)."""
    state = strip_backbone_prefix(state)
    hf = hf_config or {}
    cfg = _shape_from_state(state, heads=1)
    if heads is not None:
        cfg.heads = int(heads)
    elif "n_heads" in hf:
        cfg.heads = int(hf["n_heads"])
    elif ROTARY_KEY in state:
        cfg.heads = cfg.hidden // (2 * int(state[ROTARY_KEY].shape[0]))
    else:
        raise UserError(f"state dict has neither a config.json (n_heads) nor the {ROTARY_KEY} buffer: the "
                        f"number of attention heads cannot be read from it; give model.heads=<n> "
                        f"(MDLM small: 12, head size 64)")
    cfg.dropout = float(hf.get("dropout", 0.1))
    cfg.length = int(hf.get("model_length", 1024))
    try:
        cfg.validate()
    except ValueError as exc:
        raise UserError(f"state dict implies an invalid DiT shape: {exc}") from None
    return cfg


def _shape_from_state(state: dict[str, torch.Tensor], heads: int) -> ModelConfig:
    """Every DiT size that tensor shapes fix (all but the heads, which are given)."""
    out_key = "output_layer.linear.weight"
    need = [k for k in (out_key, "sigma_map.mlp.0.weight", "blocks.0.mlp.0.weight") if k not in state]
    if need:
        raise UserError(f"state dict lacks {', '.join(need)}: not an MDLM DiT state dict")
    vocab_size, hidden = state[out_key].shape
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    return ModelConfig(arch="dit", hidden=int(hidden), blocks=blocks, heads=heads,
                       cond_dim=int(state["sigma_map.mlp.0.weight"].shape[0]),
                       mlp_ratio=int(state["blocks.0.mlp.0.weight"].shape[0]) // int(hidden),
                       vocab_size=int(vocab_size), mask_id=int(vocab_size) - 1)


def _fmt(keys: list[str]) -> str:
    return ", ".join(keys[:SHOW]) + (", ..." if len(keys) > SHOW else "")


def check_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], label: str,
                what: str) -> None:
    """Raise one UserError listing missing/unexpected/mis-shaped keys of ``state`` against ``expected``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_fmt(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped {len(misshaped)} (file vs model): {_fmt(misshaped)}")
    raise UserError(f"{label}: weights do not fit {what}; " + "; ".join(parts))


def _with_rotary(module_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor], label: str):
    """The rotary buffer is a function of d_h only: take ours when the file omits it, check it otherwise."""
    state = dict(state)
    if ROTARY_KEY in module_state:
        ours = module_state[ROTARY_KEY]
        theirs = state.setdefault(ROTARY_KEY, ours)
        if theirs.shape == ours.shape and not torch.allclose(theirs.float(), ours.float(), rtol=1e-5):
            raise UserError(f"{label}: {ROTARY_KEY} differs from base-10000 rotary frequencies")
    return state


def load_into_dit(dit: DiT, state: dict[str, torch.Tensor], label: str = "weights") -> DiT:
    """Copy an MDLM-named state dict into ``dit`` (all-or-nothing: checked before anything is copied)."""
    expected = dit.state_dict()
    state = _with_rotary(expected, strip_backbone_prefix(state), label)
    check_state(expected, state, label, f"a DiT with hidden={dit.cfg.hidden}, blocks={dit.cfg.blocks}, "
                                        f"V={dit.cfg.vocab_size}")
    dit.load_state_dict(state)
    return dit


def load_mdlm_dit(source: str | Path, *, use_ema: bool = True, cfg: ModelConfig | None = None,
                  heads: int | None = None) -> DiT:
    """A DiT holding the weights of ``source``; its shape comes from the file unless ``cfg`` is given
    (``heads`` when the file says nothing about them, see :func:`dit_config_from_state`)."""
    weights = read_mdlm_weights(source, use_ema=use_ema)
    cfg = cfg or dit_config_from_state(weights.state, weights.hf_config, heads=heads)
    return load_into_dit(DiT(cfg), weights.state, weights.source)


def init_dsl_from_mdlm(dsl_model: nn.Module, dit_state: dict[str, torch.Tensor],
                       label: str = "weights") -> None:
    """DSL fine-tuning start (Sec 6.1): the backbone takes MDLM's weights and the converter's W_trans takes
    ``vocab_embed.embedding`` (mask row included), so high-SNR inputs reproduce the pretrained inputs."""
    state = strip_backbone_prefix(dit_state)
    embedding = state.pop(EMBED_KEY, None)
    backbone = dsl_model.backbone
    expected = backbone.state_dict()
    state = _with_rotary(expected, state, label)
    expected_all = {**expected, EMBED_KEY: dsl_model.converter.trans}
    check_state(expected_all, {**state, **({EMBED_KEY: embedding} if embedding is not None else {})}, label,
                f"the DSL model (hidden={backbone.cfg.hidden}, blocks={backbone.cfg.blocks}, "
                f"V={backbone.cfg.vocab_size})")
    backbone.load_state_dict(state)
    dsl_model.converter.init_trans_from(embedding)


def init_from_mdlm(model: nn.Module, source: str | Path, *, use_ema: bool = True) -> nn.Module:
    """Load ``source`` into a freshly built model: a DiT (MDLM objective) or a DSLModel (DSL objective)."""
    from dsl.models.dsl_model import DSLModel

    weights = read_mdlm_weights(source, use_ema=use_ema)
    backbone = model.backbone if isinstance(model, DSLModel) else model
    n_heads = (weights.hf_config or {}).get("n_heads")
    if n_heads is not None and int(n_heads) != backbone.cfg.heads:
        # heads change no tensor shape: only config.json (or the rotary buffer) can catch this
        raise UserError(f"{weights.source}: config.json has n_heads={n_heads} but the model was built with "
                        f"model.heads={backbone.cfg.heads}; set model.heads={n_heads}")
    if isinstance(model, DSLModel):
        init_dsl_from_mdlm(model, weights.state, weights.source)
    elif isinstance(model, DiT) and not model.causal:
        load_into_dit(model, weights.state, weights.source)
    else:
        raise UserError(f"{source}: MDLM weights initialise objective=mdlm or objective=dsl models only, "
                        f"not {type(model).__name__}")
    return model


__all__ = ["MDLMWeights", "check_state", "dit_config_from_state", "download_hub", "init_dsl_from_mdlm",
           "init_from_mdlm", "load_into_dit", "load_mdlm_dit", "read_hf_dir", "read_lightning_ckpt",
           "read_mdlm_weights"]
