"""Result records -> leaderboard tables (md, csv, html). A pure function of the records; records are never edited."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.io import atomic_write_text
from pipeline.metrics import (KEY_AUDIT, KEY_FD_AUDITOR, KEY_FID, KEY_IS_MEAN, KEY_KID_MEAN, KEY_PRECISION,
                              KEY_RECALL)


@dataclass(frozen=True)
class Column:
    header: str
    path: tuple[str, ...]  # where the value lives in a record
    fmt: str = "{}"
    has_std: bool = False  # metrics: with --repeats, metrics_std holds the spread at the same path
    lower_is_better: Optional[bool] = None

    def value(self, record: dict, root: str | None = None) -> Any:
        node: Any = record if root is None else record.get(root)
        for key in self.path if root is None else self.path[1:]:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node


COLUMNS = [
    Column("run", ("run_id",)),
    Column("family", ("family",)),
    Column(KEY_FID, ("metrics", KEY_FID), "{:.3f}", True, True),
    Column("is", ("metrics", KEY_IS_MEAN), "{:.3f}", True, False),
    Column("kid", ("metrics", KEY_KID_MEAN), "{:.5f}", True, True),
    Column(KEY_PRECISION, ("metrics", KEY_PRECISION), "{:.3f}", True, False),
    Column(KEY_RECALL, ("metrics", KEY_RECALL), "{:.3f}", True, False),
    Column(KEY_FD_AUDITOR, ("metrics", KEY_FD_AUDITOR), "{:.4f}", True, True),
    Column("kl_to_reference", ("metrics", KEY_AUDIT, "kl_to_reference"), "{:.4f}", True, True),
    Column("tv_to_reference", ("metrics", KEY_AUDIT, "tv_to_reference"), "{:.4f}", True, True),
    Column("fairness_discrepancy", ("metrics", KEY_AUDIT, "fairness_discrepancy"), "{:.4f}", True, True),
    Column("coverage", ("metrics", KEY_AUDIT, "coverage"), "{:.2f}", True, False),
    Column("conditional_accuracy", ("metrics", KEY_AUDIT, "conditional_accuracy"), "{:.3f}", True, False),
    Column("class_fd_worst_to_best", ("metrics", KEY_AUDIT, "per_class_fd", "worst_to_best"), "{:.2f}", True, True),
    Column("bits_per_dim", ("cost", "bits_per_dim"), "{:.3f}"),
    Column("parameters", ("cost", "parameters"), "{:,}"),
    Column("nfe", ("cost", "nfe"), "{}"),
    Column("sampling_img_per_s", ("cost", "sampling_images_per_s"), "{:.1f}"),
    Column("device_hours", ("cost", "device_hours"), "{:.4f}"),
    Column("images_seen", ("cost", "images_seen"), "{:,}"),
    Column("num_samples", ("protocol", "num_samples"), "{:,}"),
    Column("repeats", ("protocol", "repeats"), "{}"),
]
METRIC_COLUMNS = [c for c in COLUMNS if c.has_std]


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
        record["_file"] = str(path)
        records.append(record)
    return records


def latest_per_protocol(records: list[dict]) -> list[dict]:
    """One row per (run, protocol): the newest evaluation."""
    latest: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r["created"]):
        latest[(r["run_id"], r["protocol"]["protocol_id"])] = r
    return list(latest.values())


def is_reference_row(record: dict) -> bool:
    return bool(record.get("reference_row"))


def primary_metric(rows: list[dict]) -> str:
    """FID when every model row has it, else fd_auditor (always computable offline on labelled data)."""
    models = [r for r in rows if not is_reference_row(r)] or rows
    return KEY_FID if models and all(KEY_FID in r["metrics"] for r in models) else KEY_FD_AUDITOR


def format_cell(record: dict, column: Column, with_std: bool = True) -> str:
    value = column.value(record)
    if value is None:
        return ""
    text = column.fmt.format(value)
    std = column.value(record, "metrics_std") if column.has_std and with_std else None
    return f"{text} ± {column.fmt.format(std)}" if isinstance(std, (int, float)) else text


def ranked_rows(results: str | Path) -> tuple[list[dict], str]:
    rows = latest_per_protocol(load_records(results))
    metric = primary_metric(rows)
    rows.sort(key=lambda r: (r["metrics"].get(metric) is None, r["metrics"].get(metric, 0.0)))
    return rows, metric


def _ranks(rows: list[dict]) -> list[str]:
    out, n = [], 0
    for r in rows:
        if is_reference_row(r):
            out.append("ref")
        else:
            n += 1
            out.append(str(n))
    return out


def _csv(rows: list[dict], out: Path) -> str:
    """Raw values (full precision, no thousands separators), std in ``<metric>_std`` columns."""
    headers = ["rank"] + [c.header for c in COLUMNS] + [f"{c.header}_std" for c in METRIC_COLUMNS] + ["record"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(headers)
    for rank, r in zip(_ranks(rows), rows):
        values = [c.value(r) for c in COLUMNS] + [c.value(r, "metrics_std") for c in METRIC_COLUMNS]
        writer.writerow([rank] + ["" if v is None else v for v in values] + [_rel(r["_file"], out)])
    return buf.getvalue()


def _rel(path: Optional[str], out: Path) -> str:
    return "" if not path else os.path.relpath(path, out)


def _markdown(rows: list[dict], metric: str, results: str | Path, out: Path) -> str:
    used = [c for c in COLUMNS if any(c.value(r) is not None for r in rows)]
    headers = ["rank"] + [c.header for c in used] + ["links"]
    lines = ["# genbench leaderboard\n",
             f"Sorted by `{metric}` (lower is better). One row per run and protocol; each links to its immutable "
             f"result record in `{results}` and its run directory. `ref` rows frame the table: the held-out "
             "validation split scored as if generated (the best a model can do at that sample count) and uniform "
             "noise. `a ± b`: mean and standard deviation over `--repeats` sample sets.\n",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for rank, r in zip(_ranks(rows), rows):
        links = f"[record]({_rel(r['_file'], out)})"
        if r.get("run_dir"):
            links += f" [run]({_rel(r['run_dir'], out)})"
        lines.append("| " + " | ".join([rank] + [format_cell(r, c) for c in used] + [links]) + " |")
    skipped = sorted({f"- `{k}` skipped for {r['run_id']}: {v}" for r in rows for k, v in r.get("skipped", {}).items()})
    if skipped:
        lines += ["", "## Skipped metrics", ""] + skipped
    return "\n".join(lines) + "\n"


def build(results: str | Path, out: str | Path, wandb: str = "auto") -> Optional[Path]:
    """Write leaderboard.md, .csv and .html into ``out``; returns the markdown path (None if no records)."""
    from pipeline.leaderboard_html import render_html

    rows, metric = ranked_rows(results)
    if not rows:
        return None
    out = Path(out)
    atomic_write_text(out / "leaderboard.csv", _csv(rows, out))
    atomic_write_text(out / "leaderboard.html", render_html(rows, metric, _ranks(rows), results, out))
    path = atomic_write_text(out / "leaderboard.md", _markdown(rows, metric, results, out))
    log_to_wandb(rows, out, wandb)
    return path


def log_to_wandb(rows: list[dict], out: Path, mode: str = "auto",
                 project: str = "genbench") -> Optional[str]:
    """Log the table as a W&B Table (``auto``: only when W&B is logged in); returns the run's directory."""
    from pipeline.train import wandb_mode

    mode = {"auto": "online" if wandb_mode() == "online" else "off"}.get(mode, mode)
    if mode == "off":
        return None
    import wandb

    run = wandb.init(project=project, job_type="leaderboard", name=f"leaderboard-{out.name}", dir=str(out),
                     mode=mode, reinit="create_new")
    columns: list[tuple[str, Callable[[dict], Any]]] = [(c.header, c.value) for c in COLUMNS]
    table = wandb.Table(columns=["rank"] + [h for h, _ in columns] + ["record"],
                        data=[[rank] + [get(r) for _, get in columns] + [os.path.basename(r["_file"])]
                              for rank, r in zip(_ranks(rows), rows)])
    run.log({"leaderboard": table})
    directory = run.dir
    run.finish()
    return directory
