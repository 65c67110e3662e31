"""``genbench serve``: the OpenAI images API (``POST /v1/images/generations``) in front of a trained run, so a
local model and a remote service go through the same client (``genbench generate``) and the same numbers.

- A prompt maps to a class through the class names of the run's shards (a digit's name is also its English
  word: "a handwritten digit seven" asks for class 7); an unconditional run ignores the prompt.
- Requests that arrive together are sampled in one network call of up to the model's ``sample_batch_size``
  images (``Batcher``): sixteen clients asking for one image each cost one forward pass, not sixteen.
- Bounded, with the API's own error shapes: ``n``, prompt length, body size (413), requests in flight (429
  with Retry-After), the run's own size only (400 naming ``size``), a bearer key (401).
- Bound to loopback by default. Bound to any other address it refuses to start without a key, read from the
  environment variable ``--api-key-env`` names (never from the command line, where ``ps`` would show it).
- SIGTERM and Ctrl-C stop it cleanly: aiohttp's runner finishes the requests in flight, then exits.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from aiohttp import web

from pipeline.data.imageops import png_bytes
from pipeline.data.prompts import MAX_PROMPT_CHARS
from pipeline.services import LOOPBACK

log = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class ServeError(RuntimeError):
    """The server cannot start as asked, with the fix."""


@dataclass
class ServeOptions:
    run: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str = "GENBENCH_API_KEY"
    max_n: int = 10  # the OpenAI API's own limit per request
    max_body_bytes: int = 64 * 1024
    max_in_flight: int = 64  # requests being sampled at once; more get 429
    body_timeout: float = 10.0  # seconds a client may take to send its body (a stalled one gets 408)
    seed: int = 0
    device: str = "cpu"
    first_stage: Optional[str] = None  # a latent model's first stage where it is now (moved), else the recorded one


def api_error(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
              code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> web.Response:
    """An error the way the OpenAI API shapes it, so SDKs raise their usual exception classes."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class PromptClasses:
    """Prompt text -> class index through the class names (whole words, case-insensitive)."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names
        self.aliases: dict[str, int] = {}
        for index, name in enumerate(class_names):
            self.aliases[name.lower()] = index
            if name.isdigit() and int(name) < len(DIGIT_WORDS):
                self.aliases[DIGIT_WORDS[int(name)]] = index

    def __call__(self, prompt: str) -> int:
        text = prompt.lower()
        found = {i for alias, i in self.aliases.items() if re.search(rf"(?<!\w){re.escape(alias)}(?!\w)", text)}
        if len(found) != 1:
            what = "names none" if not found else f"names several ({sorted(self.class_names[i] for i in found)})"
            raise ValueError(f"the prompt {what} of this model's classes {self.class_names}; name exactly one")
        return found.pop()


class Batcher:
    """Collects concurrent requests and samples them together, up to ``max_batch`` images per network call.
    One sampling thread: the model is never run by two requests at once."""

    def __init__(self, model: Any, max_batch: int, seed: int) -> None:
        self.model, self.max_batch, self.seed = model, max_batch, seed
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="sample")
        self.next_index = 0  # every image gets its own noise: sample i of the server's life is (seed, i)
        self.calls = 0

    async def sample(self, labels: list[Optional[int]]) -> torch.Tensor:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((labels, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        carry = None  # a request that did not fit the last batch: it starts the next one
        while True:
            items = [carry if carry is not None else await self.queue.get()]
            carry = None
            size = len(items[0][0])
            while not self.queue.empty():
                item = self.queue.get_nowait()
                if size + len(item[0]) > self.max_batch:
                    carry = item
                    break
                items.append(item)
                size += len(item[0])
            labels = [label for request, _ in items for label in request]
            first, self.next_index = self.next_index, self.next_index + len(labels)
            self.calls += 1
            try:
                images = await loop.run_in_executor(self.pool, self._sample, labels, first)
            except Exception as e:  # answered as a 500 to each waiting request, the server goes on
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for request, future in items:
                if not future.done():  # its client may have gone away
                    future.set_result(images[start:start + len(request)])
                start += len(request)

    def _sample(self, labels: list[Optional[int]], first: int) -> torch.Tensor:
        y = torch.tensor(labels, dtype=torch.long) if self.model.conditional else None
        return self.model.sample(len(labels), labels=y, seed=self.seed, first_index=first)


def _key(opts: ServeOptions) -> Optional[str]:
    key = os.environ.get(opts.api_key_env) or None
    if key is not None and not key.strip():  # an empty-looking key would be one anyone can guess
        raise ServeError(f"the environment variable {opts.api_key_env} holds only whitespace; set a real key, or "
                         "unset it on 127.0.0.1")
    if key is None and opts.host not in LOOPBACK:
        raise ServeError(f"genbench serve --host {opts.host} would answer anyone who can reach this node; set a key "
                         f"in the environment variable {opts.api_key_env} (clients send it as a bearer token), or "
                         "bind 127.0.0.1")
    return key


def build_app(opts: ServeOptions) -> web.Application:
    from pipeline.benchmark.stage import load_run_model
    from pipeline.data.manifest import load_manifest

    key = _key(opts)
    run_dir = Path(opts.run)
    model, config, _ = load_run_model(run_dir, opts.device, first_stage=opts.first_stage)
    if not model.samples:
        raise ServeError(f"{run_dir} is a {model.family} run, a first stage with nothing to sample; serve a latent "
                         "model trained on it (model.init_args.first_stage) instead")
    class_names = list(load_manifest(config["data"]["init_args"]["shards"]).get("class_names") or [])
    if model.conditional and len(class_names) < model.num_classes:
        class_names = [str(i) for i in range(model.num_classes)]
    classes = PromptClasses(class_names[:model.num_classes]) if model.conditional else None
    own_size = f"{model.image_size}x{model.image_size}"
    batcher = Batcher(model, model.sample_batch_size, opts.seed)
    in_flight = 0

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path == "/health":
            return await handler(request)
        if key is not None:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
                return api_error(401, "Incorrect API key provided.", code="invalid_api_key")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return api_error(413, f"the request body is larger than {opts.max_body_bytes} bytes")
        except ConnectionError:  # the client went away (closed, reset) before its body arrived: no one to answer
            log.info("client %s disconnected before its request was read", request.remote)
            return web.Response(status=400)

    async def generations(request: web.Request) -> web.Response:
        nonlocal in_flight
        if request.content_length is not None and request.content_length > opts.max_body_bytes:
            return api_error(413, f"the request body is larger than {opts.max_body_bytes} bytes")
        try:
            # bounded in time: a client that stalls half-way through its body holds a connection, not the
            # server (the in-flight bound below counts requests being sampled, not ones still arriving)
            raw = await asyncio.wait_for(request.read(), opts.body_timeout)
        except asyncio.TimeoutError:
            return api_error(408, f"the request body did not arrive within {opts.body_timeout:g} s")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return api_error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return api_error(400, "the body must be a JSON object")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return api_error(400, "'prompt' is required (and more than whitespace)", param="prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            return api_error(400, f"'prompt' is longer than {MAX_PROMPT_CHARS} characters", param="prompt")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= opts.max_n:
            return api_error(400, f"'n' must be an integer from 1 to {opts.max_n}", param="n")
        size = body.get("size") or own_size
        if size not in (own_size, "auto"):
            return api_error(400, f"'{size}' is not a supported size: this model makes {own_size} only", param="size")
        if body.get("response_format", "b64_json") != "b64_json":
            return api_error(400, "this server answers response_format b64_json only", param="response_format")
        try:
            label = classes(prompt) if classes is not None else None
        except ValueError as e:
            return api_error(400, str(e), param="prompt")
        if in_flight >= opts.max_in_flight:
            return api_error(429, f"more than {opts.max_in_flight} requests in flight; retry shortly",
                             type_="rate_limit_exceeded", headers={"Retry-After": "1"})
        in_flight += 1
        try:
            images = await batcher.sample([label] * n)
        except Exception as e:  # a sampling failure: the API's server-error shape, and the server stays up
            return api_error(500, f"sampling failed: {type(e).__name__}: {e}", type_="server_error")
        finally:
            in_flight -= 1
        data = [{"b64_json": base64.b64encode(png_bytes(img)).decode(), "revised_prompt": None} for img in images]
        return web.json_response({"created": int(time.time()), "data": data})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "run": run_dir.name, "family": model.family, "size": own_size,
                                  "conditional": model.conditional, "classes": class_names if classes else None,
                                  "sampling_calls": batcher.calls, "images": batcher.next_index})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": run_dir.name, "object": "model",
                                                              "owned_by": "genbench"}]})

    async def start_batcher(app: web.Application):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.pool.shutdown(wait=True)

    app = web.Application(middlewares=[guard], client_max_size=opts.max_body_bytes)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.cleanup_ctx.append(start_batcher)
    return app


def serve(opts: ServeOptions) -> None:
    app = build_app(opts)

    def announce(text: str) -> None:
        print(f"serving {opts.run} at http://{opts.host}:{opts.port}/v1 (POST /v1/images/generations, "
              f"GET /health); Ctrl-C or SIGTERM stops it", flush=True)

    web.run_app(app, host=opts.host, port=opts.port, print=announce, access_log=None, handle_signals=True,
                shutdown_timeout=10)
