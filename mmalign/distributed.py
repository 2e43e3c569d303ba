"""Collectives that carry gradients, for losses that score against the global batch.

Shapes: B = per-process batch, W = number of processes, G = W * B, D = embedding width.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
from accelerate import Accelerator


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's (B, D) tensor into (G, D), in rank order, keeping autograd.

    In the backward pass each process receives the sum of the gradients that all
    processes computed for its rows, so a loss summed or averaged over processes
    gets exact gradients. Every process must pass the same shape. Without an
    initialised process group of two or more processes the tensor is returned as is.
    """
    if not is_distributed():
        return tensor
    # torch's functional collectives: the autograd-aware all-gather that replaced
    # torch.distributed.nn.functional.all_gather (deprecated in torch 2.14)
    gathered = functional_collectives.all_gather_single_autograd(tensor, 0, dist.group.WORLD)  # (G, D)
    return functional_collectives.wait_tensor(gathered) if hasattr(functional_collectives, "wait_tensor") else gathered


def launched_world_size() -> int:
    """Return the number of processes the launcher (torchrun, accelerate launch, MPI) started."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def create_accelerator(**kwargs: Any) -> Accelerator:
    """Create an Accelerator that uses every launched process, GPUs or not.

    Accelerate only sets up multi-process CPU training when asked for the CPU
    explicitly; without that, ``torchrun --nproc_per_node 2`` on a machine
    without GPUs would silently run two independent single-process trainings.

    Raises:
        RuntimeError: the launcher started several processes but Accelerate set up fewer.
    """
    launched = launched_world_size()
    use_cpu = launched > 1 and not torch.cuda.is_available() and not kwargs.get("cpu", False)
    accelerator = Accelerator(cpu=use_cpu or kwargs.pop("cpu", False), **kwargs)
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but Accelerate set up {accelerator.num_processes}; "
            "check the accelerate config (distributed_type) or launch with `accelerate launch`"
        )
    return accelerator
