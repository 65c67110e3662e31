"""Result records are immutable and never lost; the leaderboard is a pure function of them."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from pipeline import leaderboard
from pipeline.benchmark import BenchmarkError, benchmark_run
from pipeline.io import write_new_json


def _writer(directory, worker, count):
    for i in range(count):
        write_new_json(f"{directory}/w{worker}-r{i}.json", {"worker": worker, "i": i, "pad": "x" * 4096})


def test_concurrent_writers_lose_no_record(tmp_path):
    procs = [mp.get_context("spawn").Process(target=_writer, args=(str(tmp_path), w, 25)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 200
    assert {(json.loads(f.read_text())["worker"], json.loads(f.read_text())["i"]) for f in files} == \
        {(w, i) for w in range(8) for i in range(25)}
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_a_record_is_never_overwritten(tmp_path):
    write_new_json(tmp_path / "r.json", {"v": 1})
    with pytest.raises(FileExistsError):
        write_new_json(tmp_path / "r.json", {"v": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"v": 1}


def _record(run, fid=None, fd=1.0, created="2026-01-01T00:00:00", protocol="p1"):
    metrics = {"fd_auditor": fd} if fd is not None else {}
    if fid is not None:
        metrics["fid"] = fid
    return {"record_version": 1, "run_id": run, "family": "vae", "created": created, "metrics": metrics,
            "skipped": {} if fid is not None else {"fid": "no weights"},
            "protocol": {"protocol_id": protocol, "num_samples": 10}, "cost": {"parameters": 5, "nfe": 1}}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask_not_the_temporary_files_0600(tmp_path, umask):
    """Colleagues in a shared project directory read results, configs and run.json: files get what a plain
    open() would give them, whatever the temporary file they were written through."""
    from pipeline.io import atomic_write_json

    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "run.json", {"a": 1})
        write_new_json(tmp_path / "record.json", {"b": 2})
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("run.json", "record.json")} == {expected}


def test_leaderboard_sorts_by_fid_when_every_row_has_it_else_fd_auditor(tmp_path):
    results = tmp_path / "results"
    write_new_json(results / "a.json", _record("a", fid=5.0, fd=0.1))
    write_new_json(results / "b.json", _record("b", fid=3.0, fd=0.9))
    board = leaderboard.build(results, tmp_path / "board")
    rows = [l for l in board.read_text().splitlines() if l.startswith("| 1") or l.startswith("| 2")]
    assert "| b |" in rows[0] and "| a |" in rows[1] and "Sorted by `fid`" in board.read_text()
    write_new_json(results / "c.json", _record("c", fid=None, fd=0.5))  # FID skipped for one row
    text = leaderboard.build(results, tmp_path / "board").read_text()
    assert "Sorted by `fd_auditor`" in text and "`fid` skipped for c: no weights" in text
    order = [l.split("|")[2].strip() for l in text.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert order == ["a", "c", "b"]
    csv_rows = (tmp_path / "board" / "leaderboard.csv").read_text().splitlines()
    assert csv_rows[0].startswith("rank,run,family,fid,fid_inf,is,kid,precision,recall,fd_dinov2,fd_dinov2_inf,"
                                  "fd_auditor")
    assert len(csv_rows) == 4


def test_leaderboard_sorts_by_a_chosen_metric_nested_ones_included(tmp_path):
    """--sort fd_dinov2 / memorization ranks by that column (the copy rate lives inside metrics.memorization);
    a row without it goes last; an unknown name lists the choices."""
    results = tmp_path / "results"
    for run, dino, copy in (("a", 30.0, 0.2), ("b", 10.0, 0.5), ("c", None, 0.0)):
        record = _record(run, fid=1.0)
        if dino is not None:
            record["metrics"]["fd_dinov2"] = dino
        record["metrics"]["memorization"] = {"copy_rate": copy, "authpct": 50.0, "ct_score": 0.1}
        write_new_json(results / f"{run}.json", record)

    def order(sort):
        text = leaderboard.build(results, tmp_path / "board", sort=sort).read_text()
        assert f"Sorted by `{sort}`" in text
        return [l.split("|")[2].strip() for l in text.splitlines() if l.startswith("| ") and l[2].isdigit()]

    assert order("fd_dinov2") == ["b", "a", "c"]
    assert order("memorization") == ["c", "a", "b"]
    with pytest.raises(ValueError, match="--sort 'copy': choose one of .*memorization"):
        leaderboard.build(results, tmp_path / "board", sort="copy")


def test_leaderboard_keeps_the_newest_record_per_run_and_protocol(tmp_path):
    results = tmp_path / "results"
    write_new_json(results / "old.json", _record("a", fd=9.0, created="2026-01-01T00:00:00"))
    write_new_json(results / "new.json", _record("a", fd=2.0, created="2026-02-01T00:00:00"))
    write_new_json(results / "other.json", _record("a", fd=4.0, protocol="p2"))
    text = leaderboard.build(results, tmp_path / "board").read_text()
    assert "2.0000" in text and "4.0000" in text and "9.0000" not in text


def test_benchmark_of_a_directory_without_checkpoint_says_how_to_train_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    with pytest.raises(BenchmarkError, match="genbench fit --config"):
        benchmark_run(tmp_path / "run")
    with pytest.raises(BenchmarkError, match="not a genbench run directory"):
        benchmark_run(tmp_path)


def test_rows_of_different_sample_counts_are_ranked_by_fd_infinity_never_by_a_biased_metric(tmp_path):
    """The floor-versus-models problem: FD is biased upward at small N, so once the model rows differ in N the
    ranking uses FD-infinity, says why, and refuses to sort by a metric N biases."""
    results = tmp_path / "results"
    for run, fd, fd_inf, n in (("small-n", 0.9, 0.5, 200), ("large-n", 0.7, 0.6, 2000)):
        record = _record(run, fd=fd)
        record["metrics"]["fd_auditor_inf"] = fd_inf
        record["metrics"]["audit"] = {"conditional_accuracy": 0.9 if run == "small-n" else 0.8}
        record["protocol"]["num_samples"] = n
        write_new_json(results / f"{run}.json", record)
    text = leaderboard.build(results, tmp_path / "board").read_text()
    order = [l.split("|")[2].strip() for l in text.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert order == ["small-n", "large-n"]  # by fd_auditor alone the order would be the reverse
    assert "Sorted by `fd_auditor_inf`" in text and "different sample counts (200, 2,000)" in text
    with pytest.raises(ValueError, match="--sort fd_auditor: .*different sample counts .*fd_auditor_inf"):
        leaderboard.build(results, tmp_path / "board", sort="fd_auditor")
    assert leaderboard.build(results, tmp_path / "board", sort="conditional_accuracy")  # a mean: N-fair
