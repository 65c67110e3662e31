"""The benchmark scripts keep working (their figures are measured outside the tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _run(script: str, *args: str, tmp_path: Path, cwd: Path = REPO, timeout: int = 600,
         torch_home: bool = False) -> dict:
    """Run benchmarks/SCRIPT with ``--out`` in tmp_path; its results file, parsed."""
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if torch_home:  # no Inception weights can be downloaded: the script must find none in a fresh TORCH_HOME
        env["TORCH_HOME"] = str(tmp_path / "torch")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_dataloader_benchmark_writes_its_comparison(tmp_path):
    result = _run("dataloader.py", "--small", tmp_path=tmp_path, timeout=300)
    for workers in ("1", "2"):
        row = result["workers"][workers]
        assert row["shard_data_module"] > 0 and row["imagefolder"] > 0
        assert row["ratio_vs_imagefolder"] == pytest.approx(row["shard_data_module"] / row["imagefolder"], rel=0.01)


@pytest.mark.slow
def test_jpeg_dataloader_benchmark_fits_to_both_sizes(tmp_path):
    result = _run("dataloader.py", "--jpeg", "--small", tmp_path=tmp_path, timeout=300)
    assert sorted(result["fitted_to"]) == ["256", "64"]
    for rows in result["fitted_to"].values():
        for row in rows.values():
            assert row["ratio_vs_imagefolder"] == pytest.approx(row["shard_data_module"] / row["imagefolder"], rel=0.01)


@pytest.mark.slow
def test_metrics_benchmark_compares_with_torch_fidelity_in_the_same_run(tmp_path):
    result = _run("metrics.py", "--small", tmp_path=tmp_path, torch_home=True)
    assert result["weights"].startswith("architecture only") and result["num_images_each"] == 48
    assert result["ratio_cached_vs_torch_fidelity"] == pytest.approx(
        result["genbench_cached_reference_s"] / result["torch_fidelity_s"], abs=2e-3)
    assert result["feature_extraction_images_per_s"]["strict_fp32"] > 0


@pytest.mark.slow
def test_train_throughput_benchmark_compares_fit_with_a_plain_loop_for_every_family(tmp_path):
    result = _run("train_throughput.py", "--family", "all", "--small", tmp_path=tmp_path, cwd=tmp_path, timeout=900)
    assert result["device"] == "cpu" and result["torch"]
    assert sorted(result["train_throughput"]) == ["ar", "ddpm", "gan", "vae"]
    for family, row in result["train_throughput"].items():
        assert row["genbench_fit_images_per_s"] > 0 and row["plain_loop_images_per_s"] > 0, family
        assert row["ratio_fit_vs_plain"] == pytest.approx(
            row["genbench_fit_images_per_s"] / row["plain_loop_images_per_s"], rel=1e-3)
        assert row["flops_per_image"] > 0 and row["mfu_bf16"] is None  # no bf16 peak known for a CPU
        assert row["timed_steps"] == 4


@pytest.mark.slow
def test_sample_throughput_benchmark_times_every_sampler(tmp_path):
    rows = _run("sample_throughput.py", "--small", tmp_path=tmp_path, cwd=tmp_path)["sample_throughput"]
    assert sorted(rows) == ["ar-kv-cache", "ddpm-ancestral-1000", "ddpm-ddim-100", "gan", "vae"]
    assert rows["ddpm-ancestral-1000"]["nfe"] == 1000 and rows["ddpm-ddim-100"]["nfe"] == 100
    # 10x the network evaluations per sample: the ancestral sampler must be clearly slower
    assert rows["ddpm-ancestral-1000"]["samples_per_s"] < rows["ddpm-ddim-100"]["samples_per_s"] / 3
    for row in rows.values():
        assert row["seconds_for_50000"] == pytest.approx(50000 / row["samples_per_s"], rel=1e-2)


@pytest.mark.slow
@pytest.mark.ddp
def test_scaling_benchmark_runs_one_and_two_gloo_processes(tmp_path):
    # each torchrun gets 240 s; one stuck past that fails with every Python thread's stack in its message
    row = _run("scaling.py", "--small", "--timeout", "240", tmp_path=tmp_path, cwd=tmp_path)["scaling"]["ddpm"]
    assert row["backend"] == "gloo" and sorted(row["images_per_s"]) == ["1", "2"]
    assert row["efficiency"]["1"] == 1.0
    assert row["efficiency"]["2"] == pytest.approx(row["images_per_s"]["2"] / (2 * row["images_per_s"]["1"]),
                                                   rel=1e-3)


@pytest.mark.slow
@pytest.mark.ddp
def test_benchmark_split_times_one_and_two_ranks_of_a_whole_benchmark(tmp_path):
    row = _run("benchmark_split.py", "--small", "--timeout", "300", tmp_path=tmp_path, cwd=tmp_path, timeout=900,
               torch_home=True)["benchmark_split"]["ddpm"]
    # no Inception weights here: the auditor's metrics are what is timed
    assert row["backend"] == "gloo" and row["metrics"] == "fd_auditor,audit" and row["num_samples"] == 1000
    seconds = row["seconds"]
    assert sorted(seconds) == ["1", "2"] and row["split_ratio"]["1"] == 1.0
    assert row["split_ratio"]["2"] == pytest.approx(seconds["2"] / (seconds["1"] / 2), rel=1e-3)


@pytest.mark.slow
def test_memorization_benchmark_writes_cost_ratios_and_calibration(tmp_path):
    result = _run("memorization.py", "--num-images", "300", tmp_path=tmp_path, timeout=900)
    cost = result["cost"]
    assert cost["num_images"] == 300 and cost["pixels_shift_tolerant_s"] > 0 and cost["features_2048_s"] > 0
    assert cost["chunked_over_cdist"] == pytest.approx(cost["chunked_search_s"] / cost["cdist_topk_s"], rel=0.01)
    assert 0 < cost["audit_share_of_benchmark"] < 1
    calibration = result["calibration"]
    threshold = str(calibration["settings"]["threshold"])
    assert calibration["pixels"]["held_out"]["flagged"][threshold] <= 0.05
    assert calibration["pixels"]["noise_0.05"]["flagged"][threshold] >= 0.9
    assert calibration["pixels"]["moved_left"]["flagged"][threshold] >= 0.9


@pytest.mark.slow
def test_api_benchmark_compares_generate_with_a_plain_loop(tmp_path):
    results = _run("api_throughput.py", "--small", "--concurrency", "1,4", "--rounds", "2", "--task-latency", "0.2",
                   tmp_path=tmp_path)
    rows = results["generate_vs_serve"]["concurrency"]
    assert sorted(rows) == ["1", "4"]
    tasks = results["generate_vs_task_loop"]["providers"]
    assert sorted(tasks) == ["bfl", "firefly", "midjourney"] and all(sorted(t) == ["1", "8"] for t in tasks.values())
    for row in (r for t in tasks.values() for r in t.values()):
        assert row["plain_loop_images_per_s"] > 0 and row["generate_images_per_s"] > 0
    for row in rows.values():
        assert row["plain_loop_images_per_s"] > 0 and row["generate_images_per_s"] > 0
        assert row["ratio_generate_vs_plain"] == pytest.approx(
            row["generate_images_per_s"] / row["plain_loop_images_per_s"], rel=1e-2)
        assert len(row["rounds"]["plain"]) == len(row["rounds"]["generate"]) == 2


@pytest.mark.slow
def test_remote_shards_benchmark_compares_http_and_s3_with_local(tmp_path):
    rows = _run("remote_shards.py", "--small", "--workers", "1", tmp_path=tmp_path)["remote_shards"]["workers"]
    assert list(rows) == ["1"]
    for row in rows.values():
        assert row["local_mmap"] > 0 and row["http"] > 0 and row["s3"] > 0 and row["http_cached"] > 0
        assert row["http_vs_local"] == pytest.approx(row["http"] / row["local_mmap"], rel=1e-2)
        assert row["http_cached_vs_local"] == pytest.approx(row["http_cached"] / row["local_mmap"], rel=1e-2)


@pytest.mark.slow
def test_two_stage_benchmark_compares_latent_and_pixel_models_and_the_codebook_fix(tmp_path):
    rows = _run("two_stage.py", "--small", tmp_path=tmp_path, cwd=tmp_path, timeout=900)["two_stage"]
    assert {"train", "encoding", "sampling", "codebook"} <= set(rows)
    assert all(v > 0 for k, v in rows["train"].items())
    assert rows["encoding"]["precomputed_images_per_s"] > 0 and rows["sampling"]["latent_ddpm_images_per_s"] > 0
    # even after a few steps, the l2-normalised codebook is in use and the plain one is not
    assert rows["codebook"]["l2_normalized"]["codebook_usage"] > rows["codebook"]["plain"]["codebook_usage"]
