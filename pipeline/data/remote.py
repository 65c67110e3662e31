"""Shards from anywhere: ``http(s)://`` and ``s3://`` URLs read through fsspec (s3fs for S3), and ``pipe:CMD``
shards (a shell command's standard output, the WebDataset way), with the retries a stream to many nodes needs.

An HTTP shard is one streamed GET, an S3 object one streamed GetObject (through s3fs's client: S3-compatible
stores are reached through ``AWS_ENDPOINT_URL`` and the usual credential chain). What fsspec does not do is
retry: one dropped connection or 503 in the middle of a 1 GB shard would end a 64-GPU run. ``RetryingReader``
re-opens the file at the byte it had reached, with exponential backoff and jitter, up to ``retries`` times, then
fails naming the URL. A read that stalls past ``timeout`` seconds is such a failure, never a hang. 401/403/404
are not retried: the message names the URL, the endpoint and where credentials come from, never a secret. A
``pipe:`` command that fails (exits non-zero) or stalls is restarted the same way,
skipping the bytes already read.
"""

from __future__ import annotations

import io
import os
import random
import re
import select
import shlex
import subprocess
import tempfile
import time
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

REMOTE = ("http://", "https://", "s3://", "pipe:")
READ_BLOCK = 4 << 20  # block size of the files fsspec itself opens (uploads, other reads); shards are streamed
# seconds without data before a read counts as failed, and retries per read; the environment sets them for a
# whole job (loader workers included)
TIMEOUT = float(os.environ.get("GENBENCH_REMOTE_TIMEOUT", "60"))
RETRIES = int(os.environ.get("GENBENCH_REMOTE_RETRIES", "5"))


class RemoteShardError(OSError):
    """A remote shard that cannot be read, with the URL and the fix."""


def is_remote(spec: str) -> bool:
    return str(spec).startswith(REMOTE)


# command-line options whose value is a credential (curl, wget, aws): shown as *** in messages and records
_SECRET_OPTIONS = re.compile(r"^(-H|--header|-u|--user|--password|--http-password|--aws-sigv4|--oauth2-bearer)$")


def public_url(url: str) -> str:
    """The URL without user:password and query string (where presigned URLs and some gateways carry keys); for
    a ``pipe:`` command, the command with each URL in it so treated and credential options' values hidden."""
    if url.startswith("pipe:"):
        return "pipe:" + _public_command(url[len("pipe:"):])
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _public_command(command: str) -> str:
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: show only the program
        return command.split()[0] + " ..." if command.split() else ""
    shown, hide_next = [], False
    for word in words:
        if hide_next:
            shown.append("***")
        elif "://" in word:
            shown.append(public_url(word))
        elif "=" in word and _SECRET_OPTIONS.match(word.split("=", 1)[0]):
            shown.append(word.split("=", 1)[0] + "=***")
        else:
            shown.append(word)
        hide_next = bool(_SECRET_OPTIONS.match(word))
    return " ".join(shown)


def endpoint_description(url: str) -> str:
    """Where a request went and with which credentials source, for error messages (no secret)."""
    if url.startswith("pipe:"):
        return "a shell command"
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3 (no AWS_ENDPOINT_URL set)"
        source = "AWS_ACCESS_KEY_ID" if os.environ.get("AWS_ACCESS_KEY_ID") else \
            f"profile {os.environ.get('AWS_PROFILE', 'default')} / instance role"
        return f"endpoint {endpoint}, credentials from {source}"
    return f"server {urlsplit(url).hostname}"


