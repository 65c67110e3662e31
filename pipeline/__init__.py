"""genbench: train four families of image generators on the same shards and rank them fairly."""

__version__ = "0.1.0"

from pipeline import threads as _threads

# before anything imports torch: its OpenMP runtime reads the wait policy once, when it loads (pipeline/threads.py)
_threads.set_wait_policy()
