"""A small OpenAI-images-API server for the failure paths of `genbench generate`: what it answers depends on the
prompt (429 with Retry-After, 500, a stall, a refusal, broken base64, a wrong size, a url answer, a url on a
dead host, and 200s that are not images responses: an HTML page, ``{"data": []}``, another object, a list; a 429
``insufficient_quota`` for ``quota``), and it checks the bearer key. A gpt-image model asked for a
``response_format`` gets the API's 400 (that model always answers b64_json). Real HTTP on 127.0.0.1, in a thread
of the test process."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

KEY = "sk-test-9f8e7d6c5b4a-never-in-a-file"


def png(size: int = 8, value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, "PNG")
    return buf.getvalue()


class FaultServer:
    def __init__(self) -> None:
        self.calls: Counter = Counter()  # requests per prompt
        self.failing = {"flaky"}  # prompts that answer 503 while listed
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict | list | bytes | str, headers: dict | None = None) -> None:
                data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else \
                    json.dumps(body).encode()
                kind = "image/png" if isinstance(body, bytes) else "text/html" if isinstance(body, str) else \
                    "application/json"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, png())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["prompt"]
                with server.lock:
                    server.calls[prompt] += 1
                    n = server.calls[prompt]
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided", "type":
                                                      "invalid_request_error", "code": "invalid_api_key"}})
                ok = {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png()).decode(),
                                                             "revised_prompt": f"revised: {prompt}"}]}
                if str(body.get("model", "")).startswith("gpt-image") and "response_format" in body:
                    # what the API answers a gpt-image model asked for a response_format (the SDK's
                    # ImageGenerateParams: "not supported for gpt-image-1, which always returns b64_json")
                    return self._send(400, {"error": {"message": "Unknown parameter: 'response_format'.",
                                                      "type": "invalid_request_error", "param": "response_format",
                                                      "code": "unknown_parameter"}})
                if "quota" in prompt:  # the API's 429 for an account out of credit (its error codes guide)
                    return self._send(429, {"error": {"message": "You exceeded your current quota, please check "
                                                      "your plan and billing details.", "type": "insufficient_quota",
                                                      "code": "insufficient_quota"}})
                if "ratelimit" in prompt and n <= 2:
                    return self._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}},
                                      {"Retry-After": "1"})
                if "error500" in prompt and n == 1:
                    return self._send(500, {"error": {"message": "The server had an error", "type": "server_error"}})
                if "stall" in prompt:
                    time.sleep(3)
                    return self._send(200, ok)
                if "refuse" in prompt:
                    return self._send(400, {"error": {"message": "Your request was rejected by the safety system.",
                                                      "type": "invalid_request_error",
                                                      "code": "content_policy_violation"}})
                if "flaky" in prompt and "flaky" in server.failing:
                    return self._send(503, {"error": {"message": "Service unavailable", "type": "server_error"}})
                if "badb64" in prompt:
                    ok["data"][0]["b64_json"] = "###not-base64###"
                if "wrongsize" in prompt:
                    ok["data"][0]["b64_json"] = base64.b64encode(png(16)).decode()
                if "urlonly" in prompt:
                    ok["data"] = [{"url": f"http://127.0.0.1:{server.port}/files/img.png"}]
                if "deadurl" in prompt:  # port 9 (discard) has no listener on a test machine: refused at once
                    ok["data"] = [{"url": "http://127.0.0.1:9/files/img.png"}]
                if "htmlpage" in prompt:
                    return self._send(200, "<html><body>Please log in</body></html>")
                if "emptydata" in prompt:
                    return self._send(200, {"created": 1, "data": []})
                if "otherjson" in prompt:
                    return self._send(200, {"foo": 1})
                if "alist" in prompt:
                    return self._send(200, [ok])
                return self._send(200, ok)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FaultServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