def filesystem(url: str, timeout: float) -> Any:
    """The fsspec filesystem of a URL, with connect and read timeouts."""
    import fsspec

    if url.startswith("s3://"):
        client = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]} if os.environ.get("AWS_ENDPOINT_URL") else {}
        return fsspec.filesystem("s3", client_kwargs=client, default_block_size=READ_BLOCK,
                                 config_kwargs={"connect_timeout": timeout, "read_timeout": timeout,
                                                "retries": {"max_attempts": 1}})  # retried here, at the shard
    import aiohttp

    return fsspec.filesystem("http", block_size=READ_BLOCK, client_kwargs={
        "timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)})


def _status(e: BaseException) -> Optional[int]:
    status = getattr(e, "status", None) or getattr(e, "code", None)
    if isinstance(status, int):
        return status
    response = getattr(e, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(code) if code else None
    return None


def refusal(url: str, e: BaseException) -> Optional[RemoteShardError]:
    """The error for an answer that retrying cannot change (missing, forbidden), else None."""
    status = _status(e)
    if isinstance(e, FileNotFoundError) or status == 404:
        return RemoteShardError(f"{public_url(url)} does not exist (404 from {endpoint_description(url)}); check the "
                                "shard pattern or the manifest's file names")
    if isinstance(e, PermissionError) or status in (401, 403):
        return RemoteShardError(f"{public_url(url)} refused access ({status or 'forbidden'} from "
                                f"{endpoint_description(url)}); check the credentials and the endpoint")
    return None


class RetryingReader(io.RawIOBase):
    """A remote file as a sequential stream that survives dropped connections, 5xx answers and stalls."""

    def __init__(self, url: str, retries: Optional[int] = None, timeout: Optional[float] = None,
                 backoff: float = 0.5) -> None:
        super().__init__()
        self.url, self.backoff = url, backoff
        self.retries = RETRIES if retries is None else retries
        self.timeout = TIMEOUT if timeout is None else timeout
        self.position = 0
        self.file: Any = None
        self.retried = 0

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        self.close_file()
        if self.url.startswith("pipe:"):
            self.file = PipeFile(self.url[len("pipe:"):], self.timeout)
            if self.position:
                self.file.seek(self.position)
        elif self.url.startswith("s3://"):
            self.file = S3Stream(filesystem(self.url, self.timeout), self.url, self.position)
        else:
            self.file = self._open_http_stream()

    def _open_http_stream(self) -> Any:
        """One streamed GET for the whole shard, no HEAD and no per-block requests (servers without Range
        support, such as Python's http.server, work too). After a failure it resumes with ``Range:
        bytes=POSITION-``; a server that ignores the range answers 200 with the whole file, and the bytes already
        read are skipped."""
        headers = {"Range": f"bytes={self.position}-"} if self.position else {}
        # size=-1: the streamed file never uses a size, and giving one spares the request fsspec sends to learn
        # it: a HEAD, and where HEAD is refused (a presigned URL is signed for GET alone) a second GET
        file = filesystem(self.url, self.timeout).open(self.url, "rb", block_size=0, size=-1, headers=headers)
        if self.position and getattr(getattr(file, "r", None), "status", 206) == 200:
            left = self.position
            while left > 0:
                data = file.read(min(left, 1 << 20))
                if not data:
                    raise EOFError(f"the server's copy is shorter than the {self.position} bytes read before")
                left -= len(data)
        return file

    def close_file(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # a broken connection may fail to close too; the next open starts afresh
                pass
            self.file = None

    def readinto(self, buffer: Any) -> int:
        last: Optional[BaseException] = None
        for attempt in range(self.retries + 1):
            try:
                if self.file is None:
                    self._reopen()
                data = self.file.read(len(buffer))
                buffer[:len(data)] = data
                self.position += len(data)
                return len(data)
            except Exception as e:  # fsspec surfaces aiohttp/botocore/asyncio errors as they are
                denied = refusal(self.url, e)
                if denied is not None:
                    raise denied from None
                last = e
                self.close_file()
                if attempt < self.retries:
                    self.retried += 1
                    time.sleep(self.backoff * 2 ** attempt * (1 + random.random()))
        raise RemoteShardError(f"{public_url(self.url)}: reading at byte {self.position} failed {self.retries + 1} "
                               f"times ({type(last).__name__}: {last}); the last try waited up to {self.timeout:g} s "
                               f"for data ({endpoint_description(self.url)})")

    def close(self) -> None:
        self.close_file()
        super().close()


class S3Stream:
    """An S3 object from a byte offset as one streamed GetObject, through s3fs's client (its credentials,
    endpoint and timeouts); s3fs's own files read blocks of ``READ_BLOCK``, one request each."""

    def __init__(self, fs: Any, url: str, position: int) -> None:
        from fsspec.asyn import sync

        bucket, key, version = fs.split_path(url)
        request = {"Bucket": bucket, "Key": key, **({"VersionId": version} if version else {}),
                   **({"Range": f"bytes={position}-"} if position else {})}
        self._sync, self._loop = sync, fs.loop
        self.body = sync(fs.loop, fs._call_s3, "get_object", **request)["Body"]

    def read(self, n: int) -> bytes:
        return self._sync(self._loop, self.body.read, n)

    def close(self) -> None:
        self.body.close()


class PipeFile:
    """A shell command's standard output as a file: reads time out, a failed exit is an error, and ``seek``
    (after a restart) skips forward by reading."""

    def __init__(self, command: str, timeout: float) -> None:
        self.command, self.timeout = command, timeout
        self.stderr = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on it
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr,
                                        start_new_session=True)  # its own group: a kill reaches its children
        self.fd = self.process.stdout.fileno()  # type: ignore[union-attr]

    def read(self, n: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"no output for {self.timeout:g} s")
        data = os.read(self.fd, n)
        if not data:
            code = self.process.wait(timeout=self.timeout)
            if code != 0:
                self.stderr.seek(0)
                said = self.stderr.read().decode("utf-8", "replace").strip().splitlines()
                raise ChildProcessError(f"exited with status {code}" + (f": {said[-1][:300]}" if said else ""))
        return data

    def seek(self, position: int) -> None:
        while position > 0:
            data = self.read(min(position, 1 << 20))
            if not data:
                raise EOFError("the command's output is shorter than before")
            position -= len(data)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, 9)
            except ProcessLookupError:
                pass
        self.process.stdout.close()  # type: ignore[union-attr]
        self.process.wait()
        self.stderr.close()


class TeeReader(io.RawIOBase):
    """Passes a stream's bytes on and copies them into ``sink`` (the shard cache's partial file)."""

    def __init__(self, source: io.RawIOBase, sink: Any) -> None:
        super().__init__()
        self.source, self.sink = source, sink

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.source.readinto(buffer)
        if n:
            self.sink.write(memoryview(buffer)[:n])
        return n or 0

    def close(self) -> None:
        self.source.close()
        super().close()


def iter_remote_members(url: str, retries: Optional[int] = None, timeout: Optional[float] = None,
                        copy_to: Any = None, on_link: Any = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file in a remote tar, streamed in order (the local reader's header parsing).
    ``copy_to``: a binary file that receives the whole shard as it streams, to its last byte."""
    from pipeline.data.tarstream import TarFormatError, iter_stream_members

    raw: io.RawIOBase = RetryingReader(url, retries, timeout)
    if copy_to is not None:
        raw = TeeReader(raw, copy_to)
    with io.BufferedReader(raw, buffer_size=1 << 20) as stream:
        try:
            yield from iter_stream_members(stream, on_link)
        except TarFormatError as e:
            raise RemoteShardError(f"{public_url(url)} is not a readable tar ({e})") from e
        if copy_to is not None:
            while stream.read(1 << 20):  # the end-of-archive padding, which the parser stops before
                pass


def read_bytes(url: str, retries: Optional[int] = None, timeout: Optional[float] = None) -> bytes:
    """A whole small remote file (a manifest), with the same retries."""
    with RetryingReader(url, retries, timeout) as reader:
        return io.BufferedReader(reader).read()


def expand(pattern: str) -> list[str]:
    """``https://h/train-{000000..000099}.tar`` -> the URLs, the WebDataset way (braceexpand)."""
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def describe(url: str, timeout: Optional[float] = None) -> dict[str, Any]:
    """What identifies a remote shard's version without reading it: size, ETag, Last-Modified, as the server
    gives them (a ``pipe:`` command gives nothing but itself)."""
    if url.startswith("pipe:"):
        return {"url": public_url(url)}
    try:
        info = filesystem(url, TIMEOUT if timeout is None else timeout).info(url)
    except Exception as e:
        raise refusal(url, e) or RemoteShardError(f"{public_url(url)}: {type(e).__name__}: {e}") from None
    keep = {k.lower(): v for k, v in info.items() if k.lower() in ("size", "etag", "lastmodified", "last_modified")}
    return {"url": public_url(url), **{k: str(v) for k, v in keep.items()}}
