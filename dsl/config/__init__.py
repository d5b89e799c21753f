"""Typed configuration: one tree of dataclass sections, TOML presets, ``key=value`` overrides, validation.

    from dsl.config import JobConfig, RunConfig, SamplingConfig, load, ConfigError

- :mod:`dsl.config.fields`  — field declarations (help, range) and value parsing;
- :mod:`dsl.config.science` — the science sections (model, channel, mdlm, data, train, sampling);
- :mod:`dsl.config.job_sections` — eval, search, prepare, service, report, table;
- :mod:`dsl.config.tree`    — the roots (:class:`JobConfig`, :class:`RunConfig`);
- :mod:`dsl.config.presets` — run and model presets, read from ``presets/*/*.toml``;
- :mod:`dsl.config.parse`   — overrides, validation, dict round trips, ``describe``.

Command lines are parsed by :mod:`dsl.cli`, which adds per-job key sets, aliases and deprecations.
"""

from __future__ import annotations

from dsl.config.fields import ConfigError, choice, flag, num, parse_value, section, text, values
from dsl.config.job_sections import (
    EvalConfig,
    PrepareConfig,
    ReportConfig,
    ReproduceConfig,
    SearchConfig,
    ServiceConfig,
    TableConfig,
)
from dsl.config.parse import (
    apply_overrides,
    describe,
    dumps,
    flatten,
    from_dict,
    leaf_keys,
    load,
    set_key,
    split_override,
    to_dict,
    validate,
)
from dsl.config.presets import describe_presets, model_presets, run_presets
from dsl.config.science import (
    ChannelConfig,
    DataConfig,
    MDLMLossConfig,
    ModelConfig,
    SamplingConfig,
    TrainConfig,
)
from dsl.config.tree import JobConfig, RunConfig, run_config_of

MODEL_PRESETS = model_presets()
RUN_PRESETS = run_presets()

__all__ = [
    "ConfigError", "ModelConfig", "ChannelConfig", "MDLMLossConfig", "DataConfig", "TrainConfig",
    "SamplingConfig", "EvalConfig", "SearchConfig", "PrepareConfig", "ServiceConfig", "ReportConfig", "TableConfig",
    "ReproduceConfig", "RunConfig",
    "JobConfig",
    "run_config_of", "MODEL_PRESETS", "RUN_PRESETS", "model_presets", "run_presets", "describe_presets",
    "apply_overrides", "load", "set_key", "validate", "to_dict", "from_dict", "flatten", "dumps", "describe",
    "parse_value", "split_override", "leaf_keys", "choice", "num", "text", "flag", "values", "section",
]
