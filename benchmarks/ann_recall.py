"""Measure the recall and speed of the index's approximate search against exact search.

    python benchmarks/ann_recall.py --index runs/emoji-tiny/index --gallery 100000 \
        [--out benchmarks/results/ann_recall.json]

Two galleries are measured with the FAISS indexes that `mmalign index build`
creates above its `--ann-threshold` (HNSW and IVF, inner product):

- real: the image and caption embeddings of a built index (`--index`), with
  captions as queries for the images and images as queries for the captions;
- synthetic: `--gallery` unit vectors drawn around 1,000 random centres, the
  shape of real embedding clouds, queried with noisy copies of gallery rows.

Each row gives the build and tuning time and the efSearch or nprobe that
`index build` tunes to reach `--target` recall@10 on half of the queries. It
then gives recall@10 against exact search on the other half (the fraction of
the exact top 10 that the approximate search also returns), and queries per
second for exact search (one matrix product per batch of 64 queries) and for
FAISS.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmalign.index import faiss_index, measured_recall, search_parameter, tune_search


def synthetic_gallery(size: int, dim: int, queries: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (gallery, queries): unit vectors in clusters, and noisy copies of random gallery rows."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(1000, dim, generator=generator), dim=1)
    assignment = torch.randint(0, len(centres), (size,), generator=generator)
    gallery = centres[assignment] + 0.6 * torch.randn(size, dim, generator=generator) / dim**0.5
    gallery = torch.nn.functional.normalize(gallery, dim=1)
    picked = gallery[torch.randint(0, size, (queries,), generator=generator)]
    noisy = picked + 0.3 * torch.randn(queries, dim, generator=generator) / dim**0.5
    return gallery, torch.nn.functional.normalize(noisy, dim=1)


def queries_per_second(search, queries: torch.Tensor, batch: int = 64) -> float:
    start = time.perf_counter()
    for first in range(0, len(queries), batch):
        search(queries[first : first + batch])
    return len(queries) / (time.perf_counter() - start)


def measure(name: str, gallery: torch.Tensor, queries: torch.Tensor, target: float) -> list[dict]:
    rows = []
    # as in `mmalign index build`: tuned on one half of the queries, measured on the other
    tuning, held_out = queries[: len(queries) // 2], queries[len(queries) // 2 :]
    exact_speed = queries_per_second(lambda batch: (batch @ gallery.T).topk(10, dim=1), held_out)
    for kind in ("hnsw", "ivf"):
        start = time.perf_counter()
        index = faiss_index(gallery, kind)
        value = tune_search(index, gallery, tuning, target)
        build_s = time.perf_counter() - start
        parameter, _ = search_parameter(index)
        row = {
            "gallery": name,
            "size": len(gallery),
            "dim": gallery.shape[1],
            "queries": len(held_out),
            "kind": kind,
            "build_and_tune_s": round(build_s, 2),
            parameter: value,
            "recall@10": round(measured_recall(index, gallery, held_out), 4),
            "exact_queries_per_s": round(exact_speed, 1),
            "faiss_queries_per_s": round(
                queries_per_second(lambda batch, index=index: index.search(batch.float().numpy(), 10), held_out), 1
            ),
        }
        print(json.dumps(row))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="a folder written by `mmalign index build`")
    parser.add_argument("--gallery", type=int, default=100_000, help="synthetic gallery size (0 to skip)")
    parser.add_argument("--dim", type=int, default=384, help="synthetic embedding width")
    parser.add_argument("--queries", type=int, default=1000, help="queries: half tune the index, half measure it")
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 the search setting is tuned to reach")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()

    rows = []
    if args.index:
        images = load_file(str(args.index / "image_embeddings.safetensors"))["embeddings"].float()
        texts = load_file(str(args.index / "text_embeddings.safetensors"))["embeddings"].float()
        generator = torch.Generator().manual_seed(0)
        texts_sample = texts[torch.randperm(len(texts), generator=generator)[: args.queries]]
        images_sample = images[torch.randperm(len(images), generator=generator)[: args.queries]]
        rows += measure("real images", images, texts_sample, args.target)
        rows += measure("real captions", texts, images_sample, args.target)
    if args.gallery:
        gallery, queries = synthetic_gallery(args.gallery, args.dim, args.queries, seed=0)
        rows += measure("synthetic", gallery, queries, args.target)

    if args.out:
        result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({**result, "rows": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
