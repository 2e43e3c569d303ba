"""Training-step throughput and model FLOPs utilisation (MFU) on one GPU.

    python benchmarks/gpu_throughput.py --models ViT-B-32,ViT-B-16 --out benchmarks/results/gpu_h200.json

For each model, in bf16: find the largest per-GPU batch (doubling from
``--start-batch`` until the GPU runs out of memory), then time mmalign's own
train step (forward, InfoNCE loss, backward, AdamW step) on that batch for
``--seconds``. Batches are random images and token ids already on the GPU, so
the numbers are the model step alone, without the data loader. FLOPs per
sample are counted by torch's FlopCounterMode on one step (forward and
backward); MFU divides the achieved FLOP rate by ``--peak-tflops`` (dense bf16;
989 for an H100 SXM or H200). Sized to finish in well under 5 minutes on one
H200 for the two default models. ``--device cpu --models mm-test`` checks
the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from mmalign.config import ModelConfig, OptimConfig
from mmalign.loss import InfoNCELoss
from mmalign.model import create_model
from mmalign.optim import create_optimizer
from mmalign.train import train_step


def random_batch(model: torch.nn.Module, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    size = model.mmalign_model_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    context = model.mmalign_model_cfg["text_cfg"]["context_length"]
    text = torch.randint(1, 49000, (batch, context), device=device)
    text[:, -1] = 49407  # the end-of-text token, where open_clip pools
    return {"image": torch.randn(batch, 3, size, size, device=device), "text": text}


def step(model, optimizer, accelerator, batch) -> None:
    train_step(model, InfoNCELoss(), [batch], accelerator)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flops_per_sample(model, optimizer, accelerator, device: torch.device, batch: int = 8) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step(model, optimizer, accelerator, random_batch(model, batch, device))
    return counter.get_total_flops() / batch


def fits(model, optimizer, accelerator, device: torch.device, batch: int) -> bool:
    try:
        for _ in range(2):
            step(model, optimizer, accelerator, random_batch(model, batch, device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False


def measure(name: str, args: argparse.Namespace, accelerator: Accelerator) -> dict:
    device = accelerator.device
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name)).to(device)
    optimizer = create_optimizer(model, OptimConfig())
    flops = flops_per_sample(model, optimizer, accelerator, device)

    batch, largest = args.start_batch, None
    while batch <= args.max_batch and fits(model, optimizer, accelerator, device, batch):
        largest = batch
        batch *= 2
    if largest is None:
        raise RuntimeError(f"{name}: even a batch of {args.start_batch} does not fit")

    data = random_batch(model, largest, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        step(model, optimizer, accelerator, data)
        steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    samples_per_s = steps * largest / elapsed
    result = {
        "model": name,
        "batch_per_gpu": largest,
        "steps": steps,
        "samples_per_s": round(samples_per_s, 1),
        "gflops_per_sample": round(flops / 1e9, 2),
        "achieved_tflops": round(flops * samples_per_s / 1e12, 1),
        "mfu": round(flops * samples_per_s / (args.peak_tflops * 1e12), 3),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del model, optimizer, data
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-32,ViT-B-16")
    parser.add_argument("--start-batch", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=16384)
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per model")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    accelerator = Accelerator(mixed_precision="bf16", cpu=args.device == "cpu")
    gpu = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu"
    results = [measure(name, args, accelerator) for name in args.models.split(",")]
    print(f"device: {gpu}; torch {torch.__version__}; bf16")
    print(f"{'model':<12} {'batch/GPU':>9} {'samples/s':>10} {'GFLOP/sample':>12} {'TFLOP/s':>8} {'MFU':>6}")
    for result in results:
        print(
            f"{result['model']:<12} {result['batch_per_gpu']:>9} {result['samples_per_s']:>10} "
            f"{result['gflops_per_sample']:>12} {result['achieved_tflops']:>8} {result['mfu']:>6.1%}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"device": gpu, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
        args.out.write_text(json.dumps({**record, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
