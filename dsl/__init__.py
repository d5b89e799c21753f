"""Discrete Stochastic Localization: the science library (torch/numpy only).

The public API, for use from Python rather than the entry points in ``jobs/`` and ``tune/``::

    import dsl

    cfg, model, tokenizer, ckpt = dsl.load_run("runs/hmm-dsl")        # a trained run, EMA weights
    sampling = dsl.SamplingConfig(sampler="dsl-budget", steps=64)
    denoiser = dsl.load_denoiser("runs/hmm-dsl", sampling)              # or oracle:hmm, s3://..., hf:...
    batch = dsl.generate(denoiser, sampling, n=8, length=128, seed=0)
    trainer = dsl.Trainer(cfg, storage="runs/more")                     # the training loop

Names are resolved on first use, so ``import dsl`` (and every ``dsl.<module>``) stays light: torch and
the models load only when one of them is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (its one home)
_PUBLIC = {
    "Trainer": "dsl.train",
    "generate": "dsl.sampling",
    "load_denoiser": "dsl.sampling",
    "load_run": "dsl.models.loading",
    "ConfigError": "dsl.config",
    "JobConfig": "dsl.config",
    "RunConfig": "dsl.config",
    "ModelConfig": "dsl.config",
    "ChannelConfig": "dsl.config",
    "MDLMLossConfig": "dsl.config",
    "DataConfig": "dsl.config",
    "TrainConfig": "dsl.config",
    "SamplingConfig": "dsl.config",
    "EvalConfig": "dsl.config",
    "SearchConfig": "dsl.config",
    "ServiceConfig": "dsl.config",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dsl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value   # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
