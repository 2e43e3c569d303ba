"""Contrastive training under Accelerate: one code path for one CPU, one GPU or many.

mmalign train [--config FILE] [key=value ...]
accelerate launch [accelerate flags] -m mmalign.train --config FILE [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmalign import checkpoint as ckpt
from mmalign.config import Config, ConfigError, load_config, save_config
from mmalign.data.reader import DataError, FieldSpec, ShardError, check_urls
from mmalign.data.report import DataReport
from mmalign.data.schema import check_schema
from mmalign.data.stream import StreamSettings, TrainStream, describe_split
from mmalign.evaluate import evaluate_model, format_table
from mmalign.logs import configure_logging
from mmalign.loss import InfoNCELoss
from mmalign.model import (
    clamp_logit_scale,
    create_model,
    create_tokenizer,
    image_transforms,
    save_model,
    set_train_mode,
)
from mmalign.optim import create_optimizer, create_scheduler

logger = get_logger("mmalign.train")


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, or a run directory that is already in use."""


@dataclass
class Progress:
    """Where training is: the step, and each worker stream's position on this process."""

    step: int = 0
    batches: int = 0
    workers: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self, info: dict[str, Any]) -> None:
        self.batches += 1
        self.workers[str(info["worker"])] = {
            "pass": info["pass"],
            "position": info["position"],
            "batches": info["batches"],
        }

    def data_state(self) -> dict[str, Any]:
        return {"batches": self.batches, "workers": self.workers}


