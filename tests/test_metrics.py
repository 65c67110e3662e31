"""Metric code against independent computations, with explicit tolerances."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.benchmark.distributed import free_port
from pipeline.metrics.accumulators import FeatureBank, FeatureStatistics
from pipeline.metrics.bias import audit, fairness_discrepancy, histogram, per_class_fd
from pipeline.metrics.features import WeightsUnavailable, inception_cache_path, resolve_inception_weights
from pipeline.metrics.fidelity import frechet_distance, inception_score, kernel_inception_distance, precision_recall


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
    stats, bank = FeatureStatistics(x.shape[1]), FeatureBank()
    mine = np.arange(len(x))[rank::world]  # each rank sees only its share, interleaved
    stats.update(torch.from_numpy(x[mine]))
    bank.update(torch.from_numpy(x[mine]), torch.from_numpy(mine))
    result = stats.compute()  # torchmetrics all-reduces the float64 sums
    gathered = bank.compute()  # ... and gathers the bank, back in sample order
    if rank == 0:
        np.save(out, np.concatenate([result["mu"], result["sigma"].ravel(), [result["count"]]]))
        np.save(str(out).replace("stats", "bank"), gathered.numpy())
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_gloo_processes_give_the_single_process_statistics(tmp_path):
    x = _features(301, 8, shift=1.0)
    out = tmp_path / "stats.npy"
    port = free_port()
    mp.start_processes(_ddp_worker, args=(2, port, x, str(out)), nprocs=2, start_method="spawn")
    merged = np.load(out)
    single = _stats(x, 301).compute()
    np.testing.assert_allclose(merged[:8], single["mu"], rtol=1e-12)
    np.testing.assert_allclose(merged[8:-1].reshape(8, 8), single["sigma"], rtol=1e-10)
    assert merged[-1] == 301
    np.testing.assert_array_equal(np.load(tmp_path / "bank.npy"), x)  # every vector, in sample order


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


def test_fairness_discrepancy_and_per_class_audit_on_hand_made_predictions():
    # 3 classes, class 2 never generated: it counts as 0, not dropped (uniform is 1/3 each)
    counts = histogram([0, 0, 0, 1], 3)
    expected = np.sqrt((3 / 4 - 1 / 3) ** 2 + (1 / 4 - 1 / 3) ** 2 + (0 - 1 / 3) ** 2)
    assert fairness_discrepancy(counts) == pytest.approx(expected, rel=1e-12)
    assert fairness_discrepancy([7, 7, 7]) == pytest.approx(0.0, abs=1e-15)
    out = audit(counts, None, requested=[0, 1, 2, 2], predictions=[0, 0, 0, 1], class_names=["a", "b", "c"])
    assert out["fairness_discrepancy"] == pytest.approx(expected, rel=1e-12)
    assert "kl_to_reference" not in out  # no reference histogram known: not made up
    assert out["conditional_accuracy"] == pytest.approx(1 / 4)
    assert out["conditional_accuracy_per_class"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert audit([1, 1, 0], None, requested=[0, 0], predictions=[0, 1])["conditional_accuracy_per_class"]["2"] is None


def test_per_class_fd_names_the_worst_class_and_leaves_unseen_classes_empty():
    a = _features(200, 4, seed=1)
    b, c = a + 2.0, a + 0.1  # same covariance, so FD = |shift|^2 * 4: 16 and 0.04
    ref = _stats(a, 50).compute()
    out = per_class_fd([_stats(b, 50).compute(), _stats(c, 50).compute(), None], [ref, ref, ref], ["x", "y", "z"])
    assert out["per_class"]["x"] == pytest.approx(_reference_fd(b, a), rel=1e-6)
    assert out["per_class"]["y"] == pytest.approx(_reference_fd(c, a), rel=1e-6)
    assert out["per_class"]["z"] is None  # never generated: no number
    assert out["worst_class"] == "x"
    assert out["worst_to_best"] == pytest.approx(16 / 0.04, rel=1e-4)


def _numpy_inception_score(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    """Salimans et al.: exp(E_x KL(p(y|x) || p(y))) per split, after torch-fidelity's seeded shuffle."""
    x = logits[np.random.RandomState(seed).permutation(len(logits))].astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for chunk in np.array_split(np.arange(len(p)), splits):
        pc = p[chunk]
        scores.append(np.exp(np.mean(np.sum(pc * (np.log(pc) - np.log(pc.mean(0, keepdims=True))), 1))))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_against_numpy():
    logits = _features(1000, 12, seed=4) * 3
    ours = inception_score(torch.from_numpy(logits), splits=10)
    mean, std = _numpy_inception_score(logits, 10, 2020)
    assert ours["is_mean"] == pytest.approx(mean, rel=1e-6) and ours["is_std"] == pytest.approx(std, rel=1e-6)
    assert ours["is_mean"] > 1.1
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(torch.zeros(5, 3), splits=10)


