"""The memorisation audit: the chunked neighbour search against brute force, C_T and AuthPct against
independent implementations, the copy rate's calibration on the digits, and 2 ranks against 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist as scipy_cdist

from conftest import REPO, genbench
from pipeline.benchmark.distributed import free_port
from pipeline.metrics import neighbours
from pipeline.metrics.memorization import MemorizationSettings, authpct, copy_scores, ct_score
from pipeline.metrics.neighbours import merge_distinct, nearest_neighbours, search, shift_tolerant_search, shifted


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks smaller than the sets, so that the running top-k merge across chunks is exercised."""
    monkeypatch.setattr(neighbours, "QUERY_CHUNK", 7)
    monkeypatch.setattr(neighbours, "BANK_CHUNK", 11)
    monkeypatch.setattr(neighbours, "RERANK_PAIRS", 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_chunked_search_equals_brute_force_cdist(small_chunks, dtype):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        queries, bank = (torch.randint(0, 256, (n, 48), generator=g, dtype=torch.uint8) for n in (30, 57))
        q, b = queries.float() / 255, bank.float() / 255
    else:
        queries, bank = torch.randn(30, 16, generator=g), torch.randn(57, 16, generator=g)
        q, b = queries, bank
    d, i = search(queries, bank, 5)
    full = torch.cdist(q.double(), b.double())
    expected_d, expected_i = full.topk(5, dim=1, largest=False)
    assert torch.equal(i, expected_i)
    assert torch.allclose(d.double(), expected_d, rtol=1e-5, atol=1e-6)


def test_search_excludes_self_when_asked(small_chunks):
    bank = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    d, i = search(bank, bank, 3, exclude_self=True)
    full = torch.cdist(bank.double(), bank.double()).fill_diagonal_(float("inf"))
    expected_d, expected_i = full.topk(3, dim=1, largest=False)
    assert torch.equal(i, expected_i) and (i != torch.arange(40)[:, None]).all()
    assert torch.allclose(d.double(), expected_d, rtol=1e-5)
    with pytest.raises(ValueError, match="3 neighbours asked of a set of 2"):
        nearest_neighbours(bank[:3], bank[:3], 3, torch.arange(3))


def test_close_pairs_keep_their_precision():
    """The matrix-product identity loses a near-copy's distance to cancellation; the exact re-ranking does not."""
    bank = torch.rand(20, 3072, generator=torch.Generator().manual_seed(2)) * 100
    queries = bank[:4] + 1e-3
    d, i = search(queries, bank, 2)
    assert torch.equal(i[:, 0], torch.arange(4))
    assert torch.allclose(d[:, 0], torch.full((4,), 1e-3 * 3072 ** 0.5), rtol=1e-2)


def test_shift_tolerant_search_equals_brute_force_over_shifts(small_chunks):
    g = torch.Generator().manual_seed(3)
    shape = (1, 6, 6)
    train = torch.randint(0, 256, (45, *shape), generator=g, dtype=torch.uint8)
    queries = torch.cat([shifted(train[:5], 0, 1), torch.randint(0, 256, (9, *shape), generator=g, dtype=torch.uint8)])
    d, i = shift_tolerant_search(queries.flatten(1), train.flatten(1), shape, 4, max_shift=1)
    per_shift = torch.stack([torch.cdist(shifted(queries, dy, dx).flatten(1).double() / 255,
                                         train.flatten(1).double() / 255)
                             for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    expected_d, expected_i = per_shift.min(0).values.topk(4, dim=1, largest=False)
    assert torch.equal(i, expected_i)
    assert torch.allclose(d.double(), expected_d, rtol=1e-5, atol=1e-6)
    # an image moved by one pixel is found at distance 0 when the shift lost nothing (an empty last column)
    blank_border = train.clone()
    blank_border[..., :, -1] = 0
    d, i = shift_tolerant_search(shifted(blank_border[:5], 0, 1).flatten(1), blank_border.flatten(1), shape, 1, 1)
    assert torch.equal(i[:, 0], torch.arange(5)) and torch.all(d == 0)


def test_merge_distinct_keeps_each_index_once_at_its_smallest_distance():
    d = torch.tensor([[0.5, 0.1, 0.3, 0.2]])
    i = torch.tensor([[7, 3, 7, 9]])
    md, mi = merge_distinct(d, i, 3)
    assert mi.tolist() == [[3, 9, 7]] and md[0].tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_copy_score_is_carlinis_normalised_distance():
    d = torch.tensor([[1.0, 2.0, 3.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    scores = copy_scores(d, alpha=0.5, neighbours=3)
    assert scores[0].item() == pytest.approx(1.0 / (0.5 * 2.0))
    assert scores[1].item() == 0.0  # a copy of an image the training set holds 3 times


# --- C_T and AuthPct against independent implementations --------------------------------------------------------

def _authpct_dgm_eval(train: np.ndarray, gen: np.ndarray) -> float:
    """dgm-eval's AuthPct, with full distance matrices."""
    real = scipy_cdist(train, train)
    np.fill_diagonal(real, np.inf)
    to_gen = scipy_cdist(train, gen)
    nearest_real = real.min(0)
    nearest, index = to_gen.min(0), to_gen.argmin(0)
    return 100.0 * float(np.mean(nearest_real[index] < nearest))


def _ct_independent(train: np.ndarray, test: np.ndarray, gen: np.ndarray, settings: MemorizationSettings) -> float:
    """Meehan's C_T with the same cells (k-means, same seed) but brute-force distances and U counted pair by pair."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=settings.ct_cells, n_init=10, random_state=settings.seed).fit(train)
    cells_t, cells_p, cells_q = km.labels_, km.predict(test), km.predict(gen)
    total, weight = 0.0, 0.0
    for c in range(settings.ct_cells):
        t, p, q = train[cells_t == c], test[cells_p == c], gen[cells_q == c]
        if len(q) <= settings.ct_min_generated:
            continue
        lq, lp = scipy_cdist(q, t).min(1), scipy_cdist(p, t).min(1)
        u = float((lq[:, None] > lp[None, :]).sum() + 0.5 * (lq[:, None] == lp[None, :]).sum())
        m, n = len(q), len(p)
        z = (u - (m * n / 2 - 0.5)) / np.sqrt(m * n * (m + n + 1) / 12)
        total, weight = total + len(p) * z, weight + len(p)
    return total / weight


def _gaussian_sets():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(600, 8))
    test = rng.normal(size=(300, 8))
    return {
        "train": train, "test": test,
        "copying": train[rng.choice(600, 300, replace=False)] + rng.normal(scale=0.02, size=(300, 8)),
        "fresh": rng.normal(size=(300, 8)),
        "underfit": rng.normal(scale=1.6, size=(300, 8)),
    }


def test_ct_score_and_authpct_match_independent_implementations_and_signs():
    sets = _gaussian_sets()
    settings = MemorizationSettings()
    t = torch.from_numpy(sets["train"]).float()
    train_nearest = search(t, t, 1, exclude_self=True)[0][:, 0]
    results = {}
    for name in ("copying", "fresh", "underfit"):
        g = torch.from_numpy(sets[name]).float()
        ours = ct_score(t, torch.from_numpy(sets["test"]).float(), g, settings)["ct_score"]
        theirs = _ct_independent(sets["train"].astype(np.float32), sets["test"].astype(np.float32),
                                 sets[name].astype(np.float32), settings)
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-4), name
        d, i = search(g, t, 1)
        ours_auth = authpct(d[:, 0], i[:, 0], train_nearest)
        assert ours_auth == pytest.approx(_authpct_dgm_eval(sets["train"], sets[name]), abs=100 / 300 + 1e-9), name
        results[name] = (ours, ours_auth)
    assert results["copying"][0] < -5 and results["copying"][1] < 5  # copies: close to train, not authentic
    assert abs(results["fresh"][0]) < 3 and results["fresh"][1] > 30
    assert results["underfit"][0] > 5 and results["underfit"][1] > results["fresh"][1]


def test_ct_score_refuses_too_few_generated_images():
    sets = _gaussian_sets()
    t = torch.from_numpy(sets["train"]).float()
    with pytest.raises(ValueError, match="no C_T cell holds more than 20"):
        ct_score(t, torch.from_numpy(sets["test"]).float(), torch.from_numpy(sets["fresh"][:30]).float(),
                 MemorizationSettings())


# --- the whole audit on the digits ------------------------------------------------------------------------------

def _train_images(shards):
    from pipeline.benchmark.images import ShardImages

    return torch.cat([b.images for b in ShardImages(shards, "train").batches(500)])


def _save_pngs(folder, images: torch.Tensor):
    folder.mkdir(parents=True)
    for k, image in enumerate(images):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{k:04d}.png")
    return folder


def _records(results):
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def test_perturbed_training_images_are_flagged_and_held_out_images_are_not(tmp_path, digits_shards):
    """Training images with light noise, or moved by one pixel, are near-copies (copy_rate >= 0.9); the held-out
    split, real digits the models never saw, is not (<= 0.05). Through the real command, on files."""
    train = _train_images(digits_shards)
    g = torch.Generator().manual_seed(0)
    picked = train[torch.randperm(len(train), generator=g)[:150]]
    noisy = (picked.float() + torch.randn(picked.shape, generator=g) * 0.05 * 255).clamp(0, 255).round()
    moved = torch.roll(picked, 1, dims=-1)  # one pixel right: the digits' last column is nearly always empty
    results = tmp_path / "results"
    for name, images in (("noisy", noisy.to(torch.uint8)), ("moved", moved)):
        proc = genbench("benchmark", "--images", str(_save_pngs(tmp_path / name, images)), "--reference",
                        str(digits_shards), "--metrics", "memorization", "--results", str(results))
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = genbench("benchmark", "--reference-rows", "--reference", str(digits_shards), "--num-samples", "150",
                    "--metrics", "memorization", "--results", str(results))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r.get("reference_row") or r["run_id"]: r for r in _records(results)}
    noisy_m, moved_m, floor = (rows[n]["metrics"]["memorization"] for n in ("noisy", "moved", "floor"))
    for m in (noisy_m, moved_m):
        assert m["copy_rate"] >= 0.9, m["spaces"]["pixels"]["copy_score"]
        assert m["authpct"] < 10  # each copy is closer to its source than the source is to any other image
    assert floor["copy_rate"] <= 0.05, floor["spaces"]["pixels"]["copy_score"]
    assert floor["authpct"] > 30
    # C_T measures plain l2 (as dgm-eval does): the noisy copies sit far closer to the training set than held-out
    # digits do; the held-out split itself is fresh data (its own baseline: about 0)
    assert noisy_m["ct_score"] < -5 and abs(floor["ct_score"]) < 3
    pixels = noisy_m["spaces"]["pixels"]
    assert pixels["nn_distance"]["median_ratio"] < 0.5 and pixels["held_out_copy_rate"] <= 0.05
    assert set(noisy_m["spaces"]) == {"pixels", "auditor"}  # no Inception weights here: named, not faked
    # the evidence: the closest pairs, and the grid of them, saved with the record
    record = rows["moved"]
    assert record["metrics"]["memorization"]["spaces"]["pixels"]["closest_pairs"][0]["distance"] == 0
    assert (results / record["closest_pairs_grid"]).is_file()
    assert record["protocol"]["memorization"]["threshold"] == MemorizationSettings().threshold


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_audit_exactly_what_one_process_audits(tmp_path, digits_shards):
    """The neighbour searches split over 2 gloo ranks (the reference's and the generated set's) give the
    single-process memorisation figures exactly."""
    train = _train_images(digits_shards)
    g = torch.Generator().manual_seed(1)
    images = torch.cat([train[:40], torch.randint(0, 17, (37, *train.shape[1:]), generator=g, dtype=torch.uint8) * 15])
    folder = _save_pngs(tmp_path / "gen", images)
    common = ["benchmark", "--images", str(folder), "--reference", str(digits_shards), "--metrics", "memorization",
              "--batch-size", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = genbench(*common, "--results", str(tmp_path / "r1"), env={**env, "GENBENCH_CACHE": str(tmp_path / "c1")})
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "pipeline.cli", *common, "--results",
                          str(tmp_path / "r2")], cwd=REPO, env={**env, "GENBENCH_CACHE": str(tmp_path / "c2")},
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (one,), (two,) = _records(tmp_path / "r1"), _records(tmp_path / "r2")
    assert two["protocol"]["world_size"] == 2
    assert one["metrics"]["memorization"]["spaces"]["pixels"]["copies"] >= 40  # the 40 training images
    assert two["metrics"]["memorization"] == one["metrics"]["memorization"]
