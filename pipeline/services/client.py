"""``genbench generate``: ask a text-to-image service for K images per prompt of a suite and write them as a
generated set (``pipeline.data.generated``) the benchmark can score.

The protocol of each service is its provider's (``pipeline.services.providers``): the OpenAI images API
(through the openai SDK), an image in a chat completion, Stability's multipart API, Firefly's and FLUX's
submit-and-poll, Midjourney through a task proxy. What is the same for all is here: a content-policy refusal
is a result (recorded against its prompt, counted, the run goes on); a bad key, a wrong model or a malformed
request would fail every prompt, so it stops the run at once; an image that still fails after the retries,
or comes back undecodable or at the wrong size, is recorded as failed and requested again by the next run of
the same command, which resumes: images already on disk are never paid for twice, and a task the service
took is recorded the moment it is taken, so a task still running when a run ends (its deadline, a kill) is
polled again by the next run instead of being submitted again.

``--concurrency`` tasks in flight (a task's submission and its polls hold one slot). The API key is read from an
environment variable and never written, logged or put in an error message.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from PIL import Image

from pipeline.console import progress
from pipeline.data.generated import GENERATION_FILE, IMAGES, META, MetaLog, image_name, meta_path, read_meta
from pipeline.data.prompts import Prompt, PromptSuite, load_prompts
from pipeline.data.remote import public_url
from pipeline.io import atomic_write_bytes, atomic_write_json
from pipeline.services import LOOPBACK
from pipeline.services.options import GenerateOptions
from pipeline.services.providers import PROVIDERS, Answer, GenerateError, Pending, Provider, Refused

__all__ = ["GenerateError", "GenerateOptions", "Outcome", "generate"]

log_ = logging.getLogger(__name__)  # (``log`` names a prompt's MetaLog below)
GRIDS = "grids"  # Midjourney's 2x2 grids, beside the images cut from them

@dataclass
class Outcome:
    """Totals of one `genbench generate` invocation."""

    requested: int = 0
    done: int = 0
    refused: int = 0
    failed: int = 0
    pending: int = 0  # in tasks still running at their deadline: picked up by the next run
    retries: int = 0
    skipped_existing: int = 0
    wall_seconds: float = 0.0


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _provider_class(opts: GenerateOptions) -> type[Provider]:
    if opts.provider not in PROVIDERS:
        raise GenerateError(f"--provider {opts.provider!r}: use one of {', '.join(PROVIDERS)}")
    return PROVIDERS[opts.provider]


def _api_key(opts: GenerateOptions, cls: type[Provider]) -> tuple[str, bool]:
    """(key, whether it came from the environment). A loopback endpoint (genbench serve) or a local generator
    needs none."""
    if not cls.needs_key:
        return "", False
    assert opts.api_base is not None and opts.api_key_env is not None
    key = os.environ.get(opts.api_key_env)
    if key and not key.strip():
        raise GenerateError(f"the environment variable {opts.api_key_env} holds only whitespace; set the key "
                            f"for {public_url(opts.api_base)} there")
    if key:
        return key, True
    if urlsplit(opts.api_base).hostname in LOOPBACK:
        return "no-key", False  # the SDK insists on one; a loopback genbench serve does not check it
    raise GenerateError(f"no API key: set the environment variable {opts.api_key_env} (or name another one with "
                        f"--api-key-env VAR) for {public_url(opts.api_base)}")


def _as_png(raw: bytes, provider: Provider) -> tuple[bytes, str]:
    """The PNG bytes of one image as the service sent it, and the format it came in; ValueError says what is
    wrong with it."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            problem = provider.size_problem(image.size)
            if problem:
                raise ValueError(problem)
            if image.format == "PNG":
                return raw, "PNG"
            # JPEG/WebP from the service: its decoded pixels stored in PNG (no loss beyond the service's own
            # compression, which the recorded format says)
            buf = io.BytesIO()
            image.save(buf, "PNG")
            return buf.getvalue(), str(image.format)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"the image does not decode ({e})") from e


