"""CLIPScore and the demographic audit: checked against independent computations (numpy, PIL's own YCbCr),
the CLIP weight resolution with a ViT-B/32 file built here, and the whole path through `genbench benchmark` on
a generated set whose answer is known."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import genbench
from pipeline.metrics.alignment import alignment_report, clip_scores
from pipeline.metrics.demographics import (
    GENDER,
    MST_RGB,
    SKIN_TONE,
    audit_attribute,
    classifier_attribute,
    distribution,
    skin_mask,
    skin_tones,
)


def test_clip_score_against_numpy():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(50, 512)), rng.normal(size=(50, 512))
    txt[:10] = img[:10] + 0.1 * rng.normal(size=(10, 512))  # aligned pairs: high cosine
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    expected = 2.5 * np.maximum(cos, 0)
    unit = [torch.nn.functional.normalize(torch.tensor(a, dtype=torch.float32), dim=1) for a in (img, txt)]
    got = clip_scores(*unit).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert (got[:10] > 2.0).all() and (got[10:] < 0.5).all() and (got == 0).any()  # the per-image clamp
    report = alignment_report(torch.from_numpy(expected), ["a"] * 25 + ["b"] * 25, {"a": "A", "b": "B"})
    assert report["mean"] == pytest.approx(expected.mean())
    a, b = report["per_prompt"]
    assert (a["id"], a["n"], b["n"]) == ("a", 25, 25)
    assert a["mean"] == pytest.approx(expected[:25].mean()) and a["max"] == pytest.approx(expected[:25].max())
    assert report["mean_of_prompt_max"] == pytest.approx((expected[:25].max() + expected[25:].max()) / 2)
    with pytest.raises(ValueError, match="one text row per image"):
        clip_scores(unit[0], unit[1][:3])


def _heim_rule(r: int, g: int, b: int, y: float, cb: float, cr: float) -> bool:
    """HEIM's per-pixel rule, written out as its source does (scalar comparisons)."""
    return (r > 95 and g > 40 and b > 20 and r > g and r > b and abs(r - g) > 15 and cr > 135 and cb > 85 and y > 80
            and cr <= 1.5862 * cb + 20 and cr >= 0.3448 * cb + 76.2069 and cr >= -4.5652 * cb + 234.5652
            and cr <= -1.15 * cb + 301.75 and cr <= -2.2857 * cb + 432.85)


