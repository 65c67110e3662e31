"""The benchmark stage end to end: images from anywhere, torch-fidelity agreement, DDP, repeats, leaderboard."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, genbench
from pipeline.benchmark import ScoreOptions, benchmark_images
from pipeline.benchmark.distributed import free_port
from pipeline.benchmark.images import ShardImages

INCEPTION_KEYS = ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall")


def _blob_images(n, seed, bright, size=16):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    for img in images:
        y, x = rng.integers(2, size - 2, 2)
        img[max(0, y - 3):y + 3, max(0, x - 3):x + 3] = rng.integers(bright // 2, bright, 3)
        img += rng.integers(0, 30, img.shape, dtype=np.uint8)
    return images


def _save_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img.squeeze()).save(folder / f"{i:04d}.png")
    return folder


def _records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def test_every_image_source_keeps_the_interface_the_scorer_uses(tmp_path, digits_shards):
    """What the scorer calls on a source, for each kind: the protocol's members, batches that cover the source
    exactly once in the given shape with their indices, split over ranks the same way."""
    from pipeline.benchmark.images import FolderImages, ImageSource, ModelSamples, Reference, UniformNoise
    from pipeline.models import FAMILIES

    model = FAMILIES["vae"](image_size=8, channels=1, latent_dim=4, base_channels=8, sample_batch_size=8).eval()
    folder = FolderImages(_save_folder(tmp_path / "f", _blob_images(10, 0, 200, size=8)[..., 0]))
    sources = {"shards": ShardImages(digits_shards, "val"), "folder": folder, "model": ModelSamples(model, 10, 0),
               "noise": UniformNoise(10, (1, 8, 8))}
    for name, source in sources.items():
        assert isinstance(source, ImageSource), name
        assert isinstance(source, Reference) == (name in ("shards", "folder")), name
        for world in (1, 2):
            batches = [b for rank in range(world) for b in source.batches(4, rank, world)]
            index = torch.cat([b.index for b in batches])
            assert len(index) == len(set(index.tolist())) == source.num_images, (name, world)
            assert all(b.images.dtype == torch.uint8 and tuple(b.images.shape[1:]) == source.shape for b in batches)
        assert source.describe()["num_images"] == source.num_images


@pytest.mark.slow
def test_inception_metrics_do_not_depend_on_the_batch_size(tmp_path, inception_weights):
    """FID from batches of 4 and of 16 (torch-fidelity's own test of this): the same to 1e-6 relative. KID and
    precision/recall use the same feature vectors; IS its splits of the logits."""
    gen = _save_folder(tmp_path / "gen", _blob_images(32, 3, 255))
    ref = _save_folder(tmp_path / "ref", _blob_images(32, 4, 160))
    records = {}
    for batch_size in (4, 16):
        opts = ScoreOptions(batch_size=batch_size, inception_weights=str(inception_weights), progress=False,
                            device="cpu", kid_subset_size=16, kid_subsets=10, metrics=("fid", "kid", "pr", "is"))
        path = benchmark_images(str(gen), str(ref), results=str(tmp_path / f"results-{batch_size}"), opts=opts)
        records[batch_size] = json.loads(path.read_text())["metrics"]
    small, large = records[4], records[16]
    assert small["fid"] > 1 and small["fid"] == pytest.approx(large["fid"], rel=1e-6)
    for key in ("kid_mean", "is_mean", "precision", "recall"):
        assert small[key] == pytest.approx(large[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_every_inception_metric_equals_torch_fidelity_on_two_folders(tmp_path, inception_weights):
    """FID, IS, KID and precision/recall of `genbench benchmark --images --reference` against torch-fidelity's
    calculate_metrics on the same PNG folders with the same weight file; then the reference cache."""
    import torch_fidelity

    gen = _save_folder(tmp_path / "gen", _blob_images(40, 1, 255))
    ref = _save_folder(tmp_path / "ref", _blob_images(48, 2, 160))
    opts = ScoreOptions(batch_size=16, inception_weights=str(inception_weights), progress=False, device="cpu",
                        kid_subset_size=40, kid_subsets=20)
    ours = json.loads(benchmark_images(str(gen), str(ref), results=str(tmp_path / "results"), opts=opts).read_text())
    theirs = torch_fidelity.calculate_metrics(
        input1=str(gen), input2=str(ref), fid=True, isc=True, kid=True, prc=True, kid_subset_size=40, kid_subsets=20,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(inception_weights),
        cuda=False, verbose=False, cache=False, batch_size=16)
    m = ours["metrics"]
    assert set(INCEPTION_KEYS) <= set(m) and "fid" not in ours["skipped"]
    assert m["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4) and m["fid"] > 1
    assert m["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-4) and m["is_mean"] > 1
    assert m["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-3)
    assert m["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert m["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)
    assert m["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert m["recall"] == pytest.approx(theirs["recall"], abs=1e-6)
    protocol = ours["protocol"]
    assert protocol["extractors"]["inception"]["name"] == "inception-v3-compat"
    assert protocol["extractors"]["inception"]["precision"] == "fp32 (TF32 off)"
    assert protocol["settings"]["kid_subset_size"] == 40 and protocol["reference"]["kind"] == "folder"
    # an image folder has no labels: the auditor metrics say why they are missing
    assert "no labels" in ours["skipped"]["fd_auditor"] and "audit" in ours["skipped"]

    # The second evaluation reuses the cached reference features and gives the same numbers ...
    cache = Path(os.environ["GENBENCH_CACHE"]) / "reference-stats"
    assert len(list(cache.glob("*.pt"))) == 1
    again = json.loads(benchmark_images(str(gen), str(ref), results=str(tmp_path / "results"), opts=opts).read_text())
    assert {k: again["metrics"][k] for k in INCEPTION_KEYS} == {k: m[k] for k in INCEPTION_KEYS}
    assert len(list(cache.glob("*.pt"))) == 1
    # ... and a changed reference image is never served from that cache.
    Image.fromarray(_blob_images(1, 99, 255)[0]).save(ref / "0000.png")
    changed = json.loads(benchmark_images(str(gen), str(ref), results=str(tmp_path / "results"), opts=opts).read_text())
    assert len(list(cache.glob("*.pt"))) == 2 and changed["metrics"]["fid"] != m["fid"]
    assert changed["protocol"]["protocol_id"] != ours["protocol"]["protocol_id"]


def _digits_val_folder(shards: Path, folder: Path, limit: int | None = None) -> tuple[Path, Path]:
    """The digits val split as PNG files plus a `file,label` CSV: "images made elsewhere" with known classes."""
    folder.mkdir()
    rows = ["file,label"]
    for batch in ShardImages(shards, "val").batches(64):
        for i, img, label in zip(batch.index.tolist(), batch.images, batch.labels.tolist()):
            if limit is None or len(rows) <= limit:
                Image.fromarray(img[0].numpy()).save(folder / f"{i:05d}.png")
                rows.append(f"{i:05d}.png,{label}")
    labels = folder.parent / f"{folder.name}-labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return folder, labels


@pytest.mark.slow
def test_images_from_elsewhere_with_labels_and_no_inception_weights(tmp_path, digits_shards, monkeypatch):
    """The command line a user runs for another generator's images, on a machine without the weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # empty hub cache; GENBENCH_OFFLINE=1 (conftest)
    folder, labels = _digits_val_folder(digits_shards, tmp_path / "generated")
    proc = genbench("benchmark", "--images", str(folder), "--reference", str(digits_shards), "--labels", str(labels),
                    "--name", "other-codebase", "--results", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = _records(tmp_path / "results")
    assert record["run_id"] == "other-codebase" and record["family"] == "external" and record["conditional"]
    for name in ("fid", "is", "kid", "pr"):  # listed with the reason and the fix, never a number
        assert "genbench fetch-weights" in record["skipped"][name]
    assert not set(INCEPTION_KEYS) & set(record["metrics"])
    audit = record["metrics"]["audit"]
    accuracy = record["protocol"]["extractors"]["auditor"]["val_accuracy"]
    # the val split, asked for its true classes: conditional accuracy is the auditor's own val accuracy
    assert audit["conditional_accuracy"] == pytest.approx(accuracy, abs=1e-6) and accuracy > 0.8
    assert set(audit["conditional_accuracy_per_class"]) == {str(c) for c in range(10)}
    assert sum(audit["class_histogram"]) == 180 and audit["coverage"] == 1.0
    assert 0 <= audit["fairness_discrepancy"] < 0.2 and audit["kl_to_reference"] < 0.1
    # 18 images a class: per-class FDs would be mostly noise, so they are left empty with the reason
    per_class = audit["per_class_fd"]
    assert len(per_class["per_class"]) == 10 and all(v is None for v in per_class["per_class"].values())
    assert per_class["worst_to_best"] is None and all("needs 50" in why for why in per_class["skipped"].values())
    assert "needs at least 640 samples" in record["skipped"]["fd_auditor_inf"]
    assert 0 < record["metrics"]["fd_auditor"] < 1.0  # real digits against real digits
    assert (tmp_path / "results" / record["sample_grid"]).exists()


@pytest.mark.parametrize("args,message", [
    (["--images", "{folder}"], "need --reference"),
    (["--images", "{mixed}", "--reference", "{shards}"], "every image of a folder must have one size"),
    (["--images", "{folder}", "--reference", "{shards}", "--labels", "{bad_labels}"], "gives no label for 1 image"),
    (["--images", "{tmp}/nothing-here", "--reference", "{shards}"], "does not exist"),
    (["--images", "{folder}", "--reference", "{shards}", "--metrics", "fid,sharpness"], "unknown ['sharpness']"),
    (["--images", "{folder}", "--reference", "{shards}", "--results", "{a_file}/results"], "not writable"),
    (["--images", "{folder}", "--reference", "{shards}", "--sample-precision", "bf16"], "sets how a --run's model"),
])
def test_bad_benchmark_input_stops_with_the_reason(tmp_path, digits_shards, args, message):
    folder = _save_folder(tmp_path / "imgs", _blob_images(3, 0, 200, size=8)[..., :1])
    mixed = _save_folder(tmp_path / "mixed", _blob_images(2, 0, 200, size=8))
    Image.fromarray(_blob_images(1, 0, 200, size=12)[0]).save(mixed / "zz.png")
    (tmp_path / "bad.csv").write_text("file,label\n0000.png,1\n0001.png,2\n")
    (tmp_path / "a_file").write_text("")  # a results path under a file: unwritable even for root
    fill = dict(folder=folder, mixed=mixed, shards=digits_shards, bad_labels=tmp_path / "bad.csv", tmp=tmp_path,
                a_file=tmp_path / "a_file")
    proc = genbench("benchmark", *[a.format(**fill) for a in args])
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.glob("results/*.json"))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("num_generated,metrics", [(26, "fid,is,kid,pr,fd_auditor,audit"), (3, "fd_auditor,audit")])
def test_torchrun_two_ranks_score_exactly_what_one_process_scores(tmp_path, inception_weights, num_generated,
                                                                   metrics):
    """Sampling/extraction split over 2 gloo ranks (reference pass included) gives the single-process record;
    with 3 images in batches of 4, rank 1 sees none and still joins every collective."""
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import FolderSource

    rng = np.random.default_rng(0)
    for c, bright in enumerate((120, 250)):  # a small labelled reference: two classes of blobs
        _save_folder(tmp_path / "ref" / f"class{c}", _blob_images(30, c, bright))
    shards = tmp_path / "shards"
    write_shards(FolderSource(tmp_path / "ref"), shards, val_fraction=0.2, seed=0, progress=False)
    gen = _save_folder(tmp_path / "gen", _blob_images(num_generated, int(rng.integers(100)), 200))
    auditor = tmp_path / "auditor.ckpt"
    assert genbench("train-auditor", "--data", str(shards), "--epochs", "3", "--out", str(auditor)).returncode == 0
    common = ["benchmark", "--images", str(gen), "--reference", str(shards), "--auditor", str(auditor),
              "--inception-weights", str(inception_weights), "--batch-size", "4", "--metrics", metrics]
    # one thread per process in both runs: oneDNN's convolutions round differently with other thread counts
    single = genbench(*common, "--results", str(tmp_path / "r1"),
                      env={"GENBENCH_CACHE": str(tmp_path / "c1"), "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    env = {**os.environ, "GENBENCH_CACHE": str(tmp_path / "c2"), "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "pipeline.cli", *common[:1], *common[1:],
                          "--results", str(tmp_path / "r2")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (one,), (two,) = _records(tmp_path / "r1"), _records(tmp_path / "r2")  # rank 0 alone writes the record
    assert one["protocol"]["world_size"] == 1 and two["protocol"]["world_size"] == 2
    assert one["protocol"]["protocol_id"] == two["protocol"]["protocol_id"]
    keys = [k for k in INCEPTION_KEYS if "fid" in metrics] + ["fd_auditor"]
    assert all(k in one["metrics"] for k in keys)
    for key in keys:  # (the FD of 3 samples is NaN, null in the record, in both)
        if one["metrics"][key] is None:
            assert two["metrics"][key] is None, key
        else:
            assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6, abs=1e-9), key
    assert two["metrics"]["audit"]["class_histogram"] == one["metrics"]["audit"]["class_histogram"]
    per_class = [r["metrics"]["audit"]["per_class_fd"]["per_class"] for r in (two, one)]
    assert {c: v is None for c, v in per_class[0].items()} == {c: v is None for c, v in per_class[1].items()}
    assert {c: v for c, v in per_class[0].items() if v is not None} == pytest.approx(
        {c: v for c, v in per_class[1].items() if v is not None}, rel=1e-6)


@pytest.mark.slow
def test_repeats_reference_rows_and_the_html_leaderboard(tmp_path, digits_shards):
    """A trained run scored with --repeats 3, the floor/ceiling rows, then md/csv/html and a W&B table."""
    run_root = tmp_path / "runs"
    fit = genbench("fit", "--config", str(REPO / "experiments" / "digits" / "vae.yaml"), "--trainer.max_steps=20",
                   f"--data.init_args.shards={digits_shards}", f"--run.root={run_root}", "--tracking.wandb=false",
                   "--trainer.enable_progress_bar=false")
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run_dir,) = run_root.iterdir()
    results = tmp_path / "results"
    bench = genbench("benchmark", "--run", str(run_dir), "--num-samples", "120", "--repeats", "3", "--results",
                     str(results), "--metrics", "fd_auditor,audit")
    assert bench.returncode == 0, bench.stderr[-3000:]
    (record,) = _records(results)
    # the command prints the scores it wrote, not only the file
    assert f"{run_dir.name}: fd_auditor ↓ " in bench.stdout and " ± " in bench.stdout and "(N=120)" in bench.stdout
    draws = [d["fd_auditor"] for d in record["repeats"]]
    assert len(draws) == 3 and len(set(draws)) == 3  # three different sample sets (seeds 0, 1, 2)
    assert record["metrics"]["fd_auditor"] == pytest.approx(np.mean(draws), rel=1e-12)
    assert record["metrics_std"]["fd_auditor"] == pytest.approx(np.std(draws, ddof=1), rel=1e-12)
    assert record["metrics_std"]["audit"]["tv_to_reference"] >= 0
    assert record["protocol"]["repeats"] == 3 and record["cost"]["sampling_images_per_s"] > 0
    assert record["protocol"]["sampling"] == {"precision": "fp32", "compiled": False}
    bf16 = genbench("benchmark", "--run", str(run_dir), "--num-samples", "120", "--results", str(tmp_path / "bf16"),
                    "--metrics", "audit", "--sample-precision", "bf16")
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    assert _records(tmp_path / "bf16")[0]["protocol"]["sampling"]["precision"] == "bf16"

    rows = genbench("benchmark", "--reference-rows", "--reference", str(digits_shards), "--num-samples", "120",
                    "--results", str(results), "--metrics", "fd_auditor,audit")
    assert rows.returncode == 0, rows.stderr[-3000:]
    by_row = {r.get("reference_row"): r for r in _records(results)}
    floor, ceiling = by_row["floor"], by_row["ceiling"]
    assert floor["protocol"]["num_samples"] == 180 and ceiling["protocol"]["num_samples"] == 120
    # the frame holds: real held-out digits < a 20-step VAE < uniform noise
    assert floor["metrics"]["fd_auditor"] < record["metrics"]["fd_auditor"] < ceiling["metrics"]["fd_auditor"]

    out = tmp_path / "board"
    board = genbench("leaderboard", "--results", str(results), "--out", str(out), "--wandb", "offline")
    assert board.returncode == 0, board.stderr[-3000:]
    md = (out / "leaderboard.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ") and "rank" not in line]
    assert [line.split(" | ")[0] for line in lines] == ["| ref", "| 1", "| ref"]  # sorted by fd_auditor
    assert " ± " in lines[1] and f"(../results/{Path(record['name'])}.json)" in lines[1]
    table = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert float(table[1]["fd_auditor_std"]) == pytest.approx(record["metrics_std"]["fd_auditor"])
    html = (out / "leaderboard.html").read_text()
    assert html.count("<tr class=") == 3 and html.count("data:image/png;base64,") == 3
    assert "<svg" in html and "training images seen" in html and "sampling images/s" in html
    assert run_dir.name in html and "reference: uniform noise" in html
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/leaderboard_*.table.json"))
    assert len(tables) == 1 and len(json.loads(tables[0].read_text())["data"]) == 3
