"""Bad data, as a hostile new user brings it: damaged PNGs in shards, shards changed after prepare, 16-bit and
EXIF-rotated images, images beside class folders, decompression bombs. Every input is built here."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, genbench
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.imagefile import ImageError, ImageTooLarge, check_png, decode_tensor, load_image
from pipeline.data.manifest import ShardError, index_foreign_shards
from pipeline.data.tarstream import iter_samples
from pipeline.io import cache_dir, sha256_file

VAE = str(REPO / "experiments" / "digits" / "vae.yaml")


# -- PNGs built byte by byte ----------------------------------------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bytes(width: int, height: int, idat: bytes, depth: int = 8, colour: int = 0, interlace: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _adam7_png(image: np.ndarray) -> bytes:
    """An interlaced 8-bit grayscale PNG (Pillow writes none): the seven Adam7 passes, filter 0 on every row."""
    height, width = image.shape
    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = image[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    return _png_bytes(width, height, zlib.compress(raw), interlace=1)


def _bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a few bytes of image data: PIL and a careless reader
    believe the header and allocate for it."""
    return _png_bytes(width, height, zlib.compress(b"\0" * 1024))


def _encode(array: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _flip_idat_byte(png: bytes, offset: int = 30, fix_crc: bool = False) -> bytes:
    """One byte of the image data flipped (a bit-rotted or badly re-encoded file); ``fix_crc`` also rewrites the
    chunk's CRC, as a tool that re-wraps damaged data does, so that only the zlib stream is wrong."""
    data = bytearray(png)
    i = data.find(b"IDAT")
    length = struct.unpack(">I", data[i - 4:i])[0]
    data[i + 4 + offset % length] ^= 0xFF
    if fix_crc:
        data[i + 4 + length:i + 8 + length] = struct.pack(">I", zlib.crc32(bytes(data[i:i + 4 + length])))
    return bytes(data)


# -- decoding a damaged PNG raises; it never crashes the process ----------------------------------------------


FUZZ = textwrap.dedent("""
    import io, random, struct, sys, zlib
    import numpy as np
    from PIL import Image
    from pipeline.data.imagefile import ImageError, decode_tensor
    rng, r = np.random.default_rng(0), random.Random(0)
    refused = decoded = 0
    for trial in range(int(sys.argv[1])):
        mode = ("L", "RGB", "RGBA", "P", "I;16")[trial % 5]
        h, w = r.randint(1, 12), r.randint(1, 12)
        if mode == "I;16":
            im = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
        else:
            arr = rng.integers(0, 255, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
            im = Image.fromarray(arr if mode == "RGBA" else arr[:, :, 0] if mode in "LP" else arr)
            im = im.convert("P") if mode == "P" else im
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=r.choice([0, 6]))
        data = bytearray(buf.getvalue())
        kind = r.random()
        if kind < 0.4:  # any bit anywhere
            data[r.randrange(8, len(data))] ^= 1 << r.randrange(8)
        elif kind < 0.8:  # inside the image data, with the CRC made to match
            i = data.find(b"IDAT"); n = struct.unpack(">I", data[i - 4:i])[0]
            data[i + 4 + r.randrange(n)] = r.randrange(256)
            data[i + 4 + n:i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(data[i:i + 4 + n])))
        else:  # truncated
            data = data[:r.randrange(8, len(data))]
        try:
            decode_tensor(bytes(data), 3 if trial % 2 else 1)
            decoded += 1
        except ImageError:
            refused += 1
    print(decoded, refused)
""")


def test_damaged_pngs_raise_image_error_and_never_crash_the_process():
    # before: torchvision's decode_png on a flipped IDAT byte printed "libpng error" and died of SIGSEGV (139)
    proc = subprocess.run([sys.executable, "-c", FUZZ, "1500"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    decoded, refused = map(int, proc.stdout.split())
    assert decoded + refused == 1500 and refused > 1400, (decoded, refused)  # a flip in a pixel value decodes


@pytest.mark.parametrize("fix_crc", [False, True])
def test_a_flipped_idat_byte_is_named_as_damage(fix_crc):
    png = _encode(np.arange(64, dtype=np.uint8).reshape(8, 8))
    with pytest.raises(ImageError, match="damaged"):
        decode_tensor(_flip_idat_byte(png, fix_crc=fix_crc), 1)


def test_intact_pngs_of_every_layout_decode_to_the_pixels_pil_reads():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (11, 13), dtype=np.uint8)
    cases = {
        "gray": _encode(gray, compress_level=0),
        "gray, compressed": _encode(gray, compress_level=9),
        "rgb": _encode(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)),
        "rgba": _encode(rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)),
        "1x1": _encode(gray[:1, :1]),
        "interlaced": _adam7_png(gray),
        "interlaced 3x2": _adam7_png(gray[:2, :3]),
    }
    palette = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).convert("P").save(palette, format="PNG")
    cases["palette"] = palette.getvalue()
    for name, data in cases.items():
        with Image.open(io.BytesIO(data)) as im:
            expected = np.asarray(im.convert("RGB"))  # (to gray, libpng and PIL round differently)
        check_png(data)
        assert np.array_equal(decode_tensor(data, 3).permute(1, 2, 0).numpy(), expected), name


