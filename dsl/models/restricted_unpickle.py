"""Reading a pickled checkpoint without running pickled code: an unpickler that resolves only tensor and
container rebuild functions and turns every other class or function into an inert :class:`Unloaded`
stand-in. MDLM's Lightning ``.ckpt`` pickles its omegaconf config and tokenizer next to the weights.
"""

from __future__ import annotations

import io
import pickle
import types
from pathlib import Path

import torch

from dsl.errors import UserError, one_line


class Unloaded:
    """Stands in for any pickled class or function outside the allowlist; accepts and ignores everything."""

    module = ""
    name = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def __repr__(self) -> str:
        return f"<unloaded {self.module}.{self.name}>"


_ALLOWED: dict[str, set[str]] = {
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch": {"Tensor", "Size", "device"},
    "torch.nn.parameter": {"Parameter"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "complex", "bytearray", "slice"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
}


def _allowed_global(module: str, name: str) -> bool:
    if name in _ALLOWED.get(module, ()):
        return True
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    # numpy dtype classes (numpy.dtypes.Float32DType ...) are plain data types
    return module == "numpy.dtypes" and name.endswith("DType")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allowlisted tensor/container names; everything else becomes an :class:`Unloaded`."""

    def find_class(self, module: str, name: str):
        if _allowed_global(module, name):
            return super().find_class(module, name)
        return type(f"Unloaded[{module}.{name}]", (Unloaded,), {"module": module, "name": name})


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# The ``pickle_module`` torch.load needs: an object with ``Unpickler`` and ``load``.
restricted_pickle = types.ModuleType("dsl_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.loads = lambda data, **kw: _restricted_load(io.BytesIO(data), **kw)


def load_pickled_checkpoint(path: str | Path) -> dict:
    """``torch.load`` of a Lightning checkpoint via :data:`restricted_pickle` (never runs pickled code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except Exception as exc:  # zip/pickle/storage errors: a corrupt or truncated file
        raise UserError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                        f"{one_line(exc)[:160]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a Lightning checkpoint dict, found {type(obj).__name__}")
    return obj


__all__ = ["Unloaded", "RestrictedUnpickler", "restricted_pickle", "load_pickled_checkpoint"]
