"""``genbench generate``: ask an OpenAI-compatible images endpoint for K images per prompt of a suite and write
them as a generated set (``pipeline.data.generated``) the benchmark can score.

The openai SDK does the HTTP: it retries 408/409/429/5xx, timeouts and dropped connections with exponential
backoff and jitter, honouring ``Retry-After``, and never retries another 4xx, which is the policy a paid service
wants. Here is what the SDK does not know: a content-policy refusal is a result (recorded against its prompt,
counted, the run goes on); a bad key, a wrong model or a malformed request would fail every prompt, so it stops
the run at once; an image that still fails after the retries, or that comes back undecodable or at the wrong
size, is recorded as failed and requested again by the next run of the same command, which resumes: images
already on disk are never paid for twice.

One image per request (DALL-E 3 takes only n=1), ``--concurrency`` requests in flight. The API key is read
from an environment variable and never written, logged or put in an error message.
"""

from __future__ import annotations

import base64
import io
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

REFUSAL_CODES = ("content_policy_violation", "moderation_blocked")  # DALL-E's and gpt-image's


class GenerateError(RuntimeError):
    """The run cannot go on (bad key, unknown model, a request the service rejects): names the fix."""


@dataclass
class GenerateOptions:
    api_base: str
    model: str
    prompts: str
    out: str
    images_per_prompt: int = 1
    size: Optional[str] = None  # "1024x1024"; None: the service's default (then no size check)
    quality: Optional[str] = None
    response_format: Optional[str] = "b64_json"  # None: send none (gpt-image always answers b64_json)
    concurrency: int = 4
    max_retries: int = 4
    timeout: float = 120.0
    api_key_env: str = "OPENAI_API_KEY"
    price_per_image: Optional[float] = None
    retry_refused: bool = False
    progress: bool = True


@dataclass
class Outcome:
    """Totals of one `genbench generate` invocation."""

    requested: int = 0
    done: int = 0
    refused: int = 0
    failed: int = 0
    retries: int = 0
    skipped_existing: int = 0
    wall_seconds: float = 0.0


def redact(text: str, secret: Optional[str]) -> str:
    return text.replace(secret, "***") if secret else text


def _api_key(opts: GenerateOptions) -> tuple[str, bool]:
    """(key, whether it came from the environment). A loopback endpoint (genbench serve) needs none."""
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


def _expected_size(size: Optional[str]) -> Optional[tuple[int, int]]:
    if not size or size == "auto":
        return None
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError as e:
        raise GenerateError(f"--size {size!r}: use WIDTHxHEIGHT, e.g. 1024x1024") from e
    return w, h


def _decode(item: Any, expected: Optional[tuple[int, int]], download: Any) -> bytes:
    """The PNG bytes of one response item (b64_json, else its url); ValueError says what is wrong with it."""
    if getattr(item, "b64_json", None):
        try:
            raw = base64.b64decode(item.b64_json, validate=True)
        except (ValueError, TypeError) as e:
            raise ValueError(f"b64_json is not valid base64 ({e})") from e
    elif getattr(item, "url", None):
        raw = download(item.url)
    else:
        raise ValueError("the response item has neither b64_json nor url")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            if expected is not None and image.size != expected:
                raise ValueError(f"asked for {expected[0]}x{expected[1]} but got {image.size[0]}x{image.size[1]}")
            if image.format == "PNG":
                return raw
            buf = io.BytesIO()  # JPEG/WebP from the service: stored losslessly as what was received, in PNG
            image.save(buf, "PNG")
            return buf.getvalue()
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"the image does not decode ({e})") from e


class _PromptLog:
    """One prompt's outcomes so far (read back from its meta file) and the appender of new ones."""

    def __init__(self, directory: Path, prompt: Prompt, settings: dict[str, Any]) -> None:
        old = read_meta(directory, prompt.id)
        if old is not None and old["prompt"] != prompt.to_json():
            raise GenerateError(f"{meta_path(directory, prompt.id)} holds another prompt under id {prompt.id!r}; the "
                                "suite changed since these images were made: use a new --out")
        old = old or {"images": [], "refused": []}
        self.done = {i["index"] for i in old["images"] if (directory / IMAGES / i["file"]).is_file()}
        self.refused = {r["index"] for r in old["refused"]}
        self.log = MetaLog(directory, {"prompt": prompt.to_json(), **settings})


def _client(opts: GenerateOptions, key: str):
    import openai

    return openai.OpenAI(api_key=key, base_url=opts.api_base, max_retries=opts.max_retries, timeout=opts.timeout)


def _downloader(opts: GenerateOptions):
    import httpx

    # connection-level retries only; an image URL that answers an error is a failed image
    client = httpx.Client(timeout=opts.timeout, transport=httpx.HTTPTransport(retries=opts.max_retries),
                          follow_redirects=True)

    def download(url: str) -> bytes:
        try:
            response = client.get(url)
        except httpx.HTTPError as e:  # a dead host, a refused or dropped connection: this image failed
            raise ValueError(f"downloading the image URL {public_url(url)} failed after {opts.max_retries} "
                             f"retries ({type(e).__name__}: {e})") from None
        if response.status_code != 200:
            raise ValueError(f"downloading the image URL {public_url(url)} answered {response.status_code}")
        return response.content

    return client, download


