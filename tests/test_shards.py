"""Shards on disk: round trip, manifest, verification, foreign shards and sources."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datamodule import ShardDataModule
from pipeline.data.manifest import ShardError, load_manifest, verify_shards
from pipeline.data.shards import parse_shard_size, split_indices, write_shards
from pipeline.data.sources import DigitsSource, FolderSource, SourceError, open_source
from pipeline.io import sha256_file


def _read_all(shards, split):
    dm = ShardDataModule(str(shards), batch_size=64, num_workers=0, shuffle_buffer=0)
    out = {}
    for batch in dm.stream(split, False, 64):
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            out[key] = (image.permute(1, 2, 0).numpy(), int(label))
    return out


def test_round_trip_images_labels_attributes(digits_shards):
    source = DigitsSource()
    manifest = load_manifest(digits_shards)
    seen = {}
    for split in ("train", "val"):
        seen.update(_read_all(digits_shards, split))
    assert len(seen) == len(source) == 1797
    for key, (image, label) in seen.items():
        original = source[int(key)]
        np.testing.assert_array_equal(image, original.image)
        assert label == original.label
    # attributes travel in the .json entry
    with tarfile.open(digits_shards / manifest["splits"]["val"]["shards"][0]["file"]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        attrs = json.loads(tar.extractfile(member).read())
        assert attrs == {"source_id": f"digits:{int(member.name.split('.')[0])}"}


def test_manifest_counts_checksums_and_histogram(digits_shards):
    manifest = load_manifest(digits_shards)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["num_samples"], val["num_samples"]) == (1617, 180)
    assert [s["num_samples"] for s in train["shards"]] == [400, 400, 400, 400, 17]
    assert train["image_size"] == [8, 8] and train["channels"] == 1
    assert sum(train["label_histogram"]) + sum(val["label_histogram"]) == 1797
    labels = DigitsSource().labels
    assert np.array_equal(np.array(train["label_histogram"]) + val["label_histogram"], np.bincount(labels))
    for s in train["shards"]:
        assert s["sha256"] == sha256_file(digits_shards / s["file"])
    assert manifest["class_names"] == [str(i) for i in range(10)]


def test_split_is_deterministic_and_disjoint():
    a, b = split_indices(1797, 0.1, 7), split_indices(1797, 0.1, 7)
    assert np.array_equal(a["val"], b["val"]) and np.array_equal(a["train"], b["train"])
    assert not set(a["val"]) & set(a["train"]) and len(a["val"]) + len(a["train"]) == 1797
    assert not np.array_equal(split_indices(1797, 0.1, 8)["val"], a["val"])


def test_shard_size_in_samples_or_bytes(tmp_path):
    assert parse_shard_size("5000") == (5000, 1 << 62)
    assert parse_shard_size("64MB") == (1 << 62, 64_000_000)
    assert parse_shard_size("1GiB") == (1 << 62, 1 << 30)
    with pytest.raises(ValueError, match="shard-size"):
        parse_shard_size("lots")
    manifest = write_shards(DigitsSource(), tmp_path / "by-bytes", shard_size="40kB", progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["bytes"] <= 40_000 + 10_240 for s in shards)  # + end-of-archive record padding


def test_verify_reports_tampered_and_missing_shards(tmp_path):
    out = tmp_path / "d"
    write_shards(DigitsSource(), out, shard_size=500, progress=False)
    assert verify_shards(out, progress=False) == []
    data = (out / "train-000001.tar").read_bytes()
    (out / "train-000001.tar").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    (out / "train-000002.tar").unlink()
    problems = {p.shard.rsplit("/", 1)[-1]: p.problem for p in verify_shards(out, progress=False)}
    assert set(problems) == {"train-000001.tar", "train-000002.tar"}
    assert "sha256" in problems["train-000001.tar"] and problems["train-000002.tar"] == "missing"
    with pytest.raises(ShardError, match="train-000002.tar"):
        load_manifest(out)


def test_prepare_refuses_to_overwrite_and_leaves_no_partial_directory(tmp_path):
    out = tmp_path / "d"
    write_shards(DigitsSource(), out, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(DigitsSource(), out, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_hand_written_tarfile_shard_is_read(tmp_path):
    """A shard written with Python's tarfile in the WebDataset convention, no manifest, loads."""
    rng = np.random.default_rng(0)
    images = {f"{i:06d}": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(10)}
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tar:
        for i, (key, img) in enumerate(images.items()):
            _add(tar, f"{key}.png", _png(img))
            _add(tar, f"{key}.cls", str(i % 3).encode())
    manifest = load_manifest(tmp_path)
    assert manifest["splits"]["train"]["num_samples"] == 10
    assert manifest["splits"]["train"]["image_size"] == [16, 16] and manifest["splits"]["train"]["channels"] == 3
    read = _read_all(tmp_path, "train")
    assert set(read) == set(images)
    for i, (key, img) in enumerate(images.items()):
        np.testing.assert_array_equal(read[key][0], img)
        assert read[key][1] == i % 3


