"""``label_key`` is read by one rule (pipeline/data/labels.py): training on another tool's corpus directly and on
its ``prepare --from`` copy gives every sample the same label."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.labels import read_label
from pipeline.data.reshard import reshard
from pipeline.data.stream import NO_LABEL, ShardStream
from pipeline.data.tarstream import iter_samples

# per sample: txt, json attributes (None: no .json), cls; None leaves the entry out
NAMED = [("cat", {"name": "dog", "idx": 4}, "7"), ("dog", {"name": "cat", "idx": 0}, "2"),
         (None, {"idx": 9}, None), ("cat", None, "7"), ("bird", {"name": "dog"}, "5")]
NUMBERED = [("3", {"name": "12"}, "1"), ("0", {"name": "-1"}, "0"), (None, {}, "4")]


def _corpus(path, rows) -> None:
    path.mkdir()
    with tarfile.open(path / "part-0.tar", "w") as tar:
        for i, (txt, attributes, cls) in enumerate(rows):
            image = io.BytesIO()
            Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(image, format="PNG")
            entries = {"png": image.getvalue(), "txt": txt, "cls": cls,
                       "json": None if attributes is None else json.dumps(attributes)}
            for ext, value in entries.items():
                if value is not None:
                    data = value if isinstance(value, bytes) else value.encode()
                    info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("rows,label_key", [(NAMED, "txt"), (NAMED, "json:name"), (NAMED, "json:idx"),
                                            (NAMED, "cls"), (NUMBERED, "txt"), (NUMBERED, "json:name")],
                         ids=["names-txt", "names-json", "ints-json", "digits-cls", "digits-txt", "digits-json"])
def test_a_corpus_and_its_reshard_label_every_sample_alike(tmp_path, rows, label_key):
    _corpus(tmp_path / "corpus", rows)
    manifest = reshard(str(tmp_path / "corpus"), tmp_path / "out", val_fraction=0.0, label_key=label_key,
                       progress=False)
    assert not manifest.get("skipped_samples")
    copied = {}
    for shard in sorted((tmp_path / "out").glob("train-*.tar")):
        for sample in iter_samples(str(shard)):
            source = json.loads(sample["json"])["source_key"]
            copied[source] = int(sample["cls"]) if "cls" in sample else NO_LABEL
    direct = {}
    stream = ShardStream([str(tmp_path / "corpus" / "part-0.tar")], batch_size=len(rows), channels=1,
                         image_size=(8, 8), train=False, label_key=label_key,
                         class_names=manifest.get("class_names"))
    for batch in stream:
        direct.update(zip(batch["key"], batch["label"].tolist()))
    assert stream.skipped == {}, "a sample was dropped instead of read as unlabelled"
    assert copied == direct and len(direct) == len(rows)


def test_the_rule():
    assert read_label({"txt": b" 12\n"}, "txt", None) == 12  # digits are an index in any entry
    assert read_label({"txt": b"tabby cat"}, "txt", None) == "tabby cat"
    assert read_label({"json": b'{"label": 3}'}, "json", "label") == 3
    assert read_label({"json": b'{"other": 3}'}, "json", "label") is None  # unlabelled, not corrupt
    assert read_label({"png": b""}, "cls", None) is None
    for bad in (b'{"label": 0.5}', b'{"label": true}', b'{"label": ""}', b'{"label": [1]}'):
        with pytest.raises(ValueError, match="neither a class index nor a class name"):
            read_label({"json": bad}, "json", "label")
