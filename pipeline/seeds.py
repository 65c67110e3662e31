"""Seeds derived from a stable digest: the same on every machine, Python version and process.

``hash()`` of a tuple is an implementation detail of CPython (and salted for strings), so nothing that
decides which sample is drawn, or in which order data is read, may depend on it.
"""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (their ``str`` joined by ``/``)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
