"""A trained run as a model: :func:`load_run` builds the run's model from its checkpoint's config and
loads its (EMA) weights; :func:`load_weights` is the strict load every weights file goes through."""

from __future__ import annotations

from typing import Any

import torch

from dsl.checkpoint import MANIFEST, latest_complete, load_checkpoint
from dsl.errors import UserError
from dsl.storage import open_storage


def load_run(uri: str, *, use_ema: bool = True, device: str | torch.device = "cpu") -> tuple[Any, Any, Any, Any]:
    """``(RunConfig, model in eval mode, tokenizer, LoadedCheckpoint)`` from a checkpoint or a run root.

    ``uri`` may be one ``step-<N>`` checkpoint or a run directory/prefix (its latest complete one is used).
    The model gets the EMA weights unless ``use_ema=False`` (or the run kept no EMA).
    """
    from dsl.config import RunConfig, from_dict
    from dsl.models import build_model

    storage = open_storage(uri)
    if storage.exists(MANIFEST):
        ckpt = load_checkpoint(storage)
    else:
        latest = latest_complete(storage)
        if latest is None:
            raise UserError(f"{uri}: no complete checkpoint here (expected {MANIFEST} or step-<N>/{MANIFEST})")
        ckpt = load_checkpoint(latest)
    cfg = from_dict(RunConfig, ckpt.config, where=f"{ckpt.uri}/{MANIFEST}")
    model = build_model(cfg, cfg.model.vocab_size or None)
    weights = ckpt.ema_state if (use_ema and ckpt.ema_state is not None) else ckpt.model_state
    load_weights(model, weights, f"{ckpt.uri}/{'ema' if weights is ckpt.ema_state else 'model'}.safetensors")
    model.to(device).eval()
    return cfg, model, ckpt.tokenizer(), ckpt


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Strict ``load_state_dict`` with one UserError listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(f"{k} {tuple(weights[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                    if k in weights and weights[k].shape != v.shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}")
        raise UserError(f"{where}: does not fit the model ({'; '.join(parts)})")
    model.load_state_dict(weights, strict=True)


__all__ = ["load_run", "load_weights"]
