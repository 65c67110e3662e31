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


def render_markdown(rows: list[dict], metric: str, results: str | Path, out: Path) -> str:
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
    skipped = sorted({f"- `{k}` skipped for {r['run_id']}: {v}" for r in rows for k, v in r.get("skipped", {}).items()})
    if skipped:
        lines += ["", "## Skipped metrics", ""] + skipped
    return "\n".join(lines) + "\n"
