"""Prompt suites: the prompts a text-to-image generator is asked, one entry per prompt.

A suite is a JSONL file (one JSON object per line) or a YAML list. Each entry has ``prompt`` (required) and
optionally ``id`` (default: its position, ``p0000``...), ``label`` (a class index or class name: the class the
prompt asks for, for the conditional audit against a labelled reference), ``group`` (what the demographic audit
splits by, e.g. the occupation a prompt names) and ``attributes`` (free-form, recorded). A bad entry fails with
its file and line number. The suite's hash (sha256 of the file's bytes) goes into every record scored from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

FIELDS = ("prompt", "id", "label", "group", "attributes")
MAX_PROMPT_CHARS = 4000  # the OpenAI images API's limit for gpt-image; DALL-E 3 takes 4000 too


class PromptSuiteError(ValueError):
    """A prompt suite that cannot be read, naming the file and line."""


@dataclass(frozen=True)
class Prompt:
    prompt: str
    id: str
    label: Optional[int | str] = None
    group: Optional[str] = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}


@dataclass(frozen=True)
class PromptSuite:
    path: str
    sha256: str
    prompts: tuple[Prompt, ...]

    @property
    def has_groups(self) -> bool:
        return any(p.group is not None for p in self.prompts)

    @property
    def has_labels(self) -> bool:
        return any(p.label is not None for p in self.prompts)

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "num_prompts": len(self.prompts),
                "groups": sorted({p.group for p in self.prompts if p.group is not None})}


def _entry(raw: Any, where: str, position: int) -> Prompt:
    if isinstance(raw, str):  # a YAML list of plain strings is a suite too
        raw = {"prompt": raw}
    if not isinstance(raw, dict):
        raise PromptSuiteError(f"{where}: expected an object with a `prompt`, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise PromptSuiteError(f"{where}: unknown field(s) {unknown}; an entry has {', '.join(FIELDS)}")
    text = raw.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise PromptSuiteError(f"{where}: `prompt` is missing or empty; every entry needs the text to send")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptSuiteError(f"{where}: the prompt has {len(text)} characters; the images API takes at most "
                               f"{MAX_PROMPT_CHARS}")
    label = raw.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
        raise PromptSuiteError(f"{where}: `label` must be a class index or a class name, got {label!r}")
    group = raw.get("group")
    if group is not None and not isinstance(group, str):
        raise PromptSuiteError(f"{where}: `group` must be a string, got {group!r}")
    attributes = raw.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise PromptSuiteError(f"{where}: `attributes` must be an object, got {attributes!r}")
    pid = str(raw.get("id", f"p{position:04d}"))
    if not pid or any(c in pid for c in "/\\\0") or pid.startswith("."):
        raise PromptSuiteError(f"{where}: id {pid!r} cannot name a file; use letters, digits, - and _")
    return Prompt(text, pid, label, group, attributes)


def load_prompts(path: str | Path) -> PromptSuite:
    """Read and check a suite (``.jsonl``, or ``.yaml``/``.yml``/``.json`` holding a list)."""
    path = Path(path)
    if not path.is_file():
        raise PromptSuiteError(f"prompt suite {path} does not exist; see prompts/ for the shipped suites")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # (a byte-order mark, as some editors write, is not part of the text)
    except UnicodeDecodeError as e:
        row = data[:e.start].count(b"\n") + 1
        column = e.start - data.rfind(b"\n", 0, e.start)
        raise PromptSuiteError(f"{path}:{row}:{column}: byte 0x{data[e.start]:02x} is not UTF-8; save the suite as "
                               "UTF-8 (iconv -f latin1 -t utf-8 converts a Latin-1 file)") from None
    entries: list[tuple[Any, str]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entries.append((json.loads(line), f"{path}:{number}"))
            except json.JSONDecodeError as e:
                raise PromptSuiteError(f"{path}:{number}: not valid JSON ({e.msg}); one object per line") from e
    else:
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PromptSuiteError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(loaded, list):
            raise PromptSuiteError(f"{path}: a YAML suite is a list of entries, got {type(loaded).__name__}")
        # YAML loses line numbers after parsing; the entry's position is what the message can name
        entries = [(raw, f"{path}: entry {i + 1}") for i, raw in enumerate(loaded)]
    prompts = [_entry(raw, where, i) for i, (raw, where) in enumerate(entries)]
    if not prompts:
        raise PromptSuiteError(f"{path} holds no prompts")
    seen: dict[str, str] = {}
    for prompt, (_, where) in zip(prompts, entries):
        if prompt.id in seen:
            raise PromptSuiteError(f"{where}: id {prompt.id!r} is used twice (first at {seen[prompt.id]})")
        seen[prompt.id] = where
    return PromptSuite(str(path), hashlib.sha256(data).hexdigest(), tuple(prompts))


def label_index(label: Optional[int | str], class_names: Optional[Sequence[str]]) -> Optional[int]:
    """A prompt's label as a class index: an int, a digit string, or one of the reference's class names."""
    if label is None:
        return None
    if isinstance(label, int):
        return label
    if label.lstrip("-").isdigit():
        return int(label)
    names = list(class_names or [])
    if label in names:
        return names.index(label)
    raise PromptSuiteError(f"label {label!r} is neither a class index nor one of the class names {names}")
