"""A grid cell's samples drawn in contiguous index shards, each the body of one Ray task; sample i is
seeded ``sample_seed(seed, i)`` (:func:`dsl.sampling.generate`), so the merged draw does not depend on the
number of shards."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from dsl.config import DataConfig, SamplingConfig, from_dict, to_dict

_DENOISERS: dict[tuple[str, int, str, str], Any] = {}


def _denoiser(checkpoint: str, sampling: SamplingConfig, length: int, data: DataConfig, device: str) -> Any:
    """Loaded once per worker process and kept (a worker draws shards of many cells)."""
    from dsl.sampling import load_denoiser

    key = (checkpoint, length, json.dumps(to_dict(data), sort_keys=True), f"{device}:{sampling.gamma_vis}")
    if key not in _DENOISERS:
        _DENOISERS[key] = load_denoiser(checkpoint, sampling, length=length, data_cfg=data, device=device)
    return _DENOISERS[key]


def draw_shard(checkpoint: str, sampling: dict, data: dict, first: int, n: int, length: int, seed: int,
               device: str) -> dict[str, Any]:
    """Samples ``first .. first+n-1`` of a cell (the body of one Ray task): ids, texts, NFE, rewrites and
    the per-step sums behind the diagnostics (merged exactly across shards)."""
    from dsl.sampling import generate

    cfg = from_dict(SamplingConfig, sampling)
    den = _denoiser(checkpoint, cfg, length, from_dict(DataConfig, data), device)
    batch = generate(den, cfg, n, length, seed, first_index=first)
    return {"first": first, "ids": batch.ids.cpu().numpy(), "texts": [den.decode(r) for r in batch.ids],
            "seeds": batch.seeds.numpy(), "nfe": batch.nfe.cpu().numpy(), "mean_rewrites": batch.mean_rewrites.numpy(),
            "recorder": batch.recorder, "settings": batch.settings, "eta_cap": batch.eta_cap,
            "eta_cap_source": batch.eta_cap_source, "eta_cap_extrapolation": batch.eta_cap_extrapolation}


def shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """``[(first, count)]``: ``n`` samples in ``shards`` contiguous index ranges (sizes differ by at most 1)."""
    shards = max(1, min(shards, n))
    base, extra = divmod(n, shards)
    out, first = [], 0
    for k in range(shards):
        count = base + (1 if k < extra else 0)
        out.append((first, count))
        first += count
    return out


def merge_shards(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's draw from its shards, in sample-index order."""
    from dsl.sampling.diagnostics import StepRecorder

    parts = sorted(parts, key=lambda p: p["first"])
    recorder = StepRecorder.merged([p["recorder"] for p in parts])
    head = parts[0]
    return {"ids": torch.from_numpy(np.concatenate([p["ids"] for p in parts])),
            "texts": [t for p in parts for t in p["texts"]], "seeds": np.concatenate([p["seeds"] for p in parts]),
            "nfe": torch.from_numpy(np.concatenate([p["nfe"] for p in parts])),
            "mean_rewrites": torch.from_numpy(np.concatenate([p["mean_rewrites"] for p in parts])),
            "diagnostics": recorder.finalize(), "settings": {**head["settings"], "first_index": 0},
            "eta_cap": head["eta_cap"], "eta_cap_source": head["eta_cap_source"],
            "eta_cap_extrapolation": head["eta_cap_extrapolation"]}


__all__ = ["draw_shard", "shard_ranges", "merge_shards"]