class _PromptLog:
    """One prompt's outcomes so far (read back from its meta file) and the appender of new ones."""

    def __init__(self, directory: Path, prompt: Prompt, settings: dict[str, Any]) -> None:
        old = read_meta(directory, prompt.id)
        if old is not None and old["prompt"] != prompt.to_json():
            raise GenerateError(f"{meta_path(directory, prompt.id)} holds another prompt under id {prompt.id!r}; the "
                                "suite changed since these images were made: use a new --out")
        old = old or {"images": [], "refused": [], "pending": []}
        self.done = {i["index"] for i in old["images"] if (directory / IMAGES / i["file"]).is_file()}
        self.refused = {r["index"] for r in old["refused"]}
        self.pending = {p["index"]: p["task"] for p in old.get("pending", [])}
        self.history: list[dict[str, Any]] = old.get("history", [])
        self.log = MetaLog(directory, {"prompt": prompt.to_json(), **settings})


def _settings_of(opts: GenerateOptions, suite: PromptSuite, provider: Provider) -> dict[str, Any]:
    assert opts.api_base is not None
    return {"provider": opts.provider, "api_base": public_url(opts.api_base), "endpoint": provider.endpoint(),
            "model": opts.model, "name": provider.display_name(), "size": opts.size, "quality": opts.quality,
            "prompt_suite": suite.describe(),
            "images_per_prompt": opts.images_per_prompt, "images_per_task": provider.images_per_task,
            **provider.describe()}


