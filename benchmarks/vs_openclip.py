"""Compare CPU training throughput and peak memory of mmalign and OpenCLIP's trainer.

/tmp/venv_probe/bin/python benchmarks/vs_openclip.py --openclip-python /tmp/venv_openclip/bin/python \
    --steps 200 --batch-size 128 --precision fp32 --workers 1 --out results.json

Run it with the Python of an environment that has mmalign and psutil. Both trainers run in the
repository root, so a relative --shards pattern is resolved there.
OpenCLIP's trainer (``python -m open_clip_train.main``, shipped in the open_clip_torch wheel) needs
``webdataset<=0.2.86``, so it runs from its own environment:

    python3 -m venv /tmp/venv_openclip
    /tmp/venv_openclip/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 \
        'webdataset<=0.2.86' pandas

Both trainers run one after the other (mmalign first), on the CPU only, and start from random
initialisation. They share the architecture (copied into OpenCLIP's model_configs folder), shards,
batch size, precision, number of steps, loader workers and seed. They also share the AdamW settings,
the linear warmup then cosine decay of the learning rate, and gradient clipping at norm 1.

Throughput is the steady-state rate in samples/s. The script stamps each training log line as it
arrives. It divides the samples trained between the first log line at or after ``--warm-fraction``
of the steps and the last log line by the wall time between those two lines. This leaves out
start-up, worker start and shuffle-buffer filling, and the same clock measures both trainers. The
rate each trainer reports itself over the same steps is stored as well.

Peak memory is the maximum, over polls every 0.2 s, of the RSS (and PSS) summed over the trainer
process and its descendants (the loader workers). Summed RSS counts the pages that forked workers
share once per process, while PSS splits them between the processes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
# prints the Python version, torch's intra-op thread count and the version of each module named in argv
VERSIONS_SNIPPET = (
    "import importlib, json, sys, torch\n"
    "found = {name: importlib.import_module(name).__version__ for name in sys.argv[1:]}\n"
    "print(json.dumps({'python': sys.version.split()[0], 'torch_threads': torch.get_num_threads(), **found}))"
)
LIBRARIES = ["torch", "open_clip", "webdataset"]
# OpenCLIP's trainer resolves a plain --model name from the model_configs folder of its package
MODEL_CONFIG_DIR_SNIPPET = "import open_clip, pathlib; print(pathlib.Path(open_clip.__file__).parent / 'model_configs')"
MMALIGN_STEP_LINE = re.compile(r"mmalign\.train: (?:\[RANK \d+\] )?step (\d+)\s+loss ([\d.]+)")
OPENCLIP_STEP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): ([\d.]+).*?Contrastive_loss: ([\d.]+)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openclip-python", required=True, help="Python of the environment with open_clip_torch")
    parser.add_argument("--mmalign-python", default=sys.executable, help="Python of the environment with mmalign")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each run")
    parser.add_argument("--batch-size", type=int, default=128, help="image-text pairs per step")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 is autocast")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, help="linear warmup steps (default: a tenth of --steps)")
    parser.add_argument("--log-every", type=int, help="steps between log lines (default: a twentieth of --steps)")
    parser.add_argument("--warm-fraction", type=float, default=0.2, help="share of steps left out as warm-up")
    parser.add_argument("--model", default="mm-tiny", help="architecture in mmalign/configs/models")
    parser.add_argument("--shards", default="shards/train-{000..007}.tar", help="training shards, brace pattern")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds after which a run is killed")
    parser.add_argument("--work-dir", help="folder for run outputs and logs (default: a new folder in /tmp)")
    parser.add_argument("--out", default="results.json", help="JSON file for the results")
    args = parser.parse_args()
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    args.log_every = max(1, args.steps // 20) if args.log_every is None else args.log_every
    # OpenCLIP rounds its batch count up to a multiple of the workers, so other step counts would differ
    if args.steps % max(1, args.workers):
        parser.error(f"--steps {args.steps} must be a multiple of --workers {args.workers}")
    if not 0 <= args.warm_fraction < 1:
        parser.error(f"--warm-fraction {args.warm_fraction} must be in [0, 1)")
    return args


# Matched settings of the two trainers. Each word becomes one argument after str.format. The text
# tower is unfrozen because mmalign's default config freezes it. mmalign parses override values as
# YAML, where a bare no is the boolean false, so fp32 is passed as "no" in quotes.
MMALIGN_ARGS = """
    -m mmalign.cli train run.output_dir={work_dir}/mmalign run.name=bench run.seed={seed}
    model.name={model} model.freeze_text=false data.train_shards={shards} data.caption_key=txt
    data.workers={workers} train.steps={steps} train.batch_size={batch_size} train.mixed_precision={mmalign_precision}
    train.log_every={log_every} train.checkpoint_every={steps} optim.lr={lr} optim.warmup_steps={warmup}
    optim.schedule=cosine optim.weight_decay=0.1 optim.betas=[0.9,0.98] optim.eps=1e-6 optim.grad_clip=1.0
    eval.shards=null
