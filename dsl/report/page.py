"""The report page: one self-contained HTML file (inline CSS, PNGs as data URIs, no external fonts or
scripts), so it opens from disk, from an MLflow artifact download or an e-mail attachment alike.

Sections: the grid and its protocols; Table 1 (ours beside the paper's, with differences); the plots;
Table 5 (rewrites per token and the η_cap tables used); Table 6 (sharpness checkpoints); Table 3 (bits per
character, when likelihood runs exist); Fig 2 panels of chosen cells; the paper's Table 1 as printed; the
grid spec. A small inline script counts the images the browser decoded into ``<body
data-images-loaded=… data-images-total=…>`` and the footer, so a broken copy shows itself.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dsl.report import paper
from dsl.report.formatting import DASH, ShapedTable, show
from dsl.report.tables import PAPER_TABLE3_FIELDS, TABLE3_FIELDS, TABLE5_FIELDS, TABLE6_FIELDS, GridInfo


@dataclass
class Figure:
    key: str                 # element id
    title: str
    caption: str
    png: bytes


@dataclass
class Page:
    grid: GridInfo
    counts: dict[str, int]                     # cells: complete / partial / superseded
    protocols: list[dict[str, str]]            # [{"side", "name", "what"}]
    table1: ShapedTable
    paper_table1: ShapedTable
    table5: list[dict]
    eta_cap_tables: list[dict]
    table6: list[dict]
    table3: list[dict]
    paper_table3: list[dict]
    plots: list[Figure]
    fig2: list[Figure]
    fig2_missing: list[str] = field(default_factory=list)   # cells chosen for Fig 2 with nothing to show
    files: list[str] = field(default_factory=list)          # the CSV/Markdown written beside the page
    paper_experiment_url: str = ""
    command: str = ""


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1500px;
color:#1d1d1f;padding:0 16px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:.9em}nav a{margin-right:12px;font-size:.9em}
table{border-collapse:collapse;font-size:.85em;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
tr>:first-child{white-space:nowrap}
thead th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.ours th{background:#eef5ff}tr.paper th{background:#fff6e8}tr.paper td{color:#6b4a00}
tr.diff td,tr.diff th{color:#555;font-style:italic}tr.diff.cross td{background:repeating-linear-gradient(45deg,#fafafa,#fafafa 6px,#f1f1f1 6px,#f1f1f1 12px)}
ul.notes{font-size:.85em;color:#444}figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#444}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px;font-size:.9em}
pre{background:#f7f7f7;padding:8px;font-size:.8em;overflow:auto}footer{margin-top:32px;font-size:.8em;color:#666}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
  var s = document.getElementById("image-status");
  if (s) { s.textContent = ok + " of " + imgs.length + " figures loaded"; }
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure id="{_e(fig.key)}"><img src="data:image/png;base64,{data}" alt="{_e(fig.title)}">'
            f"<figcaption><b>{_e(fig.title)}</b>. {_e(fig.caption)}</figcaption></figure>")


def _notes(notes: Sequence[str]) -> str:
    return '<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>" if notes else ""


def _shaped(table: ShapedTable, table_id: str) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in ["row", "measured", "protocol", *table.columns])
    body = []
    for ln in table.lines:
        cls = ln["kind"] + (" cross" if ln["kind"] == "diff" and not ln.get("same_protocol", True) else "")
        measured = {"ours": "ours", "paper": "paper", "diff": "ours − paper"}[ln["kind"]]
        cells = "".join(f'<td class="num">{_e(x)}</td>' for x in ln["entries"])
        body.append(f'<tr class="{cls}"><th>{_e(ln["label"])}</th><td>{measured}</td><td>{_e(ln["protocol"])}</td>'
                    f"{cells}</tr>")
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            + _notes(table.notes))


def _long(records: Sequence[dict], fields: Sequence[str], table_id: str) -> str:
    head = "".join(f"<th>{_e(f)}</th>" for f in fields)
    rows = []
    for r in records:
        cells = []
        for f in fields:
            if f == "run_id" and r.get(f):     # the CSV keeps the whole id; the page its first 8 characters
                cells.append(f'<td title="{_e(r[f])}"><code>{_e(str(r[f])[:8])}</code></td>')
                continue
            text = show(f, r.get(f))
            numeric = isinstance(r.get(f), (int, float)) and not isinstance(r.get(f), bool)
            cells.append(f'<td class="num">{_e(text)}</td>' if numeric else f"<td>{_e(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _eta_tables(entries: Sequence[dict]) -> str:
    if not entries:
        return "<p>No cell names an η_cap source.</p>"
    rows = []
    for e in entries:
        if "table" in e:
            what = ", ".join(f"T={t}: {v:g}" for t, v in sorted(e["table"].items(), key=lambda kv: int(kv[0])))
        elif "rule" in e:
            what = "rule " + json.dumps(e["rule"], sort_keys=True)
        elif "error" in e:
            what = e["error"]
        else:
            what = "no table (the sampler does not cap remasking by T, or uses the official ReMDM rule)"
        rows.append(f"<tr><td>{_e(e['source'])}</td><td>{_e(what)}</td></tr>")
    return ('<table id="eta-cap-tables"><thead><tr><th>η_cap source</th><th>η_cap(T)</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def render(page: Page) -> str:
    g = page.grid
    title = f"DSL grid report — {g.name or g.run_id}"
    meta = [f"grid run <code>{_e(g.run_id)}</code>", f"experiment {_e(g.experiment or DASH)}",
            f"spec {_e(g.spec_name or DASH)}", f"status {_e(g.status or DASH)}", f"started {_e(g.started or DASH)}",
            f"cells: {page.counts.get('complete', 0)} complete, {page.counts.get('partial', 0)} partial"
            + (f", {page.counts['superseded']} superseded runs left out" if page.counts.get("superseded") else ""),
            f"tracking URI {_e(g.tracking_uri)}"]
    links = []
    if g.ui_url:
        links.append(f'<a href="{_e(g.ui_url)}">the grid in the MLflow UI</a>')
    if page.paper_experiment_url:
        links.append(f'<a href="{_e(page.paper_experiment_url)}">the paper\'s reference runs in the MLflow UI</a>')
    parts = [f"<header><h1>{_e(title)}</h1><p class=\"meta\">{' · '.join(meta)}</p>"
             + (f"<p class=\"meta\">{' · '.join(links)}</p>" if links else "") + "</header>"]
    sections = [("protocols", "Protocols"), ("table1-section", "Table 1"), ("plots", "Plots"),
                ("table5-section", "Table 5"), ("table6-section", "Table 6"), ("table3-section", "Table 3"),
                ("fig2", "Fig 2 panels"), ("paper-table1-section", "The paper's Table 1"), ("grid-spec", "Grid spec")]
    parts.append("<nav>" + "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name in sections) + "</nav>")

    # protocols
    rows = "".join(f"<tr><td>{_e(p['side'])}</td><td>{_e(p['name'])}</td><td>{_e(p['what'])}</td></tr>"
                   for p in page.protocols)
    mixed = any(p["side"] == "ours" and p["name"] != paper.TABLE1_PROTOCOL for p in page.protocols)
    parts.append('<section id="protocols"><h2>Protocols</h2>'
                 + ('<p class="warn">Our cells were measured under a different protocol than the paper\'s: the '
                    'numbers sit side by side, labelled, and their differences are not like-for-like.</p>'
                    if mixed else "")
                 + '<table id="protocol-table"><thead><tr><th>numbers</th><th>protocol</th><th>what it measures'
                   f"</th></tr></thead><tbody>{rows}</tbody></table></section>")

    parts.append('<section id="table1-section"><h2>Table 1 — our rows beside the paper\'s</h2>'
                 + _shaped(page.table1, "table1") + "</section>")
    parts.append('<section id="plots"><h2>Plots</h2>' + "".join(_img(f) for f in page.plots) + "</section>")

    parts.append('<section id="table5-section"><h2>Table 5 — rewrites per token and the η_cap table used</h2>'
                 + _long(page.table5, TABLE5_FIELDS, "table5")
                 + _notes([f"Rewrites per token: mean R_i of eq. 25 per sample. The paper's Table 5 is beside the "
                           f"cells of the step-budget protocol ({paper.STEP_BUDGET_SAMPLER}).", paper.TABLE5_NOTE])
                 + "<h3>η_cap tables used</h3>" + _eta_tables(page.eta_cap_tables) + "</section>")

    parts.append('<section id="table6-section"><h2>Table 6 — posterior sharpness checkpoints</h2>'
                 + (_long(page.table6, TABLE6_FIELDS, "table6") if page.table6 else
                    "<p>No cell logged the sharpness histories (diag.t, diag.mean_max_prob, diag.nucleus_size).</p>")
                 + _notes(["Mean max prob and the top-p (0.9) nucleus size at the paper's step checkpoints k, mapped "
                           "to each cell's budget (k = round(k'·T/T'), the last step to the last step); the paper's "
                           "values are beside the step-budget protocol's cells."]) + "</section>")

    t3 = ('<section id="table3-section"><h2>Table 3 — bits per character (NLL bound)</h2>'
          + (_long(page.table3, TABLE3_FIELDS, "table3") if page.table3 else
             "<p>No likelihood runs of this grid's checkpoints (jobs/evaluate.py likelihood) were found.</p>")
          + "<h3>The paper's Table 3</h3>" + _long(page.paper_table3, PAPER_TABLE3_FIELDS, "paper-table3")
          + _notes([f"{paper.TABLE3_PROTOCOL}: {paper.TABLE3_PROTOCOL_TEXT}."]) + "</section>")
    parts.append(t3)

    fig2 = "".join(_img(f) for f in page.fig2) or "<p>No cells were chosen for Fig 2 panels (report.fig2).</p>"
    if page.fig2_missing:
        fig2 += _notes([f"{c}: no fig2.png or diagnostics.jsonl artifact" for c in page.fig2_missing])
    parts.append(f'<section id="fig2"><h2>Fig 2 — per-step diagnostics of chosen cells</h2>{fig2}</section>')

    parts.append('<section id="paper-table1-section"><h2>The paper\'s Table 1 as printed</h2>'
                 + _shaped(page.paper_table1, "paper-table1") + "</section>")
    spec = json.dumps(g.spec, indent=2, sort_keys=True) if g.spec else "(the grid run has no grid_spec.json)"
    parts.append(f'<section id="grid-spec"><h2>Grid spec</h2><details><summary>grid_spec.json</summary>'
                 f"<pre>{_e(spec)}</pre></details></section>")
    files = " · ".join(f'<a href="{_e(f)}">{_e(f)}</a>' for f in page.files)
    parts.append(f"<footer><p>Tables beside this page: {files}</p><p>{_e(page.command)}</p>"
                 '<p id="image-status"></p></footer>')
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(parts) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


__all__ = ["Figure", "Page", "render"]
