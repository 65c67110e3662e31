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


def png(size: tuple[int, int] = (8, 8), value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, "PNG")
    return buf.getvalue()


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

            def _new_task(self, provider: str, prompt: str) -> str:
                with server.lock:
                    task_id = str(next(server.ids))
                    server.paid[(provider, prompt)] += 1
                    server.tasks[task_id] = {"provider": provider, "prompt": prompt, "started": time.monotonic()}
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
                    if name.startswith("broken"):
                        return self._send(200, b"\x89PNG\r\n\x1a\n truncated", kind="image/png")
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
                port = server.port
                self._send(200, {"id": task_id, "action": "IMAGINE", "status": "SUCCESS", "progress": "100%",
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
                if "refuse" in prompt:
                    return self._send(403, {"name": "content_moderation", "errors": [
                        "Your request was flagged by our content moderation system"]})
                if "filtered" in prompt:
                    return self._send(200, png(value=0), {"finish-reason": "CONTENT_FILTERED", "seed": "7"})
                self._send(200, png(), {"finish-reason": "SUCCESS", "seed": "1234"})

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
                prompt = json.loads(self._body())["prompt"]
                if not self._firefly_auth():
                    return self._send(401, {"error_code": "401013", "message": "Oauth token is not valid"})
                if self._submit_faults("firefly", prompt):
                    return
                if "refuse" in prompt:
                    return self._send(451, {"error_code": "input_image_or_prompt_blocked",
                                            "message": "The prompt was blocked by the content policy"})
                task_id = self._new_task("firefly", prompt)
                self._send(202, {"jobId": task_id, "statusUrl": f"http://127.0.0.1:{server.port}/v3/status/{task_id}",
                                 "cancelUrl": f"http://127.0.0.1:{server.port}/v3/cancel/{task_id}"})

            def _firefly_status(self, task_id: str):
                if not self._firefly_auth():
                    return self._send(401, {"error_code": "401013", "message": "Oauth token is not valid"})
                if self._running(task_id):
                    return self._send(200, {"jobId": task_id, "status": "running"})
                self._send(200, {"jobId": task_id, "status": "succeeded", "result": {
                    "size": {"width": 8, "height": 8}, "outputs": [
                        {"seed": 1, "image": {"url": f"http://127.0.0.1:{server.port}/files/ff-{task_id}.png"}}]}})

            # -- bfl (FLUX) --------------------------------------------------------------------------------
            def _bfl_submit(self, model: str):
                prompt = json.loads(self._body())["prompt"]
                if self.headers.get("x-key") != KEY:
                    return self._send(403, {"detail": "Not authenticated - Invalid Authentication"})
                if model.startswith("unknown"):
                    return self._send(404, {"detail": "Not Found"})
                if self._submit_faults("bfl", prompt):
                    return
                task_id = self._new_task("bfl", prompt)
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
                self._send(200, {"id": task_id, "status": "Ready", "result": {
                    "sample": f"http://127.0.0.1:{server.port}/files/{name}-{task_id}.png", "prompt": "..."}})

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
                    content, finish = "I can't create that image: it goes against the content policy.", "stop"
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
