"""The leaderboard as one self-contained HTML file, for reading before a group meeting: the protocol in a header,
the ranked table (primary metric first, secondary columns folded away, rows that differ in N or training
budget flagged), why a metric is missing, the sample grids side by side (click to enlarge), and plots of the
primary metric against training images seen and sampling speed.

Everything is inline (grids as data: URIs, plots as SVG, a few lines of script), so the file can be mailed or
attached to a paper's supplement and still show everything.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.leaderboard.table import (
    Column,
    budget_point,
    column,
    direction,
    format_cell,
    is_reference_row,
    sample_count_note,
    skipped_by_reason,
    used_columns,
)
from pipeline.leaderboard.table import ranks as table_ranks
from pipeline.leaderboard.text import budget_label
from pipeline.metrics import KEY_MEMORIZATION

# shown unfolded when present: the fidelity metrics and the budget; the rest behind "all columns"
MAIN_COLUMNS = ("fid", "is", "kid", "precision", "recall", "fd_dinov2", "fd_auditor", "memorization", "images_seen",
                "num_samples")

_SCRIPT = """
document.querySelectorAll('th[data-col]').forEach(th => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0], col = +th.dataset.col;
  const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
  const key = tr => { const v = tr.cells[col].dataset.v; return v === '' ? null : (isNaN(v) ? v : +v); };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    if (x === null) return 1; if (y === null) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(tr => body.appendChild(tr));
}));
document.getElementById('all-columns').addEventListener('click', e => {
  const t = document.getElementById('board'); t.classList.toggle('all');
  e.target.textContent = t.classList.contains('all') ? 'fewer columns' : 'all columns';
});
document.querySelectorAll('img.grid').forEach(img => img.addEventListener('click', () => img.classList.toggle('zoom')));
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; max-width: 1340px; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.6em; font-size: 1.15em; }
.protocol { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; font-size: 13px;
            background: #f6f6f6; padding: 8px 12px; border-radius: 4px; }
.protocol dt { font-weight: 600; } .protocol dd { margin: 0; }
table { border-collapse: collapse; font-size: 13px; width: 100%; }
th, td { padding: 3px 6px; border-bottom: 1px solid #ddd; vertical-align: top; }
th[data-col] { cursor: pointer; background: #f0f0f0; text-align: left; }
th.primary, td.primary { background: #eef4ff; font-weight: 600; }
tr.ref { color: #777; font-style: italic; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.secondary { display: none; } table.all .secondary { display: table-cell; }
.flag { color: #b35c00; font-weight: 600; cursor: help; }
button { font-size: 12px; margin: 6px 0; }
.budget-tables { display: flex; flex-wrap: wrap; gap: 18px; } table.budget caption { font-weight: bold; }
.grids { display: flex; flex-wrap: wrap; gap: 18px; }
.grids figure { margin: 0; width: 300px; } .grids figcaption { font-size: 12px; margin-top: 4px; }
img.grid.pairs { width: 90px; }
img.grid { width: 300px; image-rendering: pixelated; cursor: zoom-in; border: 1px solid #ccc; }
img.grid.zoom { position: fixed; top: 2vh; left: 50%; transform: translateX(-50%); width: auto; height: 96vh;
                z-index: 10; cursor: zoom-out; background: #fff; box-shadow: 0 0 0 100vmax rgba(0,0,0,.6); }
.plots { display: flex; gap: 2em; flex-wrap: wrap; } .plots figure { margin: 0; width: 600px; }
ul.skipped li { margin-bottom: .4em; font-size: 13px; }
"""


def _data_uri(path: Path) -> Optional[str]:
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    except OSError:
        return None


def _breakable(name: str) -> str:
    """A run name that may wrap after its hyphens, so long names do not widen the table."""
    return "-<wbr>".join(html.escape(part) for part in str(name).split("-"))


def _majority(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    return Counter(known).most_common(1)[0][0] if known else None


def _flags(rows: list[dict]) -> dict[int, list[str]]:
    """Row index -> why it is not comparable with most model rows: another sample count or training budget."""
    models = [r for r in rows if not is_reference_row(r)]
    n = _majority([r.get("protocol", {}).get("num_samples") for r in models])
    seen = _majority([r.get("cost", {}).get("images_seen") for r in models])
    flags: dict[int, list[str]] = {}
    for i, r in enumerate(rows):
        if is_reference_row(r):
            continue
        out = []
        if n is not None and r.get("protocol", {}).get("num_samples") != n:
            out.append(f"scored on N={r['protocol'].get('num_samples'):,} samples, most rows on {n:,}")
        images = r.get("cost", {}).get("images_seen")
        if seen is not None and images is not None and images != seen:
            out.append(f"trained on {images:,} images, most rows on {seen:,}")
        if out:
            flags[i] = out
    return flags


def _protocol(rows: list[dict], results: str | Path) -> str:
    """The header: what every number below was measured on, and how."""
    protocols = [r.get("protocol", {}) for r in rows]
    refs = {(p.get("reference", {}).get("path"), str(p.get("reference", {}).get("hash", ""))[:12]) for p in protocols}
    extractors: dict[str, set[str]] = {}
    for p in protocols:
        for name, e in p.get("extractors", {}).items():
            detail = e.get("name", name)
            if e.get("weights_sha256") or e.get("sha256"):
                detail += f" (weights {str(e.get('weights_sha256') or e.get('sha256'))[:12]})"
            if e.get("precision"):
                detail += f", {e['precision']}"
            if e.get("val_accuracy") is not None:
                detail += f", held-out accuracy {e['val_accuracy']:.3f}"
            extractors.setdefault(name, set()).add(detail)
    models = [r for r in rows if not is_reference_row(r)]
    ns = sorted({r["protocol"].get("num_samples") for r in models if r.get("protocol", {}).get("num_samples")})
    seen = sorted({r.get("cost", {}).get("images_seen") for r in models if r.get("cost", {}).get("images_seen")})
    hours = [r.get("cost", {}).get("device_hours") for r in models if r.get("cost", {}).get("device_hours")]
    sampling = sorted({r.get("protocol", {}).get("sampling", {}).get("precision") for r in models} - {None})
    items = [
        ("data", "; ".join(f"{html.escape(str(path))} (hash {h})" for path, h in sorted(refs, key=str))),
        ("samples per row", ", ".join(f"{n:,}" for n in ns) + (" (rows differ: flagged ⚠)" if len(ns) > 1 else "")),
        ("feature extractors", "; ".join(f"{html.escape(k)}: {html.escape(' / '.join(sorted(v)))}"
                                         for k, v in sorted(extractors.items())) or "none"),
        ("sampling precision", ", ".join(sampling) or "n/a"),
        ("training budget", (", ".join(f"{s:,}" for s in seen) + " images seen" if seen else "n/a")
         + (f"; {min(hours):.3g}-{max(hours):.3g} device-hours" if hours else "")),
        ("records", html.escape(str(results))),
    ]
    return '<dl class="protocol">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _skipped(rows: list[dict]) -> str:
    """Each reason once, with the metrics and rows it applies to: why a column is empty, and the fix."""
    by_reason = skipped_by_reason(rows)
    if not by_reason:
        return ""
    items = []
    for reason, (metrics, runs) in sorted(by_reason.items(), key=lambda kv: sorted(kv[1][0])):
        which = "every row" if len(runs) == len(rows) else ", ".join(sorted(runs))
        items.append(f"<li><b>{html.escape(', '.join(sorted(metrics)))}</b> ({html.escape(which)}): "
                     f"{html.escape(reason)}</li>")
    return f'<h2 id="skipped">Metrics not computed</h2><ul class="skipped">{"".join(items)}</ul>'


def _table(rows: list[dict], metric: str, ranks: list[str], out: Path) -> str:
    primary = column(metric)
    used = [c for c in used_columns(rows) if c.header not in ("run", "family", metric)]
    ordered: list[tuple[Column, bool]] = [(column("run"), True), (column("family"), True), (primary, True)]
    ordered += [(c, c.header in MAIN_COLUMNS) for c in used]
    flags = _flags(rows)
    head = ['<th data-col="0">rank</th>']
    for i, (c, main) in enumerate(ordered, 1):
        better = "" if c.lower_is_better is None else f' title="{direction(c.header)}"'
        cls = "primary" if c is primary else ("" if main else "secondary")
        head.append(f'<th data-col="{i}" class="{cls}"{better}>{html.escape(c.label)}</th>')
    head.append("<th>samples</th><th>links</th>")
    body = []
    for index, (rank, r) in enumerate(zip(ranks, rows)):
        flag = ""
        if index in flags:
            flag = f' <span class="flag" title="{html.escape("; ".join(flags[index]))}">⚠</span>'
        cells = [f'<td data-v="{"" if rank == "ref" else rank}">{rank}{flag}</td>']
        for c, main in ordered:
            v = c.value(r)
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            cls = " ".join(x for x in ("num" if numeric else "", "primary" if c is primary else "",
                                      "" if main else "secondary") if x)
            text = _breakable(format_cell(r, c)) if c.header == "run" else html.escape(format_cell(r, c))
            cells.append(f'<td class="{cls}" data-v="{html.escape("" if v is None else str(v))}">{text}</td>')
        cells.append(f'<td><a href="#grid-{index}">grid</a></td>' if r.get("sample_grid") else "<td></td>")
        run_link = (f' <a href="{html.escape(os.path.relpath(r["run_dir"], out))}">run</a>' if r.get("run_dir") else "")
        cells.append(f'<td><a href="{html.escape(os.path.relpath(r["_file"], out))}">record</a>{run_link}</td>')
        body.append(f'<tr class="{"ref" if is_reference_row(r) else "model"}">{"".join(cells)}</tr>')
    return (f'<table id="board"><thead><tr>{"".join(head)}</tr></thead><tbody>\n' + "\n".join(body)
            + "\n</tbody></table>")


def _grids(rows: list[dict], metric: str) -> str:
    figures = []
    for index, r in enumerate(rows):
        uri = _data_uri(Path(r["_file"]).parent / r["sample_grid"]) if r.get("sample_grid") else None
        if uri is None:
            continue
        value = format_cell(r, column(metric))
        alt = f"samples of {html.escape(r['run_id'])}"
        figures.append(f'<figure id="grid-{index}"><img class="grid" src="{uri}" alt="{alt}">'
                       f'<figcaption>{_breakable(r["run_id"])}<br>{html.escape(metric)} {html.escape(value)}'
                       f'</figcaption></figure>')
    if not figures:
        return ""
    return ('<h2>Samples</h2><p>The first 64 scored images of each row (click one to enlarge). The reference rows '
            f'show real held-out images and noise.</p><div class="grids">{"".join(figures)}</div>')


def _closest_pairs(rows: list[dict]) -> str:
    """The memorisation audit's evidence: per row, its generated images closest to a training image, each beside
    that training image, so a reader judges "copy or not" with their own eyes."""
    figures = []
    for index, r in enumerate(rows):
        uri = _data_uri(Path(r["_file"]).parent / r["closest_pairs_grid"]) if r.get("closest_pairs_grid") else None
        if uri is None:
            continue
        m = r["metrics"].get(KEY_MEMORIZATION, {})
        caption = (f"copy rate {format_cell(r, column(KEY_MEMORIZATION))}, "
                   f"AuthPct {format_cell(r, column('authpct'))}, "
                   f"C_T {format_cell(r, column('ct_score')) or '–'} ({m.get('space', '')})")
        figures.append(f'<figure id="closest-{index}"><img class="grid pairs" src="{uri}" '
                       f'alt="closest pairs of {html.escape(r["run_id"])}"><figcaption>{_breakable(r["run_id"])}<br>'
                       f'{html.escape(caption)}</figcaption></figure>')
    if not figures:
        return ""
    return ('<h2>Memorisation: closest pairs</h2><p>Per row, the generated images nearest to a training image '
            '(left), each beside that training image (right), closest first. <b>memorization</b> is the fraction of '
            'generated images that are near-copies: the nearest training image much closer than the other near ones '
            '(Carlini et al.\'s normalised distance under the threshold in the protocol, in pixels with a one-pixel '
            'shift tolerance); the held-out row shows what fresh data scores. AuthPct: % of generated images farther '
            'from their nearest training image than that image is from its own nearest neighbour. '
            'C_T: below about -3, closer to the training set than fresh data (copying); above +3, farther '
            f'(underfitting).</p><div class="grids">{"".join(figures)}</div>')


PAD_L, PAD_B, PAD_T, PAD_R = 64, 42, 24, 24  # plot margins: y labels left, x labels below


def _frame(width: int, height: int, x_range: tuple[float, float], y_ticks: list[float],
           refs: list[tuple[float, str]], sx: Callable[[float], float], sy: Callable[[float], float]) -> list[str]:
    """The opening of a plot's SVG: the axes, a label per decade of the log x axis, the y tick labels, and the
    reference rows as labelled dashed lines."""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<line x1="{PAD_L}" y1="{height - PAD_B}" x2="{width - PAD_R}" y2="{height - PAD_B}" stroke="#000"/>',
             f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{height - PAD_B}" stroke="#000"/>']
    for decade in range(math.ceil(x_range[0]), math.floor(x_range[1]) + 1):
        parts.append(f'<text x="{sx(decade):.1f}" y="{height - PAD_B + 14}" text-anchor="middle">1e{decade}</text>')
    for v in y_ticks:
        parts.append(f'<text x="{PAD_L - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for y, name in refs:
        parts.append(f'<line x1="{PAD_L}" x2="{width - PAD_R}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#999" '
                     f'stroke-dasharray="4 3"/><text x="{width - PAD_R}" y="{sy(y) - 3:.1f}" text-anchor="end" '
                     f'fill="#777">{html.escape(name)}</text>')
    return parts


def _scatter(rows: list[dict], metric: str, x_of: Callable[[dict], Any], x_label: str, width: int = 560,
             height: int = 340) -> str:
    """SVG scatter of ``metric`` against a positive x on a log axis; reference rows as dashed lines. The y axis
    turns logarithmic when the values span more than 20x (the noise ceiling would flatten every model), and the
    points carry numbers with a legend below, so long run names never overlap."""
    value = column(metric).value
    points = [(x_of(r), value(r), r["run_id"]) for r in rows if not is_reference_row(r)]
    points = [(x, y, n) for x, y, n in points if isinstance(x, (int, float)) and x > 0 and y is not None]
    refs = [(value(r), r["run_id"]) for r in rows if is_reference_row(r) and value(r) is not None]
    title = f"{metric} vs {x_label}"
    if not points:
        return f"<figure><figcaption>{html.escape(title)}: no rows with both values</figcaption></figure>"
    pad_l, pad_b, pad_t, pad_r = PAD_L, PAD_B, PAD_T, PAD_R
    ys = [y for _, y, _ in points] + [y for y, _ in refs]
    log_y = min(ys) > 0 and max(ys) / min(ys) > 20
    ty: Callable[[float], float] = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    y0, y1 = (ty(min(ys)) - 0.1, ty(max(ys)) + 0.1) if log_y else (min(0.0, min(ys)), max(ys) * 1.08 or 1.0)
    xs = [math.log10(x) for x, _, _ in points]
    x0, x1 = min(xs) - 0.3, max(xs) + 0.3

    def sx(v: float) -> float:
        return pad_l + (v - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(v: float) -> float:
        return height - pad_b - (ty(v) - y0) / (y1 - y0) * (height - pad_b - pad_t)

    ticks = [10 ** e for e in range(math.ceil(y0), math.floor(y1) + 1)] if log_y else \
        [y0 + (y1 - y0) * i / 4 for i in range(5)]
    parts = _frame(width, height, (x0, x1), ticks, refs, sx, sy)
    legend = []
    for number, ((_, y, name), lx) in enumerate(zip(points, xs), 1):
        parts.append(f'<circle cx="{sx(lx):.1f}" cy="{sy(y):.1f}" r="4" fill="#1f77b4"><title>{html.escape(name)}: '
                     f'{y:.4g}</title></circle>'
                     # numbers alternate above and below their point: neighbours at one x stay apart
                     f'<text x="{sx(lx) + 6:.1f}" y="{sy(y) + (-5 if number % 2 else 13):.1f}" '
                     f'fill="#1f77b4">{number}</text>')
        legend.append(f"{number} {html.escape(name)} ({y:.4g})")
    scale = " (log scale)" if log_y else ""
    parts.append(f'<text x="{(width + pad_l) / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)} '
                 f'(log scale)</text><text x="8" y="{pad_t - 8}">{html.escape(metric)}{scale}</text></svg>')
    return (f"<figure>{''.join(parts)}<figcaption>{html.escape(title)}<br><small>{'; '.join(legend)}</small>"
            "</figcaption></figure>")


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _budget_lines(rows: list[dict], metric: str, unit: str, x_label: str, width: int = 560, height: int = 340) -> str:
    """SVG line plot of ``metric`` against the budget spent (log x), one line per run through its budget points;
    the reference rows as dashed lines."""
    value = column(metric).value
    runs: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        x = ((r.get("budget") or {}).get("spent") or {}).get(unit)
        y = value(r)
        if not is_reference_row(r) and budget_point(r) is not None and x and x > 0 and y is not None:
            runs.setdefault(str(r["run_id"]), []).append((math.log10(x), y))
    refs = [(value(r), r["run_id"]) for r in rows if is_reference_row(r) and value(r) is not None]
    title = f"{metric} vs {x_label}"
    if not runs:
        return f"<figure><figcaption>{html.escape(title)}: no run evaluated along its budget</figcaption></figure>"
    pad_l, pad_b, pad_t, pad_r = PAD_L, PAD_B, PAD_T, PAD_R
    xs = [x for pts in runs.values() for x, _ in pts]
    ys = [y for pts in runs.values() for _, y in pts] + [y for y, _ in refs]
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.08 or 1.0

    def sx(v: float) -> float:
        return pad_l + (v - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(v: float) -> float:
        return height - pad_b - (v - y0) / (y1 - y0) * (height - pad_b - pad_t)

    parts = _frame(width, height, (x0, x1), [y0 + (y1 - y0) * i / 4 for i in range(5)], refs, sx, sy)
    legend = []
    for i, (name, pts) in enumerate(sorted(runs.items())):
        colour = _COLOURS[i % len(_COLOURS)]
        pts.sort()
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="budget-line" points="{path}" fill="none" stroke="{colour}" stroke-width="2">'
                     f'<title>{html.escape(name)}</title></polyline>')
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        legend.append(f'<span style="color:{colour}">&#9632;</span> {html.escape(name)}')
    parts.append(f'<text x="{(width + pad_l) / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)} '
                 f'(log scale)</text><text x="8" y="{pad_t - 8}">{html.escape(metric)}</text></svg>')
    return (f"<figure>{''.join(parts)}<figcaption>{html.escape(title)}<br><small>{' '.join(legend)}</small>"
            "</figcaption></figure>")


def _budget_section(tables: list, rows: list[dict], metric: str) -> str:
    if not tables:
        return ""
    c = column(metric)
    blocks = []
    for point, at in tables:
        body = "".join(f"<tr><td>{rank}</td><td>{_breakable(r['run_id'])}</td><td>{html.escape(str(r.get('family')))}"
                       f"</td><td class=\"num\">{html.escape(format_cell(r, c))}</td></tr>"
                       for rank, r in zip(table_ranks(at), at))
        blocks.append(f'<table class="budget"><caption>{html.escape(budget_label(point))}</caption><thead><tr>'
                      f'<th>rank</th><th>run</th><th>family</th><th>{html.escape(c.label)}</th></tr></thead>'
                      f"<tbody>{body}</tbody></table>")
    plots = (_budget_lines(rows, metric, "flops", "training FLOPs")
             + _budget_lines(rows, metric, "device_hours", "device-hours"))
    return (f"<h2>At equal training budgets</h2><p>Each run scored at every budget point <code>run.evaluate_every"
            f"</code> kept, ranked by <b>{html.escape(metric)}</b> at that point; the table above shows the largest "
            f"point every run reached.</p><div class=\"budget-tables\">{''.join(blocks)}</div>"
            f"<div class=\"plots\">{plots}</div>")


def render_html(rows: list[dict], metric: str, ranks: list[str], results: str | Path, out: Path,
                tables: Optional[list] = None, every: Optional[list[dict]] = None) -> str:
    plots = (_scatter(rows, metric, lambda r: r.get("cost", {}).get("images_seen"), "training images seen")
             + _scatter(rows, metric, lambda r: r.get("cost", {}).get("sampling_images_per_s"), "sampling images/s"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>genbench leaderboard</title><style>{_STYLE}</style></head>
<body><h1>genbench leaderboard</h1>
{_protocol(rows, results)}
<p>Ranked by <b>{html.escape(metric)}</b> ({direction(metric)}). ↓/↑ after a header: lower/higher is better; click
a header to sort by it. One row per run and protocol. Grey rows frame the table: the held-out validation split
scored as if generated (the best a model can do at that sample count) and uniform noise. <code>a ± b</code>: mean
and standard deviation over repeated sample sets. ⚠: a row scored on another sample count or trained on another
budget than most (hover for which). {html.escape(sample_count_note(rows, metric))}</p>
<button id="all-columns">all columns</button>
{_table(rows, metric, ranks, out)}
{_skipped(rows)}
{_budget_section(tables or [], every or rows, metric)}
{_grids(rows, metric)}
{_closest_pairs(rows)}
<h2>Plots</h2><div class="plots">{plots}</div>
<script>{_SCRIPT}</script></body></html>
"""