"""
# OpenCLIP picks betas and eps from the model name (only names containing "vit" get 0.98 and 1e-6),
# so they are given. Its one epoch is --steps batches because --steps is a multiple of --workers.
# NOTE: these differences remain. OpenCLIP shuffles samples in a fixed buffer of 5000 undecoded
# samples (mmalign: data.shuffle_buffer, 1000), uses PyTorch's prefetch factor 2 (mmalign: 4)
# and applies weight decay to the token and positional embeddings (mmalign does not).
OPENCLIP_ARGS = """
    -m open_clip_train.main --model {model} --train-data {shards} --dataset-type webdataset
    --train-num-samples {samples} --batch-size {batch_size} --epochs 1 --workers {workers}
    --precision {openclip_precision} --device cpu --lr {lr} --warmup {warmup} --wd 0.1
    --beta1 0.9 --beta2 0.98 --eps 1e-6 --grad-clip-norm 1.0 --seed {seed}
    --log-every-n-steps {log_every} --save-frequency 0 --logs {work_dir}/open_clip --name bench
"""


def trainer_commands(args: argparse.Namespace, work_dir: Path) -> dict[str, list[str]]:
    values = {
        **vars(args),
        "work_dir": work_dir,
        "samples": args.steps * args.batch_size,
        "mmalign_precision": "bf16" if args.precision == "bf16" else '"no"',
        "openclip_precision": "amp_bf16" if args.precision == "bf16" else "fp32",
    }
    return {
        "mmalign": [args.mmalign_python, *(word.format(**values) for word in MMALIGN_ARGS.split())],
        "open_clip": [args.openclip_python, *(word.format(**values) for word in OPENCLIP_ARGS.split())],
    }


def install_model_config(openclip_python: str, model: str) -> Path:
    """Copy mmalign's architecture JSON into OpenCLIP's model_configs folder unless it is there already."""
    source = REPO / "mmalign" / "configs" / "models" / f"{model}.json"
    if not source.is_file():
        raise SystemExit(f"architecture file not found: {source}; pick --model from mmalign/configs/models")
    folder = Path(subprocess.check_output([openclip_python, "-c", MODEL_CONFIG_DIR_SNIPPET], text=True).strip())
    target = folder / source.name
    if not target.is_file() or target.read_bytes() != source.read_bytes():
        target.write_bytes(source.read_bytes())
        print(f"copied {source} to {target}")
    return target


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """Return the RSS and PSS in bytes summed over a process and its descendants."""
    rss = pss = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            info = member.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0)
    return rss, pss


def run_trainer(name: str, command: list[str], work_dir: Path, timeout: float) -> dict:
    """Run one trainer; return its output lines with arrival times, its peak memory and its log path.

    Raises SystemExit when the trainer fails or times out.
    """
    print(f"\n[{name}] {shlex.join(command)}", flush=True)
    log_path = work_dir / f"{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )

    def read_output() -> None:
        with log_path.open("w", encoding="utf-8") as log:
            for line in process.stdout:
                lines.append((time.monotonic() - start, line))
                log.write(line)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    watched = psutil.Process(process.pid)
    peak_rss = peak_pss = 0
    while process.poll() is None:
        try:
            rss, pss = tree_memory(watched)
        except psutil.NoSuchProcess:
            break
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if time.monotonic() - start > timeout:
            for member in [*watched.children(recursive=True), watched]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            print(f"[{name}] timed out after {timeout:.0f} s (--timeout), so it was killed")
            break
        time.sleep(0.2)
    returncode = process.wait()
    reader.join()
    if returncode != 0:
        raise SystemExit(f"[{name}] failed with exit status {returncode}; its output is in {log_path}")
    print(f"[{name}] finished in {time.monotonic() - start:.1f} s; output in {log_path}")
    return {"lines": lines, "peak_rss_mib": peak_rss / MIB, "peak_pss_mib": peak_pss / MIB, "log": str(log_path)}


def parse_progress(name: str, lines: list[tuple[float, str]], batch_size: int) -> list[tuple[int, float, float, float]]:
    """Return (step, arrival seconds, reported seconds per step, loss) for each training log line.

    The seconds per step are NaN for mmalign, which writes its own figure to metrics.jsonl. The loss
    is mmalign's mean over the log interval and OpenCLIP's loss of the logged step.
    """
    points = []
    for seconds, line in lines:
        if name == "mmalign" and (match := MMALIGN_STEP_LINE.search(line)):
            points.append((int(match[1]), seconds, float("nan"), float(match[2])))
        elif name == "open_clip" and (match := OPENCLIP_STEP_LINE.search(line)):
            points.append((int(match[1]) // batch_size, seconds, float(match[2]), float(match[3])))
    return points


def summarize(name: str, run: dict, args: argparse.Namespace, work_dir: Path) -> dict:
    """Compute the steady-state samples/s, the trainer's own figure for the same steps, and the last logged loss."""
    points = parse_progress(name, run["lines"], args.batch_size)
    first = next((point for point in points if point[0] >= args.warm_fraction * args.steps), None)
    if first is None or points[-1][0] <= first[0]:
        raise SystemExit(
            f"[{name}] found fewer than two training log lines after the warm-up in {run['log']}; "
            "raise --steps or lower --log-every"
        )
    last = points[-1]
    samples = (last[0] - first[0]) * args.batch_size
    # Each log record covers the steps since the previous one. OpenCLIP logs their mean seconds
    # per step, and mmalign writes to metrics.jsonl their samples/s over data wait plus compute.
    if name == "mmalign":
        records = (work_dir / "mmalign" / "bench" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        intervals = [json.loads(line) for line in records]
        intervals = [(item["step"], item["data/samples_per_s"]) for item in intervals if "data/samples_per_s" in item]
        reported_s = sum(
            (step - previous) * args.batch_size / rate
            for (previous, _), (step, rate) in itertools.pairwise(intervals)
            if previous >= first[0]
        )
    else:
        reported_s = sum(
            (step - previous) * per_step
            for (previous, *_), (step, _, per_step, _) in itertools.pairwise(points)
            if previous >= first[0]
        )
    return {
        "samples_per_s": samples / (last[1] - first[1]),
        "reported_samples_per_s": samples / reported_s if reported_s else None,
        "measured_steps": [first[0], last[0]],
        "peak_rss_mib": run["peak_rss_mib"],
        "peak_pss_mib": run["peak_pss_mib"],
        "last_logged_loss": last[3],
        "log": run["log"],
    }


def environment_versions(python: str, modules: list[str]) -> dict:
    output = subprocess.check_output([python, "-c", VERSIONS_SNIPPET, *modules], text=True, cwd=REPO)
    return json.loads(output.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    args = parse_args()
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="vs_openclip-")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    if any((work_dir / folder).exists() for folder in ("mmalign", "open_clip")):
        raise SystemExit(f"--work-dir {work_dir} already contains an earlier run; pass an empty or new folder")
    install_model_config(args.openclip_python, args.model)
    commands = trainer_commands(args, work_dir)

    results = {}
    for name, command in commands.items():
        results[name] = summarize(name, run_trainer(name, command, work_dir, args.timeout), args, work_dir)

    mmalign, openclip = results["mmalign"], results["open_clip"]
    report = {
        "settings": {key: value for key, value in vars(args).items() if key not in ("out",)},
        "results": results,
        "ratio_mmalign_to_open_clip": {
            "samples_per_s": mmalign["samples_per_s"] / openclip["samples_per_s"],
            "peak_rss": mmalign["peak_rss_mib"] / openclip["peak_rss_mib"],
            "peak_pss": mmalign["peak_pss_mib"] / openclip["peak_pss_mib"],
        },
        "versions": {
            "mmalign_env": environment_versions(args.mmalign_python, [*LIBRARIES, "accelerate", "mmalign"]),
            "open_clip_env": environment_versions(args.openclip_python, LIBRARIES),
        },
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))},
        "commands": {name: shlex.join(command) for name, command in commands.items()},
        "work_dir": str(work_dir),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    header = ("trainer", "steps", "samples/s", "reported", "peak RSS MiB", "peak PSS MiB", "loss")
    print("\n" + "".join(f"{cell:>14}" for cell in header))
    for name, result in results.items():
        steps = "{}-{}".format(*result["measured_steps"])
        reported = result["reported_samples_per_s"] or float("nan")
        cells = (name, steps, f"{result['samples_per_s']:.1f}", f"{reported:.1f}")
        cells += (f"{result['peak_rss_mib']:.0f}", f"{result['peak_pss_mib']:.0f}", f"{result['last_logged_loss']:.3f}")
        print("".join(f"{cell:>14}" for cell in cells))
    ratio = report["ratio_mmalign_to_open_clip"]
    print(f"mmalign / open_clip: samples/s x{ratio['samples_per_s']:.2f}, peak RSS x{ratio['peak_rss']:.2f}")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
