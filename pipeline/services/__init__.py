"""Generators behind an API: ``genbench generate`` (a client of the OpenAI images API) and ``genbench serve``
(that API in front of a trained run), so remote services and local models reach the benchmark the same way."""

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # addresses that only this machine reaches: no key needed there
