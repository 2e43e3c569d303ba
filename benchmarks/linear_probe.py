"""Time the evaluation's linear probe on synthetic embeddings of a given size.

    python benchmarks/linear_probe.py --images 595 --classes 9 --dim 384 --images 5000 --classes 100 --dim 512

Each case is unit vectors around one random centre per class, with Gaussian noise
of --noise. The probe runs as `mmalign eval` runs it: 5 folds, with the penalty
chosen inside each training fold. Prints and writes one JSON record per case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mmalign.metrics import linear_probe_metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, action="append", required=True, help="labelled images, per case")
    parser.add_argument("--classes", type=int, action="append", required=True, help="classes, per case")
    parser.add_argument("--dim", type=int, action="append", required=True, help="embedding width, per case")
    parser.add_argument("--noise", type=float, default=3.0, help="noise around the class centres")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    if not len(args.images) == len(args.classes) == len(args.dim):
        parser.error("give --images, --classes and --dim once per case")

    records = []
    for images, classes, dim in zip(args.images, args.classes, args.dim, strict=True):
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, classes, (images,), generator=generator)
        centres = torch.randn(classes, dim, generator=generator)
        features = centres[labels] + args.noise * torch.randn(images, dim, generator=generator)
        features = torch.nn.functional.normalize(features, dim=1)
        started = time.perf_counter()
        results, details = linear_probe_metrics(features, labels, args.folds, device=args.device)
        record = {
            "images": images,
            "classes": classes,
            "dim": dim,
            "noise": args.noise,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - started, 2),
            **results,
            **details,
        }
        records.append(record)
        sys.stdout.write(json.dumps(record) + "\n")
    if args.out:
        args.out.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
