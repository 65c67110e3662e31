"""Stand-ins for the named services on 127.0.0.1, each following its documented protocol and error shapes
(docs/services.md): Midjourney through a midjourney-proxy/CometAPI task proxy, Stability's v2beta multipart
API, Firefly's v3 async API behind an IMS client-credentials token, BFL's FLUX submit-and-poll, and a chat
completion carrying an image (CometAPI's gpt-4o-image). One threaded server speaks all five; what it answers
depends on words in the prompt:

* ``slow``: the task stays running (IN_PROGRESS / Pending / running) for ``SLOW_POLLS`` polls;
* ``held``: the task runs until the test sets ``server.release`` (a task still running at the deadline);
* ``ratelimit``: the submission answers 429 with ``Retry-After: 1`` twice;
* ``error500``: the first submission answers 500;
* ``refuse``: the provider's refusal (banned prompt, CONTENT_FILTERED, 451, Content Moderated, content_filter);
* ``broken`` (bfl): the finished task's image URL serves a truncated PNG;

and a wrong key is each provider's 401. Firefly's tokens stop working after ``TOKEN_USES`` calls (a token that
expires mid-run). Midjourney's grid is 2x2 images of four grey levels, so the split can be checked.
``paid`` counts the submissions the services would bill, per prompt.

What each answers as its documentation says (issue 41), by more words in the prompt:

* midjourney (midjourney-proxy's ``ReturnCode`` and trueai-org's ``TaskStatus``; CometAPI's "fetch task"):
  ``modal`` / ``cancel`` end the task ``MODAL`` / ``CANCEL``; ``failure9`` answers code 9 (a failure of the
  proxy's) to the first submission; ``dupid`` answers every such submission with one task id (a proxy that
  reuses ids); the task's ``properties.finalPrompt`` is the prompt the proxy ran, with ``--v 7`` appended;
* stability (API reference, "Stable Image Core"): the answer has the documented pixel size of the
  ``aspect_ratio`` sent (3:2 is 1216x832), except for 1:1, answered at 8x8 to keep the tests small (``skewed``:
  16:9's size whatever was asked); the ``seed`` header echoes the seed sent;
* firefly (Firefly API reference, "Generate images asynchronously"): the model is the ``x-model-version`` header
  (image3 when absent; another value is a 400 ``validation_error``) and is recorded per task; ``unsafe`` answers
  the submission 422 ``prompt_unsafe``; ``jobunsafe`` ends the job ``failed`` with ``output_media_unsafe``;
  ``timeout`` ends it ``timeout``; each output carries the ``seed`` sent in ``seeds``;
* bfl (BFL API reference): the Ultra and Kontext endpoints refuse ``width``/``height`` (422, FastAPI's
  validation shape) and take ``aspect_ratio`` (Ultra's default 16:9, answered at 32x18); ``output_format``
  defaults to jpeg; ``result.seed`` echoes the seed sent; ``expiring``: the first download of each result URL
  answers 403 (the signed URL expired), a later poll hands out a fresh one that works;
* openai-chat: ``refuse`` ends the completion ``finish_reason: content_filter``; ``words`` answers in words
  without an image (a progress message), finish ``stop``.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

KEY = "sk-provider-7a6b5c4d3e2f-never-in-a-file"
CLIENT_ID = "firefly-client-id-public"
SLOW_POLLS = 3
TOKEN_USES = 10
QUADRANTS = (40, 100, 160, 220)  # U1..U4's grey levels in the Midjourney grid


def png(size: tuple[int, int] = (8, 8), value: int = 128, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, "JPEG" if fmt in ("jpeg", "jpg") else fmt.upper())
    return buf.getvalue()


# Stability's pixel size for each aspect ratio (API reference, "Stable Image Core": output dimensions)
STABILITY_SIZES = {"16:9": (1344, 768), "21:9": (1536, 640), "2:3": (832, 1216), "3:2": (1216, 832),
                   "4:5": (896, 1088), "5:4": (1088, 896), "9:16": (768, 1344), "9:21": (640, 1536)}


def grid(size: int = 8) -> bytes:
    image = Image.new("L", (2 * size, 2 * size))
    for (top, left), value in zip(((0, 0), (0, size), (size, 0), (size, size)), QUADRANTS):
        image.paste(value, (left, top, left + size, top + size))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


class ProviderServer:
    def __init__(self, latency: float = 0.0, token_uses: int = TOKEN_USES) -> None:
        self.paid: Counter = Counter()  # billed submissions per (provider, prompt)
        self.calls: Counter = Counter()  # every request per (provider, prompt) or path
        self.polls: Counter = Counter()  # status requests per task id
        self.tasks: dict[str, dict] = {}
        self.tokens: dict[str, int] = {}  # firefly token -> uses left
        self.token_requests = 0
        self.release = threading.Event()
        self.latency = latency  # seconds a task runs (the benchmark's fixed task latency)
        self.token_uses = token_uses
        self.lock = threading.Lock()
        self.ids = itertools.count(1000)
        self.active: set[str] = set()  # tasks submitted and not yet answered done
        self.most_active = 0
        self.downloads: Counter = Counter()  # GETs per file name
        self.dup_id: str | None = None  # the one id answered to every "dupid" submission
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body, headers: dict | None = None, kind: str | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind or ("image/png" if isinstance(body, bytes) else
                                                          "application/json"))
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            # -- shared ------------------------------------------------------------------------------------
            def _bearer_ok(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {KEY}"

            def _submit_faults(self, provider: str, prompt: str) -> bool:
                """429 / 500 on the first submissions of such prompts; True when one was sent."""
                with server.lock:
                    server.calls[(provider, prompt)] += 1
                    n = server.calls[(provider, prompt)]
                if "ratelimit" in prompt and n <= 2:
                    self._send(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "1"})
                    return True
                if "error500" in prompt and n == 1:
                    self._send(500, {"error": {"message": "internal error"}})
                    return True
                return False

            def _new_task(self, provider: str, prompt: str, **more) -> str:
                with server.lock:
                    task_id = str(next(server.ids))
                    if "dupid" in prompt:
                        server.dup_id = server.dup_id or task_id
                        task_id = server.dup_id
                    server.paid[(provider, prompt)] += 1
                    server.tasks.setdefault(task_id, {"provider": provider, "prompt": prompt,
                                                      "started": time.monotonic(), **more})
                    server.active.add(task_id)
                    server.most_active = max(server.most_active, len(server.active))
                return task_id

            def _finished(self, task_id: str) -> None:
                with server.lock:
                    server.active.discard(task_id)

            def _running(self, task_id: str) -> bool:
                """Whether the task is still running at this poll (counted)."""
                task = server.tasks[task_id]
                with server.lock:
                    server.polls[task_id] += 1
                    polls = server.polls[task_id]
                if "held" in task["prompt"] and not server.release.is_set():
                    return True
                if "slow" in task["prompt"] and polls <= SLOW_POLLS:
                    return True
                return time.monotonic() - task["started"] < server.latency

            # -- routes ------------------------------------------------------------------------------------
            def do_GET(self):
                path = urlsplit(self.path).path
                if path.startswith("/files/"):
                    name = path.rsplit("/", 1)[1]
                    with server.lock:
                        server.downloads[name] += 1
                    if name.startswith("broken"):
                        return self._send(200, b"\x89PNG\r\n\x1a\n truncated", kind="image/png")
                    if name.startswith("expiring") and name.endswith("-0.png"):  # the first URL handed out
                        return self._send(403, b"<Error><Code>AccessDenied</Code>Request has expired</Error>",
                                          kind="application/xml")
                    query = parse_qs(urlsplit(self.path).query)
                    if "w" in query:  # an image of the size the service answers (its format as asked)
                        size = (int(query["w"][0]), int(query["h"][0]))
                        return self._send(200, png(size, fmt=query.get("fmt", ["png"])[0]),
                                          kind=f"image/{query.get('fmt', ['png'])[0]}")
                    return self._send(200, grid() if name.startswith("grid") else png())
                if path.startswith("/mj/task/"):
                    return self._mj_fetch(path.split("/")[3])
                if path.startswith("/bfl/get_result"):
                    return self._bfl_result(parse_qs(urlsplit(self.path).query)["id"][0])
                if path.startswith("/v3/status/"):
                    return self._firefly_status(path.rsplit("/", 1)[1])
                self._send(404, {"error": "not found"})

            def do_POST(self):
                path = urlsplit(self.path).path
                if path == "/mj/submit/imagine":
                    return self._mj_imagine()
                if path.startswith("/v2beta/stable-image/generate/"):
                    return self._stability(path.rsplit("/", 1)[1])
                if path == "/ims/token/v3":
                    return self._ims_token()
                if path == "/v3/images/generate-async":
                    return self._firefly_submit()
                if path.startswith("/v1/flux") or path.startswith("/v1/unknown"):
                    return self._bfl_submit(path.rsplit("/", 1)[1])
                if path == "/v1/chat/completions":
                    return self._chat()
                self._send(404, {"error": {"message": f"no route {path}"}})

            # -- midjourney (midjourney-proxy protocol, as CometAPI serves it) -----------------------------
            def _mj_auth(self) -> bool:
                return self._bearer_ok() or self.headers.get("mj-api-secret") == KEY

            def _mj_imagine(self):
                prompt = json.loads(self._body())["prompt"]
                if not self._mj_auth():
                    return self._send(401, {"code": 401, "description": "invalid api key"})
                if self._submit_faults("midjourney", prompt):
                    return
                if "refuse" in prompt:
                    return self._send(200, {"code": 24, "description": "banned prompt: sensitive word",
                                            "result": None, "properties": {"bannedWord": "refuse"}})
                if "failure9" in prompt and server.calls[("midjourney", prompt)] == 1:
                    return self._send(200, {"code": 9, "description": "system error", "result": None})
                task_id = self._new_task("midjourney", prompt)
                self._send(200, {"code": 1, "description": "Submit success", "result": task_id})

            def _mj_fetch(self, task_id: str):
                if not self._mj_auth():
                    return self._send(401, {"code": 401, "description": "invalid api key"})
                if task_id not in server.tasks:
                    return self._send(404, {"code": 3, "description": "task not found"})
                if self._running(task_id):
                    return self._send(200, {"id": task_id, "action": "IMAGINE", "status": "IN_PROGRESS",
                                            "progress": "42%", "imageUrl": "", "failReason": ""})
                prompt = server.tasks[task_id]["prompt"]
                for word, state in (("modal", "MODAL"), ("cancel", "CANCEL")):
                    if word in prompt:
                        return self._send(200, {"id": task_id, "action": "IMAGINE", "status": state,
                                                "progress": "0%", "imageUrl": "", "failReason": ""})
                port = server.port
                self._send(200, {"id": task_id, "action": "IMAGINE", "status": "SUCCESS", "progress": "100%",
                                 "properties": {"finalPrompt": f"{prompt} --v 7"},
                                 "imageUrl": f"http://127.0.0.1:{port}/files/grid-{task_id}.png", "failReason": "",
                                 "buttons": [{"customId": f"MJ::JOB::upsample::{i}::{task_id}", "label": f"U{i}"}
                                             for i in range(1, 5)]})

            # -- stability (v2beta, multipart in, image out) -----------------------------------------------
            def _stability(self, endpoint: str):
                body = self._body()
                if not self.headers.get("Content-Type", "").startswith("multipart/form-data"):
                    return self._send(400, {"name": "bad_request", "errors": ["multipart/form-data expected"]})
                prompt = body.split(b'name="prompt"\r\n\r\n', 1)[1].split(b"\r\n--", 1)[0].decode()
                if not self._bearer_ok():
                    return self._send(401, {"name": "unauthorized", "errors": ["authorization is missing"]})
                if endpoint not in ("core", "ultra", "sd3"):
                    return self._send(404, {"name": "not_found", "errors": [f"no endpoint {endpoint}"]})
                if self._submit_faults("stability", prompt):
                    return
                self._new_task("stability", prompt)
                form = {}
                for part in body.split(b'Content-Disposition: form-data; name="')[1:]:
                    name, rest = part.split(b'"', 1)
                    if b"\r\n\r\n" in rest:
                        form[name.decode()] = rest.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0].decode()
                size = STABILITY_SIZES.get(form.get("aspect_ratio", "1:1"), (8, 8))
                if "skewed" in prompt:  # a size of another ratio than asked: rejected by the client, but paid
                    size = STABILITY_SIZES["16:9"]
                if "refuse" in prompt:
                    return self._send(403, {"name": "content_moderation", "errors": [
                        "Your request was flagged by our content moderation system"]})
                if "filtered" in prompt:
                    return self._send(200, png(value=0), {"finish-reason": "CONTENT_FILTERED", "seed": "7"})
                self._send(200, png(size), {"finish-reason": "SUCCESS", "seed": form.get("seed", "1234")})

            # -- firefly (IMS token, v3 async) -------------------------------------------------------------
            def _ims_token(self):
                form = parse_qs(self._body().decode())
                if form.get("client_secret") != [KEY] or form.get("client_id") != [CLIENT_ID]:
                    return self._send(401, {"error": "invalid_client", "error_description": "invalid client"})
                with server.lock:
                    server.token_requests += 1
                    token = f"ims-token-{server.token_requests}-secret"
                    server.tokens[token] = server.token_uses
                self._send(200, {"access_token": token, "token_type": "bearer", "expires_in": 86399})

            def _firefly_auth(self) -> bool:
                auth = self.headers.get("Authorization", "")
                token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
                with server.lock:
                    if self.headers.get("x-api-key") != CLIENT_ID or server.tokens.get(token, 0) <= 0:
                        return False
                    server.tokens[token] -= 1
                return True

            def _firefly_submit(self):
                body = json.loads(self._body())
                prompt = body["prompt"]
                if not self._firefly_auth():
                    return self._send(401, {"error_code": "401013", "message": "Oauth token is not valid"})
                version = self.headers.get("x-model-version", "image3")
                if version not in ("image3", "image4_standard", "image4_ultra"):
                    return self._send(400, {"error_code": "validation_error",
                                            "message": f"x-model-version {version} is not supported"})
                if self._submit_faults("firefly", prompt):
                    return
                if "refuse" in prompt:
                    return self._send(451, {"error_code": "input_image_or_prompt_blocked",
                                            "message": "The prompt was blocked by the content policy"})
                if "unsafe" in prompt and "jobunsafe" not in prompt:
                    return self._send(422, {"error_code": "prompt_unsafe",
                                            "message": "The prompt is not safe to generate"})
                task_id = self._new_task("firefly", prompt, model_version=version, seed=(body.get("seeds") or [7])[0])
                self._send(202, {"jobId": task_id, "statusUrl": f"http://127.0.0.1:{server.port}/v3/status/{task_id}",
                                 "cancelUrl": f"http://127.0.0.1:{server.port}/v3/cancel/{task_id}"})

            def _firefly_status(self, task_id: str):
                if not self._firefly_auth():
                    return self._send(401, {"error_code": "401013", "message": "Oauth token is not valid"})
                if self._running(task_id):
                    return self._send(200, {"jobId": task_id, "status": "running"})
                task = server.tasks[task_id]
                if "jobunsafe" in task["prompt"]:
                    return self._send(200, {"jobId": task_id, "status": "failed", "error_code": "output_media_unsafe",
                                            "message": "The generated image was flagged"})
                if "timeout" in task["prompt"]:
                    return self._send(200, {"jobId": task_id, "status": "timeout"})
                self._send(200, {"jobId": task_id, "status": "succeeded", "result": {
                    "size": {"width": 8, "height": 8}, "outputs": [
                        {"seed": task["seed"],
                         "image": {"url": f"http://127.0.0.1:{server.port}/files/ff-{task_id}.png"}}]}})

            # -- bfl (FLUX) --------------------------------------------------------------------------------
            def _bfl_submit(self, model: str):
                body = json.loads(self._body())
                prompt = body["prompt"]
                if self.headers.get("x-key") != KEY:
                    return self._send(403, {"detail": "Not authenticated - Invalid Authentication"})
                if model.startswith("unknown"):
                    return self._send(404, {"detail": "Not Found"})
                by_ratio = "ultra" in model or "kontext" in model
                if by_ratio and ("width" in body or "height" in body):
                    return self._send(422, {"detail": [{"loc": ["body", "width"], "msg": "Extra inputs are not "
                                                        "permitted", "type": "extra_forbidden"}]})
                if self._submit_faults("bfl", prompt):
                    return
                if by_ratio:
                    w, h = (int(v) for v in body.get("aspect_ratio", "16:9").split(":"))
                    size = (w * 2, h * 2)  # its own pixel size for the ratio (small here)
                else:
                    size = (body.get("width", 8), body.get("height", 8))
                task_id = self._new_task("bfl", prompt, size=size, fmt=body.get("output_format", "jpeg"),
                                         seed=body.get("seed", 42))
                self._send(200, {"id": task_id, "polling_url":
                                 f"http://127.0.0.1:{server.port}/bfl/get_result?id={task_id}"})

            def _bfl_result(self, task_id: str):
                if self.headers.get("x-key") != KEY:
                    return self._send(403, {"detail": "Not authenticated - Invalid Authentication"})
                if self._running(task_id):
                    return self._send(200, {"id": task_id, "status": "Pending", "result": None, "progress": 0.4})
                self._finished(task_id)
                name = "broken" if "broken" in server.tasks[task_id]["prompt"] else "bfl"
                if "refuse" in server.tasks[task_id]["prompt"]:
                    return self._send(200, {"id": task_id, "status": "Content Moderated", "result": None,
                                            "details": {"moderation": ["Derivative Works Filter"]}})
                task = server.tasks[task_id]
                fmt, (w, h) = task["fmt"], task["size"]
                if "expiring" in task["prompt"]:  # a fresh signed URL at every Ready answer: -0 (expired), -1, ...
                    with server.lock:
                        task["ready"] = task.get("ready", -1) + 1
                    name = f"expiring-{task_id}-{task['ready']}"
                else:
                    name = f"{name}-{task_id}"
                self._send(200, {"id": task_id, "status": "Ready", "result": {
                    "sample": f"http://127.0.0.1:{server.port}/files/{name}.png?w={w}&h={h}&fmt={fmt}",
                    "prompt": "...", "seed": task["seed"]}})

            # -- openai-chat (gpt-4o-image through CometAPI) -----------------------------------------------
            def _chat(self):
                body = json.loads(self._body())
                prompt = body["messages"][-1]["content"]
                if not self._bearer_ok():
                    return self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error",
                                                      "code": "invalid_api_key"}})
                if self._submit_faults("openai-chat", prompt):
                    return
                self._new_task("openai-chat", prompt)
                if "refuse" in prompt:
                    content, finish = "I can't create that image.", "content_filter"
                elif "words" in prompt:
                    content, finish = "> progress 40%\n\nStill drawing, please wait...", "stop"
                elif "datauri" in prompt:
                    content = f"![image](data:image/png;base64,{base64.b64encode(png()).decode()})"
                    finish = "stop"
                else:
                    content = (f"> progress 100%\n\n![gen](http://127.0.0.1:{server.port}/files/chat.png)\n\n"
                               f"[download](http://127.0.0.1:{server.port}/files/chat.png)")
                    finish = "stop"
                self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                                 "model": body["model"], "choices": [{"index": 0, "finish_reason": finish, "message": {
                                     "role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def paid_for(self, provider: str) -> int:
        return sum(n for (p, _), n in self.paid.items() if p == provider)

    def __enter__(self) -> "ProviderServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
