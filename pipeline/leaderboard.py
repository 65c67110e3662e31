"""Result records -> leaderboard tables. A pure function of the records; records are never edited."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

from pipeline.io import atomic_write_text
from pipeline.metrics import KEY_AUDIT, KEY_FD_AUDITOR, KEY_FID

COLUMNS = [
    # (header, how to read it from a record, format)
    ("run", lambda r: r["run_id"], "{}"),
    ("family", lambda r: r["family"], "{}"),
    ("fid", lambda r: r["metrics"].get(KEY_FID), "{:.3f}"),
    ("fd_auditor", lambda r: r["metrics"].get(KEY_FD_AUDITOR), "{:.4f}"),
    ("kl_to_reference", lambda r: r["metrics"].get(KEY_AUDIT, {}).get("kl_to_reference"), "{:.4f}"),
    ("tv_to_reference", lambda r: r["metrics"].get(KEY_AUDIT, {}).get("tv_to_reference"), "{:.4f}"),
    ("coverage", lambda r: r["metrics"].get(KEY_AUDIT, {}).get("coverage"), "{:.2f}"),
    ("bits_per_dim", lambda r: r["cost"].get("bits_per_dim"), "{:.3f}"),
    ("parameters", lambda r: r["cost"].get("parameters"), "{:,}"),
    ("nfe", lambda r: r["cost"].get("nfe"), "{}"),
    ("sampling_img_per_s", lambda r: r["cost"].get("sampling_images_per_s"), "{:.1f}"),
    ("device_hours", lambda r: r["cost"].get("device_hours"), "{:.4f}"),
    ("images_seen", lambda r: r["cost"].get("images_seen"), "{:,}"),
    ("num_samples", lambda r: r["protocol"]["num_samples"], "{:,}"),
    ("record", lambda r: r["_file"], "{}"),
]


def load_records(results: str | Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(Path(results).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"result record {path} is not valid JSON ({e}); records are written atomically, so "
                             "this file was changed by something else: restore or remove it") from e
        if "record_version" not in record:
            continue  # not a genbench record
        record["_file"] = path.name
        records.append(record)
    return records


def latest_per_protocol(records: list[dict]) -> list[dict]:
    """One row per (run, protocol): the newest evaluation."""
    latest: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r["created"]):
        latest[(r["run_id"], r["protocol"]["protocol_id"])] = r
    return list(latest.values())


def primary_metric(rows: list[dict]) -> str:
    """FID when every row has it, else fd_auditor (always computable offline on labelled data)."""
    return KEY_FID if rows and all(KEY_FID in r["metrics"] for r in rows) else KEY_FD_AUDITOR


def _cell(row: dict, getter, fmt: str) -> str:
    try:
        value = getter(row)
    except (KeyError, TypeError):
        value = None
    return "" if value is None else fmt.format(value)


def build(results: str | Path, out: str | Path) -> Optional[Path]:
    """Write leaderboard.md and leaderboard.csv into ``out``; returns the markdown path (None if no records)."""
    rows = latest_per_protocol(load_records(results))
    if not rows:
        return None
    metric = primary_metric(rows)
    rows.sort(key=lambda r: (r["metrics"].get(metric) is None, r["metrics"].get(metric, 0.0)))
    headers = ["rank"] + [c[0] for c in COLUMNS]
    table = [[str(i + 1)] + [_cell(r, g, f) for _, g, f in COLUMNS] for i, r in enumerate(rows)]
    out = Path(out)
    buf = io.StringIO()
    csv.writer(buf).writerows([headers] + table)
    atomic_write_text(out / "leaderboard.csv", buf.getvalue())
    skipped = sorted({f"- `{k}` skipped for {r['run_id']}: {v}" for r in rows for k, v in r.get("skipped", {}).items()})
    md = ["# genbench leaderboard\n", f"Sorted by `{metric}` (lower is better). One row per run and protocol; "
          f"each row links to its immutable result record in `{results}`.\n",
          "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(cells) + " |" for cells in table]
    if skipped:
        md += ["", "## Skipped metrics", ""] + skipped
    return atomic_write_text(out / "leaderboard.md", "\n".join(md) + "\n")
