"""The leaderboard as markdown (for reading) and CSV (raw values, for analysis)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional

from pipeline.leaderboard.table import (
    COLUMNS,
    METRIC_COLUMNS,
    column,
    direction,
    format_cell,
    ranks,
    sample_count_note,
    used_columns,
)


def relative(path: Optional[str], out: Path) -> str:
    return "" if not path else os.path.relpath(path, out)


def render_csv(rows: list[dict], out: Path) -> str:
    """Raw values (full precision, no thousands separators), std in ``<metric>_std`` columns."""
    headers = ["rank"] + [c.header for c in COLUMNS] + [f"{c.header}_std" for c in METRIC_COLUMNS] + ["record"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(headers)
    for rank, r in zip(ranks(rows), rows):
        values = [c.value(r) for c in COLUMNS] + [c.value(r, "metrics_std") for c in METRIC_COLUMNS]
        writer.writerow([rank] + ["" if v is None else v for v in values] + [relative(r["_file"], out)])
    return buf.getvalue()


def budget_label(point: tuple[str, float]) -> str:
    unit, amount = point
    return f"{amount:,.0f} images" if unit == "images" else f"{amount:.3g} training FLOPs" if unit == "flops" \
        else f"{amount:.3g} device-hours"


def render_budget_tables(tables: list, metric: str) -> list[str]:
    """One small table per budget point: each run's rank at that equal budget, and what it had spent."""
    if not tables:
        return []
    c = column(metric)
    lines = ["", "## At equal training budgets", "",
             f"Each run scored at every budget point `run.evaluate_every` kept, ranked by `{metric}` at that point. "
             "Runs trained without a budget are not in these tables.", ""]
    for point, rows in tables:
        lines += [f"### {budget_label(point)}", "", f"| rank | run | family | {c.label} | images | training FLOPs | "
                  "device-hours |", "|---|---|---|---|---|---|---|"]
        for rank, r in zip(ranks(rows), rows):
            spent = (r.get("budget") or {}).get("spent") or {}
            cells = [rank, str(r["run_id"]), str(r.get("family", "")), format_cell(r, c),
                     "" if spent.get("images") is None else f"{spent['images']:,.0f}",
                     "" if spent.get("flops") is None else f"{spent['flops']:.3g}",
                     "" if spent.get("device_hours") is None else f"{spent['device_hours']:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render_markdown(rows: list[dict], metric: str, results: str | Path, out: Path,
                    tables: Optional[list] = None) -> str:
    used = used_columns(rows)
    headers = ["rank"] + [c.label for c in used] + ["links"]
    lines = ["# genbench leaderboard\n",
             f"Sorted by `{metric}` ({direction(metric)}; ↓/↑ after a header: lower/higher is better). One row per "
             f"run and protocol; each links to its immutable result record in `{results}` and its run directory. "
             "`ref` rows frame the table: the held-out validation split scored as if generated (the best a model "
             "can do at that sample count) and uniform noise. `a ± b`: mean and standard deviation over "
             f"`--repeats` sample sets. {sample_count_note(rows, metric)}\n",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for rank, r in zip(ranks(rows), rows):
        links = f"[record]({relative(r['_file'], out)})"
        if r.get("run_dir"):
            links += f" [run]({relative(r['run_dir'], out)})"
        lines.append("| " + " | ".join([rank] + [format_cell(r, c) for c in used] + [links]) + " |")
    lines += render_budget_tables(tables or [], metric)
    skipped = sorted({f"- `{k}` skipped for {r['run_id']}: {v}" for r in rows for k, v in r.get("skipped", {}).items()})
    if skipped:
        lines += ["", "## Skipped metrics", ""] + skipped
    return "\n".join(lines) + "\n"
