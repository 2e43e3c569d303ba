"""Stream the shipped shards for many passes and report host memory (RSS) after each pass.

    python benchmarks/soak_loader.py --passes 30 --workers 2 [--out benchmarks/results/soak.json]

The loader is mmalign's training stream with persistent DataLoader workers,
the default model's image transform and tokenizer, and no model step, so the
numbers show the loader alone. RSS is summed over the main process and its
worker processes. It should level off after the first pass, once the shuffle
buffer and the prefetched batches are full, and then stay flat.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import psutil
from torch.utils.data import DataLoader

from mmalign.config import ModelConfig
from mmalign.data.reader import FieldSpec, check_urls
from mmalign.data.stream import StreamSettings, TrainStream
from mmalign.model import create_model, create_tokenizer, image_transforms


def tree_rss_mb() -> float:
    main = psutil.Process()
    processes = [main, *main.children(recursive=True)]
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="shards/train-{000..007}.tar")
    parser.add_argument("--passes", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--model", default="mm-tiny-minilm", help="architecture whose transform and tokenizer run")
    parser.add_argument("--out", type=Path, help="write the per-pass records here as JSON")
    args = parser.parse_args()

    model = create_model(ModelConfig(name=args.model))
    tokenizer = create_tokenizer(model)
    train_transform, _ = image_transforms(model)
    del model
    settings = StreamSettings(
        urls=tuple(check_urls(args.shards, "--shards")),
        fields=FieldSpec(caption_key="json:captions"),
        batch_size=args.batch_size,
        shuffle_buffer=args.shuffle_buffer,
        workers=args.workers,
    )
    stream = TrainStream(settings, train_transform, tokenizer, tokenizer.count_truncated)
    loader = DataLoader(stream, batch_size=None, num_workers=args.workers, persistent_workers=args.workers > 0)

    records = []
    finished: dict[int, int] = {}
    streams = max(1, args.workers)
    start = time.perf_counter()
    samples = 0
    print(f"{'pass':>4} {'seconds':>8} {'samples/s':>10} {'RSS MB':>8}")
    for batch in loader:
        samples += len(batch["keys"])
        for summary in batch["info"]["passes_done"]:
            finished[summary["pass"]] = finished.get(summary["pass"], 0) + 1
            if finished[summary["pass"]] < streams:
                continue
            elapsed = time.perf_counter() - start
            record = {
                "pass": summary["pass"],
                "seconds": round(elapsed, 2),
                "samples_per_s": round(samples / elapsed, 1),
                "rss_mb": round(tree_rss_mb(), 1),
            }
            records.append(record)
            print(f"{record['pass']:>4} {record['seconds']:>8} {record['samples_per_s']:>10} {record['rss_mb']:>8}")
        if len(records) >= args.passes:
            break

    first, last = records[min(1, len(records) - 1)]["rss_mb"], records[-1]["rss_mb"]
    print(f"RSS after pass 1: {first} MB; after pass {records[-1]['pass']}: {last} MB ({last - first:+.1f} MB)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"args": {k: str(v) for k, v in vars(args).items()}, "cpu": platform.processor(), "passes": records}
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