def _check_same_set(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """generation.json of an earlier run into ``out``: it must be the same service, model, size and suite."""
    import json

    path = out / GENERATION_FILE
    if not path.exists():
        if any((out / META).glob("*.jsonl")):  # from a run killed before it wrote its settings: whose?
            raise GenerateError(f"{out} holds generated images but no {GENERATION_FILE}, so what made them is not "
                                "known; pass another --out (or remove this one)")
        return {}
    old = json.loads(path.read_text())
    old.setdefault("provider", "openai")  # sets written before there were providers
    for key in ("provider", "api_base", "model", "size", "quality", *provider_keys(settings)):
        if old.get(key) != settings.get(key):
            if key == "pipeline":
                raise GenerateError(f"{out} holds images of another pipeline or other options (weights sha256 "
                                    f"{str((old.get(key) or {}).get('weights_sha256'))[:12]}..., scheduler, steps, "
                                    "guidance scale, batch size or device differ); one set per generator: pass "
                                    "another --out")
            raise GenerateError(f"{out} holds images made with {key} {old.get(key)!r}, not {settings[key]!r}; "
                                "one set per generator: pass another --out")
    if old["prompt_suite"]["sha256"] != settings["prompt_suite"]["sha256"]:
        raise GenerateError(f"{out} was made from another version of the prompt suite "
                            f"({old['prompt_suite']['path']}); pass another --out")
    return old


def provider_keys(settings: dict[str, Any]) -> tuple[str, ...]:
    """Settings a provider adds (a local pipeline's identity): a set must keep them too."""
    return ("pipeline",) if "pipeline" in settings else ()


def _tasks(suite: PromptSuite, logs: dict[str, _PromptLog], opts: GenerateOptions,
           per_task: int) -> list[tuple[Prompt, int, list[int], Optional[dict[str, Any]]]]:
    """(prompt, task index, the images still wanted from it, the task an earlier run left running)."""
    tasks = []
    for p in suite.prompts:
        log = logs[p.id]
        for t in range(-(-opts.images_per_prompt // per_task)):
            span = range(t * per_task, min((t + 1) * per_task, opts.images_per_prompt))
            wanted = [k for k in span if k not in log.done and (opts.retry_refused or k not in log.refused)]
            if wanted:
                tasks.append((p, t, wanted, next((log.pending[k] for k in wanted if k in log.pending), None)))
    return tasks


def generate(opts: GenerateOptions) -> Outcome:
    """Request every missing image of the suite; returns the totals. Raises GenerateError when the run must stop
    (what is on disk stays, and the same command resumes)."""
    if opts.images_per_prompt < 1 or opts.concurrency < 1 or opts.max_retries < 0:
        raise GenerateError("--images-per-prompt and --concurrency must be at least 1, --max-retries at least 0")
    cls = _provider_class(opts)
    opts.api_base = opts.api_base or cls.default_base
    opts.api_key_env = opts.api_key_env or cls.default_key_env
    suite = load_prompts(opts.prompts)
    key, from_env = _api_key(opts, cls)
    provider = cls(opts, key, from_env)  # before the clock starts: importing an SDK takes seconds, once
    out = Path(opts.out)
    settings = _settings_of(opts, suite, provider)
    old = _check_same_set(out, settings)
    logs = {p.id: _PromptLog(out, p, {k: settings[k] for k in ("model", "size", "quality")}) for p in suite.prompts}
    tasks = _tasks(suite, logs, opts, provider.images_per_task)
    wanted = sum(len(t[2]) for t in tasks)
    outcome = Outcome(requested=wanted, skipped_existing=len(suite.prompts) * opts.images_per_prompt - wanted)
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    # the settings first: a run killed at any point leaves a set that says what made it (and a run with another
    # --model into the same --out is refused), never images of unknown origin
    _write_generation(out, settings, old, Outcome(), opts)
    old = _check_same_set(out, settings)
    bar = progress(wanted, f"generate {opts.model}", "img", enabled=opts.progress)
    fatal: list[BaseException] = []  # the first error that stops the run; every task checks it before requesting
    lock = threading.Lock()
    owners = _task_owners(logs, provider.images_per_task)

    def count(kind: str, n: int, retries: int = 0) -> None:
        with lock:
            setattr(outcome, kind, getattr(outcome, kind) + n)
            outcome.retries += retries
            bar.update(n)
            _postfix(bar, f"{outcome.refused} refused, {outcome.failed} failed, {outcome.pending} pending, "
                          f"{outcome.retries} retries")

    def one(prompt: Prompt, t: int, wanted: list[int], task: Optional[dict[str, Any]]) -> None:
        if fatal:
            return
        t0 = time.perf_counter()
        log = logs[prompt.id].log

        def submitted(new: dict[str, Any]) -> None:  # the service took it: on disk before the first poll
            with lock:  # a task id the service (or a proxy) gave another task already: never file its images twice
                owner = owners.setdefault(str(new["id"]), (prompt.id, t))
            if owner != (prompt.id, t):
                raise ValueError(f"the service answered task id {new['id']} for prompt {prompt.id!r} (task {t}), but "
                                 f"it had given that id to prompt {owner[0]!r} (task {owner[1]}): one task's images "
                                 "are never filed under two prompts; this one failed, and the next run submits it "
                                 "again")
            for k in wanted:
                log.record("pending", {"index": k, "task": new})

        try:
            answer = provider.run(prompt, t, task, submitted, time.monotonic() + opts.timeout)
            _store(out, prompt, t, wanted, answer, provider, log, time.perf_counter() - t0, count)
        except Refused as e:
            for k in wanted:
                log.record("refused", {"index": k, "code": e.code, "message": redact(e.message, provider.secrets()),
                                       **({"task_id": e.task_id} if e.task_id else {})})
            count("refused", len(wanted))
        except Pending as e:
            count("pending", len(wanted))
            log_.warning(redact(f"{prompt.id}: {e.reason}; the next run picks it up", provider.secrets()))
        except GenerateError as e:
            fatal.append(GenerateError(redact(str(e), provider.secrets())))
        except ValueError as e:  # retries spent (429/5xx/timeouts/dropped connections) or a bad image
            for k in wanted:
                log.record("failed", {"index": k, "error": redact(str(e), provider.secrets())})
            count("failed", len(wanted))
        except Exception as e:  # anything else (a full disk): stop, keeping what is done
            fatal.append(GenerateError(redact(f"{type(e).__name__}: {e}", provider.secrets())))

    started = time.time()
    try:
        with ThreadPoolExecutor(opts.concurrency, thread_name_prefix="generate") as pool:
            try:
                for _ in pool.map(lambda task: one(*task), tasks):
                    pass
            except BaseException:  # Ctrl-C: the queued tasks see it and return without requesting
                fatal.append(GenerateError("interrupted"))
                raise
    finally:
        bar.close()
        provider.close()
        outcome.wall_seconds = time.time() - started
        _write_generation(out, settings, old, outcome, opts)
    if fatal:
        raise fatal[0]
    return outcome


def _store(out: Path, prompt: Prompt, t: int, wanted: list[int], answer: Answer, provider: Provider, log: MetaLog,
           latency: float, count: Any) -> None:
    """Write the wanted images of a finished task and record each: done, or failed with what is wrong."""
    per_task = provider.images_per_task
    if answer.grid is not None:
        (out / GRIDS).mkdir(exist_ok=True)
        atomic_write_bytes(out / GRIDS / image_name(prompt.id, t), answer.grid, durable=False)
    # the task's requests and the images the service billed count once, on its first entry (an image kept or one
    # rejected here), so that totals are what was made and paid for, kept or not
    paid = {"requests": answer.requests, "billed": answer.billed}
    done = 0
    for k in wanted:
        position = k - t * per_task
        try:
            if position >= len(answer.images):
                raise ValueError(f"the task answered {len(answer.images)} image(s), not {per_task}")
            png, received = _as_png(answer.images[position], provider)
        except ValueError as e:
            log.record("failed", {"index": k, "error": redact(str(e), provider.secrets()), **answer.info, **paid})
            paid = {"requests": 0, "billed": 0}
            count("failed", 1)
            continue
        # renamed into place (atomic for readers and against a killed process), not fsynced: a power cut may
        # cost a rerun the last few images, which it requests again
        atomic_write_bytes(out / IMAGES / image_name(prompt.id, k), png, durable=False)
        extra = {"grid": f"{GRIDS}/{image_name(prompt.id, t)}", "grid_position": position} if answer.grid else {}
        own = answer.per_image[position] if position < len(answer.per_image) else {}
        log.record("images", {"index": k, "file": image_name(prompt.id, k), **answer.info, **own, **extra,
                              "format": received, **paid, "latency_s": round(latency, 3)})
        paid, done = {"requests": 0, "billed": 0}, done + 1
    count("done", done, answer.retries)


def _task_owners(logs: dict[str, _PromptLog], per_task: int) -> dict[str, tuple[str, int]]:
    """Task id -> (prompt id, task index) of every task an earlier run recorded."""
    owners: dict[str, tuple[str, int]] = {}
    for prompt_id, log in logs.items():
        for entry in log.history:
            task_id = entry.get("task_id") or (entry.get("task") or {}).get("id")
            if task_id:
                owners.setdefault(str(task_id), (prompt_id, entry["index"] // per_task))
    return owners


def _postfix(bar: Any, text: str) -> None:
    if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(text, refresh=False)
    else:
        bar.postfix = text


def _write_generation(out: Path, settings: dict[str, Any], old: dict[str, Any], outcome: Outcome,
                      opts: GenerateOptions) -> None:
    """generation.json: settings and totals over every run into ``out`` (counted from the meta files, so a
    resumed set's totals are its own, not the last invocation's)."""
    metas = [m for m in (read_meta(out, p.stem) for p in sorted((out / META).glob("*.jsonl"))) if m]
    images = sum(len(m["images"]) for m in metas)
    # every answer ever recorded, superseded ones too: an image paid for, rejected and made again was paid twice
    answered = [e for m in metas for e in m["history"] if "requests" in e]
    requests = sum(e["requests"] for e in answered)
    # sets written before "billed" recorded requests on kept images only: one billed image each
    billed = sum(e.get("billed", 1 if e["event"] == "images" else 0) for e in answered)
    task_ids = sorted({str(e["task_id"]) for m in metas for e in m["images"] + m["refused"] + m["failed"]
                       if e.get("task_id")} |
                      {str(e["task"]["id"]) for m in metas for e in m["pending"]})
    totals = {"images": images, "refused": sum(len(m["refused"]) for m in metas),
              "failed": sum(len(m["failed"]) for m in metas), "pending": sum(len(m["pending"]) for m in metas),
              "requests": requests, "billed_images": billed, "tasks": len(task_ids), "task_ids": task_ids,
              "wall_seconds": round(old.get("totals", {}).get("wall_seconds", 0.0) + outcome.wall_seconds, 3),
              "price_per_image": opts.price_per_image,
              "cost": None if opts.price_per_image is None else round(billed * opts.price_per_image, 6)}
    atomic_write_json(out / GENERATION_FILE, {**settings, "created": old.get("created", time.time()),
                                              "updated": time.time(), "totals": totals})
