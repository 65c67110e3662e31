"""Loader plumbing: where loader workers come from (a fork server), what they do with SIGTERM, and a
DataLoader that passes the epoch to its stream."""

from __future__ import annotations

import multiprocessing
import signal
from typing import Any

from torch.utils.data import DataLoader

from pipeline.data.stream import ShardStream

# SIGTERM: SLURM preempting, requeueing or cancelling the job; SIGUSR1: the warning --signal=SIGUSR1@90 sends
# before the time limit. Both are for the training process (pipeline/fit/preemption.py) to act on.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_job_signals(worker_id: int = 0) -> None:
    """Loader workers outlive the signals SLURM sends to the whole job step.

    SLURM signals every process of a job step. A worker killed by one (SIGUSR1's default action ends a
    process too) makes the main process's loader fail (PyTorch checks that its workers live) before the step
    can be checkpointed. So the workers, like their fork server, leave the decision to the main process: they
    stop when it shuts the loader down or exits (PyTorch's worker watchdog), or at SLURM's SIGKILL.
    """
    for signum in JOB_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def loader_context() -> multiprocessing.context.BaseContext:
    """Where loader workers come from: a fork server, not the training process.

    Forking the training process, which runs threads (gloo's, NCCL's, W&B's, PyTorch's), copies the locks
    those threads hold at that instant into the worker, which then waits on one forever: CI saw a resumed
    DDP rank's worker stuck inside ``os.fork`` and the whole job hung. The fork server is a fresh,
    single-threaded process that has imported the data code once (``pipeline.data.loader_server``); a
    worker forked from it starts at once, and still sees the stream's current epoch, which is pickled to
    it when the epoch's workers start. As with any fork server, a script that makes a loader with workers
    runs its top-level code under ``if __name__ == "__main__":``.
    """
    context = multiprocessing.get_context("forkserver")
    # "__main__" as multiprocessing's default: workers then do not re-import the main module one by one
    context.set_forkserver_preload(["__main__", "pipeline.data.loader_server"])
    _start_helpers_deaf_to_job_signals()
    return context


def _start_helpers_deaf_to_job_signals() -> None:
    """Start multiprocessing's helper processes (the resource tracker, the fork server) with the job signals
    blocked, a mask they keep across exec.

    SLURM signals every process of the job step. The resource tracker ignores SIGINT and SIGTERM but not
    SIGUSR1, whose default action ends it: after the time-limit warning, Python relaunched it ("process died
    unexpectedly, relaunching. Some resources might leak") and the new tracker printed a KeyError traceback for
    every semaphore the old one had registered. The fork server ignores both once ``loader_server`` is imported;
    blocked from its start, a signal during that import cannot end it either. Blocking, not ignoring, in this
    process: a signal that arrives meanwhile is delivered when the mask is restored, not lost.
    """
    from multiprocessing import forkserver, resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        resource_tracker.ensure_running()
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class EpochDataLoader(DataLoader):
    """A DataLoader that tells its stream the epoch before the workers start, and knows its length.

    Workers start at each epoch (non-persistent), so the updated ``epoch`` reaches them and every
    epoch draws a new, still deterministic, order — also after a resume, since the epoch comes from the
    Trainer rather than from a counter that restarts at zero.
    """

    def __init__(self, dataset: ShardStream, epoch_fn=None, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self.stream = dataset
        self._epoch_fn = epoch_fn

    def __iter__(self):
        if self._epoch_fn is not None:
            self.stream.epoch = int(self._epoch_fn())
        return super().__iter__()

    def __len__(self) -> int:
        if self.stream.batches_per_rank is not None:
            return self.stream.batches_per_rank
        raise TypeError("an evaluation stream has no fixed length")
