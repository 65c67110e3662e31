"""genbench: train four families of image generators on the same shards and rank them fairly."""

__version__ = "0.1.0"
