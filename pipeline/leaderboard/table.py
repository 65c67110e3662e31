"""The leaderboard table: which records become rows, in which order, with which columns.

A pure function of the result records; records are never edited. The renderers (``text`` for markdown
and CSV, ``html``) only format what this module selects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.metrics import (
    KEY_AUDIT,
    KEY_CLIP_SCORE,
    KEY_FD_AUDITOR,
    KEY_FD_AUDITOR_INF,
    KEY_FD_DINOV2,
    KEY_FD_DINOV2_INF,
    KEY_FID,
    KEY_FID_INF,
    KEY_GENDER_IMBALANCE,
    KEY_IS_MEAN,
    KEY_KID_MEAN,
    KEY_MEMORIZATION,
    KEY_PRECISION,
    KEY_RECALL,
    KEY_SKIN_TONE_IMBALANCE,
)


@dataclass(frozen=True)
class Column:
    header: str
    path: tuple[str, ...]  # where the value lives in a record
    fmt: str = "{}"
    has_std: bool = False  # metrics: with --repeats, metrics_std holds the spread at the same path
    lower_is_better: Optional[bool] = None  # None: not a quality metric (names, costs)
    # a metric whose expectation does not depend on the sample count N (unbiased estimators, means): rows of
    # different N may be ranked on it; a Fréchet distance, IS or a histogram distance may not
    n_fair: bool = False

    @property
    def arrow(self) -> str:
        """The header's direction mark: which way is better."""
        return "" if self.lower_is_better is None else " ↓" if self.lower_is_better else " ↑"

    @property
    def label(self) -> str:
        return self.header + self.arrow

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
    Column(KEY_FID_INF, ("metrics", KEY_FID_INF), "{:.3f}", True, True, n_fair=True),
    Column("is", ("metrics", KEY_IS_MEAN), "{:.3f}", True, False),
    Column("kid", ("metrics", KEY_KID_MEAN), "{:.5f}", True, True, n_fair=True),
    Column(KEY_PRECISION, ("metrics", KEY_PRECISION), "{:.3f}", True, False),
    Column(KEY_RECALL, ("metrics", KEY_RECALL), "{:.3f}", True, False),
    Column(KEY_FD_DINOV2, ("metrics", KEY_FD_DINOV2), "{:.2f}", True, True),
    Column(KEY_FD_DINOV2_INF, ("metrics", KEY_FD_DINOV2_INF), "{:.2f}", True, True, n_fair=True),
    Column(KEY_FD_AUDITOR, ("metrics", KEY_FD_AUDITOR), "{:.4f}", True, True),
    Column(KEY_FD_AUDITOR_INF, ("metrics", KEY_FD_AUDITOR_INF), "{:.4f}", True, True, n_fair=True),
    # the fraction of generated images that are near-copies of a training image (pixel space, docs/benchmark.md)
    Column(KEY_MEMORIZATION, ("metrics", KEY_MEMORIZATION, "copy_rate"), "{:.3f}", True, True, n_fair=True),
    Column("authpct", ("metrics", KEY_MEMORIZATION, "authpct"), "{:.1f}", True, False, n_fair=True),
    # C_T has no better direction: strongly negative is copying, strongly positive underfitting, 0 is fresh data
    Column("ct_score", ("metrics", KEY_MEMORIZATION, "ct_score"), "{:.2f}", True),
    Column("kl_to_reference", ("metrics", KEY_AUDIT, "kl_to_reference"), "{:.4f}", True, True),
    Column("tv_to_reference", ("metrics", KEY_AUDIT, "tv_to_reference"), "{:.4f}", True, True),
    Column("fairness_discrepancy", ("metrics", KEY_AUDIT, "fairness_discrepancy"), "{:.4f}", True, True),
    Column("coverage", ("metrics", KEY_AUDIT, "coverage"), "{:.2f}", True, False),
    Column("conditional_accuracy", ("metrics", KEY_AUDIT, "conditional_accuracy"), "{:.3f}", True, False,
           n_fair=True),
    # prompt alignment and the demographic audit of generators driven by prompts (docs/services.md)
    Column(KEY_CLIP_SCORE, ("metrics", KEY_CLIP_SCORE), "{:.4f}", True, False, n_fair=True),
    Column(KEY_GENDER_IMBALANCE, ("metrics", KEY_GENDER_IMBALANCE), "{:.3f}", True, True),
    Column(KEY_SKIN_TONE_IMBALANCE, ("metrics", KEY_SKIN_TONE_IMBALANCE), "{:.3f}", True, True),
    Column("class_fd_worst_to_best", ("metrics", KEY_AUDIT, "per_class_fd", "worst_to_best"), "{:.2f}", True, True),
    Column("bits_per_dim", ("cost", "bits_per_dim"), "{:.3f}"),
    Column("parameters", ("cost", "parameters"), "{:,}"),
    Column("nfe", ("cost", "nfe"), "{}"),
    Column("sampling_img_per_s", ("cost", "sampling_images_per_s"), "{:.1f}"),
    # a two-stage model's autoencoder run (its reconstruction row is the `ref` row of that run id)
    Column("first_stage", ("provenance", "first_stage", "run_id")),
    Column("provider", ("external", "provider")),
    Column("service", ("external", "api_base")),
    Column("refused", ("external", "refused"), "{}"),
    Column("cost_usd", ("cost", "usd"), "{:.2f}"),
    Column("device_hours", ("cost", "device_hours"), "{:.4f}"),
    Column("images_seen", ("cost", "images_seen"), "{:,}"),
    Column("training_flops", ("cost", "training_flops"), "{:.3g}"),
    Column("budget_point", ("budget", "point"), "{:.4g}"),
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


