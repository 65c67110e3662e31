"""Imported only by the data loaders' fork server (``set_forkserver_preload`` in loaders.py), never by the
training process.

It loads once what every worker needs, so forking a worker from the server costs no imports, and it makes
the server ignore SIGTERM and SIGUSR1: SLURM signals every process of a job step, and loader workers (the
server's children) stop when their parent dies, so a server killed by a preemption's signal would take the
loader down before the training process has checkpointed. The server still exits with the training process.
"""

import pipeline.data.stream  # noqa: F401  (torch, webdataset and the stream classes the workers unpickle)
from pipeline.data.loaders import ignore_job_signals

ignore_job_signals()
