"""What every provider of ``genbench generate`` answers for one task, and the rules they share.

A *task* is what one submission buys: one image for most services, a 2x2 grid of four for Midjourney. A
provider's ``run`` submits it (or picks up a task an earlier run submitted), waits for it, and returns the
image bytes, or raises:

* ``Refused``: the service's moderation declined the prompt; recorded against it, counted, the run goes on;
* ``Pending``: still running at the deadline, or its status could not be read; the task's id is on disk, so
  the next run of the same command polls it again instead of paying for a new one;
* ``ValueError``: this image failed (retries spent, a broken answer); asked again by the next run;
* ``GenerateError``: every prompt would fail the same way (a bad key, an unknown model, the wrong
  ``--api-base``): the run stops, naming the endpoint and the environment variable, never the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Optional

import httpx

from pipeline.data.remote import public_url
from pipeline.services.http import RETRIED_STATUS, PollSchedule, json_of, retries_taken, retrying_client
from pipeline.services.options import GenerateOptions

if TYPE_CHECKING:
    from pipeline.data.prompts import Prompt


# The services' pixel sizes for a ratio are up to 2.9% off it (Stability's 4:5 is 896x1088); the next documented
# ratio is 17% away (4:5 vs 2:3), so 5% tells one ratio from another
RATIO_TOLERANCE = 0.05


class GenerateError(RuntimeError):
    """The run cannot go on (bad key, unknown model, a request the service rejects): names the fix."""


class Refused(Exception):
    def __init__(self, code: str, message: str, task_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.code, self.message, self.task_id = code, message, task_id


class Pending(Exception):
    """The task is still the service's: its record (id, where to poll) is what the next run resumes."""

    def __init__(self, task: dict[str, Any], reason: str) -> None:
        super().__init__(reason)
        self.task, self.reason = task, reason


@dataclass
class Answer:
    images: list[bytes]  # as the service sent them (PNG, JPEG, WebP): checked and stored by the client
    info: dict[str, Any] = field(default_factory=dict)  # recorded beside each image: task id, revised prompt
    requests: int = 1  # HTTP requests this task took, retries and polls included
    retries: int = 0  # of those, retries of its submission
    grid: Optional[bytes] = None  # Midjourney: the grid the images were cut from, kept beside them
    per_image: list[dict[str, Any]] = field(default_factory=list)  # recorded beside image i only: its seed

    @property
    def billed(self) -> int:
        """Images the service made (and charged) for this task, whether genbench keeps them or not."""
        return len(self.images)


Submitted = Callable[[dict[str, Any]], None]  # records a task's id the moment the service has taken it


