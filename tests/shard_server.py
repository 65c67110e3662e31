"""A static file server for shard tests on 127.0.0.1 that answers Range requests (as nginx and object stores
do; Python's http.server does not), logs every request, and injects the faults of a real network on demand:
a connection cut mid-body, 503 answers, a stall."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline.benchmark.distributed import free_port


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server (the S3 wire protocol) on a free 127.0.0.1 port, answering: (process, endpoint URL)."""
    import httpx

    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, endpoint


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a reader that stops mid-shard (its epoch's quota reached) closes its stream: normal
        super().handle_error(request, client_address)


class ShardServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.log: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.cut_once: set[str] = set()  # paths whose next GET sends half the body, then drops the connection
        self.unavailable: dict[str, int] = {}  # path -> how many more 503 answers
        self.stall: set[str] = set()  # paths that never answer
        self.ranges = True  # False: answer every GET with the whole file, as servers without Range support do
        self.head_status = 200  # 403: refuse HEAD, as a presigned URL (signed for GET) does
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _file(self):
                path = (server.root / self.path.lstrip("/").split("?")[0]).resolve()
                return path if path.is_file() and server.root.resolve() in path.parents else None

            def _headers(self, status: int, length: int, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", '"v1"')
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):
                server.log.append(("HEAD", self.path, ""))
                path = self._file()
                if path is None:
                    return self._headers(404, 0)
                if server.head_status != 200:
                    return self._headers(server.head_status, 0)
                self._headers(200, path.stat().st_size)

            def do_GET(self):
                rng = self.headers.get("Range", "")
                server.log.append(("GET", self.path, rng))
                if self.path in server.stall:
                    time.sleep(30)
                    return
                if server.unavailable.get(self.path, 0) > 0:
                    server.unavailable[self.path] -= 1
                    return self._headers(503, 0)
                path = self._file()
                if path is None:
                    return self._headers(404, 0)
                size = path.stat().st_size
                start, end = 0, size - 1
                if rng.startswith("bytes=") and server.ranges:
                    a, _, b = rng[6:].partition("-")
                    start, end = int(a), min(int(b) if b else size - 1, size - 1)
                with open(path, "rb") as f:  # only the range asked for, as a real server reads it
                    f.seek(start)
                    body = f.read(end + 1 - start)
                ranged = bool(rng) and server.ranges
                status = 206 if ranged else 200
                extra = {"Content-Range": f"bytes {start}-{end}/{size}"} if ranged else {}
                self._headers(status, len(body), extra)
                if self.path in server.cut_once and len(body) > 2048:
                    server.cut_once.discard(self.path)
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    # aiohttp raises a lost connection before handing out the bytes it had buffered: cut at once,
                    # the reader may never see the half sent, and its retry starts at byte 0 (a real cut can do
                    # that too, but the test wants the resume from the byte reached)
                    time.sleep(0.3)
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
