"""PreemptionCheckpoint's signal handlers, without a cluster (tests/test_slurm.py runs them under SLURM)."""

from __future__ import annotations

import signal

from pipeline.fit.preemption import PreemptionCheckpoint


def test_teardown_leaves_the_handlers_the_trainer_restored(tmp_path):
    """Lightning installs its SIGTERM handler before ours and restores the original before callbacks' teardown;
    ours must not put Lightning's back (it broadcasts over a process group that is gone by then)."""
    original = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def lightnings(signum, frame):  # what the Trainer's signal connector installs for SIGTERM
        raise AssertionError("a stale handler ran")

    try:
        callback = PreemptionCheckpoint(tmp_path / "last.ckpt")
        callback.setup(None, None, "fit")  # SIGUSR1 from setup
        signal.signal(signal.SIGTERM, lightnings)  # the Trainer registers its handlers
        callback.on_train_start(None, None)  # SIGTERM replaced at the start of training
        assert signal.getsignal(signal.SIGTERM) == callback._handler == signal.getsignal(signal.SIGUSR1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the Trainer's teardown restores what it found
        callback.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # not `lightnings`
        assert signal.getsignal(signal.SIGUSR1) == original[signal.SIGUSR1]  # ours was still there: restored
    finally:
        for signum, handler in original.items():
            signal.signal(signum, handler)
