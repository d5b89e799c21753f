"""MAUVE reference features cached on disk or S3 (``dsl.storage.open_storage``).

An entry's key is derived from the featurizer (name, max length, identity) and the sha256 of the texts it
featurized (after truncation); its safetensors metadata repeats those inputs, so an entry made from other
inputs, or a damaged one, is recomputed rather than trusted. An entry is written once, complete, in a
single ``put_bytes``: a failed run leaves either nothing or the old entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dsl.eval.mauve import Featurizer

CACHE_FORMAT = "dsl-mauve-features/1"


def texts_sha256(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    return h.hexdigest()


def cache_key(featurizer: Featurizer, texts: Sequence[str]) -> str:
    """Where the features of ``texts`` by ``featurizer`` live under the cache root."""
    ident = hashlib.sha256(f"{featurizer.identity}|{featurizer.max_length}".encode()).hexdigest()[:16]
    return f"mauve-features/{_safe(featurizer.name)}-{featurizer.max_length}-{ident}/{texts_sha256(texts)}" \
           f".safetensors"


def cached_features(cache: str, featurizer: Featurizer, texts: Sequence[str], progress: bool = False
                    ) -> tuple[np.ndarray, bool]:
    """``(features (n, d), computed)``: the entry for ``texts`` under the cache URI ``cache`` when it holds
    a sound one, else the featurizer's output, then stored."""
    from dsl.storage import open_storage

    storage = open_storage(cache)
    key = cache_key(featurizer, texts)
    meta = {"format": CACHE_FORMAT, "texts_sha256": texts_sha256(texts), "featurizer": featurizer.name,
            "identity": featurizer.identity, "max_length": str(featurizer.max_length), "n": str(len(texts))}
    if storage.exists(key):
        feats = _decode_features(storage.get_bytes(key), meta)
        if feats is not None:
            return feats, False
    feats = featurizer.featurize(list(texts), progress=progress)
    storage.put_bytes(key, _encode_features(feats, meta))
    return feats, True


def _safe(name: str) -> str:
    base = os.path.basename(name.rstrip("/")) or "model"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)


def _encode_features(feats: np.ndarray, meta: dict[str, str]) -> bytes:
    from safetensors.numpy import save

    return save({"features": np.ascontiguousarray(feats, dtype=np.float32)}, metadata=meta)


def _decode_features(blob: bytes, expect: dict[str, str]) -> np.ndarray | None:
    """Features from a cache blob, or None when it is unreadable or was made from other inputs."""
    from safetensors.numpy import load

    try:
        (header_len,) = struct.unpack("<Q", blob[:8])
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__", {})
        if any(meta.get(k) != v for k, v in expect.items()):
            return None
        feats = load(blob)["features"]
    except Exception:
        return None
    return feats if feats.shape[0] == int(expect["n"]) else None


__all__ = ["CACHE_FORMAT", "texts_sha256", "cache_key", "cached_features"]