def _settings_of(opts: GenerateOptions, suite: PromptSuite) -> dict[str, Any]:
    return {"api_base": public_url(opts.api_base), "model": opts.model, "size": opts.size, "quality": opts.quality,
            "prompt_suite": suite.describe(), "images_per_prompt": opts.images_per_prompt}


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
    for key in ("api_base", "model", "size", "quality"):
        if old.get(key) != settings[key]:
            raise GenerateError(f"{out} holds images made with {key} {old.get(key)!r}, not {settings[key]!r}; "
                                "one set per generator: pass another --out")
    if old["prompt_suite"]["sha256"] != settings["prompt_suite"]["sha256"]:
        raise GenerateError(f"{out} was made from another version of the prompt suite "
                            f"({old['prompt_suite']['path']}); pass another --out")
    return old


def generate(opts: GenerateOptions) -> Outcome:
    """Request every missing image of the suite; returns the totals. Raises GenerateError when the run must stop
    (what is on disk stays, and the same command resumes)."""
    if opts.images_per_prompt < 1 or opts.concurrency < 1 or opts.max_retries < 0:
        raise GenerateError("--images-per-prompt and --concurrency must be at least 1, --max-retries at least 0")
    suite = load_prompts(opts.prompts)
    key, from_env = _api_key(opts)
    expected = _expected_size(opts.size)
    out = Path(opts.out)
    settings = _settings_of(opts, suite)
    old = _check_same_set(out, settings)
    logs = {p.id: _PromptLog(out, p, {k: settings[k] for k in ("model", "size", "quality")}) for p in suite.prompts}
    todo = [(p, k) for p in suite.prompts for k in range(opts.images_per_prompt)
            if k not in logs[p.id].done and (opts.retry_refused or k not in logs[p.id].refused)]
    outcome = Outcome(requested=len(todo),
                      skipped_existing=len(suite.prompts) * opts.images_per_prompt - len(todo))
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    # the settings first: a run killed at any point leaves a set that says what made it (and a run with another
    # --model into the same --out is refused), never images of unknown origin
    _write_generation(out, settings, old, Outcome(), opts)
    old = _check_same_set(out, settings)
    client = _client(opts, key)  # before the clock starts: importing the SDK takes seconds, once
    http, download = _downloader(opts)
    bar = progress(len(todo), f"generate {opts.model}", "img", enabled=opts.progress)
    fatal: list[BaseException] = []  # the first error that stops the run; every task checks it before requesting
    lock = threading.Lock()

    def one(prompt: Prompt, k: int) -> None:
        import openai

        if fatal:
            return
        t0 = time.perf_counter()
        kwargs: dict[str, Any] = {"model": opts.model, "prompt": prompt.prompt, "n": 1}
        for name in ("size", "quality", "response_format"):
            if getattr(opts, name):
                kwargs[name] = getattr(opts, name)
        log, retries = logs[prompt.id].log, 0
        try:
            raw = client.images.with_raw_response.generate(**kwargs)
            retries = raw.retries_taken
            response = _images_response(raw, opts)
            png = _decode(response.data[0], expected, download)
            # renamed into place (atomic for readers and against a killed process), not fsynced: a power cut may
            # cost a rerun the last few images, which it requests again
            atomic_write_bytes(out / IMAGES / image_name(prompt.id, k), png, durable=False)
            item = response.data[0]
            log.record("images", {"index": k, "file": image_name(prompt.id, k), "created": response.created,
                                  "revised_prompt": getattr(item, "revised_prompt", None), "requests": retries + 1,
                                  "latency_s": round(time.perf_counter() - t0, 3)})
            kind = "done"
        except openai.BadRequestError as e:
            if _error_code(e) not in REFUSAL_CODES:
                fatal.append(GenerateError(_status_text(opts, e, key, from_env)))
                return
            log.record("refused", {"index": k, "code": _error_code(e), "message": redact(_message(e), key)})
            kind = "refused"
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
                openai.UnprocessableEntityError) as e:
            fatal.append(GenerateError(_status_text(opts, e, key, from_env)))
            return
        except GenerateError as e:  # not an images API at all (an HTML page, another JSON): every prompt would fail
            fatal.append(GenerateError(redact(str(e), key)))
            return
        except (openai.APIStatusError, openai.APIConnectionError, ValueError) as e:
            # retries spent (429/5xx/timeouts/dropped connections) or a bad image: this image failed, others go on
            text = _status_text(opts, e, key, from_env) if isinstance(e, openai.APIError) else str(e)
            log.record("failed", {"index": k, "error": redact(text, key)})
            kind = "failed"
        except Exception as e:  # anything else (a full disk): stop, keeping what is done
            fatal.append(GenerateError(redact(f"{type(e).__name__}: {e}", key)))
            return
        with lock:
            setattr(outcome, kind, getattr(outcome, kind) + 1)
            outcome.retries += retries
            bar.update(1)
            _postfix(bar, f"{outcome.refused} refused, {outcome.failed} failed, {outcome.retries} retries")

    started = time.time()
    try:
        with ThreadPoolExecutor(opts.concurrency, thread_name_prefix="generate") as pool:
            try:
                for _ in pool.map(lambda task: one(*task), todo):
                    pass
            except BaseException:  # Ctrl-C: the queued tasks see it and return without requesting
                fatal.append(GenerateError("interrupted"))
                raise
    finally:
        bar.close()
        http.close()
        client.close()
        outcome.wall_seconds = time.time() - started
        _write_generation(out, settings, old, outcome, opts)
    if fatal:
        raise fatal[0]
    return outcome


