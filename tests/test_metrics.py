"""Metric code against independent computations, with explicit tolerances."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from pipeline.metrics.bias import audit, histogram
from pipeline.metrics.features import WeightsUnavailable, inception_cache_path, resolve_inception_weights
from pipeline.metrics.fidelity import FeatureStatistics, frechet_distance


def _features(n, d, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix + shift).astype(np.float32)


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FD with scipy's matrix square root, from numpy's mean and covariance."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _stats(x: np.ndarray, batch: int) -> FeatureStatistics:
    s = FeatureStatistics(x.shape[1])
    for i in range(0, len(x), batch):
        s.update(torch.from_numpy(x[i:i + batch]))
    return s


def test_running_statistics_equal_numpy_mean_and_covariance_whatever_the_batch():
    x = _features(500, 16, shift=3.0)
    for batch in (1, 7, 500):
        stats = _stats(x, batch).compute()
        np.testing.assert_allclose(stats["mu"], x.astype(np.float64).mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats["sigma"], np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-10)


def test_frechet_distance_against_scipy_sqrtm():
    a, b = _features(800, 32, seed=1), _features(900, 32, shift=0.5, seed=2)
    ours = frechet_distance(_stats(a, 64).compute(), _stats(b, 100).compute())
    assert ours == pytest.approx(_reference_fd(a, b), rel=1e-6)
    assert ours > 1.0
    same = frechet_distance(_stats(a, 64).compute(), _stats(a, 13).compute())
    assert abs(same) < 1e-6


def test_statistics_need_two_vectors_and_the_right_width():
    s = FeatureStatistics(4)
    with pytest.raises(ValueError, match="N x 4"):
        s.update(torch.zeros(3, 5))
    s.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        s.compute()


def _ddp_worker(rank, world, port, x, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stats = FeatureStatistics(x.shape[1])
    stats.update(torch.from_numpy(x[rank::world]))  # each rank sees only its share
    result = stats.compute()  # torchmetrics all-reduces the float64 sums
    if rank == 0:
        np.save(out, np.concatenate([result["mu"], result["sigma"].ravel(), [result["count"]]]))
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_processes_give_the_single_process_statistics(tmp_path):
    x = _features(301, 8, shift=1.0)
    out = tmp_path / "stats.npy"
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_ddp_worker, args=(2, port, x, str(out)), nprocs=2, start_method="spawn")
    merged = np.load(out)
    single = _stats(x, 301).compute()
    np.testing.assert_allclose(merged[:8], single["mu"], rtol=1e-12)
    np.testing.assert_allclose(merged[8:-1].reshape(8, 8), single["sigma"], rtol=1e-10)
    assert merged[-1] == 301


def test_audit_on_hand_made_predictions_with_a_class_never_generated():
    predicted = histogram([0, 0, 1, 1, 1, 1], 3)  # class 2 never generated
    assert predicted.tolist() == [2, 4, 0]
    out = audit(predicted, [10, 10, 10], requested=[0, 0, 1, 1, 2, 2], predictions=[0, 0, 1, 1, 1, 1])
    p, q = np.array([1 / 3, 2 / 3, 0]), np.array([1 / 3] * 3)
    assert out["kl_to_reference"] == pytest.approx(float(np.sum(p[:2] * np.log(p[:2] / q[:2]))), rel=1e-9)
    assert out["tv_to_reference"] == pytest.approx(1 / 3, rel=1e-12)
    assert out["coverage"] == pytest.approx(2 / 3)
    assert out["class_histogram"] == [2, 4, 0] and out["reference_histogram"] == [10, 10, 10]
    assert out["conditional_accuracy"] == pytest.approx(4 / 6)
    perfect = audit([5, 5], [1, 1])
    assert perfect["kl_to_reference"] == 0 and perfect["tv_to_reference"] == 0 and perfect["coverage"] == 1


def test_inception_weights_explicit_then_cache_then_clear_offline_error(tmp_path, monkeypatch, inception_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailable, match="does-not-exist.pth does not exist"):
        resolve_inception_weights(str(tmp_path / "does-not-exist.pth"))
    assert resolve_inception_weights(str(inception_weights)) == inception_weights
    with pytest.raises(WeightsUnavailable) as err:  # GENBENCH_OFFLINE=1 (conftest): no download attempt
        resolve_inception_weights(None)
    message = str(err.value)
    assert str(inception_cache_path()) in message and "genbench fetch-weights" in message
    inception_cache_path().parent.mkdir(parents=True)
    shutil.copy(inception_weights, inception_cache_path())
    assert resolve_inception_weights(None) == inception_cache_path()


def _blob_images(n, seed, bright):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 16, 16, 3), dtype=np.uint8)
    for img in images:
        y, x = rng.integers(2, 14, 2)
        img[max(0, y - 3):y + 3, max(0, x - 3):x + 3] = rng.integers(bright // 2, bright, 3)
        img += rng.integers(0, 30, img.shape, dtype=np.uint8)
    return images


@pytest.mark.slow
def test_fid_equals_torch_fidelity_on_the_same_images_and_weights(tmp_path, inception_weights):
    """Our FID (shards -> float64 running sums) against torch-fidelity's calculate_metrics on PNG folders."""
    import torch_fidelity

    from pipeline.benchmark import ScoreOptions, score
    from pipeline.data.shards import write_shards
    from pipeline.data.sources import FolderSource

    generated, reference = _blob_images(48, 1, 255), _blob_images(56, 2, 160)
    for name, images in (("gen", generated), ("ref", reference)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(tmp_path / name / f"{i:04d}.png")
    write_shards(FolderSource(tmp_path / "ref"), tmp_path / "shards", val_fraction=0.0, progress=False)
    opts = ScoreOptions(metrics=("fid",), batch_size=16, inception_weights=str(inception_weights), progress=False,
                        device="cpu")
    images = torch.from_numpy(generated).permute(0, 3, 1, 2).contiguous()
    metrics, skipped, protocol = score(images, str(tmp_path / "shards"), opts)
    theirs = torch_fidelity.calculate_metrics(input1=str(tmp_path / "gen"), input2=str(tmp_path / "ref"), fid=True,
                                              cuda=False, verbose=False, cache=False, batch_size=16,
                                              feature_extractor_weights_path=str(inception_weights))
    assert skipped == {}
    assert metrics["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert metrics["fid"] > 0
    assert protocol["extractors"]["inception"]["name"] == "inception-v3-compat"
    # the second evaluation reuses the cached reference statistics and gives the same number
    cache = Path(os.environ["GENBENCH_CACHE"]) / "reference-stats"
    assert len(list(cache.glob("*.pt"))) == 1
    again, _, _ = score(images, str(tmp_path / "shards"), opts)
    assert again["fid"] == metrics["fid"] and len(list(cache.glob("*.pt"))) == 1