def budget_point(record: dict) -> Optional[tuple[str, float]]:
    """(unit, amount) of the training budget point a record's weights stand for; None when it has none."""
    budget = record.get("budget") or {}
    return None if budget.get("point") is None else (budget["point_unit"], float(budget["point"]))


def latest_per_protocol(records: list[dict]) -> list[dict]:
    """One row per (run, protocol, budget point): the newest evaluation."""
    latest: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r["created"]):
        latest[(r["run_id"], r["protocol"]["protocol_id"], budget_point(r))] = r
    return list(latest.values())


def common_budget_view(rows: list[dict]) -> list[dict]:
    """One row per run: a run evaluated at several budget points is shown at the largest point that every such
    run reached (in the unit most of them use), so the default ranking compares equal budgets; rows without a
    budget point stay as they are. The other points are in ``budget_tables``."""
    pointed = [r for r in rows if budget_point(r) is not None]
    if not pointed:
        return rows
    units = [budget_point(r)[0] for r in pointed]  # type: ignore[index]
    unit = max(set(units), key=units.count)
    reached: dict[str, float] = {}
    for r in pointed:
        u, point = budget_point(r)  # type: ignore[misc]
        if u == unit:
            reached[r["run_id"]] = max(reached.get(r["run_id"], 0.0), point)
    common = min(reached.values()) if reached else None
    keep = [r for r in rows if budget_point(r) is None and r["run_id"] not in reached]
    keep += [r for r in pointed if budget_point(r) == (unit, common)]
    return keep


def budget_tables(rows: list[dict], metric: str) -> list[tuple[tuple[str, float], list[dict]]]:
    """Per budget point (unit, amount), the rows evaluated there, best first on ``metric``; reference rows frame
    every table. Rows without a budget point are never mixed in."""
    references = [r for r in rows if is_reference_row(r)]
    points = sorted({p for r in rows if (p := budget_point(r)) is not None})
    c = column(metric)
    sign = 1.0 if c.lower_is_better else -1.0
    tables = []
    for point in points:
        at = sorted((r for r in rows if budget_point(r) == point), key=lambda r: (c.value(r) is None,
                                                                                   sign * (c.value(r) or 0.0)))
        tables.append((point, at + references))
    return tables


def is_reference_row(record: dict) -> bool:
    return bool(record.get("reference_row"))


def sample_counts(rows: list[dict]) -> list[int]:
    """The distinct sample counts N of the model rows (reference rows are shown, not ranked)."""
    models = [r for r in rows if not is_reference_row(r)]
    return sorted({r.get("protocol", {}).get("num_samples") for r in models} - {None})


