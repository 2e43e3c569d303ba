"""Training health: per-interval metrics, data accounting across processes and loader throughput."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from torch import nn

from mmalign.config import Config
from mmalign.data.report import DataReport

logger = get_logger("mmalign.train")


@dataclass
class PassTracker:
    """Sums the per-stream pass summaries until every stream has finished a pass."""

    num_streams: int
    passes: dict[int, dict[str, int]] = field(default_factory=dict)

    def add(self, summaries: list[dict[str, int]]) -> list[dict[str, int]]:
        """Add stream summaries; return the passes that every stream has now finished."""
        finished = []
        for summary in summaries:
            total = self.passes.setdefault(summary["pass"], {"streams": 0})
            total["streams"] += 1
            for key in ("distinct", "repeated", "read", "usable", "skipped"):
                total[key] = total.get(key, 0) + summary.get(key, 0)
            if total["streams"] == self.num_streams:
                finished.append({"pass": summary["pass"], **self.passes.pop(summary["pass"])})
        return finished


class Monitor:
    """Per-interval metrics: loss, logit scale, learning rate, gradient norm, throughput and data health."""

    def __init__(self, config: Config, accelerator: Accelerator, run_dir: Path, report: DataReport) -> None:
        self.config = config
        self.accelerator = accelerator
        self.metrics_path = run_dir / "metrics.jsonl"
        self.report = report
        self.local_delta = DataReport()
        self.passes = PassTracker(accelerator.num_processes * max(1, config.data.workers))
        self.pass_summaries: list[dict[str, int]] = []
        self.reset_interval()

    def reset_interval(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.wait_s = 0.0
        self.compute_s = 0.0
        self.samples = 0

    def record(
        self,
        infos: list[dict[str, Any]],
        loss: float,
        grad_norm: float,
        wait: float,
        compute: float,
    ) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.wait_s += wait
        self.compute_s += compute
        for info in infos:
            self.local_delta.add(info["report"])
            self.pass_summaries.extend(info["passes_done"])
        global_batch = self.config.train.batch_size * self.config.train.accumulation_steps
        self.samples += global_batch * self.accelerator.num_processes

    def log(self, step: int, model: nn.Module, lr: float) -> None:
        """Combine the interval's data reports over processes, check them, and write one metrics record."""
        deltas = gather_object([(self.local_delta.delta(DataReport()), self.pass_summaries)])
        for delta, summaries in deltas:
            self.report.add(delta)
            for finished in self.passes.add(summaries):
                logger.info(
                    "pass %d over the data finished: %d distinct samples, %d repeated, %d usable, %d skipped",
                    finished["pass"],
                    finished["distinct"],
                    finished["repeated"],
                    finished["usable"],
                    finished["skipped"],
                )
                self.write({"event": "pass_done", "step": step, **finished})
        self.local_delta = DataReport()
        self.pass_summaries = []
        self.report.check_fraction(self.config.data.max_skip_fraction, self.config.data.skip_check_after)

        elapsed = self.wait_s + self.compute_s
        wait_fraction = self.wait_s / elapsed if elapsed else 0.0
        metrics = {
            "step": step,
            "train/loss": sum(self.losses) / len(self.losses),
            "train/logit_scale": float(model.logit_scale.detach().exp()),
            "train/lr": lr,
            "train/grad_norm": sum(self.grad_norms) / len(self.grad_norms),
            "data/samples_per_s": self.samples / elapsed if elapsed else 0.0,
            "data/wait_fraction": wait_fraction,
            "data/wait_s": self.wait_s,
            "train/compute_s": self.compute_s,
            "data/read": self.report.read,
            "data/skipped": self.report.total_skipped,
        }
        logger.info(
            "step %d  loss %.4f  logit_scale %.2f  lr %.2e  grad_norm %.3f  %.0f samples/s  data wait %.0f%%",
            step,
            metrics["train/loss"],
            metrics["train/logit_scale"],
            lr,
            metrics["train/grad_norm"],
            metrics["data/samples_per_s"],
            100 * wait_fraction,
        )
        if wait_fraction > self.config.train.data_wait_warn_fraction:
            logger.warning(
                "the data loader is the bottleneck: %.0f%% of the last interval was spent waiting for batches; "
                "raise data.workers (now %d) if there are idle CPU cores, or store smaller images",
                100 * wait_fraction,
                self.config.data.workers,
            )
        self.write(metrics)
        self.accelerator.log({key: value for key, value in metrics.items() if key != "step"}, step=step)
        self.reset_interval()

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def set_aside_later_records(metrics_path: Path, step: int) -> int:
    """Move records after ``step`` (written by an interrupted run) to metrics.superseded.jsonl.

    A resumed run logs those steps again, so metrics.jsonl keeps one record per
    step; the interrupted run's records stay in the superseded file. Returns how
    many records were moved.
    """
    if not metrics_path.is_file():
        return 0
    kept, later = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            (later if json.loads(line).get("step", 0) > step else kept).append(line)
    if later:
        superseded = metrics_path.with_name("metrics.superseded.jsonl")
        with superseded.open("a", encoding="utf-8") as handle:
            handle.write("\n".join(later) + "\n")
        metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return len(later)
