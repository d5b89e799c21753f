"""Models: the time-invariant DiT, the DSL model (converter + DiT), the AR transformer, MDLM weights.

``build_model(run_cfg, vocab_size)`` is the one place a model is made from a run config.
"""

from __future__ import annotations

import torch
from torch import nn

from dsl.config import ConfigError, RunConfig
from dsl.models.ar import ARTransformer
from dsl.models.dit import DiT
from dsl.models.dsl_model import DSLModel
from dsl.seeding import derive_seed, sample_generator


def resolve_vocab(run_cfg: RunConfig, vocab_size: int | None) -> None:
    """Fill ``model.vocab_size`` (0 = from the tokenizer) and ``model.mask_id`` (−1 = V−1) in place."""
    model = run_cfg.model
    if model.vocab_size == 0:
        if not vocab_size:
            raise ConfigError("model.vocab_size=0 needs the tokenizer's vocabulary size (incl. the mask id)")
        model.vocab_size = int(vocab_size)
    elif vocab_size and vocab_size != model.vocab_size:
        raise ConfigError(f"model.vocab_size={model.vocab_size} but the tokenizer has {vocab_size} ids "
                          "(incl. the mask); set model.vocab_size=0 to take it from the tokenizer")
    if model.mask_id == -1:
        model.mask_id = model.vocab_size - 1
    if not 0 <= model.mask_id < model.vocab_size:
        raise ConfigError(f"model.mask_id={model.mask_id} must lie in "
                          f"[0, model.vocab_size={model.vocab_size})")


def build_model(run_cfg: RunConfig, vocab_size: int | None = None) -> nn.Module:
    """DiT (objective mdlm), DSLModel (dsl) or ARTransformer (ar), initialised from ``run_cfg.seed``.

    The initial weights depend only on the config and its seed (the global RNG is forked and restored),
    so every data-parallel rank builds the same model.
    """
    resolve_vocab(run_cfg, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(run_cfg.seed, "model-init"))
        if run_cfg.objective == "dsl":
            return DSLModel(run_cfg.model, run_cfg.channel,
                            gen=sample_generator(run_cfg.seed, "token-embeddings"))
        if run_cfg.objective == "mdlm":
            return DiT(run_cfg.model)
        if run_cfg.objective == "ar":
            return ARTransformer(run_cfg.model)
    raise ConfigError(f"objective={run_cfg.objective!r} is not one of: dsl, mdlm, ar")


__all__ = ["ARTransformer", "DSLModel", "DiT", "build_model", "resolve_vocab"]