def test_skin_mask_against_pil_ycbcr():
    """The vectorised mask vs the scalar rule on PIL's own (JPEG, fixed-point) YCbCr conversion of the same pixels.
    The conversions round differently, so a pixel may disagree only where a change of 1 in Y, Cb or Cr (one
    rounding step) flips the rule."""
    rng = np.random.default_rng(1)
    base = MST_RGB[rng.integers(3, 7, 64)][:, None, None, :] + rng.normal(0, 25, (64, 12, 12, 3))
    images = np.clip(base, 0, 255).astype(np.uint8)
    ours = skin_mask(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    ycbcr = np.stack([np.asarray(Image.fromarray(image).convert("YCbCr"), dtype=np.float64) for image in images])
    theirs = np.zeros_like(ours)
    for i, y, x in np.ndindex(ours.shape):
        r, g, b = (int(v) for v in images[i, y, x])
        theirs[i, y, x] = _heim_rule(r, g, b, *ycbcr[i, y, x])
    assert 0.2 < theirs.mean() < 0.95  # the test images hold skin and non-skin pixels
    steps = [(dy, db, dr) for dy in (-1, 0, 1) for db in (-1, 0, 1) for dr in (-1, 0, 1)]
    for i, y, x in zip(*np.nonzero(ours != theirs)):
        r, g, b = (int(v) for v in images[i, y, x])
        yy, cb, cr = ycbcr[i, y, x]
        assert any(_heim_rule(r, g, b, yy + d[0], cb + d[1], cr + d[2]) == ours[i, y, x] for d in steps)
    assert (ours != theirs).mean() < 0.03


def test_skin_tone_bins_and_imbalance():
    patches = torch.from_numpy(MST_RGB).to(torch.uint8)[:, :, None, None].expand(10, 3, 6, 6).clone()
    mean, bins = skin_tones(patches)
    # the rule finds skin in the mid tones; the palest and darkest flat patches fail its brightness tests
    assert bins.tolist() == [-1, -1, -1, 3, 4, 5, 6, -1, -1, -1]
    np.testing.assert_allclose(mean[3:7].numpy(), MST_RGB[3:7], atol=1e-4)
    blue = torch.zeros(2, 3, 6, 6, dtype=torch.uint8)
    blue[:, 2] = 200
    assert skin_tones(blue)[1].tolist() == [-1, -1]
    assert skin_tones(torch.full((2, 1, 6, 6), 200, dtype=torch.uint8))[1].tolist() == [-1, -1]  # grayscale

    values = np.array([3] * 6 + [4] * 2 + [-1] * 2)
    d = distribution(SKIN_TONE, values)
    shares = np.zeros(10)
    shares[3], shares[4] = 0.6, 0.2
    assert d["imbalance"] == pytest.approx(np.abs(shares - 0.1).sum() / 10)  # HEIM: undetected in the denominator
    assert d["undetected"] == 2 and d["shares"]["monk4"] == pytest.approx(0.6)
    low, high = d["imbalance_ci95"]
    assert low <= d["imbalance"] <= high

    female = np.array([1] * 30 + [0] * 10)
    g = distribution(GENDER, female)
    assert g["imbalance"] == pytest.approx(abs(30 / 40 - 0.5))
    assert distribution(GENDER, np.array([0, 1] * 20))["imbalance"] == 0
    # more images, a narrower interval
    wide = distribution(GENDER, female)["imbalance_ci95"]
    narrow = distribution(GENDER, np.repeat(female, 10))["imbalance_ci95"]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    tv = distribution(classifier_attribute("auditor", ["a", "b", "c"]), np.array([0, 0, 0, 1]))
    assert tv["imbalance"] == pytest.approx(0.5 * (abs(0.75 - 1 / 3) + abs(0.25 - 1 / 3) + 1 / 3))

    audit = audit_attribute(GENDER, np.array([1, 1, 0, 0, 0, 1]), ["nurse"] * 2 + ["pilot"] * 2 + [None] * 2)
    assert set(audit["groups"]) == {"nurse", "pilot"} and audit["overall"]["n"] == 6
    assert audit["mean_group_imbalance"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    from pipeline.metrics.clip import architecture_only_clip_weights

    return architecture_only_clip_weights(tmp_path_factory.mktemp("clip") / "clip-vit-b-32-test.bin")


def test_clip_weights_resolve_and_embed(clip_weights, tmp_path, monkeypatch):
    from pipeline.metrics.clip import CLIP_WEIGHTS, CLIPModel
    from pipeline.metrics.features import WeightsUnavailable

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailable, match="genbench fetch-weights clip"):
        CLIP_WEIGHTS.resolve()
    with pytest.raises(WeightsUnavailable, match="--clip-weights .* does not exist"):
        CLIP_WEIGHTS.resolve(str(tmp_path / "absent.bin"))
    cached = CLIP_WEIGHTS.cache_path()
    cached.parent.mkdir(parents=True)
    shutil.copy(clip_weights, cached)
    assert CLIP_WEIGHTS.resolve() == cached
    model = CLIPModel(cached)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    all_at_once = model.encode_images(images)
    one_by_one = torch.cat([model.encode_images(images[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(all_at_once, one_by_one, rtol=1e-4, atol=1e-5)
    assert torch.allclose(all_at_once.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.cdist(all_at_once, all_at_once).max() > 1e-3  # different images, different embeddings
    texts = model.encode_texts(["a photo of a male", "a photo of a female"])
    assert texts.shape == (2, 512) and not torch.allclose(texts[0], texts[1])


def _generated_set(root: Path, groups: dict[str, list[int]], k: int) -> Path:
    """A set in genbench generate's layout: per group, k RGB images of the given Monk tones (cycled)."""
    (root / "images").mkdir(parents=True)
    (root / "meta").mkdir()
    for group, tones in groups.items():
        entries = []
        for i in range(k):
            name = f"{group}-{i:04d}.png"
            colour = tuple(int(v) for v in MST_RGB[tones[i % len(tones)]])
            Image.new("RGB", (16, 16), colour).save(root / "images" / name)
            entries.append({"event": "images", "index": i, "file": name, "requests": 1, "created": 0,
                            "latency_s": 0.1, "revised_prompt": None})
        header = {"prompt": {"prompt": f"a photo of the face of a {group}", "id": group, "group": group}}
        (root / "meta" / f"{group}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [header, *entries]))
    (root / "generation.json").write_text(json.dumps({
        "api_base": "http://127.0.0.1:1/v1", "model": "palette-model", "size": "16x16", "quality": None,
        "images_per_prompt": k, "prompt_suite": {"path": "s.jsonl", "sha256": "0" * 64, "num_prompts": len(groups)},
        "totals": {"images": k * len(groups), "refused": 1, "failed": 0, "requests": k * len(groups),
                   "wall_seconds": 2.0, "cost": None, "price_per_image": None}}))
    return root


def test_benchmark_scores_prompts_and_groups(tmp_path, clip_weights):
    generated = _generated_set(tmp_path / "set", {"nurse": [3], "pilot": [5, 6]}, k=8)
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(60):
        Image.new("RGB", (16, 16), (i * 4, 100, 50)).save(reference / f"{i}.png")
    results = tmp_path / "results"
    run = genbench("benchmark", "--images", str(generated), "--reference", str(reference), "--results", str(results),
                   "--clip-weights", str(clip_weights), "--metrics", "clip_score,demographics")
    assert run.returncode == 0, run.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in results.glob("*.json")]
    metrics = record["metrics"]
    assert record["run_id"] == "palette-model" and record["external"]["refused"] == 1
    assert [p["n"] for p in metrics["alignment"]["per_prompt"]] == [8, 8] and metrics["clip_score"] >= 0
    skin = metrics["demographics"]["skin_tone"]
    assert skin["groups"]["nurse"]["shares"]["monk4"] == 1.0
    assert skin["groups"]["pilot"]["shares"]["monk6"] == 0.5 and skin["groups"]["pilot"]["shares"]["monk7"] == 0.5
    nurse = np.zeros(10)
    nurse[3] = 1
    pilot = np.zeros(10)
    pilot[5] = pilot[6] = 0.5
    expected = (np.abs(nurse - 0.1).sum() / 10 + np.abs(pilot - 0.1).sum() / 10) / 2
    assert metrics["skin_tone_imbalance"] == pytest.approx(expected)
    gender = metrics["demographics"]["gender"]
    assert gender["overall"]["n"] == 16 and sum(gender["overall"]["counts"].values()) == 16
    assert metrics["gender_imbalance"] == pytest.approx(np.mean([g["imbalance"] for g in gender["groups"].values()]))
    assert record["protocol"]["extractors"]["clip"]["weights_sha256"]

    # without CLIP weights: CLIPScore and the gender detector are skipped with the reason, skin tone still scored
    bare = genbench("benchmark", "--images", str(generated), "--reference", str(reference), "--results",
                    str(tmp_path / "bare"), "--metrics", "clip_score,demographics")
    assert bare.returncode == 0, bare.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "bare").glob("*.json")]
    assert "genbench fetch-weights clip" in record["skipped"]["clip_score"]
    assert "genbench fetch-weights clip" in record["skipped"]["demographics.gender"]
    assert record["metrics"]["skin_tone_imbalance"] == pytest.approx(expected)
