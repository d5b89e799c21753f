"""The comparison report of a Table 1 grid: our cells beside the paper's numbers, as one self-contained
HTML page plus CSV and Markdown of every table.

- :mod:`dsl.report.paper`  — the paper's tables (1, 3, 5, 6) and how a cell meets them;
- :mod:`dsl.report.tables` — cells → table records;
- :mod:`dsl.report.formatting` — numbers, CSV and Markdown of the tables;
- :mod:`dsl.report.plots`  — the figures (matplotlib Agg);
- :mod:`dsl.report.page`   — the HTML page.

:func:`write_report` takes plain records (read from MLflow by :mod:`dsl.service.grid_results`) and writes
the files; nothing here talks to MLflow.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dsl.report import paper
from dsl.report.tables import Cell, GridInfo, LikelihoodRun

REPORT_HTML = "report.html"
TABLE1_CSV = "table1.csv"


@dataclass
class Fig2Source:
    """What a cell offers for its Fig 2 panels: a drawn ``png`` or per-step ``records`` to draw from."""

    cell: Cell
    kind: str        # png | records
    path: str


def fig2_cells(cells: Sequence[Cell], choice: str, spec_rows: Sequence[str] = ()) -> list[Cell]:
    """The cells whose Fig 2 panels the page shows (``report.fig2``): ``smallest`` = every row at the grid's
    smallest T, ``all``, ``none``, or the listed budgets ``T,T,...``; by T, then in the spec's row order."""
    from dsl.report.tables import row_order

    order = {r: i for i, r in enumerate(row_order(cells, spec_rows))}
    ranked = sorted(cells, key=lambda c: (c.steps, order[c.row]))
    if choice == "none" or not cells:
        return []
    if choice == "all":
        return ranked
    if choice == "smallest":
        wanted = {min(c.steps for c in cells)}
    else:
        wanted = {int(p) for p in choice.split(",") if p.strip()}
    return [c for c in ranked if c.steps in wanted]


def _slug(text: str) -> str:
    keep = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    return "-".join(p for p in keep.split("-") if p) or "row"


def _protocols(cells: Sequence[Cell], grid: GridInfo) -> list[dict[str, str]]:
    deviations = grid.spec.get("deviations") if isinstance(grid.spec, dict) else None
    out = []
    for name in sorted({c.protocol or "unknown" for c in cells}):
        if name == paper.TABLE1_PROTOCOL:
            what = paper.TABLE1_PROTOCOL_TEXT
            if deviations:
                what += "; deviations recorded by the grid: " + ", ".join(f"{k}={v}" for k, v in
                                                                          sorted(dict(deviations).items()))
        elif name in ("none", "offline"):
            what = "the offline default (eval.protocol=none): its settings are in the grid spec below"
        else:
            what = "the grid's own evaluation protocol (its settings are in the grid spec below)"
        out.append({"side": "ours", "name": name, "what": what})
    out.append({"side": "paper, Table 1", "name": paper.TABLE1_PROTOCOL, "what": paper.TABLE1_PROTOCOL_TEXT})
    out.append({"side": "paper, Table 3", "name": paper.TABLE3_PROTOCOL, "what": paper.TABLE3_PROTOCOL_TEXT})
    return out


