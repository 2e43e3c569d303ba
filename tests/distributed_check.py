"""Run under torchrun: compare distributed InfoNCE training steps with one process on the global batch.

    torchrun --nproc_per_node 2 tests/distributed_check.py --out DIR [--accumulation K] [--freeze PART]

Every process builds the same model, takes its slice of a fixed global batch,
and runs mmalign's train step under Accelerate (DDP over gloo). Rank 0 also
runs a plain single-process reference on the whole global batch. Each rank
writes its loss and gradients to DIR/rank-R.json; rank 0 adds the reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mmalign.config import ModelConfig
from mmalign.distributed import create_accelerator
from mmalign.loss import InfoNCELoss
from mmalign.model import create_model
from mmalign.train import train_step

BATCH = 4
DIM_IMAGE = 32


def global_batch(world: int, accumulation: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    total = BATCH * world * accumulation
    images = torch.rand(total, 3, DIM_IMAGE, DIM_IMAGE, generator=generator)
    texts = torch.randint(1, 49000, (total, 16), generator=generator)
    texts[:, -1] = 49407  # an end-of-text token in every row
    return images, texts


def local_micro_batches(images, texts, rank: int, world: int, accumulation: int) -> list[dict]:
    """Micro-batch j of rank r holds global rows ((j * world) + r) * B ... + B."""
    batches = []
    for micro in range(accumulation):
        start = (micro * world + rank) * BATCH
        batches.append({"image": images[start : start + BATCH], "text": texts[start : start + BATCH]})
    return batches


def reference(model, images, texts, world: int, accumulation: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Plain symmetric InfoNCE on the whole global batch, in the same row order as the distributed run."""
    order = []
    for rank in range(world):
        for micro in range(accumulation):
            start = (micro * world + rank) * BATCH
            order.extend(range(start, start + BATCH))
    image_emb, text_emb, logit_scale = model(images[order], texts[order])[:3]
    logits = logit_scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    labels = torch.arange(len(order))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return loss.item(), grads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--freeze", default="none", choices=["none", "image", "text", "logit_scale", "image+text"])
    args = parser.parse_args()

    accelerator = create_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    freeze = args.freeze.split("+")
    config = ModelConfig(
        name="mm-test",
        freeze_image="image" in freeze,
        freeze_text="text" in freeze,
        freeze_logit_scale="logit_scale" in freeze,
    )
    torch.manual_seed(0)
    model = create_model(config).double()
    torch.manual_seed(0)
    reference_model = create_model(config).double()
    reference_model.load_state_dict(model.state_dict())

    images, texts = global_batch(world, args.accumulation)
    images = images.double()
    prepared = accelerator.prepare(model)
    micro_batches = local_micro_batches(images, texts, rank, world, args.accumulation)
    loss = train_step(prepared, InfoNCELoss(), micro_batches, accelerator)
    mean_loss = accelerator.reduce(loss, reduction="mean").item()
    grads = {
        name: param.grad.tolist()
        for name, param in accelerator.unwrap_model(prepared).named_parameters()
        if param.grad is not None
    }
    result = {"rank": rank, "world": world, "loss": loss.item(), "mean_loss": mean_loss, "grads": grads}
    if rank == 0:
        ref_loss, ref_grads = reference(reference_model, images, texts, world, args.accumulation)
        result["reference_loss"] = ref_loss
        result["reference_grads"] = {name: grad.tolist() for name, grad in ref_grads.items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank-{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
