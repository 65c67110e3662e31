"""Mistyped keys in an experiment, explained: the key, where it was given, and the closest valid one
("--trainer.max_step: did you mean --trainer.max_steps?"), instead of jsonargparse's dump of type unions."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from pytorch_lightning import Trainer

from pipeline.data.datamodule import ShardDataModule
from pipeline.fit.options import BenchmarkOptions, PrepareOptions, RunOptions, TrackingOptions

GROUPS = {"run": RunOptions, "prepare": PrepareOptions, "benchmark": BenchmarkOptions, "tracking": TrackingOptions}
TOP_LEVEL = ("seed_everything", "config", "dry_run", "model", "data", "trainer", *GROUPS)

_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.+)")
_GROUP_OPTION = re.compile(r"Group '([\w.]+)' does not accept option '([\w.]+)'")
_CLASS_OPTION = re.compile(r"Problem with given class_path '([\w.]+)':\s+Option '([\w.]+)' is not accepted")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')


def parameters(cls: type) -> list[str]:
    """The keyword arguments a class takes, its bases' included (a family passes its own to the base)."""
    names: list[str] = []
    for klass in inspect.getmro(cls):
        if klass is object or "__init__" not in vars(klass):
            continue
        for name, p in inspect.signature(vars(klass)["__init__"]).parameters.items():
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in names:
                names.append(name)
    return names


def _class(path: str) -> Optional[type]:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def valid_keys(model_class: Optional[str] = None, data_class: Optional[str] = None) -> list[str]:
    """Every dotted key an experiment may set."""
    keys = list(TOP_LEVEL) + [f"trainer.{p}" for p in parameters(Trainer)]
    keys += [f"{g}.{f.name}" for g, dc in GROUPS.items() for f in fields(dc)]
    model = _class(model_class) if model_class else None
    if model is not None:
        keys += [f"model.init_args.{p}" for p in parameters(model)]
    data = (_class(data_class) if data_class else None) or ShardDataModule
    keys += [f"data.init_args.{p}" for p in parameters(data)]
    return keys


def _closest(key: str, candidates: Iterable[str]) -> Optional[str]:
    found = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def config_files(args: list[str]) -> list[Path]:
    """The ``--config`` files of a command line, in order."""
    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    return [Path(p) for p in paths + [a.split("=", 1)[1] for a in args if a.startswith("--config=")]]


def _where(key: str, args: list[str]) -> str:
    """``--key`` when the command line set it, else the config file that holds it."""
    if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in args):
        return f"--{key}"
    for path in config_files(args):
        node: Any = yaml.safe_load(path.read_text()) if path.is_file() else None
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return f"{path}: {key}"
    return key


def _classes(args: list[str]) -> tuple[Optional[str], Optional[str]]:
    """The model and data class paths the experiment names (last one wins, as in jsonargparse)."""
    found: dict[str, Optional[str]] = {"model": None, "data": None}
    for path in config_files(args):
        config = yaml.safe_load(path.read_text()) if path.is_file() else None
        for group in found:
            node = config.get(group) if isinstance(config, dict) else None
            if isinstance(node, dict) and node.get("class_path"):
                found[group] = node["class_path"]
    for a in args:
        for group in found:
            if a.startswith(f"--{group}.class_path=") or a.startswith(f"--{group}="):
                found[group] = a.split("=", 1)[1]
    return found["model"], found["data"]


def explain(message: str, args: list[str]) -> Optional[str]:
    """A short error for an unknown key, with the closest valid one; None when ``message`` is about something else."""
    model_class, data_class = _classes(args)
    bad: Optional[str] = None
    if m := _UNRECOGNIZED.search(message):
        bad = m.group(1).split()[0].lstrip("-").split("=", 1)[0]
    elif m := _GROUP_OPTION.search(message):
        bad = f"{m.group(1)}.{m.group(2)}"
    elif m := _CLASS_OPTION.search(message):
        group = (_PARSER_KEY.search(message) or re.search(r"(model|data)", message))
        prefix = group.group(1) if group else "model"
        bad = f"{prefix}.init_args.{m.group(2)}"
        if prefix == "model":
            model_class = m.group(1)
        else:
            data_class = m.group(1)
    if bad is None:
        return None
    keys = valid_keys(model_class, data_class)
    guess = _closest(bad, keys)
    where = _where(bad, args)
    flag = where.startswith("--")
    hint = f"did you mean {'--' if flag else ''}{guess}?" if guess else \
        "genbench fit --help lists every key, genbench fit --config FILE --dry-run prints the resolved config"
    return f"{where}: unknown key; {hint}"
