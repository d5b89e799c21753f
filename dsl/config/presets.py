"""Named presets, stored as TOML data files in ``dsl/config/presets/``.

- ``presets/model/<name>.toml``: a backbone size, the keys of the ``model`` section
  (``model=<name>`` on the command line).
- ``presets/run/<name>.toml``: a run, keys of the config tree as TOML tables (``preset=<name>``);
  ``[model] preset = "<name>"`` applies a model preset before the table's other model keys.
- ``presets/<job>/<name>.toml``: the same, for an entry point that keeps its own presets
  (``dsl.cli.Job.presets``, e.g. ``presets/reproduce/smoke.toml`` is ``jobs/reproduce.py preset=smoke``).

Each file has a one-line ``description``. Adding a file adds a preset; nothing else needs to change.
"""

from __future__ import annotations

import sys
from functools import cache
from importlib import resources
from typing import Any

from dsl.config.fields import ConfigError
from dsl.errors import one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib


def preset_files(kind: str) -> dict[str, Any]:
    """``{name: file}`` of the TOML presets in ``presets/<kind>/``."""
    folder = resources.files("dsl.config") / "presets" / kind
    return {p.name[: -len(".toml")]: p for p in folder.iterdir() if p.name.endswith(".toml")}


def read_preset(path: Any) -> dict[str, Any]:
    """A preset file's TOML (one line naming the file when it does not parse)."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset file {path}: {one_line(exc)}") from None


def _word(value: Any) -> str:
    """A TOML value as the command-line word that sets it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_word(v) for v in value)
    return str(value)


def table_overrides(table: dict[str, Any], prefix: str = "") -> list[str]:
    """The ``key=value`` command-line words a TOML table of the config tree sets, in file order."""
    out: list[str] = []
    if "preset" in table and prefix:        # a section preset first, then the section's own keys
        out.append(f"{prefix[:-1]}={table['preset']}")
    for key, value in table.items():
        if key == "description" or (key == "preset" and prefix):
            continue
        if isinstance(value, dict):
            out.extend(table_overrides(value, f"{prefix}{key}."))
        else:
            out.append(f"{prefix}{key}={_word(value)}")
    return out


@cache
def model_presets() -> dict[str, dict[str, Any]]:
    """``{name: {model field: value}}`` from ``presets/model/*.toml``."""
    return {name: {k: v for k, v in read_preset(p).items() if k != "description"}
            for name, p in sorted(preset_files("model").items())}


@cache
def run_presets(folder: str = "run") -> dict[str, list[str]]:
    """``{name: ["key=value", ...]}`` from ``presets/<folder>/*.toml``, in file order."""
    return {name: table_overrides(read_preset(p)) for name, p in sorted(preset_files(folder).items())}


@cache
def descriptions(kind: str) -> dict[str, str]:
    return {name: str(read_preset(p).get("description", "")) for name, p in sorted(preset_files(kind).items())}


def describe_presets(folder: str = "run") -> str:
    """The ``--help`` block: every run preset (of ``folder``) and model preset with its sizes."""
    lines = ["run presets (preset=NAME, applied before the other keys):"]
    for name, words in run_presets(folder).items():
        shown = [w for w in words if w.split("=")[0] in ("model", "model.length", "data.source", "train.steps",
                                                           "train.batch_size", "init", "reproduce.pretrain_steps",
                                                           "reproduce.finetune_steps", "sampling.num_samples")]
        lines.append(f"  {name:<12} {descriptions(folder)[name]}")
        lines.append(f"  {'':<12} {' '.join(shown)}")
    lines.append("model presets (model=NAME):")
    by_size = sorted(model_presets().items(), key=lambda kv: (kv[1].get("hidden", 0), kv[1].get("blocks", 0)))
    for name, fields in by_size:
        sizes = " ".join(f"{k}={fields[k]}" for k in ("hidden", "blocks", "heads", "length") if k in fields)
        lines.append(f"  {name:<12} {sizes}  ({descriptions('model')[name]})")
    return "\n".join(lines)


__all__ = ["model_presets", "run_presets", "descriptions", "describe_presets", "preset_files", "read_preset",
           "table_overrides"]