@dataclass
class PassTracker:
    """Sums the per-stream pass summaries until every stream has finished a pass."""

    num_streams: int
    passes: dict[int, dict[str, int]] = field(default_factory=dict)

    def add(self, summaries: list[dict[str, int]]) -> list[dict[str, int]]:
        """Add stream summaries; return the passes that every stream has now finished."""
        finished = []
        for summary in summaries:
            total = self.passes.setdefault(summary["pass"], {"streams": 0, "distinct": 0, "repeated": 0})
            total["streams"] += 1
            total["distinct"] += summary["distinct"]
            total["repeated"] += summary["repeated"]
            if total["streams"] == self.num_streams:
                finished.append({"pass": summary["pass"], **self.passes.pop(summary["pass"])})
        return finished


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mmalign train",
        description="Train an image-text model with the symmetric InfoNCE loss.",
        epilog="Overrides are dotted config keys, e.g. optim.lr=5e-4 train.steps=200 run.resume=auto",
    )
    parser.add_argument("--config", help="YAML or TOML config file (default: the shipped emoji-tiny config)")
    parser.add_argument("overrides", nargs="*", help="section.key=value pairs applied over the config")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmalign train`` and ``python -m mmalign.train``; returns the exit status."""
    args = parse_args(argv)
    configure_logging()
    overrides = [item[2:] if item.startswith("--") else item for item in args.overrides]
    try:
        config = load_config(args.config, overrides)
        train(config)
    except (ConfigError, DataError, ShardError, TrainingError, FileNotFoundError) as error:
        logging.getLogger("mmalign").error("%s", error)
        return 2
    return 0


def create_accelerator(config: Config, run_dir: Path) -> Accelerator:
    return Accelerator(
        mixed_precision=config.train.mixed_precision,
        log_with="tensorboard" if config.train.tensorboard else None,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
    )


def prepare_run_dir(config: Config, accelerator: Accelerator) -> tuple[Path, Path | None]:
    """Create the run directory; return it and the checkpoint to resume from, if any.

    Raises:
        TrainingError: the directory holds an earlier run and ``run.resume`` is ``none``.
    """
    run_dir = Path(config.run.output_dir) / config.run.name
    resume = config.run.resume
    checkpoint: Path | None = None
    if resume == "auto":
        checkpoint = ckpt.latest_checkpoint(run_dir)
        if checkpoint is None:
            logger.info("run.resume=auto: no complete checkpoint in %s, starting from step 0", run_dir)
    elif resume != "none":
        checkpoint = Path(resume)
        if not (checkpoint / ckpt.STATE_FILE).is_file():
            raise ConfigError(f"run.resume={resume!r} is not a complete checkpoint folder (no {ckpt.STATE_FILE})")
    elif ckpt.list_checkpoints(run_dir) or (run_dir / "model.safetensors").exists():
        raise TrainingError(
            f"{run_dir} already holds a run; continue it with run.resume=auto, "
            f"or start a new one with run.name=NAME (the existing files are left untouched)"
        )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_staging(run_dir)
        save_config(config, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    return run_dir, checkpoint


def budget_steps(config: Config, world_size: int) -> int:
    """Return the number of optimizer steps from train.steps or train.samples."""
    if config.train.steps is not None:
        return config.train.steps
    per_step = config.train.batch_size * config.train.accumulation_steps * world_size
    return math.ceil(config.train.samples / per_step)


def field_spec(config: Config) -> FieldSpec:
    data = config.data
    return FieldSpec(
        image_keys=tuple(key.lower() for key in data.image_keys),
        caption_key=data.caption_key.lower(),
        caption_json_field=data.caption_json_field,
    )


def create_loader(
    config: Config, accelerator: Accelerator, urls: list[str], model: nn.Module, resume: dict[str, Any] | None
) -> DataLoader:
    data = config.data
    settings = StreamSettings(
        urls=tuple(urls),
        fields=field_spec(config),
        batch_size=config.train.batch_size,
        seed=config.run.seed,
        shuffle_shards=data.shuffle_shards,
        shuffle_buffer=data.shuffle_buffer,
        max_pixels=data.max_pixels,
        encoding_fallback=data.caption_encoding_fallback,
        warn_every=data.warn_every,
        max_skip_fraction=data.max_skip_fraction,
        skip_check_after=data.skip_check_after,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        workers=data.workers,
    )
    logger.info(describe_split(len(urls), accelerator.num_processes * max(1, data.workers)))
    tokenizer = create_tokenizer(model)
    train_transform, _ = image_transforms(model, tuple(data.augment_scale))
    stream = TrainStream(settings, train_transform, tokenizer, tokenizer.count_truncated, resume)
    # the loader is not passed to accelerator.prepare: every process reads and decodes its own shards
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=data.workers,
        prefetch_factor=4 if data.workers else None,
        persistent_workers=data.workers > 0,
        pin_memory=accelerator.device.type == "cuda",
        worker_init_fn=_worker_init,
    )


def _worker_init(worker_id: int) -> None:
    # decoding is single-threaded work; extra torch threads per worker only contend for cores
    torch.set_num_threads(1)


def train_step(
    model: nn.Module, loss_fn: InfoNCELoss, micro_batches: list[dict[str, Any]], accelerator: Accelerator
) -> torch.Tensor:
    """Run forward and backward for one optimizer step; return this process's loss.

    With several micro-batches the negatives span all of them: embeddings are
    computed without gradients, the loss over the whole effective batch gives
    gradients for the embeddings, and each micro-batch is then recomputed with
    gradients and back-propagated against them (the GradCache method).
    """
    if len(micro_batches) == 1:
        with accelerator.autocast():
            image_emb, text_emb, logit_scale = model(micro_batches[0]["image"], micro_batches[0]["text"])[:3]
        loss = loss_fn(image_emb, text_emb, logit_scale)
        accelerator.backward(loss)
        return loss.detach()

    # 1. embed every micro-batch without gradients
    with torch.no_grad(), accelerator.autocast():
        outputs = [model(batch["image"], batch["text"])[:3] for batch in micro_batches]
    image_emb = torch.cat([out[0] for out in outputs]).float().requires_grad_()  # (k*B, D)
    text_emb = torch.cat([out[1] for out in outputs]).float().requires_grad_()  # (k*B, D)
    logit_scale = outputs[0][2].detach().float().requires_grad_()

    # 2. the loss of the whole effective batch, differentiated to the embeddings only
    loss = loss_fn(image_emb, text_emb, logit_scale)
    loss.backward()

    # 3. recompute each micro-batch with gradients; gradients are synchronised on the last one
    size = micro_batches[0]["image"].shape[0]
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        rows = slice(index * size, (index + 1) * size)
        with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            image_out, text_out, scale_out = model(batch["image"], batch["text"])[:3]
            surrogate = (image_out.float() * image_emb.grad[rows]).sum() + (
                text_out.float() * text_emb.grad[rows]
            ).sum()
            if last:
                surrogate = surrogate + scale_out.float() * logit_scale.grad
        accelerator.backward(surrogate)
    return loss.detach()


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: Config, accelerator: Accelerator
) -> float:
    """Clip, step, schedule and clamp the logit scale; return the gradient norm before clipping."""
    max_norm = config.optim.grad_clip if config.optim.grad_clip is not None else math.inf
    grad_norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    clamp_logit_scale(accelerator.unwrap_model(model), config.model.max_logit_scale)
    return float(grad_norm)


def next_micro_batches(
    batches: Iterator[dict[str, Any]], count: int, progress: Progress, device: torch.device
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Take ``count`` batches from the loader; return them on the device, and their info records."""
    taken, infos = [], []
    for _ in range(count):
        batch = next(batches)
        progress.record(batch["info"])
        infos.append(batch["info"])
        taken.append(
            {
                "image": batch["image"].to(device, non_blocking=True),
                "text": batch["text"].to(device, non_blocking=True),
                "keys": batch["keys"],
                "shards": batch["info"].get("shards", []),
            }
        )
    return taken, infos


