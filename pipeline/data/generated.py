"""The on-disk layout of an image set a generator behind an API made (``genbench generate``), and how the
benchmark reads it back:

    DIR/generation.json     what made the set: service, model, size, prompt suite (path, sha256), totals
    DIR/images/<id>-<k>.png image k of prompt <id>
    DIR/meta/<id>.jsonl     one per prompt, append-only: a first line with the prompt entry, then one line per
                            outcome: an image (revised prompt, creation time, requests made, latency, the
                            task id), a refusal or a failure with its message, or a task the service took
                            and had not finished (its id and where to poll: the next run asks about it)

An image counts as done when its meta file has an ``image`` line for it and its PNG exists, so a rerun requests
exactly the images that are missing. A later line for the same image supersedes an earlier one (a success after
a failure). PNGs are written to a temporary name and renamed; meta lines are appended whole and flushed, so a
killed run leaves at most a torn last line, which reading skips. Appending keeps the per-image bookkeeping
O(1): rewriting a growing JSON file per image cost the client 0.7 ms of CPU per image, half of what the SDK
itself costs (benchmarks/api_throughput.py).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.data.prompts import Prompt, label_index

GENERATION_FILE = "generation.json"
IMAGES, META = "images", "meta"


def image_name(prompt_id: str, k: int) -> str:
    return f"{prompt_id}-{k:04d}.png"


def meta_path(directory: Path, prompt_id: str) -> Path:
    return directory / META / f"{prompt_id}.jsonl"


def is_generated_set(directory: str | Path) -> bool:
    return (Path(directory) / GENERATION_FILE).is_file()


def read_meta(directory: Path, prompt_id: str) -> Optional[dict[str, Any]]:
    """A prompt's meta file folded into ``{"prompt", ..., "images": [...], "refused": [...], "failed": [...],
    "pending": [...], "history": [...]}`` (each list by image index, the latest line per image winning; history:
    every line); None when there is none yet."""
    path = meta_path(directory, prompt_id)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # a line torn by a kill mid-write: that outcome was never recorded
                break
            raise ValueError(f"{path}:{number} is damaged ({e}); delete the file and rerun genbench generate to "
                             "request that prompt's images again") from e
    if not entries or "prompt" not in entries[0]:
        raise ValueError(f"{path} does not start with its prompt entry; delete it and rerun genbench generate")
    latest: dict[int, dict[str, Any]] = {}
    for entry in entries[1:]:
        latest[entry["index"]] = entry
    # "history": every outcome line in order, superseded ones too (a paid image rejected, then made again, was
    # paid for twice: the totals count both)
    folded: dict[str, Any] = {**entries[0], "images": [], "refused": [], "failed": [], "pending": [],
                              "history": entries[1:]}
    for index in sorted(latest):
        entry = dict(latest[index])
        folded[entry.pop("event")].append(entry)
    return folded


class MetaLog:
    """Appends a prompt's outcomes to its meta file, one flushed line each, from any thread. The file is opened
    per line (a suite of 10,000 prompts would otherwise hold 10,000 descriptors) and created, with its prompt
    line first, by the first outcome."""

    EVENTS = ("images", "refused", "failed", "pending")

    def __init__(self, directory: Path, header: dict[str, Any]) -> None:
        self.path = meta_path(directory, header["prompt"]["id"])
        self.header = header
        self.lock = threading.Lock()

    def record(self, event: str, entry: dict[str, Any]) -> None:
        assert event in self.EVENTS, event
        with self.lock:
            lines = [] if self.path.exists() else [self.header]
            lines.append({"event": event, **entry})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))


@dataclass(frozen=True)
class GeneratedImage:
    file: str  # relative to DIR/images
    prompt: Prompt
    index: int  # k: which image of its prompt


def generated_images(directory: str | Path) -> tuple[dict[str, Any], list[GeneratedImage]]:
    """(generation.json, every done image with its prompt entry, in file order)."""
    directory = Path(directory)
    info = json.loads((directory / GENERATION_FILE).read_text())
    images: list[GeneratedImage] = []
    for path in sorted((directory / META).glob("*.jsonl")):
        meta = read_meta(directory, path.stem)
        assert meta is not None
        prompt = Prompt(**meta["prompt"])
        for image in meta.get("images", []):
            if (directory / IMAGES / image["file"]).is_file():
                images.append(GeneratedImage(image["file"], prompt, image["index"]))
    images.sort(key=lambda g: g.file)
    return info, images


def labels_of(images: Sequence[GeneratedImage], class_names: Optional[Sequence[str]]) -> Optional[list[int]]:
    """The class each image's prompt asked for, or None when no prompt of the set names one."""
    if not any(g.prompt.label is not None for g in images):
        return None
    out = []
    for g in images:
        index = label_index(g.prompt.label, class_names)
        out.append(-1 if index is None else index)
    return out