def write_report(grid: GridInfo, cells: Sequence[Cell], out: str | os.PathLike, *, match: str = "fraction",
                 likelihood: Sequence[LikelihoodRun] = (), fig2: Sequence[Fig2Source] = (),
                 fig2_missing: Sequence[str] = (), counts: dict[str, int] | None = None,
                 paper_experiment_url: str = "", command: str = "") -> list[str]:
    """Write ``report.html`` and every table's CSV and Markdown (and the plots' PNGs) into ``out``; return
    the files written, relative to ``out``. Everything is built in a temporary folder first, so a failure
    leaves the previous report in ``out`` as it was."""
    from dsl.report import formatting, page, plots, tables

    if not cells:
        raise ValueError("a report needs at least one cell")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".report-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "plots").mkdir(parents=True)
    spec_rows = grid.spec_rows()
    try:
        written: list[str] = []

        def put(name: str, text: str) -> None:
            (tmp / name).write_text(text, encoding="utf-8")
            written.append(name)

        t1 = tables.table1_records(cells, match, spec_rows)
        shaped = tables.table1_shaped(cells, match, spec_rows)
        put(TABLE1_CSV, formatting.to_csv(t1, tables.TABLE1_FIELDS))
        put("table1.md", formatting.shaped_markdown(shaped, "Table 1 — our rows beside the paper's"))
        t5 = tables.table5_records(cells, match, spec_rows)
        etas = tables.eta_cap_tables(c.eta_cap_source for c in cells)
        put("table5.csv", formatting.to_csv(t5, tables.TABLE5_FIELDS))
        eta_lines = [f"η_cap source {e['source']}: " + (str(e.get("table") or e.get("rule") or e.get("error") or "no table"))
                     for e in etas]
        put("table5.md", formatting.long_markdown(t5, tables.TABLE5_FIELDS, "Table 5 — rewrites per token",
                                              [*eta_lines, paper.TABLE5_NOTE]))
        t6 = tables.table6_records(cells, match, spec_rows)
        if t6:
            put("table6.csv", formatting.to_csv(t6, tables.TABLE6_FIELDS))
            put("table6.md", formatting.long_markdown(t6, tables.TABLE6_FIELDS, "Table 6 — sharpness checkpoints"))
        t3 = tables.table3_records(likelihood)
        p3 = tables.paper_table3_records()
        if t3:
            put("table3.csv", formatting.to_csv(t3, tables.TABLE3_FIELDS))
            put("table3.md", formatting.long_markdown(t3, tables.TABLE3_FIELDS, "Table 3 — bits per character (ours)")
                + "\n" + formatting.long_markdown(p3, tables.PAPER_TABLE3_FIELDS, "Table 3 — the paper's",
                                              [paper.TABLE3_PROTOCOL_TEXT]))

        plot_specs = [
            ("mauve_vs_steps", "MAUVE vs step budget",
             "Ours: filled circles, ± std over k-means seeds; the paper's Table 1: open squares, dashed.",
             lambda p: plots.mauve_vs_steps(cells, match, p, spec_rows)),
            ("mauve_vs_nfe", "MAUVE vs NFE",
             "Ours at their measured NFE; the paper reports step budgets, drawn at NFE = T.",
             lambda p: plots.mauve_vs_nfe(cells, p, spec_rows)),
            ("genppl_vs_entropy", "GenPPL vs sentence entropy",
             "Quality against diversity; each point is labelled with its T. Judges differ across protocols.",
             lambda p: plots.genppl_vs_entropy(cells, p, spec_rows)),
        ]
        figures = []
        for key, title, caption, draw in plot_specs:
            name = f"plots/{key}.png"
            draw(str(tmp / name))
            written.append(name)
            figures.append(page.Figure(f"plot-{key.replace('_', '-')}", title, caption, (tmp / name).read_bytes()))
        fig2_figures, missing = [], list(fig2_missing)
        for src in fig2:
            c = src.cell
            name = f"plots/fig2-{_slug(c.row)}-T{c.steps}.png"
            title = f"{c.row}, T={c.steps}"
            if src.kind == "png":
                shutil.copyfile(src.path, tmp / name)
            elif not plots.fig2_from_records(src.path, f"{c.row} — {c.sampler} T={c.steps}", str(tmp / name)):
                missing.append(title)
                continue
            written.append(name)
            fig2_figures.append(page.Figure(f"fig2-{_slug(c.row)}-t{c.steps}", f"Fig 2 panels: {title}",
                                            "masking and reveal, remasking and rewrite rate, posterior sharpness, "
                                            "nucleus size, against decoding progress 1 − t"
                                            + (" (redrawn from diagnostics.jsonl)" if src.kind == "records" else ""),
                                            (tmp / name).read_bytes()))
        if counts is None:
            counts = {"complete": sum(c.status == "complete" for c in cells),
                      "partial": sum(c.status != "complete" for c in cells)}
        tables_written = [w for w in written if not w.startswith("plots/")]
        html = page.render(page.Page(
            grid=grid, counts=counts, protocols=_protocols(cells, grid), table1=shaped,
            paper_table1=tables.paper_table1_shaped(), table5=t5, eta_cap_tables=etas, table6=t6, table3=t3,
            paper_table3=p3, plots=figures, fig2=fig2_figures, fig2_missing=missing, files=tables_written,
            paper_experiment_url=paper_experiment_url, command=command))
        put(REPORT_HTML, html)
        (out / "plots").mkdir(exist_ok=True)
        for name in written:               # commit: the page last, so a page never points at missing files
            if name != REPORT_HTML:
                os.replace(tmp / name, out / name)
        os.replace(tmp / REPORT_HTML, out / REPORT_HTML)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["write_report", "fig2_cells", "Fig2Source", "REPORT_HTML", "TABLE1_CSV"]
