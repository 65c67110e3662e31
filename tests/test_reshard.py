"""``genbench prepare --from PATTERN``: another tool's tars (mixed sizes and modes, labels as names, one broken
image, no manifest) streamed from a real HTTP server on 127.0.0.1 and re-sharded with a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shard_server import ShardServer
from test_foreign_images import _bands, _encode, _write_tar

from conftest import genbench
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.manifest import load_manifest, manifest_hash
from pipeline.data.reshard import in_val
from pipeline.data.tarstream import iter_samples

NAMES = ["tabby", "beagle", "heron"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """3 shards x 20 samples of every size and mode, labelled by name in .txt; sample 5 of shard 1 is broken."""
    images = [(_bands(40, 20), "JPEG"), (_bands(20, 50, "RGBA"), "PNG"), (_bands(33, 33, "CMYK"), "JPEG"),
              (_bands(64, 64, "L"), "PNG"), (_bands(50, 40), "WEBP")]
    root = tmp_path / "corpus"
    root.mkdir()
    for s in range(3):
        samples = []
        for i in range(20):
            image, fmt = images[(s + i) % len(images)]
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
            data = b"not an image" if (s, i) == (1, 5) else _encode(image, fmt)
            samples.append({ext: data, "txt": NAMES[(s * 20 + i) % 3].encode(),
                            "json": json.dumps({"caption": f"picture {s}-{i}"}).encode()})
        _write_tar(root / f"part-{s:05d}.tar", samples)
    return root


def test_prepare_from_a_url_pattern_reshards_with_a_manifest(corpus, tmp_path):
    with ShardServer(corpus) as server:
        pattern = server.url + "/part-{00000..00002}.tar"
        args = ["prepare", "--from", pattern, "--image-size", "16", "--channels", "3", "--label-key", "txt",
                "--val-fraction", "0.25", "--shard-size", "20"]
        first = genbench(*args, "--out", str(tmp_path / "a"))
        assert first.returncode == 0, first.stderr[-2000:]
        assert "skipped 1 sample(s) that do not decode" in first.stdout
        again = genbench(*args, "--out", str(tmp_path / "b"))
        assert again.returncode == 0, again.stderr[-2000:]
        assert any(method == "GET" for method, _, _ in server.log)
    manifest = load_manifest(tmp_path / "a")
    assert manifest_hash(manifest) == manifest_hash(load_manifest(tmp_path / "b"))  # the same split every time
    assert manifest["class_names"] == NAMES  # in the order they first appear
    assert manifest["source"] == f"shards:{pattern}" and manifest["skipped_samples"] == {
        f"{pattern.split('{')[0]}00001.tar": 1}
    splits = manifest["splits"]
    assert splits["train"]["num_samples"] + splits["val"]["num_samples"] == 59
    expected_val = sum(in_val(0, f"{server.url}/part-{s:05d}.tar", f"sample{i:05d}", 0.25)
                       for s in range(3) for i in range(20) if (s, i) != (1, 5))
    assert splits["val"]["num_samples"] == expected_val and 1 <= expected_val <= 35  # 25% of 59, give or take
    assert all(info["image_size"] == [16, 16] and info["channels"] == 3 for info in splits.values())
    samples = [s for shard in sorted((tmp_path / "a").glob("train-*.tar")) for s in iter_samples(str(shard))]
    assert len(samples) == splits["train"]["num_samples"]
    for sample in samples:  # each keeps where it came from, its own attributes and its label
        attributes = json.loads(sample["json"])
        s, i = int(attributes["source_shard"][-9:-4]), int(attributes["source_key"][-5:])
        assert attributes["source_shard"] == f"{server.url}/part-{s:05d}.tar"
        assert attributes["caption"] == f"picture {s}-{i}"
        assert not in_val(0, attributes["source_shard"], attributes["source_key"], 0.25)
        assert int(sample["cls"]) == (s * 20 + i) % 3  # NAMES[k] first appears as the k-th sample
    dm = ShardDataModule(str(tmp_path / "a"), batch_size=8, num_workers=0)
    batch = next(iter(dm.stream("train", True, 8)))
    assert batch["image"].shape == (8, 3, 16, 16)


def test_prepare_from_refuses_what_it_cannot_read(corpus, tmp_path):
    both = genbench("prepare", "digits", "--from", str(corpus), "--out", str(tmp_path / "x"))
    assert both.returncode == 2 and "SOURCE or --from PATTERN (one of them)" in both.stderr
    missing = genbench("prepare", "--from", str(corpus / "part-{00000..00009}.tar"), "--out", str(tmp_path / "y"))
    assert missing.returncode == 2 and "part-00003.tar does not exist" in missing.stderr
    assert not (tmp_path / "y").exists()
    mixed = genbench("prepare", "--from", str(corpus), "--out", str(tmp_path / "z"), "--label-key", "txt")
    assert mixed.returncode == 2 and "pass --image-size S to resize every image" in mixed.stderr
    assert not list(tmp_path.glob(".z.partial-*")) and not (tmp_path / "z").exists()  # nothing half-written