def _numpy_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with k(a, b) = (a.b / d + 1)^3, written out with explicit loops over pairs' sums."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = ~np.eye(m, dtype=bool)
    return float(kxx[off].sum() / (m * (m - 1)) + kyy[off].sum() / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def test_kid_against_numpy_mmd():
    x, y = _features(300, 16, seed=5), _features(300, 16, shift=0.3, seed=6)
    # one subset of every sample: the subset is a permutation, and MMD² does not depend on order
    full = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=300)
    assert full["kid_mean"] == pytest.approx(_numpy_mmd2(x, y), rel=1e-6) and full["kid_std"] == 0
    # random subsets: the same seeded draws as torch-fidelity (generated first, then reference)
    rng, mmds = np.random.RandomState(2020), []
    for _ in range(5):
        mmds.append(_numpy_mmd2(x[rng.choice(300, 100, replace=False)], y[rng.choice(300, 100, replace=False)]))
    sub = kernel_inception_distance(torch.from_numpy(x), torch.from_numpy(y), subsets=5, subset_size=100)
    assert sub["kid_mean"] == pytest.approx(np.mean(mmds), rel=1e-6)
    assert sub["kid_std"] == pytest.approx(np.std(mmds), rel=1e-6)
    halves = kernel_inception_distance(torch.from_numpy(x[:150]), torch.from_numpy(x[150:]), subsets=1, subset_size=150)
    assert full["kid_mean"] > 10 * abs(halves["kid_mean"])  # two draws of one distribution: about 0


