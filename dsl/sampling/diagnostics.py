"""Per-step decoding diagnostics (Sec 7.4, App C.2 eq. 20–21, Fig 2, Table 6).

One record per step, each a mean over the samples of the run:

    t                 t_k of the grid (the sampler's time, 1 → ε)
    uncertainty       u_t = mean_i (1 − max_v p(v))             Sec 7.4
    entropy           H_t = mean_i (−Σ_v p log p), nats         Sec 7.4
    nucleus_size      k_t = mean_i |TopP(p_i, diag_top_p)|      Sec 7.4 (smallest set with mass ≥ p)
    mean_max_prob     mean_i max_v p(v) = 1 − u_t               Table 6
    remask_ratio      r_t = |M_t|/L, positions remasked at this step       Sec 7.4
    change_rate       Δ_t = mean_i 1[x_i changed at this step]             Sec 7.4 (mask is a symbol)
    masked_ratio      r(t_k) = masked fraction after the step              eq. 20
    reveal_fraction   Δr = masked fraction before − after the step (net)   eq. 21
    remask_intensity  mean remask probability σ over visible positions     Fig 2b "remask | unmasked"
    forward_rate      fraction of samples that ran a denoiser forward (the p(x0) cache's NFE rate)

Reading chosen for (u, H, k): the per-token distribution is the denoiser's prediction used at that step,
averaged over the positions that are masked when the step starts (visible positions are one-hot under
carry-over and would only dilute the means); a sample with nothing masked does not enter that step's
mean (NaN when no sample has a masked position). The last step's record includes the final
noise-removal pass. These statistics are computed once per forward from the sorted top-k the nucleus
filter needs anyway, plus one entropy pass over the masked rows.
"""

from __future__ import annotations

import numpy as np
import torch

SHARPNESS_KEYS = ("uncertainty", "entropy", "nucleus_size")
KEYS = ("t", "uncertainty", "entropy", "nucleus_size", "mean_max_prob", "remask_ratio", "change_rate",
        "masked_ratio", "reveal_fraction", "remask_intensity", "forward_rate")


class StepRecorder:
    """Accumulates per-step sums over every sample of a run (batch chunks add up)."""

    def __init__(self, steps: int, length: int):
        self.steps, self.length = steps, length
        self.t = np.full(steps, np.nan)
        self.sums = {k: np.zeros(steps) for k in KEYS if k not in ("t", "mean_max_prob")}
        self.counts = {k: np.zeros(steps) for k in self.sums}

    def _add(self, key: str, k: int, values: torch.Tensor) -> None:
        values = values[~torch.isnan(values)]
        self.sums[key][k] += float(values.sum())
        self.counts[key][k] += values.numel()

    def record(self, k: int, t: float, *, masked: torch.Tensor, new_masked: torch.Tensor, changed: torch.Tensor,
               remasked: torch.Tensor, remask_prob: torch.Tensor, stats: torch.Tensor, forwards: torch.Tensor
               ) -> None:
        """Add one step of a batch: masks/changes (b, L) bool, remask_prob (b, L), stats (b, 3) = (u, H, k)."""
        self.t[k] = t
        L = self.length
        has_masked = masked.any(-1)
        for j, key in enumerate(SHARPNESS_KEYS):
            self._add(key, k, stats[has_masked, j])
        self._add("remask_ratio", k, remasked.sum(-1).double() / L)
        self._add("change_rate", k, changed.sum(-1).double() / L)
        self._add("masked_ratio", k, new_masked.sum(-1).double() / L)
        self._add("reveal_fraction", k, (masked.sum(-1) - new_masked.sum(-1)).double() / L)
        visible = ~masked
        has_visible = visible.any(-1)
        intensity = (remask_prob * visible).sum(-1) / visible.sum(-1).clamp(min=1)
        self._add("remask_intensity", k, intensity[has_visible].double())
        self._add("forward_rate", k, forwards.double())

    def record_values(self, k: int, t: float, values: dict[str, torch.Tensor]) -> None:
        """Add per-sample values (b,) for any subset of keys (used by the SDE sampler)."""
        self.t[k] = t
        for key, v in values.items():
            self._add(key, k, v.double())

    @classmethod
    def merged(cls, parts: list[StepRecorder]) -> StepRecorder:
        """One recorder for a run whose samples were drawn in parts (index shards on several workers):
        the per-step sums and counts add up, so the means are those of one process up to rounding."""
        first = parts[0]
        out = cls(first.steps, first.length)
        out.t = first.t.copy()
        for part in parts:
            out.t = np.where(np.isnan(out.t), part.t, out.t)
            for key in out.sums:
                out.sums[key] += part.sums[key]
                out.counts[key] += part.counts[key]
        return out

    def finalize(self) -> dict[str, np.ndarray]:
        out = {"t": self.t.copy()}
        for key, total in self.sums.items():
            with np.errstate(invalid="ignore", divide="ignore"):
                out[key] = np.where(self.counts[key] > 0, total / np.maximum(self.counts[key], 1), np.nan)
        out["mean_max_prob"] = 1.0 - out["uncertainty"]
        return {k: out[k] for k in KEYS}


def diagnostics_to_records(diagnostics: dict[str, np.ndarray]) -> list[dict[str, float | int | None]]:
    """One JSON-serialisable dict per step (NaN becomes None)."""
    steps = len(diagnostics["t"])
    records = []
    for k in range(steps):
        rec: dict[str, float | int | None] = {"step": k}
        for key, arr in diagnostics.items():
            v = float(arr[k])
            rec[key] = None if np.isnan(v) else v
        records.append(rec)
    return records


__all__ = ["StepRecorder", "KEYS", "diagnostics_to_records"]