def save_checkpoint(
    run_dir: Path,
    progress: Progress,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Accelerator,
    report: DataReport,
    keep: int,
) -> None:
    """Write checkpoints/step-N atomically (every process takes part)."""
    staging = ckpt.staging_dir(run_dir, progress.step)
    data_states = gather_object([progress.data_state()])
    rng_tensors, rng_values = ckpt.rng_state()
    rng_values_all = gather_object([rng_values])
    if accelerator.is_main_process:
        staging.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    ckpt.save_file_tensors(staging / f"rng-rank-{accelerator.process_index}.safetensors", rng_tensors)
    if accelerator.is_main_process:
        ckpt.save_model_state(staging / "model.safetensors", accelerator.unwrap_model(model).state_dict())
        tensors, optimizer_meta = ckpt.optimizer_to_files(optimizer.state_dict())
        ckpt.save_file_tensors(staging / "optimizer.safetensors", tensors)
        state = {
            "step": progress.step,
            "world_size": accelerator.num_processes,
            "optimizer": optimizer_meta,
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "data": data_states,
            "data_report": report.to_dict(),
            "rng": rng_values_all,
        }
        ckpt.write_json(staging / ckpt.STATE_FILE, state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = ckpt.commit(run_dir, progress.step, keep)
        logger.info("saved checkpoint %s", path)
    accelerator.wait_for_everyone()


def restore_checkpoint(
    checkpoint: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Accelerator,
    workers: int,
) -> tuple[int, dict[str, Any] | None, DataReport]:
    """Load a checkpoint into the model and optimizer; return the step, this process's data state and the report."""
    state = ckpt.read_state(checkpoint)
    accelerator.unwrap_model(model).load_state_dict(ckpt.load_tensors(checkpoint / "model.safetensors"))
    tensors = ckpt.load_tensors(checkpoint / "optimizer.safetensors")
    optimizer.load_state_dict(ckpt.optimizer_from_files(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rank = accelerator.process_index
    data_state = None
    same_layout = state["world_size"] == accelerator.num_processes
    same_layout = same_layout and all(len(item["workers"]) <= max(1, workers) for item in state["data"])
    rng_file = checkpoint / f"rng-rank-{rank}.safetensors"
    if same_layout and rng_file.is_file():
        ckpt.restore_rng(ckpt.load_tensors(rng_file), state["rng"][rank])
        data_state = state["data"][rank]
    else:
        logger.warning(
            "checkpoint %s was written by %d processes; the data streams restart from the first pass",
            checkpoint,
            state["world_size"],
        )
    report = DataReport.from_dict(state.get("data_report", {}))
    logger.info("resumed from %s at step %d", checkpoint, state["step"])
    return state["step"], data_state, report


def train(config: Config) -> Path:
    """Train a model as ``config`` says; return the run directory.

    Writes config.yaml, metrics.jsonl, checkpoints/, the final model
    (model.safetensors, open_clip_config.json), data_report.json and eval.json.
    """
    # bad shards or keys fail here, before a run directory exists
    urls = check_urls(config.data.train_shards, "data.train_shards")
    check_schema(urls[0], field_spec(config), "data")
    if config.eval.shards is not None:
        check_urls(config.eval.shards, "eval.shards")

    run_dir = Path(config.run.output_dir) / config.run.name
    accelerator = create_accelerator(config, run_dir)
    run_dir, checkpoint = prepare_run_dir(config, accelerator)

    set_seed(config.run.seed)
    model = create_model(config.model)
    optimizer = create_optimizer(model, config.optim)
    total_steps = budget_steps(config, accelerator.num_processes)
    scheduler = create_scheduler(optimizer, config.optim, total_steps)
    if config.model.compile:
        compile_towers(model)
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step, data_state, report = 0, None, DataReport(warn_every=config.data.warn_every)
    if checkpoint is not None:
        start_step, data_state, report = restore_checkpoint(
            checkpoint, model, optimizer, scheduler, accelerator, config.data.workers
        )
    loader = create_loader(config, accelerator, urls, accelerator.unwrap_model(model), data_state)
    log_run_start(config, accelerator, model, total_steps, start_step)
    if config.train.tensorboard:
        accelerator.init_trackers(config.run.name, config=flat_hparams(config))

    progress = Progress(step=start_step)
    if data_state is not None:
        progress.batches = data_state["batches"]
        progress.workers = data_state["workers"]
    run_loop(config, accelerator, run_dir, model, optimizer, scheduler, loader, progress, report, total_steps)
    finish(config, accelerator, run_dir, model, report)
    return run_dir


def compile_towers(model: nn.Module) -> None:
    """Compile each tower in place with torch.compile; parameter names stay the same."""
    model.visual.compile()
    text_tower = model.text if hasattr(model, "text") else model.transformer
    text_tower.compile()


def log_run_start(config: Config, accelerator: Accelerator, model: nn.Module, total: int, start: int) -> None:
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    global_batch = config.train.batch_size * config.train.accumulation_steps * accelerator.num_processes
    logger.info(
        "model %s: %.1fM parameters (%.1fM trainable); %d processes on %s, mixed precision %s",
        config.model.name,
        parameters / 1e6,
        trainable / 1e6,
        accelerator.num_processes,
        accelerator.device.type,
        config.train.mixed_precision,
    )
    logger.info(
        "training steps %d to %d with a global batch of %d pairs (%d per process x %d micro-batches x %d processes)",
        start,
        total,
        global_batch,
        config.train.batch_size,
        config.train.accumulation_steps,
        accelerator.num_processes,
    )


def flat_hparams(config: Config) -> dict[str, Any]:
    flat = {}
    for section, values in config.model_dump(mode="json").items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else json.dumps(value)
    return flat


def run_loop(
    config: Config,
    accelerator: Accelerator,
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: DataLoader,
    progress: Progress,
    report: DataReport,
    total_steps: int,
) -> None:
    """Train from ``progress.step`` to ``total_steps``, logging and checkpointing on the way."""
    loss_fn = InfoNCELoss()
    monitor = Monitor(config, accelerator, run_dir, report)
    batches = iter(loader)
    set_train_mode(accelerator.unwrap_model(model))
    bar = tqdm(total=total_steps, initial=progress.step, disable=not accelerator.is_main_process, desc="train")
    while progress.step < total_steps:
        wait_start = time.perf_counter()
        micro_batches, infos = next_micro_batches(
            batches, config.train.accumulation_steps, progress, accelerator.device
        )
        compute_start = time.perf_counter()
        loss = train_step(model, loss_fn, micro_batches, accelerator)
        global_loss = accelerator.reduce(loss, reduction="mean").item()
        if not math.isfinite(global_loss):
            shards = sorted({shard for batch in micro_batches for shard in batch["shards"]})
            raise TrainingError(
                f"non-finite loss {global_loss} at step {progress.step + 1}; shards in flight: {shards}"
            )
        grad_norm = optimizer_step(model, optimizer, scheduler, config, accelerator)
        progress.step += 1
        bar.update(1)
        monitor.record(
            progress, infos, global_loss, grad_norm, compute_start - wait_start, time.perf_counter() - compute_start
        )
        if progress.step % config.train.log_every == 0 or progress.step == total_steps:
            monitor.log(progress.step, accelerator.unwrap_model(model), scheduler.get_last_lr()[0])
        if progress.step % config.train.checkpoint_every == 0 or progress.step == total_steps:
            save_checkpoint(
                run_dir,
                progress,
                model,
                optimizer,
                scheduler,
                accelerator,
                monitor.report,
                config.train.keep_checkpoints,
            )
    bar.close()


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
        progress: Progress,
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
                    "pass %d over the data finished: %d distinct samples, %d repeated",
                    finished["pass"],
                    finished["distinct"],
                    finished["repeated"],
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


def finish(config: Config, accelerator: Accelerator, run_dir: Path, model: nn.Module, report: DataReport) -> None:
    """Save the final model and data report, then evaluate on the held-out shards."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        save_model(unwrapped, run_dir, extra={"trained_steps": budget_steps(config, accelerator.num_processes)})
        ckpt.write_json(run_dir / "data_report.json", report.to_dict())
        logger.info("data: %s", report.summary())
        logger.info("saved the final model to %s (model.safetensors, open_clip_config.json)", run_dir)
    accelerator.wait_for_everyone()
    if config.eval.shards is not None:
        results = evaluate_model(unwrapped, config, accelerator, run_dir)
        if accelerator.is_main_process:
            sys.stdout.write(format_table(results) + "\n")
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
