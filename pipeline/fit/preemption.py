"""SLURM preemption and time limits: checkpoint at a step boundary, requeue, resume with the same run.

The templates ask SLURM for ``--signal=SIGUSR1@90``: 90 s before the job's end (time limit or
preemption) every task gets SIGUSR1. Lightning's own auto-requeue saves the checkpoint *inside* the
signal handler, which can run in the middle of a backward pass or a collective and then hangs or
writes a torn state (Lightning-AI/pytorch-lightning#21406). Here the handler only sets a flag; at the
next batch end all ranks agree (one all-reduce) and save ``checkpoints/last.ckpt`` together, training
stops, and rank 0 requeues the job (``scontrol requeue``). The requeued job runs the same command,
finds the same run directory (named by the config hash), and resumes from that checkpoint with the
same W&B run id (``<run>/wandb_id``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Checkpoint

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR1


def under_slurm() -> bool:
    """Inside a SLURM job step (srun) that Lightning treats as the cluster environment."""
    return SLURMEnvironment.detect()


def slurm_job_id() -> Optional[str]:
    """The id ``scontrol requeue`` needs: ARRAYJOB_TASK for an array task, else the job id."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_job(job_id: str) -> None:
    """Put the job back in the queue; SLURM then ends this allocation and starts the job again later."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"could not requeue SLURM job {job_id} ({e}); resubmit the same command to resume "
                           "from checkpoints/last.ckpt") from e
    if done.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} failed: {done.stderr.strip()}; resubmit the same command "
                           "to resume from checkpoints/last.ckpt")


class PreemptionCheckpoint(Checkpoint):
    """On SIGUSR1 or SIGTERM: checkpoint at the next batch end on every rank and stop training.

    SIGUSR1 is the warning ``--signal=SIGUSR1@90`` asks for before the time limit: ``fit`` then requeues the
    job. SIGTERM is how SLURM ends a job it preempts, requeues (``scontrol requeue``) or cancels; it requeues
    a preempted job itself, and waits ``KillWait`` seconds (30 by default) before SIGKILL, time enough to save
    a step's state.

    A ``Checkpoint`` subclass, so Lightning runs it after every other callback, as it does ModelCheckpoint:
    the EMA of the weights has taken this step's update when the checkpoint is written.

    Args:
        checkpoint: where the checkpoint goes (the run's ``checkpoints/last.ckpt``, which a rerun resumes from).
    """

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.signal: Optional[int] = None  # the first signal received, on this rank
        self.preempted_at_step: Optional[int] = None
        self.requeue = False  # True when the job should requeue itself (SIGUSR1 on some rank)
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        # Nothing but a flag: the handler may run between any two bytecodes, even mid-collective.
        self.signal = self.signal or signum

    def _install(self, signum: int) -> None:
        self._previous.setdefault(signum, signal.signal(signum, self._handler))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._install(REQUEUE_SIGNAL)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Installed after the Trainer's own SIGTERM handler, and instead of it: that one broadcasts inside the
        # handler, a collective that can pair with another one on a rank that got the signal a moment later,
        # and then every rank hangs until SIGKILL (seen here on 2 nodes in 1 of 3 runs).
        self._install(signal.SIGTERM)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            for signum, previous in self._previous.items():
                # Only where our handler is still the one installed. The Trainer has restored its own originals
                # by now; putting back the handler ours replaced for SIGTERM would revive Lightning's, which
                # broadcasts over a process group already gone: the SIGTERM that `scontrol requeue` sends after
                # a SIGUSR1 checkpoint then printed a gloo traceback while the process exited.
                if signal.getsignal(signum) == self._handler:
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            self._previous = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.preempted_at_step is not None:
            return
        # Every rank calls this at the same step; any rank signalled means all stop here.
        if not trainer.strategy.reduce_boolean_decision(self.signal is not None, all=False):
            return
        self.requeue = trainer.strategy.reduce_boolean_decision(self.signal == REQUEUE_SIGNAL, all=False)
        trainer.save_checkpoint(str(self.checkpoint))  # collective: all ranks, rank 0 writes (atomically)
        self.preempted_at_step = trainer.global_step
        trainer.should_stop = True
        log.warning("%s: saved %s at step %d, stopping", "SIGUSR1" if self.requeue else "SIGTERM", self.checkpoint,
                    trainer.global_step)

    @property
    def preempted(self) -> bool:
        return self.preempted_at_step is not None


def allocation_problem(devices: Any) -> Optional[str]:
    """Why this SLURM job's allocation does not fit the trainer (more GPUs per node than it trains on), or None."""
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    if isinstance(devices, str) and devices.isdigit():  # `--trainer.devices=4` parses as the string "4"
        devices = int(devices)
    if not gpus or not isinstance(devices, int) or int(gpus) <= devices:
        return None
    return (f"this SLURM job holds {gpus} GPUs per node but trains on {devices} device(s) per node (one task per "
            f"GPU); submit with --ntasks-per-node={gpus}, or ask for --gpus-per-node={devices}")
