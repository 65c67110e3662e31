"""HTTP for the providers that are not the OpenAI SDK's: one httpx client whose transport retries 408, 409,
429 and 5xx answers and dropped connections with exponential backoff and jitter, honouring ``Retry-After``
(httpx-retries: the urllib3 ``Retry`` policy on httpx), and the polling of a submitted task.

Submissions are POSTs and are retried too: the answers retried (429, 5xx, a connection dropped before any
answer) are those where the service did not take the job, which is the same policy as the openai SDK's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import httpx
from httpx_retries import Retry, RetryTransport

RETRIED_STATUS = (408, 409, 429, 500, 502, 503, 504)


class _LockoutAfter429(httpx.HTTPTransport):
    """A 429 without ``Retry-After`` from a service whose documented rate limit locks a client out for a fixed
    time: that time as its ``Retry-After``, so the retries wait it out instead of spending themselves inside it."""

    def __init__(self, lockout: float) -> None:
        super().__init__()
        self.lockout = lockout

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if response.status_code == 429 and "retry-after" not in response.headers:
            response.headers["Retry-After"] = str(math.ceil(self.lockout))  # httpx-retries reads whole seconds
        return response


def retrying_client(timeout: float, max_retries: int, backoff: float = 0.5,
                    lockout: Optional[float] = None) -> httpx.Client:
    """``lockout``: seconds a 429 without Retry-After means (Stability's documented 60 s); None: the backoff."""
    retry = Retry(total=max_retries, backoff_factor=backoff, status_forcelist=RETRIED_STATUS,
                  allowed_methods=["GET", "POST"], max_backoff_wait=max(60.0, lockout or 0.0))
    inner = _LockoutAfter429(lockout) if lockout else httpx.HTTPTransport()
    return httpx.Client(timeout=timeout, transport=RetryTransport(transport=inner, retry=retry),
                        follow_redirects=True)


def retries_taken(response: httpx.Response) -> int:
    retry = response.extensions.get("retry")
    return int(getattr(retry, "attempts_made", 0))


@dataclass
class PollSchedule:
    """How often a running task is asked about: never sooner than ``first`` seconds apart, then a ``fraction``
    of the time the task has been running so far, at most ``longest`` seconds apart, so polls thin out as a
    task ages (a 60 s task is asked ~30 times at first=1, not 60) while the wait after it finishes stays
    within max(first, 10%) of its run time, which a fixed-interval loop cannot beat by more. A
    ``Retry-After`` on a status answer takes precedence. Nothing is asked past the deadline."""

    first: float = 1.0
    fraction: float = 0.1
    longest: float = 15.0

    def waits(self, deadline: float) -> Callable[[Optional[httpx.Response]], bool]:
        """A sleeper: called after each status answer, it sleeps until the next poll and returns True, or
        returns False at once when the next poll would be past the deadline (``time.monotonic()``)."""
        started = time.monotonic()

        def sleep(response: Optional[httpx.Response]) -> bool:
            wait = min(max(self.first, self.fraction * (time.monotonic() - started)), self.longest)
            after = response.headers.get("retry-after") if response is not None else None
            if after and after.strip().replace(".", "", 1).isdigit():
                wait = float(after)
            if time.monotonic() + wait > deadline:
                return False
            time.sleep(wait)
            return True

        return sleep


def json_of(response: httpx.Response, what: str) -> Any:
    """The JSON body, or ValueError naming the endpoint and what came back instead."""
    try:
        return response.json()
    except ValueError:
        kind = response.headers.get("content-type", "no content type")
        raise ValueError(f"{what} answered {response.status_code} with {kind}, not JSON "
                         f"({response.text[:80]!r})") from None