def _numpy_precision_recall(gen: np.ndarray, ref: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.: a sample is covered if it lies in some other set member's k-NN ball."""
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, 1)[:, k]  # index 0 is the point itself
    cross = np.sqrt(((gen[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
    precision = np.mean((cross <= radii(ref)[None, :]).any(1))
    recall = np.mean((cross.T <= radii(gen)[None, :]).any(1))
    return float(precision), float(recall)


def test_precision_recall_against_numpy_knn():
    gen, ref = _features(150, 6, shift=0.4, seed=7).astype(np.float64), _features(170, 6, seed=8).astype(np.float64)
    ours = precision_recall(torch.from_numpy(gen), torch.from_numpy(ref), neighborhood=3, batch_size=64)
    precision, recall = _numpy_precision_recall(gen, ref, 3)
    assert ours["precision"] == pytest.approx(precision, abs=1e-6)  # a fraction of 150: 1e-6 tells counts apart
    assert ours["recall"] == pytest.approx(recall, abs=1e-6)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    itself = precision_recall(torch.from_numpy(ref), torch.from_numpy(ref))
    assert itself["precision"] == 1 and itself["recall"] == 1


# --- FD-infinity -------------------------------------------------------------------------------------------------

def _fd_infinity_dgm_eval(x: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray, seed: int) -> float:
    """dgm-eval's compute_FD_infinity with its FD (scipy's sqrtm) and sklearn's regression, on the subsets our
    seeded generator draws (dgm-eval draws unseeded ones)."""
    from scipy import linalg
    from sklearn.linear_model import LinearRegression

    sizes = np.linspace(min(5000, max(len(x) // 10, 2)), len(x), 15).astype("int32")
    rng = np.random.default_rng(seed)
    fds = []
    for size in sizes:
        sub = x[rng.choice(len(x), size, replace=False)]
        mu, sigma = sub.mean(0), np.cov(sub, rowvar=False)
        covmean = linalg.sqrtm(sigma.dot(sigma_r)).real
        fds.append((mu - mu_r) @ (mu - mu_r) + np.trace(sigma) + np.trace(sigma_r) - 2 * np.trace(covmean))
    reg = LinearRegression().fit(1 / sizes.reshape(-1, 1), np.array(fds).reshape(-1, 1))
    return float(reg.predict(np.array([[0]]))[0, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fd_infinity_recovers_the_true_distance_where_plain_fd_is_biased(seed):
    """Gaussians of known distance (32-d, covariance 2I against I: FD = 32 (sqrt 2 - 1)^2 = 5.49): FD-infinity
    from N = 500, 1000, 2000 samples is within 5% of it, as dgm-eval's procedure computes it; the plain FD at
    N = 500 is off by more than 5%."""
    from pipeline.metrics.frechet import FD_INF_SEED, fd_infinity

    d = 32
    reference = {"mu": np.zeros(d), "sigma": np.eye(d)}
    truth = d * (np.sqrt(2) - 1) ** 2
    assert frechet_distance({"mu": np.zeros(d), "sigma": 2 * np.eye(d)}, reference) == pytest.approx(truth, rel=1e-9)
    rng = np.random.default_rng(seed)
    for n in (500, 1000, 2000):
        x = rng.normal(size=(n, d)) * np.sqrt(2)
        ours = fd_infinity(torch.from_numpy(x), reference)
        assert ours == pytest.approx(_fd_infinity_dgm_eval(x, reference["mu"], reference["sigma"], FD_INF_SEED),
                                     rel=1e-6)
        assert ours == pytest.approx(truth, rel=0.05), n
        if n == 500:
            plain = frechet_distance({"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}, reference)
            assert abs(plain / truth - 1) > 0.05


def test_fd_infinity_refuses_subsets_smaller_than_the_feature_dimension():
    from pipeline.metrics.frechet import fd_infinity

    x = torch.randn(300, 64, dtype=torch.float64)  # smallest subset 30 < 64 dimensions
    with pytest.raises(ValueError, match="needs at least 640 samples"):
        fd_infinity(x, {"mu": np.zeros(64), "sigma": np.eye(64)})


def test_per_class_fd_is_left_empty_below_the_minimum_count_with_the_reason():
    a = _features(400, 4, seed=1)
    ref = _stats(a, 100).compute()
    many, few = _features(120, 4, shift=1.0, seed=2), _features(20, 4, shift=1.0, seed=3)
    features = torch.from_numpy(np.concatenate([many, few, many]))
    predicted = torch.tensor([0] * 120 + [1] * 20 + [2] * 120)
    out = per_class_fd([_stats(many, 40).compute(), _stats(few, 20).compute(), _stats(many, 40).compute()],
                       [ref, ref, ref], ["x", "y", "z"], features, predicted, min_count=50)
    assert out["per_class"]["y"] is None and out["per_class_inf"]["y"] is None
    assert "20 generated" in out["skipped"]["y"] and "needs 50" in out["skipped"]["y"]
    assert out["per_class"]["x"] == pytest.approx(_reference_fd(many, a), rel=1e-6)
    assert out["per_class_inf"]["x"] is not None and out["worst_to_best_from"] == "fd_infinity"
    assert out["worst_to_best"] == pytest.approx(1.0)  # x and z hold the same images