class Provider:
    """One service's protocol. Subclasses set the class attributes and implement ``run``."""

    name = ""
    default_base = ""
    default_key_env = ""
    images_per_task = 1
    path = ""  # the endpoint a task is submitted to, below the base (for messages and records)
    auth_header = "Authorization"  # "Authorization" sends "Bearer KEY"; another header the bare key
    rate_lockout: Optional[float] = None  # seconds a 429 without Retry-After locks the client out (documented)
    needs_key = True  # False: a local generator, no credentials

    def __init__(self, opts: GenerateOptions, key: str, from_env: bool) -> None:
        self.opts, self.key, self.from_env = opts, key, from_env
        assert opts.api_base is not None, "generate() fills in the provider's default base"
        self.base = opts.api_base.rstrip("/")
        self.header = opts.auth_header or self.auth_header
        self._http: Optional[httpx.Client] = None

    # -- what the records say --------------------------------------------------------------------------------
    def endpoint(self) -> str:
        """Where tasks go, without credentials: in generation.json, the records and every message."""
        return public_url(f"{self.base}{self.path.format(model=self.opts.model)}")

    def display_name(self) -> str:
        """The generator's name in records and the leaderboard (the model as the service calls it)."""
        return self.opts.model

    def describe(self) -> dict[str, Any]:
        """What else names the generator in generation.json (a local pipeline's identity); a set into the same --out
        must have the same."""
        return {}

    def secrets(self) -> list[str]:
        """Everything that must never be written: the key, and any token derived from it."""
        return [self.key]

    # -- the HTTP every provider shares ----------------------------------------------------------------------
    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = retrying_client(self.opts.timeout, self.opts.max_retries, lockout=self.rate_lockout)
        return self._http

    def auth(self) -> dict[str, str]:
        if not self.from_env:
            return {}
        return {self.header: f"Bearer {self.key}" if self.header.lower() == "authorization" else self.key}

    def request(self, method: str, url: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        """One call with the transport's retries; a connection that stays down is a failed image."""
        headers = {**(self.auth() if auth else {}), **kwargs.pop("headers", {})}
        try:
            return self.http.request(method, url, headers=headers, **kwargs)
        except httpx.TimeoutException:
            raise ValueError(f"{public_url(url)}: no answer within --timeout {self.opts.timeout:g} s after "
                             f"{self.opts.max_retries} retries") from None
        except httpx.TransportError as e:
            raise ValueError(f"{public_url(url)}: connection failed after {self.opts.max_retries} retries "
                             f"({type(e).__name__}: {e})") from None

    def check(self, response: httpx.Response, what: str) -> None:
        """Raise what a non-2xx answer means: a fatal error for what every prompt would get (401, 403, 404,
        another 4xx), a failed image when the retries are spent (429, 5xx)."""
        status = response.status_code
        if status < 400:
            return
        text = f"{public_url(what)} answered {status}: {self.message_of(response)}"
        if status in RETRIED_STATUS:
            raise ValueError(f"{text} after {self.opts.max_retries} retries")
        if status in (401, 403):
            where = f"the environment variable {self.opts.api_key_env}" if self.from_env else "no key (none was set)"
            text += f" (the key came from {where}; check it is valid for this endpoint)"
        elif status == 404:
            text += f" (is --model {self.opts.model!r} served there, and is --api-base {public_url(self.base)} " \
                    f"right for --provider {self.name}?)"
        else:
            text += " (the service rejects the request itself: check --size and --model)"
        raise GenerateError(text)

    @staticmethod
    def message_of(response: httpx.Response) -> str:
        try:
            body = response.json()
        except ValueError:
            return response.text[:200] or response.reason_phrase
        if isinstance(body, dict):
            for key in ("error", "message", "errors", "detail", "failReason", "description", "name"):
                value = body.get(key)
                if isinstance(value, dict):
                    value = value.get("message") or value.get("error_code") or value
                if isinstance(value, list) and value:
                    value = value[0].get("message", value[0]) if isinstance(value[0], dict) else value[0]
                if value:
                    return str(value)[:300]
        return str(body)[:200]

    def json(self, response: httpx.Response, what: str) -> Any:
        body = json_of(response, public_url(what))
        if not isinstance(body, dict):
            raise GenerateError(f"{public_url(what)} answered {response.status_code} with a JSON "
                                f"{type(body).__name__}, not the {self.name} protocol's object; check --api-base "
                                f"and --provider")
        return body

    def download(self, url: str) -> bytes:
        """An image the service links to (a signed URL: no credentials sent with it)."""
        try:
            response = self.http.get(url)
        except httpx.HTTPError as e:
            raise ValueError(f"downloading the image URL {public_url(url)} failed after {self.opts.max_retries} "
                             f"retries ({type(e).__name__}: {e})") from None
        if response.status_code != 200:
            raise ValueError(f"downloading the image URL {public_url(url)} answered {response.status_code}")
        return response.content

    def fetch_result(self, task: dict[str, Any], url: str) -> bytes:
        """The image of a task the service finished, from its (signed, expiring) URL. A download that fails keeps
        the task pending: the next run polls the finished task again for a fresh URL instead of paying for a
        new one."""
        try:
            return self.download(url)
        except ValueError as e:
            raise Pending(task, f"task {task.get('id')} finished but its image could not be fetched ({e}); the next "
                                "run asks the task for a fresh URL, without submitting it again") from None

    def poll(self, task: dict[str, Any], url: str, deadline: float,
             state_of: Callable[[dict[str, Any]], Any]) -> tuple[Any, int]:
        """GET ``url`` on the poll schedule until ``state_of(body)`` returns something (it returns None while
        the task runs, and raises Refused or ValueError for a task that ended without images); returns that
        and the requests made. Past the deadline, or when the status cannot be read (retries spent), the task
        stays pending: ``Pending``, so the next run asks about the same task instead of paying again."""
        sleep = PollSchedule(first=self.opts.poll_interval,
                             longest=max(15.0, self.opts.poll_interval)).waits(deadline)
        response: Optional[httpx.Response] = None
        requests = 0
        while True:
            if not sleep(response):
                raise Pending(task, f"task {task.get('id')} still running at --timeout {self.opts.timeout:g} s")
            try:
                response = self.request("GET", url)
            except ValueError as e:
                raise Pending(task, f"the status of task {task.get('id')} could not be read: {e}") from None
            requests += 1 + retries_taken(response)
            if response.status_code in RETRIED_STATUS:
                raise Pending(task, f"the status of task {task.get('id')} could not be read: {public_url(url)} "
                                    f"answered {response.status_code} after {self.opts.max_retries} retries")
            if response.status_code == 404:  # the service forgot the task (expired): a new one next run
                raise ValueError(f"{public_url(url)} answered 404: task {task.get('id')} is not known there (any "
                                 "more); the next run submits it again")
            self.check(response, url)
            state = state_of(self.json(response, url))
            if state is not None:
                return state, requests

    def size_problem(self, size: tuple[int, int]) -> Optional[str]:
        """What is wrong with an image of ``size`` for ``--size``; None when it is what was asked."""
        expected = size_of(self.opts.size)
        if expected is not None and tuple(size) != expected:
            return f"asked for {expected[0]}x{expected[1]} but got {size[0]}x{size[1]}"
        return None

    @staticmethod
    def ratio_problem(size: tuple[int, int], ratio: Fraction, asked: str,
                      tolerance: float = RATIO_TOLERANCE) -> Optional[str]:
        """For a service that takes an aspect ratio and answers its own pixel size for it (which rounds the ratio
        to its sizes: Stability's 3:2 is 1216x832, 2.6% off), what is wrong with ``size``; None when it has the
        ratio asked for."""
        if abs(size[0] / size[1] - ratio) > tolerance * ratio:
            return f"asked for the aspect ratio {asked} but got {size[0]}x{size[1]}"
        return None

    # -- the protocol ----------------------------------------------------------------------------------------
    def run(self, prompt: Prompt, index: int, task: Optional[dict[str, Any]], submitted: Submitted,
            deadline: float) -> Answer:
        """Task ``index`` of ``prompt`` (its images are ``index * images_per_task`` onwards): submit it, or
        poll ``task`` an earlier run submitted, until done or ``deadline`` (``time.monotonic()``)."""
        raise NotImplementedError

    def close(self) -> None:
        if self._http is not None:
            self._http.close()


def size_of(size: Optional[str]) -> Optional[tuple[int, int]]:
    if not size or size == "auto":
        return None
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError as e:
        raise GenerateError(f"--size {size!r}: use WIDTHxHEIGHT, e.g. 1024x1024") from e
    return w, h
