"""Apply ``key=value`` words to a config tree, validate it, and move it to and from plain dicts.

Keys are dotted paths into the tree (``train.lr=1e-4``). ``preset=NAME`` applies a run preset first,
whatever its position; a section key given a bare word applies a section preset (``model=small``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Callable, Iterable
from dataclasses import fields, is_dataclass
from typing import Any

from dsl.config.fields import ConfigError, check_range, parse_value, range_text, strip_optional, type_name
from dsl.config.presets import model_presets, run_presets
from dsl.config.science import ModelConfig


def leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every settable (non-section) dotted key of ``cfg``, in declaration order."""
    out = []
    for f in fields(cfg):
        val = getattr(cfg, f.name)
        if is_dataclass(val):
            out.extend(leaf_keys(val, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def section_keys(cfg: Any) -> list[str]:
    return [f.name for f in fields(cfg) if is_dataclass(getattr(cfg, f.name))]


def resolve(cfg: Any, key: str) -> tuple[Any, dataclasses.Field]:
    """(the dataclass that owns ``key``'s last part, that field); KeyError if there is no such key."""
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        fmap = {f.name: f for f in fields(node)}
        if part not in fmap:
            raise KeyError(key)
        if i == len(parts) - 1:
            return node, fmap[part]
        node = getattr(node, part)
        if not is_dataclass(node):
            raise KeyError(key)
    raise KeyError(key)


def unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        f"; known top-level keys: {', '.join(sorted({k.split('.')[0] for k in known}))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def set_key(cfg: Any, key: str, raw: str, aliases: dict[str, str] | None = None) -> None:
    """Set one dotted key from its string form, in place, with full validation of that field."""
    aliases = aliases or {}
    key = aliases.get(key, key)
    try:
        owner, f = resolve(cfg, key)
    except KeyError:
        raise unknown_key(key, leaf_keys(cfg) + section_keys(cfg) + list(aliases)) from None
    current = getattr(owner, f.name)
    if is_dataclass(current):
        presets = model_presets() if isinstance(current, ModelConfig) else {}
        if raw in presets:
            for k, v in presets[raw].items():
                setattr(current, k, v)
            return
        allowed = ", ".join(presets) if presets else "no presets"
        raise ConfigError(f"{key}={raw!r}: a section takes a preset name ({allowed}) or use {key}.<field>=...")
    hints = typing.get_type_hints(type(owner))
    value = parse_value(key, raw, hints[f.name])
    check_range(key, value, f.metadata)
    setattr(owner, f.name, value)


def validate(cfg: Any, prefix: str = "") -> None:
    """Run range checks on every field and each section's ``validate()`` hook."""
    for f in fields(cfg):
        val = getattr(cfg, f.name)
        if is_dataclass(val):
            validate(val, prefix + f.name + ".")
        else:
            check_range(prefix + f.name, val, f.metadata)
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        hook()


def split_override(arg: str) -> tuple[str, str]:
    if "=" not in arg or arg.startswith("="):
        raise ConfigError(f"malformed override {arg!r}: expected key=value (e.g. train.lr=1e-4)")
    key, raw = arg.split("=", 1)
    return key.strip(), raw.strip()


def preset_overrides(name: str, presets: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    presets = run_presets() if presets is None else presets
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(presets)) or 'none'}")
    return [split_override(p) for p in presets[name]]


def apply_overrides(cfg: Any, args: list[str], aliases: dict[str, str] | None = None,
                    presets: dict[str, list[str]] | None = None,
                    keep: Callable[[str], bool] | None = None) -> Any:
    """Apply ``preset=NAME`` (first) and then ``key=value`` overrides in order; validate.

    ``keep(key)`` filters a preset's keys (a job takes the part of a preset it reads)."""
    pairs = [split_override(a) for a in args]
    for key, raw in pairs:
        if key == "preset":
            for k, v in preset_overrides(raw, presets):
                if keep is None or keep(k):
                    set_key(cfg, k, v, aliases)
    for key, raw in pairs:
        if key != "preset":
            set_key(cfg, key, raw, aliases)
    validate(cfg)
    return cfg


def load(cls: type, args: list[str], aliases: dict[str, str] | None = None,
         presets: dict[str, list[str]] | None = None, defaults: list[str] | None = None) -> Any:
    """Build ``cls()``, apply ``defaults`` (a job's own starting values), then ``args``."""
    cfg = cls()
    for key, raw in (split_override(a) for a in defaults or ()):
        set_key(cfg, key, raw, aliases)
    return apply_overrides(cfg, args, aliases, presets)


# ----------------------------------------------------------------------------------------------
# Serialisation.


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Keys older versions wrote that no longer exist, dropped when an old dict is read back.
RETIRED = {"SamplingConfig": ("seed",)}


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Strictly rebuild ``cls`` from ``to_dict`` output; unknown keys are an error."""
    cfg = cls()
    _fill(cfg, data, "", where)
    validate(cfg)
    return cfg


def _fill(node: Any, data: dict[str, Any], prefix: str, where: str) -> None:
    fmap = {f.name: f for f in fields(node)}
    hints = typing.get_type_hints(type(node))
    retired = RETIRED.get(type(node).__name__, ())
    for k, v in data.items():
        if k not in fmap:
            if k in retired:
                continue
            raise ConfigError(f"{where}: unknown config key {prefix + k!r}")
        cur = getattr(node, k)
        if is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {prefix + k} must be a mapping")
            _fill(cur, v, prefix + k + ".", where)
            continue
        tp, optional = strip_optional(hints[k])
        if typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not (optional and v is None) and not _has_type(v, tp):
            raise ConfigError(f"{where}: {prefix + k}={v!r} is not a valid {type_name(hints[k])}")
        setattr(node, k, v)


def _has_type(value: Any, tp: Any) -> bool:
    """Whether a value read back from JSON is of the field type ``tp`` (bool is not an int here)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is tuple:
        inner = typing.get_args(tp)[0]
        return isinstance(value, tuple) and all(_has_type(v, inner) for v in value)
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 3e-4, ...}``: the form MLflow params and tables want."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def key_info(cfg: Any, key: str) -> dict[str, Any]:
    """Type, range, default (the value in ``cfg``) and help of one leaf key."""
    owner, f = resolve(cfg, key)
    hints = typing.get_type_hints(type(owner))
    return {"type": type_name(hints[f.name]), "range": range_text(f.metadata), "help": f.metadata.get("help", ""),
            "default": getattr(owner, f.name)}


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value) or "''"
    if value == "":
        return "''"
    return str(value)


def describe(cfg: Any, keys: Iterable[str] | None = None, aliases: dict[str, list[str]] | None = None) -> str:
    """One line per key: name, type, range, default, help, and its short aliases.

    ``cfg`` is a config class or instance (an instance shows its own values as defaults)."""
    cfg = cfg() if isinstance(cfg, type) else cfg
    aliases = aliases or {}
    lines = []
    for key in keys if keys is not None else leaf_keys(cfg):
        info = key_info(cfg, key)
        kind = info["type"] + (f" in {info['range']}" if info["range"] else "")
        extra = f"  (alias: {', '.join(aliases[key])})" if aliases.get(key) else ""
        lines.append(f"  {key:<28} {kind:<30} default {_shown(info['default'])}")
        if info["help"] or extra:
            lines.append(f"  {'':<28} {info['help']}{extra}")
    return "\n".join(lines)


__all__ = ["leaf_keys", "section_keys", "resolve", "unknown_key", "set_key", "validate", "split_override",
           "preset_overrides", "apply_overrides", "load", "to_dict", "from_dict", "flatten", "dumps",
           "key_info", "describe"]
