"""Field declarations and value parsing: how one ``key=value`` word becomes a typed, range-checked value.

A field carries its help text and range in ``dataclasses.field(metadata=...)``; its type is the
annotation (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``tuple[T, ...]``, ``T | None``).
Every problem is one :class:`ConfigError` line naming the key and what would be accepted.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad key or value; the message is one line that says what would be accepted."""


def choice(default: Any, help: str = "") -> Any:
    """A field whose allowed values are its ``Literal[...]`` annotation."""
    return field(default=default, metadata={"help": help})


def num(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
        hi_open: bool = False, help: str = "") -> Any:
    """A numeric field constrained to [lo, hi] (open ends with ``lo_open``/``hi_open``)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open,
                                            "hi_open": hi_open, "help": help})


def text(default: str = "", help: str = "") -> Any:
    return field(default=default, metadata={"help": help})


def flag(default: bool, help: str = "") -> Any:
    """A boolean field (``true``/``false``; see :data:`TRUE`/:data:`FALSE`)."""
    return field(default=default, metadata={"help": help})


def values(default: tuple, help: str = "") -> Any:
    """A comma-separated list field (``tuple[T, ...]``)."""
    return field(default=default, metadata={"help": help})


def section(cls: type) -> Any:
    return field(default_factory=cls)


# The only spellings of a boolean, in every job and every key.
TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")


def strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _literal_text(value: Any) -> str:
    return "''" if value == "" else str(value)


def type_name(tp: Any) -> str:
    tp, optional = strip_optional(tp)
    if typing.get_origin(tp) is Literal:
        name = " | ".join(_literal_text(a) for a in typing.get_args(tp))
    elif typing.get_origin(tp) is tuple:
        name = f"{typing.get_args(tp)[0].__name__},..."
    elif tp is bool:
        name = "true | false"
    else:
        name = getattr(tp, "__name__", str(tp))
    return name + (" | none" if optional else "")


def parse_bool(key: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise ConfigError(f"{key}={raw!r} is not a boolean (true/false)")


def parse_value(key: str, raw: str, tp: Any) -> Any:
    """Parse ``raw`` as the annotated type ``tp`` or raise one ConfigError line."""
    tp, optional = strip_optional(tp)
    if optional and raw.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    try:
        if origin is Literal:
            allowed = typing.get_args(tp)
            for a in allowed:
                if str(a) == raw:
                    return a
            raise ConfigError(f"{key}={raw!r} is not one of: {', '.join(map(_literal_text, allowed))}")
        if origin is tuple:
            inner = typing.get_args(tp)[0]
            parts = [p for p in raw.split(",") if p.strip()]
            return tuple(parse_value(key, p.strip(), inner) for p in parts)
        if tp is bool:
            return parse_bool(key, raw)
        if tp is int:
            val = float(raw) if ("e" in raw.lower() and "." not in raw) else None
            if val is not None and val.is_integer():
                return int(val)
            return int(raw)
        if tp is float:
            val = float(raw)
            if not math.isfinite(val):
                raise ConfigError(f"{key}={raw!r} must be a finite number")
            return val
        if tp is str:
            return raw
    except ConfigError:
        raise
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}={raw!r} is not a valid {type_name(tp)}")


def range_text(meta: dict) -> str:
    """``[0, 1)`` for a numeric field's range, '' for a field without one."""
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return ""
    left = "(" if meta.get("lo_open") else "["
    right = ")" if meta.get("hi_open") else "]"
    lo_s = "-inf" if lo is None else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    return f"{left}{lo_s}, {hi_s}{right}"


def check_range(key: str, value: Any, meta: dict) -> None:
    if value is None or isinstance(value, (bool, str, tuple)):
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    lo_open, hi_open = meta.get("lo_open", False), meta.get("hi_open", False)
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or \
          (hi is not None and (value > hi or (hi_open and value == hi)))
    if bad:
        raise ConfigError(f"{key}={value} is out of range: expected a value in {range_text(meta)}")
