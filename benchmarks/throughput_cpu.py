"""Training throughput and peak host memory of mmalign on the CPU, with 1 and 2 processes.

    python benchmarks/throughput_cpu.py [--model mm-tiny-minilm] [--steps 60] [--batch-size 64] \
        [--out benchmarks/results/throughput_cpu.json]

Each configuration runs the real trainer (``python -m mmalign.train``, under
torchrun for 2 processes) on the shipped shards with evaluation off, and reads
``data/samples_per_s`` from metrics.jsonl, leaving out the first logged
interval (start-up and warm-up). Peak memory is the largest RSS summed over
the whole process tree (launcher, trainers, loader workers), polled every 0.2 s.
``--batch-size`` is per process, so 2 processes train on a global batch twice
as large.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def peak_tree_rss(process: subprocess.Popen) -> float:
    """Wait for the process; return the peak RSS of it and its descendants, in MiB."""
    parent = psutil.Process(process.pid)
    peak = 0.0
    while process.poll() is None:
        total = 0
        try:
            for member in [parent, *parent.children(recursive=True)]:
                total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
        peak = max(peak, total / 2**20)
        time.sleep(0.2)
    return peak


def run(processes: int, args: argparse.Namespace, work: Path) -> dict:
    name = f"p{processes}"
    overrides = [
        f"model.name={args.model}",
        f"run.output_dir={work}",
        f"run.name={name}",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.log_every={args.log_every}",
        f"train.checkpoint_every={args.steps}",
        f"train.mixed_precision={args.precision}",
        f"data.workers={args.workers}",
        "eval.shards=null",
        "eval.build_index=false",
    ]
    launcher = [sys.executable, "-m", "mmalign.train"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        launcher += ["-m", "mmalign.train"]
    command = [*launcher, *overrides]
    # each process gets an equal share of the cores for its matrix math
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = peak_tree_rss(process)
    if process.returncode != 0:
        raise RuntimeError(f"training with {processes} processes failed:\n{process.stderr.read()[-3000:]}")
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    rates = [record["data/samples_per_s"] for record in records if "data/samples_per_s" in record][1:]
    waits = [record["data/wait_fraction"] for record in records if "data/wait_fraction" in record][1:]
    return {
        "processes": processes,
        "global_batch": args.batch_size * processes,
        "samples_per_s": round(sum(rates) / len(rates), 1),
        "data_wait_fraction": round(sum(waits) / len(waits), 3),
        "peak_rss_mib": round(peak),
        "wall_s": round(time.perf_counter() - started, 1),
        "command": command,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mm-tiny-minilm")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per process")
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--workers", type=int, default=1, help="loader workers per process")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as work:
        for processes in (int(item) for item in args.processes.split(",")):
            results.append(run(processes, args, Path(work)))
    print(f"{'processes':>9} {'global batch':>12} {'samples/s':>10} {'data wait':>9} {'peak RSS MiB':>12}")
    for result in results:
        print(
            f"{result['processes']:>9} {result['global_batch']:>12} {result['samples_per_s']:>10} "
            f"{result['data_wait_fraction']:>9.1%} {result['peak_rss_mib']:>12}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "machine": machine, "runs": results}, indent=1)
            + "\n"
        )


if __name__ == "__main__":
    main()