def sample_count_note(rows: list[dict], metric: str) -> str:
    """One sentence when the ranking had to step around different sample counts, else nothing."""
    counts = sample_counts(rows)
    if len(counts) <= 1:
        return ""
    return (f"The model rows were scored on different sample counts ({', '.join(f'{n:,}' for n in counts)}): a "
            f"Fréchet distance is biased upward by about 1/N, so they are ranked by `{metric}`, which is not "
            "(FD-infinity: the FD extrapolated to infinitely many samples, Chong & Forsyth 2020).")


def primary_metric(rows: list[dict]) -> str:
    """FID when every model row has it, else fd_auditor (always computable offline on labelled data); their
    FD-infinity when the model rows were scored on different sample counts (an FD is biased upward by ~1/N)."""
    models = [r for r in rows if not is_reference_row(r)] or rows
    metric = KEY_FID if models and all(KEY_FID in r["metrics"] for r in models) else KEY_FD_AUDITOR
    return f"{metric}_inf" if len(sample_counts(rows)) > 1 else metric


def skipped_by_reason(rows: list[dict]) -> dict[str, tuple[list[str], list[str]]]:
    """Each reason a metric was not computed, once: reason -> (the metrics, the runs it applies to)."""
    grouped: dict[str, tuple[list[str], list[str]]] = {}
    for r in rows:
        for metric, reason in sorted(r.get("skipped", {}).items()):
            metrics, runs = grouped.setdefault(reason, ([], []))
            if metric not in metrics:
                metrics.append(metric)
            if str(r["run_id"]) not in runs:
                runs.append(str(r["run_id"]))
    return grouped


def format_cell(record: dict, column: Column, with_std: bool = True) -> str:
    value = column.value(record)
    if value is None:
        return ""
    text = column.fmt.format(value)
    std = column.value(record, "metrics_std") if column.has_std and with_std else None
    return f"{text} ± {column.fmt.format(std)}" if isinstance(std, (int, float)) else text


def column(header: str) -> Column:
    return next(c for c in COLUMNS if c.header == header)


def direction(metric: str) -> str:
    """``lower is better`` or ``higher is better``, from the metric's column."""
    return "lower is better" if column(metric).lower_is_better else "higher is better"


SORTABLE = [c.header for c in COLUMNS if c.has_std and c.lower_is_better is not None]


def ranked_rows(results: str | Path, sort: Optional[str] = None, every_point: bool = False) -> tuple[list[dict], str]:
    """The newest record per (run, protocol), at the largest budget point every budgeted run reached (or at
    every point, ``every_point``), best first on ``sort`` (default: the primary metric); rows without it last."""
    rows = latest_per_protocol(load_records(results))
    if not every_point:
        rows = common_budget_view(rows)
    if sort is not None and sort not in SORTABLE:
        raise ValueError(f"--sort {sort!r}: choose one of {', '.join(SORTABLE)}")
    counts = sample_counts(rows)
    if sort is not None and not column(sort).n_fair and len(counts) > 1:
        fair = [c.header for c in COLUMNS if c.n_fair]
        raise ValueError(f"--sort {sort}: the model rows were scored on different sample counts ({counts}) and "
                         f"{sort} is biased by the count; sort by one that is not ({', '.join(fair)}), or score "
                         "every row at one --num-samples")
    metric = sort or primary_metric(rows)
    c = column(metric)
    sign = 1.0 if c.lower_is_better else -1.0
    rows.sort(key=lambda r: (c.value(r) is None, sign * (c.value(r) or 0.0)))
    return rows, metric


def used_columns(rows: list[dict]) -> list[Column]:
    """The columns that have a value in at least one row: what the markdown and HTML tables show."""
    return [c for c in COLUMNS if any(c.value(r) is not None for r in rows)]


def ranks(rows: list[dict]) -> list[str]:
    out, n = [], 0
    for r in rows:
        if is_reference_row(r):
            out.append("ref")
        else:
            n += 1
            out.append(str(n))
    return out
