"""The leaderboard as one self-contained HTML file: a sortable table, each row's sample grid, and plots
of the primary metric against training images seen and against sampling speed.

Everything is inline (grids as data: URIs, plots as SVG, a few lines of script to sort), so the file
can be mailed or attached to a paper's supplement and still show everything.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Optional

from pipeline.leaderboard.table import direction, format_cell, is_reference_row, used_columns

_SORT_SCRIPT = """
document.querySelectorAll('th[data-col]').forEach(th => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0], col = +th.dataset.col;
  const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
  const key = tr => { const v = tr.cells[col].dataset.v; return v === '' ? null : (isNaN(v) ? v : +v); };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    if (x === null) return 1; if (y === null) return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(tr => body.appendChild(tr));
}));
"""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 13px; } th, td { padding: 3px 7px; border-bottom: 1px solid #ddd; }
th[data-col] { cursor: pointer; background: #f3f3f3; } tr.ref { color: #777; font-style: italic; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } img.grid { height: 64px; image-rendering: pixelated; }
.plots { display: flex; gap: 2em; flex-wrap: wrap; margin: 2em 0; }
"""


def _data_uri(path: Path) -> Optional[str]:
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    except OSError:
        return None


def _scatter(rows: list[dict], metric: str, x_of, x_label: str, width: int = 460, height: int = 300) -> str:
    """SVG scatter of ``metric`` against a positive x on a log axis; reference rows as dashed lines."""
    points = [(x_of(r), r["metrics"].get(metric), r["run_id"]) for r in rows if not is_reference_row(r)]
    points = [(x, y, n) for x, y, n in points if isinstance(x, (int, float)) and x > 0 and y is not None]
    refs = [(r["metrics"].get(metric), r["run_id"]) for r in rows if is_reference_row(r) and metric in r["metrics"]]
    title = f"{metric} vs {x_label}"
    if not points:
        return f"<figure><figcaption>{html.escape(title)}: no rows with both values</figcaption></figure>"
    pad_l, pad_b, pad_t, pad_r = 60, 40, 20, 20
    xs = [math.log10(x) for x, _, _ in points]
    ys = [y for _, y, _ in points] + [y for y, _ in refs]
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.08 or 1.0

    def sx(v: float) -> float:
        return pad_l + (v - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(v: float) -> float:
        return height - pad_b - (v - y0) / (y1 - y0) * (height - pad_b - pad_t)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#000"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#000"/>']
    for decade in range(math.ceil(x0), math.floor(x1) + 1):
        parts.append(f'<text x="{sx(decade):.1f}" y="{height - pad_b + 14}" text-anchor="middle">1e{decade}</text>')
    for i in range(5):
        v = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{pad_l - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for y, name in refs:
        parts.append(f'<line x1="{pad_l}" x2="{width - pad_r}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#999" '
                     f'stroke-dasharray="4 3"/><text x="{width - pad_r}" y="{sy(y) - 3:.1f}" text-anchor="end" '
                     f'fill="#777">{html.escape(name)}</text>')
    for (_, y, name), lx in zip(points, xs):
        parts.append(f'<circle cx="{sx(lx):.1f}" cy="{sy(y):.1f}" r="4" fill="#1f77b4"><title>{html.escape(name)}: '
                     f'{y:.4g}</title></circle>'
                     f'<text x="{sx(lx) + 6:.1f}" y="{sy(y) - 6:.1f}">{html.escape(name)}</text>')
    parts.append(f'<text x="{(width + pad_l) / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)} '
                 f'(log scale)</text><text x="12" y="{pad_t - 6}">{html.escape(metric)}</text></svg>')
    return f"<figure>{''.join(parts)}<figcaption>{html.escape(title)}</figcaption></figure>"


def render_html(rows: list[dict], metric: str, ranks: list[str], results: str | Path, out: Path) -> str:
    used = used_columns(rows)
    head = "".join(f'<th data-col="{i}">{html.escape(h)}</th>'
                   for i, h in enumerate(["rank"] + [c.label for c in used] + ["samples", "links"]))
    body = []
    for rank, r in zip(ranks, rows):
        cells = [f'<td data-v="{"" if rank == "ref" else rank}">{rank}</td>']
        for c in used:
            v = c.value(r)
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="{"num" if numeric else ""}" data-v="{html.escape("" if v is None else str(v))}">'
                         f'{html.escape(format_cell(r, c))}</td>')
        grid = _data_uri(Path(r["_file"]).parent / r["sample_grid"]) if r.get("sample_grid") else None
        image = f'<img class="grid" src="{grid}" alt="samples">' if grid else ""
        cells.append(f'<td data-v="">{image}</td>')
        name = Path(r["_file"]).name
        run_link = (f' <a href="{html.escape(os.path.relpath(r["run_dir"], out))}">run</a>' if r.get("run_dir") else "")
        cells.append(f'<td data-v="{html.escape(name)}"><a href="{html.escape(os.path.relpath(r["_file"], out))}">'
                     f'record</a>{run_link}</td>')
        body.append(f'<tr class="{"ref" if is_reference_row(r) else ""}">{"".join(cells)}</tr>')
    plots = (_scatter(rows, metric, lambda r: r.get("cost", {}).get("images_seen"), "training images seen")
             + _scatter(rows, metric, lambda r: r.get("cost", {}).get("sampling_images_per_s"), "sampling images/s"))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>genbench leaderboard</title><style>{_STYLE}</style></head>
<body><h1>genbench leaderboard</h1>
<p>Sorted by <code>{html.escape(metric)}</code> ({direction(metric)}; ↓/↑ after a header: lower/higher is
better); click a header to sort by it. One row per run and
protocol, from the records in <code>{html.escape(str(results))}</code>. Grey rows are the reference frame: the held-out
validation split scored as if generated, and uniform noise. <code>a ± b</code>: mean and standard deviation over
repeated sample sets.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<div class="plots">{plots}</div>
<script>{_SORT_SCRIPT}</script></body></html>
"""