def test_16_bit_images_are_scaled_by_their_bit_depth_everywhere():
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    png = _encode(values)
    expected = np.rint(values / 257.0).astype(np.uint8)  # 65535 / 255 = 257 exactly; before: [0, 255, 255, ...]
    assert expected.tolist() == [[0, 1, 4, 128, 255]]
    assert decode_tensor(png, 1)[0].numpy().tolist() == expected.tolist()
    assert load_image(io.BytesIO(png))[:, :, 0].tolist() == expected.tolist()
    assert (load_image(io.BytesIO(png), channels=3) == expected[:, :, None]).all()


def _oriented(array: np.ndarray, fmt: str) -> bytes:
    """``array`` saved with EXIF orientation 6: "rotate 90 degrees clockwise to display"."""
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6
    return _encode(array, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_is_applied_by_every_reader(fmt):
    array = np.zeros((16, 24, 3), dtype=np.uint8)
    array[:8, :8] = 255  # a white top-left corner
    data = _oriented(array, fmt)
    upright = np.rot90(array, k=-1)  # 90 degrees clockwise: 24 high, 16 wide, the corner at the top right
    for read in (load_image(io.BytesIO(data), 3), decode_tensor(data, 3).permute(1, 2, 0).numpy()):
        assert read.shape == upright.shape
        assert np.abs(read.astype(int) - upright).max() < 40  # lossy formats: near, not equal


def test_images_above_the_pixel_limit_are_refused_from_the_header(tmp_path):
    huge, bomb = _bomb(13000, 13000), _bomb(40000, 40000)
    for data in (huge, bomb):
        for read in (lambda d: decode_tensor(d, 1), lambda d: load_image(io.BytesIO(d))):
            with pytest.raises(ImageTooLarge, match="megapixels, above the limit of 64"):
                read(data)
    with pytest.raises(ImageTooLarge, match="above the limit of 0.0001"):
        decode_tensor(_encode(np.zeros((20, 20), np.uint8)), 1, max_pixels=100)

    # a folder of another tool's shards is indexed from its first image's shape: a bomb there is not a crash
    with tarfile.open(tmp_path / "part-0.tar", "w") as tar:
        for name, body in (("a.png", bomb), ("a.cls", b"0"), ("b.png", _encode(np.zeros((3, 3), np.uint8)))):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    index_foreign_shards(tmp_path)


# -- shards -------------------------------------------------------------------------------------------------


def _rewrite_shard(directory: Path, file: str, change) -> None:
    """Rewrite shard ``file`` with ``change(name, data) -> data`` applied to every member, and record the new
    bytes in the manifest: data that was bad when it was prepared, as far as the manifest knows."""
    path = directory / file
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            data = change(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            if shard["file"] == file:
                shard["sha256"], shard["bytes"] = sha256_file(path), path.stat().st_size
    manifest_path.write_text(json.dumps(manifest))


def test_loader_skips_and_counts_huge_and_damaged_images_in_a_shard(digits_shards, tmp_path):
    shards = tmp_path / "digits"
    shutil.copytree(digits_shards, shards)
    file = "val-000000.tar"
    keys = [s["__key__"] for s in iter_samples(str(shards / file))]
    huge, damaged = keys[5], keys[9]

    def change(name, data):
        if name == f"{huge}.png":
            return _bomb(13000, 13000)
        return _flip_idat_byte(data, fix_crc=True) if name == f"{damaged}.png" else data

    _rewrite_shard(shards, file, change)
    dm = ShardDataModule(str(shards), batch_size=16, num_workers=0)
    stream = dm.stream("val", False, 16)
    batches = list(stream)
    seen = [k for b in batches for k in b["key"]]
    assert sorted(seen) == sorted(set(keys) - {huge, damaged})
    assert sum(stream.skipped.values()) == 2 and sum(b["skipped"] for b in batches) == 2


def test_fit_goes_on_past_a_damaged_png_and_records_the_skip(digits_shards, tmp_path):
    """A flipped IDAT byte in a training shard, read by a real loader worker process: the run finishes and
    run.json counts the skipped sample. Before: "libpng error: IDAT: incorrect data check", a worker killed by
    SIGSEGV, and the run dead."""
    shards = tmp_path / "digits"
    shutil.copytree(digits_shards, shards)
    first = next(iter_samples(str(shards / "train-000000.tar")))["__key__"]
    _rewrite_shard(shards, "train-000000.tar", lambda name, data: _flip_idat_byte(data) if name == f"{first}.png"
                   else data)
    proc = genbench("fit", "--config", VAE, f"--run.root={tmp_path / 'runs'}", f"--data.init_args.shards={shards}",
                    "--data.init_args.num_workers=1", "--trainer.max_steps=30", "--tracking.wandb=false",
                    "--data.init_args.shuffle_buffer=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping corrupt sample {first}" in proc.stderr and "damaged" in proc.stderr
    (run_json,) = (tmp_path / "runs").glob("*/run.json")
    record = json.loads(run_json.read_text())
    assert record["status"] == "finished" and record["data"]["verify"] == "first"
    # 30 steps of 64 read all 400 samples of train-000000 at least once: the damaged one was met at least once
    assert record["data"]["skipped_samples"]["train"] >= 1
    assert f"skipped {record['data']['skipped_samples']['train']} corrupt train" in proc.stderr


def _flip_pixel_byte(shard: Path) -> None:
    """One pixel byte of a stored PNG changed in place: same size, new bytes (bit rot, a bad copy)."""
    data = bytearray(shard.read_bytes())
    i = data.find(b"IDAT")
    data[i + 40] ^= 0x01
    shard.write_bytes(bytes(data))


def test_a_shard_whose_bytes_changed_is_refused_before_the_run_records_its_identity(digits_shards, tmp_path):
    shards = tmp_path / "digits"
    shutil.copytree(digits_shards, shards)
    _flip_pixel_byte(shards / "train-000002.tar")
    proc = genbench("fit", "--config", VAE, f"--run.root={tmp_path / 'runs'}", f"--data.init_args.shards={shards}",
                    "--data.init_args.num_workers=0", "--trainer.max_steps=5", "--tracking.wandb=false")
    assert proc.returncode != 0
    assert "train-000002.tar has sha256" in proc.stderr and "genbench prepare --verify" in proc.stderr
    assert not list((tmp_path / "runs").glob("*/run.json")), "a run recorded the identity of data it did not have"


def test_verify_first_hashes_once_and_catches_a_later_change(digits_shards, tmp_path):
    shards = tmp_path / "digits"
    shutil.copytree(digits_shards, shards)
    ShardDataModule(str(shards)).setup("fit")  # hashed now; a marker remembers it
    markers = list((cache_dir() / "verified-shards").iterdir())
    assert len(markers) == 6  # 5 train shards and 1 val
    ShardDataModule(str(shards)).setup("fit")  # trusted: size, mtime and inode unchanged
    _flip_pixel_byte(shards / "val-000000.tar")
    with pytest.raises(ShardError, match="val-000000.tar has sha256"):
        ShardDataModule(str(shards)).setup("fit")
    ShardDataModule(str(shards), verify="never").setup("fit")  # sizes only: the user's choice
    with pytest.raises(ValueError, match="data.verify='sometimes': use one of first, always, never"):
        ShardDataModule(str(shards), verify="sometimes")


# -- prepare folder: ----------------------------------------------------------------------------------------


def test_prepare_folder_scales_16_bit_applies_exif_and_skips_what_it_cannot_use(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    deep = np.array([[1000, 32768], [65535, 0]], dtype=np.uint16)
    (root / "a" / "deep.png").write_bytes(_encode(deep))
    corner = np.zeros((2, 2), dtype=np.uint8)
    corner[0, 0] = 255
    (root / "a" / "turned.png").write_bytes(_oriented(corner, "PNG"))
    (root / "b" / "plain.png").write_bytes(_encode(np.full((2, 2), 7, np.uint8)))
    (root / "b" / "bomb.png").write_bytes(_bomb(40000, 40000))
    (root / "b" / "huge.png").write_bytes(_bomb(13000, 13000))
    (root / "b" / "cut.png").write_bytes(_encode(np.full((2, 2), 9, np.uint8))[:30])
    (root / "b" / "big.png").write_bytes(_encode(np.zeros((40, 40), np.uint8)))
    proc = genbench("prepare", f"folder:{root}", "--out", str(tmp_path / "out"), "--val-fraction", "0",
                    "--image-size", "2", "--max-pixels", "1000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = manifest["skipped_images"]
    assert sorted(skipped) == ["b/big.png", "b/bomb.png", "b/cut.png", "b/huge.png"], skipped
    assert "above the limit of 0.001" in skipped["b/big.png"] and "megapixels" in skipped["b/bomb.png"]
    assert "skipped 4 image(s) that cannot be used" in proc.stdout
    assert manifest["splits"]["train"]["num_samples"] == 3
    samples = {json.loads(s["json"])["source_id"]: np.asarray(Image.open(io.BytesIO(s["png"])))
               for shard in sorted((tmp_path / "out").glob("train-*.tar")) for s in iter_samples(str(shard))}
    assert samples["a/deep.png"].tolist() == np.rint(deep / 257.0).astype(np.uint8).tolist()  # before: all 255
    assert samples["a/turned.png"].tolist() == np.rot90(corner, k=-1).tolist()  # the corner at the top right


def test_prepare_folder_refuses_images_beside_class_folders_naming_them(tmp_path):
    root = tmp_path / "photos"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        (root / cls / "1.png").write_bytes(_encode(np.zeros((4, 4), np.uint8)))
    (root / "stray.png").write_bytes(_encode(np.zeros((4, 4), np.uint8)))
    (root / "notes.txt").write_text("not an image")
    proc = genbench("prepare", f"folder:{root}", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "1 image(s) beside them with no class: stray.png" in proc.stderr and "subfolder" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_prepare_from_a_corpus_with_a_bomb_skips_and_counts_it(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with tarfile.open(corpus / "part-00000.tar", "w") as tar:
        for i in range(6):
            data = _bomb(40000, 40000) if i == 2 else _encode(np.full((4, 4), i * 10, np.uint8))
            for ext, body in (("png", data), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    # a folder of foreign shards without a manifest is indexed from its first image: the bomb is not first here
    proc = genbench("prepare", "--from", str(corpus), "--out", str(tmp_path / "out"), "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 sample(s)" in proc.stdout and "megapixels" in proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 5


# -- prepare --from: what another tool's tars hold ----------------------------------------------------------


def _foreign_tar(path: Path, gz: bool = False) -> None:
    """Six labelled samples, then a symbolic and a hard link to one of them, and one key again, apart."""
    mode = "w:gz" if gz else "w"
    with tarfile.open(path, mode) as tar:
        def add(name: str, body: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))

        for i in range(6):
            add(f"s{i:04d}.png", _encode(np.full((4, 4), i * 10, np.uint8)))
            add(f"s{i:04d}.cls", str(i % 2).encode())
        for kind, name in ((tarfile.SYMTYPE, "s0006.png"), (tarfile.LNKTYPE, "s0007.png")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "s0000.png"
            tar.addfile(link)
        add("s0002.png", _encode(np.full((4, 4), 99, np.uint8)))  # key s0002 again, after others


def test_prepare_from_counts_links_and_duplicate_names(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _foreign_tar(corpus / "part-00000.tar")
    proc = genbench("prepare", "--from", str(corpus), "--out", str(tmp_path / "out"), "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    shard = str(corpus / "part-00000.tar")
    assert manifest["skipped_links"] == {shard: 2}  # before: dropped without a word
    assert manifest["duplicate_names"] == {shard: 2}  # s0002.png as a member name, and s0002 as a sample
    assert "s0006.png is a symbolic link" in proc.stderr and "--hard-dereference" in proc.stderr
    assert "found 2 link member(s)" in proc.stdout and "found 2 duplicate member or sample name(s)" in proc.stdout
    # the later s0002 has no label of its own: unlabelled or not, it is a sample that is counted, never hidden
    assert manifest["splits"]["train"]["num_samples"] == 7


def test_prepare_from_reads_gzip_tars_and_file_urls(tmp_path):
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    packed.mkdir()
    _foreign_tar(plain / "part-00000.tar")
    _foreign_tar(packed / "part-00000.tar.gz", gz=True)
    outs = {}
    for name, source in (("plain", str(plain)), ("gz", str(packed)),  # before: "bad header checksum"
                         ("url", (packed / "part-00000.tar.gz").as_uri())):  # before: "does not exist"
        out = tmp_path / f"out-{name}"
        proc = genbench("prepare", "--from", source, "--out", str(out), "--val-fraction", "0")
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        outs[name] = [(s["png"], s.get("cls")) for shard in sorted(out.glob("train-*.tar"))
                      for s in iter_samples(str(shard))]
    assert len(outs["plain"]) == 7 and outs["plain"] == outs["gz"] == outs["url"]  # the same samples, same bytes
    with pytest.raises(ShardError, match="another host"):
        from pipeline.data.reshard import expand_shards

        expand_shards("file://elsewhere/data/part-{0..9}.tar")
