"""Pure post-processing of an η_cap(T) search: band distance, best trial per T, the fitted rule, the plot.

Nothing here touches Ray, Optuna or MLflow; the records are plain dicts (one per trial) so these
functions are tested on hand-written records and reused by the driver on the study's rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RULE_FORM = "linear_log_t"


def band_distance(mean_rewrites: float, band: Sequence[float]) -> float:
    """How far E[R_i] lies outside the target band [lo, hi] (0 inside; Sec 5.2 asks for E[R_i] ∈ [1, 2])."""
    lo, hi = band
    if mean_rewrites < lo:
        return lo - mean_rewrites
    if mean_rewrites > hi:
        return mean_rewrites - hi
    return 0.0


def penalised_score(mauve_mean: float, mean_rewrites: float, band: Sequence[float], penalty: float) -> float:
    """The single objective TPE and ASHA see.

    Sec 5.2 states a constrained problem (best MAUVE with E[R_i] in the band). ASHA needs one scalar, and
    Optuna constraints do not reach Tune's scheduler, so we use a documented exact penalty:
    score = MAUVE − penalty · dist(E[R_i], band). With penalty ≥ 1 per rewrite (MAUVE ∈ [0, 1]) a trial
    one rewrite outside the band can never beat any in-band trial; the final choice (``best_per_steps``)
    still ranks in-band trials by MAUVE alone.
    """
    return float(mauve_mean) - float(penalty) * band_distance(float(mean_rewrites), band)


def best_per_steps(records: Sequence[dict[str, Any]], band: Sequence[float]) -> dict[int, dict[str, Any]]:
    """The chosen trial per step budget T.

    Only full-fidelity records are trusted (ASHA-stopped trials carry MAUVE on fewer samples, which is
    noisier and biased low). Among them: the best MAUVE inside the band; if no trial reached the band,
    the one closest to it (then the best MAUVE), flagged ``in_band=False``. Ties go to the lower trial
    number so the choice is reproducible.
    """
    by_steps: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("full_fidelity"):
            by_steps.setdefault(int(r["steps"]), []).append(r)
    chosen: dict[int, dict[str, Any]] = {}
    for steps, rows in sorted(by_steps.items()):
        def key(r: dict[str, Any]) -> tuple[float, float, int]:
            return (band_distance(r["mean_rewrites"], band), -r["mauve"], int(r["number"]))
        best = min(rows, key=key)
        chosen[steps] = dict(best, in_band=band_distance(best["mean_rewrites"], band) == 0.0)
    return chosen


def fit_rule(table: dict[int, float]) -> dict[str, Any]:
    """Least-squares η_cap(T) = a + b · ln T with its R² (Sec 5.2: a cap that decreases with T).

    The paper gives only a table (Sec 6.1 / eq. 24 / Table 4, which disagree at T=512, 1024); a line in
    log T is the simplest rule that reproduces a monotone table. With one budget the slope is 0; R² is 1
    when the points are collinear (always with two) and 1 when all η are equal.
    """
    if not table:
        raise ValueError("fit_rule needs at least one (T, η_cap) pair")
    xs = [math.log(float(t)) for t in table]
    ys = [float(v) for v in table.values()]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx if sxx > 0 else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"form": RULE_FORM, "a": a, "b": b, "r2": r2, "points": n}


def eta_cap_artifacts(chosen: dict[int, dict[str, Any]], length: int) -> tuple[dict[str, Any], dict[str, Any], dict]:
    """(table JSON, rule JSON, fit quality) — the first two exactly in the samplers' format
    (``dsl.sampling.schedules.load_eta_cap``), with the sequence length L they were measured at and,
    for the rule, the budgets it was fitted on, so a sampler can say when it extrapolates."""
    table = {int(t): float(r["eta_cap"]) for t, r in chosen.items()}
    table_doc = {"table": {str(t): v for t, v in sorted(table.items())}, "length": int(length)}
    rule = fit_rule(table)
    rule_doc = {"rule": {"form": rule["form"], "a": rule["a"], "b": rule["b"]}, "length": int(length),
                "budgets": [min(table), max(table)]}
    return table_doc, rule_doc, {"r2": rule["r2"], "points": rule["points"]}


def plot_mauve_vs_rewrites(records: Sequence[dict[str, Any]], chosen: dict[int, dict[str, Any]],
                           band: Sequence[float], path: Path) -> Path:
    """MAUVE against E[R_i] per T: full-fidelity trials filled, ASHA-stopped hollow, the choice starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({int(r["steps"]) for r in records} | set(chosen))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.axvspan(band[0], band[1], color="0.92", zorder=0, label=f"target band [{band[0]:g}, {band[1]:g}]")
    cmap = plt.get_cmap("viridis")
    for i, steps in enumerate(steps_list):
        color = cmap(i / max(1, len(steps_list) - 1))
        full = [r for r in records if int(r["steps"]) == steps and r.get("full_fidelity")]
        partial = [r for r in records if int(r["steps"]) == steps and not r.get("full_fidelity")]
        ax.scatter([r["mean_rewrites"] for r in full], [r["mauve"] for r in full], color=color,
                   label=f"T={steps}", zorder=2)
        if partial:
            ax.scatter([r["mean_rewrites"] for r in partial], [r["mauve"] for r in partial],
                       facecolors="none", edgecolors=color, zorder=2)
        if steps in chosen:
            c = chosen[steps]
            ax.scatter([c["mean_rewrites"]], [c["mauve"]], marker="*", s=260, color=color,
                       edgecolors="black", zorder=3)
            note = "" if c.get("in_band", True) else " (band not reached)"
            ax.annotate(f"η_cap={c['eta_cap']:.3g}{note}", (c["mean_rewrites"], c["mauve"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("mean rewrites per token E[R_i] (eq. 25)")
    ax.set_ylabel("MAUVE (mean over k-means seeds)")
    ax.set_title("η_cap(T) search: ★ chosen, ○ stopped early (fewer samples)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
