"""AdamW with decoupled weight decay on weight matrices only, and the learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mmalign.config import OptimConfig

logger = logging.getLogger("mmalign.train")


def decays(name: str, param: nn.Parameter) -> bool:
    """Return whether weight decay applies: not to biases, norm gains, the logit scale or embeddings."""
    if param.ndim < 2:
        # biases, norm gains, logit scale and bias, class embeddings
        return False
    return "embedding" not in name and not name.endswith(".bias")


def create_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in a decayed and a non-decayed group."""
    decayed, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decayed if decays(name, param) else plain).append(param)
    if not decayed and not plain:
        raise ValueError("every parameter is frozen: unset model.freeze_image, model.freeze_text or both")
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def effective_warmup(config: OptimConfig, total_steps: int) -> int:
    """Return the warmup length, clipped (with a warning) so it never outlasts the run."""
    if config.warmup_steps > total_steps:
        logger.warning(
            "optim.warmup_steps=%d is longer than the run (%d steps); warming up for %d steps instead",
            config.warmup_steps,
            total_steps,
            total_steps,
        )
        return total_steps
    return config.warmup_steps


def create_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """Linear warmup from 0 to ``lr``, then cosine decay to ``min_lr`` (or constant) until ``total_steps``."""
    warmup = effective_warmup(config, total_steps)
    floor = config.min_lr / config.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
