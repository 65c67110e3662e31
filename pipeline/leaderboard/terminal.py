"""The leaderboard in a terminal: the few lines a researcher reads at the end of ``genbench run``, and the
scores of one record after ``genbench benchmark``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.leaderboard.table import (
    COLUMNS,
    column,
    direction,
    format_cell,
    is_reference_row,
    ranked_rows,
    ranks,
    skipped_by_reason,
)

# what one record's summary shows, when the record has it
SUMMARY_COLUMNS = ("fid", "is", "kid", "precision", "recall", "fd_dinov2", "fd_auditor", "kl_to_reference",
                   "coverage", "conditional_accuracy", "memorization", "ct_score", "clip_score", "gender_imbalance",
                   "skin_tone_imbalance", "refused")


def record_summary(record: dict) -> str:
    """``<run>: fid ↓ 12.345 | is ↑ 2.101 | ... (N=1,000)``, then a line per reason metrics were skipped for."""
    cells = [f"{c.label.strip()} {format_cell(record, c)}" for c in COLUMNS
             if c.header in SUMMARY_COLUMNS and c.value(record) is not None]
    n = record.get("protocol", {}).get("num_samples")
    lines = [f"{record['run_id']}: {' | '.join(cells) or 'no metric computed'}" + (f" (N={n:,})" if n else "")]
    lines += [f"  skipped {', '.join(metrics)}: {reason}"
              for reason, (metrics, _) in skipped_by_reason([record]).items()]
    return "\n".join(lines)


def ranked_summary(results: str | Path, out: str | Path, top: int = 10, sort: Optional[str] = None) -> str:
    """The ranked table in a few lines: rank, run, family, the primary metric, N; the best model named; the
    paths of the markdown and HTML reports."""
    rows, metric = ranked_rows(results, sort)
    if not rows:
        return f"no result records in {results}"
    primary = column(metric)
    shown = list(zip(ranks(rows), rows))[:top]
    width = max(len(str(r["run_id"])) for _, r in shown)
    lines = [f"{'rank':>4}  {'run':<{width}}  {'family':<9}  {primary.label:>12}  {'N':>7}"]
    for rank, r in shown:
        n = r.get("protocol", {}).get("num_samples")
        lines.append(f"{rank:>4}  {r['run_id']:<{width}}  {r.get('family', ''):<9}  "
                     f"{format_cell(r, primary):>12}  {'' if n is None else f'{n:,}':>7}")
    if len(rows) > top:
        lines.append(f"      ... {len(rows) - top} more rows in the reports")
    models = [r for r in rows if not is_reference_row(r) and primary.value(r) is not None]
    if models:
        lines.append(f"best: {models[0]['run_id']} ({models[0].get('family')}), {metric} "
                     f"{format_cell(models[0], primary)} ({direction(metric)})")
    out = Path(out)
    lines.append(f"leaderboard: {out / 'leaderboard.md'}  (sortable, with samples and plots: "
                 f"{out / 'leaderboard.html'})")
    return "\n".join(lines)