def _images_response(raw: Any, opts: GenerateOptions) -> Any:
    """The parsed images response of a 200, checked: ``GenerateError`` when the body is not the images API's
    (an HTML login page, another JSON: the wrong --api-base), ``ValueError`` (a failed image, asked again next
    run) when it is but holds no image."""
    import openai.types

    url = f"{public_url(opts.api_base).rstrip('/')}/images/generations"
    http = raw.http_response
    try:
        body = http.json()
    except ValueError:
        kind = http.headers.get("content-type", "no content type")
        raise GenerateError(f"{url} answered 200 with {kind}, not the JSON of an images API "
                            f"({http.text[:80]!r}); check --api-base (it ends in /v1)") from None
    if not isinstance(body, dict) or "data" not in body or not isinstance(body["data"], list):
        shape = f"an object with {sorted(body)[:5]}" if isinstance(body, dict) else f"a JSON {type(body).__name__}"
        raise GenerateError(f"{url} answered 200 with {shape}, not an images response ({{\"data\": [...]}}); "
                            "check --api-base (it ends in /v1)")
    if not body["data"] or not isinstance(body["data"][0], dict):
        raise ValueError(f"{url} answered 200 with no image in its data ({str(body['data'])[:60]})")
    response = raw.parse()
    if not isinstance(response, openai.types.ImagesResponse):
        raise GenerateError(f"{url} answered 200 with {type(response).__name__}, not an images response")
    return response


def _postfix(bar: Any, text: str) -> None:
    if hasattr(bar, "set_postfix_str"):
        bar.set_postfix_str(text, refresh=False)
    else:
        bar.postfix = text


def _error_code(e: Any) -> Optional[str]:
    code = getattr(e, "code", None)
    if code:
        return str(code)
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        return inner.get("code") if isinstance(inner, dict) else None
    return None


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(e, "message", e))


def _status_text(opts: GenerateOptions, e: Any, key: str, from_env: bool) -> str:
    """What went wrong, where, and the fix: the endpoint and the key's variable name, never the key."""
    import openai

    url = f"{public_url(opts.api_base).rstrip('/')}/images/generations"
    if isinstance(e, openai.APITimeoutError):
        text = f"{url}: no answer within --timeout {opts.timeout:g} s after {opts.max_retries} retries"
    elif isinstance(e, openai.APIConnectionError):
        text = f"{url}: connection failed after {opts.max_retries} retries ({e.__cause__ or e})"
    else:
        status = getattr(e, "status_code", "?")
        text = f"{url} answered {status}: {_message(e)}"
        if status in (401, 403):
            where = f"the environment variable {opts.api_key_env}" if from_env else "no key (none was set)"
            text += f" (the key came from {where}; check it is valid for this endpoint)"
        elif status == 404:
            text += f" (is --model {opts.model!r} served there, and does --api-base end in /v1?)"
        elif status in (400, 422):
            text += " (the service rejects the request itself: check --size, --quality and --model)"
        elif status == 429 or (isinstance(status, int) and status >= 500):
            text += f" after {opts.max_retries} retries"
    return redact(text, key)


def _write_generation(out: Path, settings: dict[str, Any], old: dict[str, Any], outcome: Outcome,
                      opts: GenerateOptions) -> None:
    """generation.json: settings and totals over every run into ``out`` (counted from the meta files, so a
    resumed set's totals are its own, not the last invocation's)."""
    metas = [m for m in (read_meta(out, p.stem) for p in sorted((out / META).glob("*.jsonl"))) if m]
    images = sum(len(m["images"]) for m in metas)
    requests = sum(i["requests"] for m in metas for i in m["images"])
    totals = {"images": images, "refused": sum(len(m["refused"]) for m in metas),
              "failed": sum(len(m["failed"]) for m in metas), "requests": requests,
              "wall_seconds": round(old.get("totals", {}).get("wall_seconds", 0.0) + outcome.wall_seconds, 3),
              "price_per_image": opts.price_per_image,
              "cost": None if opts.price_per_image is None else round(images * opts.price_per_image, 6)}
    atomic_write_json(out / GENERATION_FILE, {**settings, "created": old.get("created", time.time()),
                                              "updated": time.time(), "totals": totals})