def test_shards_without_a_manifest_are_identified_by_their_bytes(tmp_path):
    """An image edited inside a foreign tar, size unchanged, must change the data's identity: the reference
    caches (statistics, auditor) are keyed by it, and a stale one would score against the old images."""
    from pipeline.benchmark.images import ShardImages

    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tar:
        for i in range(6):
            _add(tar, f"{i:06d}.png", _png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    path = tmp_path / "train-000000.tar"
    shard = load_manifest(tmp_path)["splits"]["train"]["shards"][0]
    assert shard["sha256"] == sha256_file(path)
    before = ShardImages(tmp_path).content_hash
    with tarfile.open(path) as tar:
        offset = tar.getmember("000003.png").offset_data
    data = bytearray(path.read_bytes())
    data[offset + 40] ^= 0xFF  # one byte inside one member's PNG data; every header and size unchanged
    path.write_bytes(bytes(data))
    assert load_manifest(tmp_path)["splits"]["train"]["num_samples"] == 6
    assert ShardImages(tmp_path).content_hash != before


def _folder(root, images):
    root.mkdir()
    for name, array in images.items():
        Image.fromarray(array).save(root / name)
    return FolderSource(root)


def test_prepare_names_the_odd_image_and_the_option_that_fixes_it(tmp_path, caplog):
    gray, rgb = np.full((8, 8), 90, np.uint8), np.full((8, 8, 3), 200, np.uint8)
    sizes = _folder(tmp_path / "sizes", {"a.png": gray, "b.png": np.zeros((10, 12), np.uint8)})
    with pytest.raises(ValueError, match=r"folder:.*/sizes/b.png is 12x10 but folder:.*/sizes/a.png is 8x8; "
                                         r"pass --image-size S"):
        write_shards(sizes, tmp_path / "out1", val_fraction=0.0, progress=False)
    mixed = _folder(tmp_path / "mixed", {"a.png": gray, "b.png": rgb})
    with pytest.raises(ValueError, match=r"b.png has 3 channel\(s\) but .*a.png has 1; pass --channels 1 "
                                         r"\(grayscale\) or --channels 3 \(RGB\)"):
        write_shards(mixed, tmp_path / "out2", val_fraction=0.0, progress=False)
    # --channels converts: gray becomes three equal channels, RGB the ITU-R 601 luma
    manifest = write_shards(mixed, tmp_path / "rgb", val_fraction=0.0, progress=False, channels=3)
    assert manifest["splits"]["train"]["channels"] == 3 and manifest["prepare"]["channels"] == 3
    read = {k: v[0] for k, v in _read_all(tmp_path / "rgb", "train").items()}
    assert sorted(np.unique(image).tolist()[0] for image in read.values()) == [90, 200]
    gray_manifest = write_shards(mixed, tmp_path / "gray", val_fraction=0.0, progress=False, channels=1)
    assert gray_manifest["splits"]["train"]["channels"] == 1
    plain = write_shards(sizes, tmp_path / "plain", val_fraction=0.0, progress=False, image_size=8)
    assert "channels" not in plain["prepare"]  # unset: the manifest hash stays as it was
    # the default fit is the central square: the 12x10 image keeps its proportions, and nothing is said
    assert plain["prepare"]["resize"] == "center-crop" and plain["splits"]["train"]["image_size"] == [8, 8]
    assert not any("aspect ratio" in r.getMessage() for r in caplog.records)
    # a stretch of a non-square image says so
    write_shards(sizes, tmp_path / "stretched", val_fraction=0.0, progress=False, image_size=8, resize_mode="stretch")
    assert any("changed the aspect ratio of 1 of 2 images" in r.getMessage() and "b.png (12x10)" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="--resize 'random-crop': use one of center-crop, stretch"):
        write_shards(sizes, tmp_path / "r", image_size=8, resize_mode="random-crop")


def test_folder_source_with_class_subfolders_and_flat(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "lab" / cls / f"{i}.png")
    (tmp_path / "flat").mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(tmp_path / "flat" / "a.png")
    labelled = open_source(f"folder:{tmp_path / 'lab'}")
    assert labelled.class_names == ["cat", "dog"] and [labelled[i].label for i in range(6)] == [0, 0, 0, 1, 1, 1]
    flat = FolderSource(tmp_path / "flat")
    assert flat.class_names == [] and flat[0].label is None and flat[0].image.shape == (12, 12, 1)
    manifest = write_shards(labelled, tmp_path / "out", val_fraction=0.0, image_size=8, progress=False)
    assert manifest["splits"]["train"]["image_size"] == [8, 8] and "val" not in manifest["splits"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        FolderSource(tmp_path / "empty")


def test_torchvision_source_without_files_names_root_and_download_command(tmp_path):
    with pytest.raises(SourceError) as err:
        open_source("torchvision:CIFAR10", root=str(tmp_path / "nothing-here"))
    assert str(tmp_path / "nothing-here") in str(err.value) and "--download" in str(err.value)
    with pytest.raises(SourceError, match="unknown source"):
        open_source("imagenet")


def test_preparing_the_same_data_twice_gives_the_same_checksums(tmp_path):
    from pipeline.data.manifest import manifest_hash

    a = write_shards(DigitsSource(), tmp_path / "a", shard_size=700, progress=False)
    b = write_shards(DigitsSource(), tmp_path / "b", shard_size=700, progress=False)
    hashes = [[s["sha256"] for s in m["splits"]["train"]["shards"]] for m in (a, b)]
    assert hashes[0] == hashes[1]
    assert manifest_hash(a) == manifest_hash(b)
    c = write_shards(DigitsSource(), tmp_path / "c", shard_size=700, seed=1, progress=False)
    assert manifest_hash(c) != manifest_hash(a)


def test_png_compression_level_changes_bytes_not_pixels(tmp_path):
    stored = write_shards(DigitsSource(), tmp_path / "l0", png_compression=0, progress=False)
    deflated = write_shards(DigitsSource(), tmp_path / "l9", png_compression=9, progress=False)
    from pipeline.data.tarstream import iter_members

    def png_bytes(directory):  # tar padding hides the difference for 8x8 images: count the PNGs themselves
        return sum(len(data) for name, data in iter_members(str(directory / "val-000000.tar")) if name.endswith(".png"))

    assert png_bytes(tmp_path / "l0") > png_bytes(tmp_path / "l9")
    assert stored["prepare"]["png_compression"] == 0 and deflated["prepare"]["png_compression"] == 9
    a, b = _read_all(tmp_path / "l0", "val"), _read_all(tmp_path / "l9", "val")
    assert a.keys() == b.keys() and all(np.array_equal(a[k][0], b[k][0]) for k in a)
    with pytest.raises(ValueError, match="png-compression"):
        write_shards(DigitsSource(), tmp_path / "bad", png_compression=10, progress=False)
