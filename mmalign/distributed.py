"""Collectives that carry gradients, for losses that score against the global batch.

Shapes: B = per-process batch, W = number of processes, G = W * B, D = embedding width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


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
    return torch.cat(dist_fn.all_gather(tensor), dim=0)  # (G, D)
