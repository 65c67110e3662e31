"""The fast tar reader against Python's tarfile, on tars in every format tarfile writes."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.data.tarstream import TarFormatError, iter_members, iter_samples


def _tar(path, members, fmt):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5  # a float mtime makes the PAX writer add a header
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("a-directory")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)


MEMBERS = [("000001.png", b"\x89PNG" + bytes(range(256)) * 3), ("000001.cls", b"7"),
           ("000002.png", b""), ("000002.cls", b"1"),
           ("deep/" * 30 + "000003.png", b"x" * 513),  # longer than 100 characters: long-name extensions
           ("deep/" * 30 + "000003.cls", b"2")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_what_tarfile_reads(tmp_path, fmt):
    long_name = "p" * 60 + "/" + "q" * 50 + "/000003.png"
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else MEMBERS[:4] + [(long_name, b"z")]
    path = tmp_path / "s.tar"
    _tar(path, members, fmt)
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]
    assert list(iter_members(str(path))) == expected == members


def test_samples_are_grouped_by_key_and_filtered_by_extension(tmp_path):
    path = tmp_path / "s.tar"
    _tar(path, MEMBERS, tarfile.GNU_FORMAT)
    samples = list(iter_samples(str(path), frozenset({"cls"})))
    assert [s["__key__"] for s in samples] == ["000001", "000002", "deep/" * 30 + "000003"]
    assert [s["cls"] for s in samples] == [b"7", b"1", b"2"] and all("png" not in s for s in samples)
    assert all(s["__url__"] == str(path) for s in samples)


def test_truncation_and_garbage_are_errors_not_a_short_archive(tmp_path):
    path = tmp_path / "s.tar"
    _tar(path, MEMBERS, tarfile.GNU_FORMAT)
    data = path.read_bytes()
    for cut in (100, 512, 1024 + 10, len(data) // 2):
        path.write_bytes(data[:cut])
        with pytest.raises(TarFormatError, match="truncated"):
            list(iter_members(str(path)))
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_members(str(path)))
