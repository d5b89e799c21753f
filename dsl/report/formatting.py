"""How the report writes numbers and tables: one number format per column for the page, the Markdown
and the tests' reading of both, tables in the paper's shape, CSV (full precision) and Markdown."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DASH = "–"


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_mauve(x: float | None) -> str:
    return f"{x:.3f}" if finite(x) else DASH


def fmt_ppl(x: float | None) -> str:
    return (f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}") if finite(x) else DASH


def fmt_entropy(x: float | None) -> str:
    return f"{x:.2f}" if finite(x) else DASH


def fmt_count(x: float | None) -> str:
    """NFE and the like: whole numbers without decimals, means with one."""
    if not finite(x):
        return DASH
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def fmt_num(x: float | None, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if finite(x) else DASH


def fmt_general(x: float | None) -> str:
    return f"{x:.4g}" if finite(x) else DASH


def fmt_diff(x: float | None, fmt=fmt_mauve) -> str:
    """A signed difference: ``+0.397``, ``−26.3`` (a true minus sign)."""
    if not finite(x):
        return DASH
    text = fmt(abs(x))
    return ("−" if x < 0 else "+") + text


def mauve_entry(mauve: float | None, std: float | None) -> str:
    return fmt_mauve(mauve) + (f" ± {fmt_mauve(std)}" if finite(std) else "")


def table1_entry(mauve: float | None, std: float | None, genppl: float | None, entropy: float | None,
                 nfe: float | None) -> str:
    """Table 1's cell: MAUVE ± std / GenPPL / sentence entropy / NFE."""
    return " / ".join((mauve_entry(mauve, std), fmt_ppl(genppl), fmt_entropy(entropy), fmt_count(nfe)))


@dataclass
class ShapedTable:
    """A table in the paper's shape: a header, and lines of (kind, label, protocol, entries)."""

    columns: list[str]                     # per budget: "T=4 (paper T=128)"
    lines: list[dict[str, Any]]            # {"kind": ours|paper|diff, "label", "protocol", "entries": [...]}
    notes: list[str]


def to_csv(records: Sequence[dict], fields: Sequence[str]) -> str:
    """Numbers at full precision (``repr``), missing values empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    return buf.getvalue()


def markdown_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(markdown_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def shaped_markdown(table: ShapedTable, title: str) -> str:
    header = ["row", "measured", "protocol", *table.columns]
    rows = [[ln["label"], {"ours": "ours", "paper": "paper", "diff": "ours − paper"}[ln["kind"]], ln["protocol"],
             *ln["entries"]] for ln in table.lines]
    return f"## {title}\n\n" + markdown_table(header, rows) + "\n" + "".join(f"- {n}\n" for n in table.notes)


FORMATS = {  # how a column of the long tables is shown on the page and in Markdown
    "mauve": fmt_mauve, "mauve_std": fmt_mauve, "mauve_mean": fmt_mauve, "paper_mauve": fmt_mauve,
    "diff_mauve": fmt_diff, "genppl": fmt_ppl, "paper_genppl": fmt_ppl,
    "diff_genppl": lambda x: fmt_diff(x, fmt_ppl), "sentence_entropy": fmt_entropy,
    "paper_sentence_entropy": fmt_entropy, "diff_sentence_entropy": lambda x: fmt_diff(x, fmt_entropy),
    "nfe": fmt_count, "rewrites_per_token": lambda x: fmt_num(x, 4), "paper_rewrites_per_token": lambda x: fmt_num(x, 4),
    "eta_cap": fmt_general, "paper_eta_printed": fmt_general, "paper_eta_eq24": fmt_general,
    "genppl_impossible_share": lambda x: fmt_num(x, 3), "t": lambda x: fmt_num(x, 4), "paper_t": lambda x: fmt_num(x, 4),
    "mean_max_prob": lambda x: fmt_num(x, 4), "paper_mean_max_prob": lambda x: fmt_num(x, 4),
    "nucleus_size": lambda x: fmt_num(x, 2), "paper_nucleus_size": lambda x: fmt_num(x, 2),
    "bpc": lambda x: fmt_num(x, 3), "bits_per_token": lambda x: fmt_num(x, 3), "nll_bound": lambda x: fmt_num(x, 4),
    "nll_stderr": lambda x: fmt_num(x, 4),
}


def show(field_name: str, value: Any) -> str:
    """A long table's value as the page and the Markdown show it."""
    if value is None or value == "":
        return DASH
    fmt = FORMATS.get(field_name)
    if fmt is not None and finite(value):
        return fmt(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def long_markdown(records: Sequence[dict], fields: Sequence[str], title: str, notes: Sequence[str] = ()) -> str:
    rows = [[show(f, r.get(f)) for f in fields] for r in records]
    return f"## {title}\n\n" + markdown_table(list(fields), rows) + "\n" + "".join(f"- {n}\n" for n in notes)
