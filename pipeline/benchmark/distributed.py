"""Process placement for the benchmark stage: one process, or every rank of a torchrun/SLURM job.

Lightning's cluster environments read the launcher's variables (torchrun's RANK/WORLD_SIZE,
SLURM's SLURM_PROCID/SLURM_NTASKS and node list), so ``genbench benchmark`` under ``torchrun`` or
``srun`` joins one process group without a launcher flag of its own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on loopback, for a torchrun rendezvous started on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Placement:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def init_from_environment() -> Placement:
    """Join the job's process group (NCCL on GPUs, gloo on CPU) when launched with several ranks.

    Lightning Fabric sets the group up from the detected cluster environment, as the Trainer does
    for training; genbench only reads the launcher's sizes to tell Fabric what to expect.
    """
    from lightning_fabric import Fabric
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        world, per_node = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    elif SLURMEnvironment.detect():
        world = int(os.environ["SLURM_NTASKS"])
        per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])  # "2(x3)": 2 tasks on 3 nodes
    else:
        return Placement()
    if world <= 1:
        return Placement()
    fabric = Fabric(accelerator="auto", devices=per_node, num_nodes=world // per_node, strategy="ddp")
    fabric.launch()  # already launched by torchrun/srun: this only initialises the process group
    return Placement(fabric.global_rank, fabric.world_size, fabric.local_rank)


def broadcast(value: Any, placement: Placement) -> Any:
    """Rank 0's ``value`` on every rank (decisions such as "the cache exists" must be taken once)."""
    if placement.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(placement: Placement) -> None:
    if placement.world_size > 1:
        dist.barrier()


def shutdown(placement: Placement) -> None:
    if placement.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
