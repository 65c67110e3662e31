"""The on-disk layout of an image set a generator behind an API made (``genbench generate``), and how the
benchmark reads it back:

    DIR/generation.json     what made the set: service, model, size, prompt suite (path, sha256), totals
    DIR/images/<id>-<k>.png image k of prompt <id>
    DIR/meta/<id>.json      one per prompt: the prompt entry and, per image, revised prompt, creation time,
                            requests made and latency; refusals and failures with their message

An image counts as done when ``meta/<id>.json`` lists it and its PNG exists, so a rerun requests exactly the
images that are missing. Every file is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.data.prompts import Prompt, label_index

GENERATION_FILE = "generation.json"
IMAGES, META = "images", "meta"


def image_name(prompt_id: str, k: int) -> str:
    return f"{prompt_id}-{k:04d}.png"


def meta_path(directory: Path, prompt_id: str) -> Path:
    return directory / META / f"{prompt_id}.json"


def is_generated_set(directory: str | Path) -> bool:
    return (Path(directory) / GENERATION_FILE).is_file()


def read_meta(directory: Path, prompt_id: str) -> Optional[dict[str, Any]]:
    path = meta_path(directory, prompt_id)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); delete it and rerun genbench generate to request its "
                         "images again") from e


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
    for path in sorted((directory / META).glob("*.json")):
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
