"""The report's figures (PNG, matplotlib Agg): MAUVE against the step budget and against NFE, GenPPL
against sentence entropy — our cells and the paper's Table 1 points in the same axes — and Fig 2's
diagnostics panels redrawn from a cell's per-step records.

Our points are filled circles on solid lines (error bars: MAUVE's std over k-means seeds); the paper's
are open squares on dashed lines, in the colour of our row that meets them. The paper reports step
budgets, not NFE: its points in the NFE plot sit at NFE = T (one forward per step).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from dsl.report import paper
from dsl.report.tables import Cell, grid_length, row_order
from dsl.sampling.figures import headless_pyplot, plot_diagnostics, save_png


def _budget_axis(cells: Sequence[Cell], match: str) -> tuple[float, str]:
    """(scale, label): x = T/scale for us and T'/(scale·1024/L) for the paper. With ``fraction`` and a known
    L ≠ 1024 the axis is T/L; otherwise T."""
    length = grid_length(cells)
    if match == "fraction" and length and length != paper.PAPER_LENGTH:
        return float(length), f"step budget T / L (ours: L={length}; paper: L={paper.PAPER_LENGTH})"
    return 1.0, "step budget T"


def _paper_rows(cells: Sequence[Cell], spec_rows: Sequence[str]) -> list[tuple[str, str | None]]:
    """[(paper row, our row that meets it or None)]: the rows our grid meets, then the paper's headline rows."""
    out: dict[str, str | None] = {}
    for row in row_order(cells, spec_rows):
        prow = paper.paper_row(row)
        if prow is not None and prow not in out:
            out[prow] = row
    for prow in paper.HEADLINE_ROWS:
        out.setdefault(prow, None)
    return list(out.items())


def _colours(cells: Sequence[Cell], spec_rows: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    palette = [f"C{i}" for i in range(10)]
    ours = {row: palette[i % 10] for i, row in enumerate(row_order(cells, spec_rows))}
    theirs, spare = {}, (c for c in [*palette[len(ours) % 10:], *palette] if c not in ours.values())
    for prow, mine in _paper_rows(cells, spec_rows):
        theirs[prow] = ours[mine] if mine else next(spare, "0.5")
    return ours, theirs


def _label_paper(prow: str) -> str:
    return f"paper: {prow}" + (f" {paper.mark(prow)}" if paper.mark(prow) else "")


def _protocol_note(cells: Sequence[Cell]) -> str:
    protocols = sorted({c.protocol or "unknown" for c in cells})
    same = protocols == [paper.TABLE1_PROTOCOL]
    return f"ours: {', '.join(protocols)}; paper: {paper.TABLE1_PROTOCOL}" + ("" if same else " (different protocols)")


def _finish(fig, ax, title: str, path: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ranked = sorted(zip(labels, handles), key=lambda lh: not lh[0].startswith("ours"))   # ours first, then the paper
    ax.legend([h for _, h in ranked], [lab for lab, _ in ranked], fontsize=7, loc="center left",
              bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    save_png(fig, path, 100)


def _mauve_against(cells: Sequence[Cell], path: str, spec_rows: Sequence[str], ours_x: Callable[[Cell], float | None],
                   paper_x: Callable[[int], float], xlabel: str, title: str, paper_note: str = "") -> None:
    """MAUVE (± std over k-means seeds) of every row against ``ours_x(cell)``, the paper's rows against
    ``paper_x(T')``."""
    plt = headless_pyplot()
    ours, theirs = _colours(cells, spec_rows)
    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    for row in row_order(cells, spec_rows):
        pts = sorted((ours_x(c), c.metric("mauve"), c.metric("mauve_std") or 0.0) for c in cells
                     if c.row == row and c.metric("mauve") is not None and ours_x(c))
        if pts:
            ax.errorbar([x for x, _, _ in pts], [m for _, m, _ in pts], yerr=[s for _, _, s in pts],
                        color=ours[row], marker="o", ls="-", capsize=3, label=f"ours: {row}")
    for prow, _ in _paper_rows(cells, spec_rows):
        pts = sorted((t, v[0]) for t, v in paper.TABLE1[prow].items())
        ax.plot([paper_x(t) for t, _ in pts], [m for _, m in pts], color=theirs[prow], marker="s", mfc="none",
                ls="--", label=_label_paper(prow) + paper_note)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MAUVE")
    ax.set_ylim(0, 1.05)
    _finish(fig, ax, f"{title} — {_protocol_note(cells)}", path)


def mauve_vs_steps(cells: Sequence[Cell], match: str, path: str, spec_rows: Sequence[str] = ()) -> None:
    scale, xlabel = _budget_axis(cells, match)
    paper_scale = float(paper.PAPER_LENGTH) if scale != 1.0 else 1.0   # T'/1024 on a T/L axis
    _mauve_against(cells, path, spec_rows, lambda c: c.steps / scale, lambda t: t / paper_scale, xlabel,
                   "MAUVE vs step budget")


def mauve_vs_nfe(cells: Sequence[Cell], path: str, spec_rows: Sequence[str] = ()) -> None:
    _mauve_against(cells, path, spec_rows, lambda c: c.metric("nfe"), float,
                   "NFE (mean denoiser forwards per sample)", "MAUVE vs NFE", " (NFE = T)")


def genppl_vs_entropy(cells: Sequence[Cell], path: str, spec_rows: Sequence[str] = ()) -> None:
    plt = headless_pyplot()
    ours, theirs = _colours(cells, spec_rows)
    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    for row in row_order(cells, spec_rows):
        pts = sorted((c.steps, c.metric("sentence_entropy"), c.metric("genppl")) for c in cells
                     if c.row == row and c.metric("genppl") is not None and c.metric("sentence_entropy") is not None)
        if pts:
            ax.plot([e for _, e, _ in pts], [g for _, _, g in pts], color=ours[row], marker="o", ls="-",
                    label=f"ours: {row}")
            for t, e, g in pts:
                ax.annotate(f"T={t}", (e, g), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for prow, _ in _paper_rows(cells, spec_rows):
        pts = sorted((t, v[2], v[1]) for t, v in paper.TABLE1[prow].items())
        ax.plot([e for _, e, _ in pts], [g for _, _, g in pts], color=theirs[prow], marker="s", mfc="none", ls="--",
                label=_label_paper(prow))
        for t, e, g in pts:
            ax.annotate(f"T={t}", (e, g), fontsize=6, xytext=(3, -8), textcoords="offset points", color="0.4")
    ax.set_yscale("log")
    ax.set_xlabel("sentence entropy (higher: more diverse)")
    ax.set_ylabel("GenPPL (lower: more likely under the judge)")
    _finish(fig, ax, "GenPPL vs sentence entropy — " + _protocol_note(cells), path)


def fig2_from_records(records_path: str, title: str, path: str) -> bool:
    """Fig 2's panels redrawn from a cell's ``diagnostics.jsonl`` (one record per sampler step); False
    when the file does not hold the per-step records the panels need."""
    try:
        with open(records_path, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
        diagnostics = {k: [float("nan") if r.get(k) is None else r[k] for r in records] for k in records[0]}
        plot_diagnostics(diagnostics, title, path)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return False
    return True


__all__ = ["mauve_vs_steps", "mauve_vs_nfe", "genppl_vs_entropy", "fig2_from_records"]
