"""Contrastive losses.

Shapes: B = per-process batch, W = number of processes, G = W * B (global batch),
D = embedding width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.distributed import gather_with_grad, rank_and_world


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors to float32; leave float32 and float64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (the CLIP loss) over the global batch.

    Each process scores its B image rows against all G texts and its B text rows
    against all G images (logits = logit_scale * cosine similarity), and takes the
    cross-entropy against the matching pair in each direction, averaged over the
    two directions and the B rows. Embeddings of other processes are gathered with
    autograd, so averaging this loss over processes (as DDP does with gradients)
    gives the loss and the gradients of one process holding the whole global batch.
    Memory per process is B x G logits, never G x G.

    Shape:
        image_emb: (B, D), text_emb: (B, D), any scale (normalised here).
        logit_scale: scalar tensor, the multiplier itself (exp of the learnt log-scale).
        output: scalar, this process's share of the loss.

    Every process must pass the same B.
    """

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        if image_emb.shape != text_emb.shape:
            raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} differ")
        rank, _ = rank_and_world()
        batch = image_emb.shape[0]

        # normalise in at least float32, whatever the towers ran in
        image_emb = F.normalize(at_least_float32(image_emb), dim=-1)  # (B, D)
        text_emb = F.normalize(at_least_float32(text_emb), dim=-1)  # (B, D)

        # candidates: every process's embeddings, in rank order
        all_image_emb = gather_with_grad(image_emb)  # (G, D)
        all_text_emb = gather_with_grad(text_emb)  # (G, D)

        # row i of this process matches global column rank * B + i
        labels = torch.arange(batch, device=image_emb.device) + rank * batch  # (B,)
        logits_per_image = logit_scale * image_emb @ all_text_emb.T  # (B, G)
        logits_per_text = logit_scale * text_emb @ all_image_emb.T  # (B, G)

        image_to_text = F.cross_entropy(logits_per_image, labels)
        text_to_image = F.cross_entropy(logits_per_text, labels)
        return (image_to_text + text_to_image) / 2
