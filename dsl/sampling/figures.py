"""Figures of the sampling package: Fig 2's per-step diagnostics panels and the toys of Fig 3 and Fig 1b.

matplotlib is imported inside each function (Agg backend), so importing :mod:`dsl.sampling` stays
torch-only. Every figure is written under a temporary name and renamed, so a failure leaves no file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dsl.atomic import atomic_path


def headless_pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str, dpi: int) -> None:
    """``fig`` as a PNG at ``path``, written whole or not at all; the figure is closed."""
    plt = headless_pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def plot_diagnostics(diagnostics: dict, title: str, path: str) -> None:
    """Fig 2's three panels against decoding progress 1 − t: masking/reveal, remasking, sharpness."""
    plt = headless_pyplot()
    progress = 1 - np.asarray(diagnostics["t"])
    panels = [("masking & reveal", ["masked_ratio", "reveal_fraction"]),
              ("remasking / rewrite rate", ["remask_intensity", "remask_ratio", "change_rate"]),
              ("posterior sharpness", ["mean_max_prob", "uncertainty"])]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(progress, diagnostics[key], label=key, lw=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("decoding progress 1 − t")
        ax.legend(fontsize=7)
    axes[3].semilogy(progress, diagnostics["nucleus_size"], label="nucleus size k_t")
    axes[3].set_title("top-p nucleus size (log)", fontsize=10)
    axes[3].set_xlabel("decoding progress 1 − t")
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path, 100)


def recover_figure(steps: int, n: int, seed: int, path: str) -> dict:
    """Fig 3: K=7 recovery of ``__CDBFD`` by confidence-driven remasking; the timeline of run 0 is drawn,
    ``n`` runs (seeds ``seed``..``seed+n-1``) give the valid and exact-recovery rates."""
    from dsl.sampling.toys import FIG3_DRAFT, FIG3_TRUTH, parse_draft, recover_cyclic
    from dsl.sources import CyclicSource

    plt = headless_pyplot()
    source = CyclicSource(7)
    draft = parse_draft(FIG3_DRAFT, source)
    runs = [recover_cyclic(source, draft, steps, torch.Generator().manual_seed(seed + i)) for i in range(n)]
    rows = [FIG3_DRAFT] + runs[0].timeline
    fig, ax = plt.subplots(figsize=(5.5, 0.35 * len(rows) + 1))
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            ok = ch == FIG3_TRUTH[c]
            ax.text(c, r, ch, ha="center", va="center", family="monospace",
                    color="green" if ok else ("gray" if ch == "_" else "red"))
    ax.set_xlim(-0.5, 6.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(range(len(rows)), ["init"] + [f"step {k}" for k in range(len(rows) - 1)])
    ax.set_xticks(range(7), [str(i + 1) for i in range(7)])
    ax.set_title(f"confidence-driven remasking: {FIG3_DRAFT} → {runs[0].final}")
    fig.tight_layout()
    save_png(fig, path, 110)
    return {"toy": "recover", "n": n, "steps": steps, "valid_rate": sum(r.valid for r in runs) / n,
            "truth_rate": sum(r.final == FIG3_TRUTH for r in runs) / n}


def sde_figure(steps: int, n: int, seed: int, gamma_end: float, sde_path: str, path: str) -> dict:
    """Fig 1b: K=5 posterior-mean paths x̂(z) of the SDE sampler (eq. 2), up to 4 samples side by side."""
    from dsl.sampling.toys import sde_localization

    plt = headless_pyplot()
    res = sde_localization(k=5, steps=steps, n=min(n, 4), seed=seed, gamma_end=gamma_end, path=sde_path)
    paths = res.mean_path.numpy()  # (T+1, n, L, 2): x̂(z) moves from the origin to a circle vertex
    fig, axes = plt.subplots(1, paths.shape[1], figsize=(3.2 * paths.shape[1], 3.4), squeeze=False)
    angles = np.linspace(0, 2 * np.pi, 200)
    for j, ax in enumerate(axes[0]):
        ax.plot(np.cos(angles), np.sin(angles), color="0.85", lw=1)
        for v in range(5):
            ax.text(1.15 * np.cos(2 * np.pi * v / 5), 1.15 * np.sin(2 * np.pi * v / 5), "ABCDE"[v],
                    ha="center", va="center")
        for i in range(paths.shape[2]):
            ax.plot(paths[:, j, i, 0], paths[:, j, i, 1], lw=1.2, label=f"token {i + 1}")
            ax.plot(*paths[-1, j, i], "o", ms=4)
        ax.set_aspect("equal")
        ax.set_xlim(-1.35, 1.35)
        ax.set_ylim(-1.35, 1.35)
        ax.set_title(f"sample {j}: " + "".join("ABCDE"[t] for t in res.ids[j].tolist()), fontsize=9)
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"SDE (eq. 2), K=5, {sde_path} path: posterior mean x̂(z) paths")
    fig.tight_layout()
    save_png(fig, path, 110)
    return {"toy": "sde-2d", "n": paths.shape[1], "steps": steps, "nfe": int(res.nfe[0])}


__all__ = ["plot_diagnostics", "recover_figure", "sde_figure", "headless_pyplot", "save_png"]
