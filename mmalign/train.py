"""Contrastive training under Accelerate: one code path for one CPU, one GPU or many.

mmalign train [--config FILE] [key=value ...]
accelerate launch [accelerate flags] -m mmalign.train --config FILE [key=value ...]
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mmalign import checkpoint as ckpt
from mmalign.cli import train_parser
from mmalign.config import Config, ConfigError, config_to_dict, load_config, save_config
from mmalign.data.reader import DataError, FieldSpec, ShardError, check_urls
from mmalign.data.report import DataReport
from mmalign.data.schema import check_schema
from mmalign.data.stream import StreamSettings, TrainStream, describe_split, pass_order
from mmalign.distributed import create_accelerator
from mmalign.evaluate import evaluate_model, format_table, read_class_file
from mmalign.index import build_index
from mmalign.logs import configure_logging
from mmalign.loss import InfoNCELoss, at_least_float32
from mmalign.model import (
    cache_text_embeddings,
    clamp_logit_scale,
    create_model,
    create_tokenizer,
    image_transforms,
    save_model,
    set_train_mode,
)
from mmalign.monitor import Monitor, set_aside_later_records
from mmalign.optim import create_optimizer, create_scheduler

logger = get_logger("mmalign.train")


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, or a run directory that is already in use."""


@dataclass
class Progress:
    """The training position: the step, and each loader stream's place in the data on this process."""

    step: int = 0
    batches: int = 0
    workers: dict[str, dict[str, int]] = field(default_factory=dict)
    shards: set[str] = field(default_factory=set)

    def record(self, info: dict[str, Any]) -> None:
        self.batches += 1
        self.shards.update(info.get("shards", []))
        self.workers[str(info["worker"])] = {
            "pass": info["pass"],
            "position": info["position"],
            "batches": info["batches"],
        }

    def data_state(self) -> dict[str, Any]:
        return {"batches": self.batches, "workers": self.workers}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmalign train`` and ``python -m mmalign.train``; returns the exit status."""
    args = train_parser().parse_args(argv)
    configure_logging()
    overrides = [item[2:] if item.startswith("--") else item for item in args.overrides]
    try:
        config = load_config(args.config, overrides)
        train(config)
    except (ConfigError, DataError, ShardError, TrainingError, FileNotFoundError) as error:
        logging.getLogger("mmalign").error("%s", error)
        return 2
    except KeyboardInterrupt:
        # train() has logged the step and the checkpoint to resume from
        return 130
    return 0


def create_run_accelerator(config: Config, run_dir: Path) -> Accelerator:
    return create_accelerator(
        mixed_precision=config.train.mixed_precision,
        log_with="tensorboard" if config.train.tensorboard else None,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
    )


def prepare_run_dir(config: Config, accelerator: Accelerator) -> tuple[Path, list[Path]]:
    """Create the run directory; return it and the checkpoints to try resuming from, newest first.

    Raises:
        TrainingError: the directory contains an earlier run and ``run.resume`` is ``none``.
        ConfigError: ``run.resume`` names a folder that is not a checkpoint.
    """
    run_dir = Path(config.run.output_dir) / config.run.name
    resume = config.run.resume
    checkpoints: list[Path] = []
    if resume == "auto":
        checkpoints = ckpt.list_checkpoints(run_dir)[::-1]
        if not checkpoints:
            logger.info("run.resume=auto: no complete checkpoint in %s, starting from step 0", run_dir)
    elif resume != "none":
        checkpoints = [Path(resume)]
        if not (checkpoints[0] / ckpt.STATE_FILE).is_file():
            raise ConfigError(
                f"run.resume={resume!r} is not a complete checkpoint folder (no {ckpt.STATE_FILE}); "
                "use none, auto, or a checkpoints/step-N folder"
            )
    elif ckpt.list_checkpoints(run_dir) or (run_dir / "model.safetensors").exists():
        raise TrainingError(
            f"{run_dir} already contains a run; continue it with run.resume=auto, "
            f"or start a new one with run.name=NAME (the existing files are left untouched)"
        )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_staging(run_dir)
        if not checkpoints:
            # a run that failed before its first checkpoint left records that are not this run's
            moved = set_aside_later_records(run_dir / "metrics.jsonl", 0)
            if moved:
                logger.info("moved %d metrics records of an earlier attempt to metrics.superseded.jsonl", moved)
    accelerator.wait_for_everyone()
    return run_dir, checkpoints


def resume_from(
    checkpoints: list[Path],
    config: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Accelerator,
    order: Callable[[int], list[str]],
) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
    """Restore the first readable checkpoint of ``checkpoints`` (newest first).

    A checkpoint that cannot be read (a damaged file) is skipped with a warning, and the
    one before it is tried. A checkpoint written for another architecture stops the run.

    Raises:
        TrainingError: no checkpoint could be read, or the model does not match.
    """
    for checkpoint in checkpoints:
        try:
            restored = ckpt.restore_checkpoint(
                checkpoint, model, optimizer, scheduler, accelerator, config.data.workers, order
            )
        except RuntimeError as error:
            if "size mismatch" in str(error) or "Missing key" in str(error) or "Unexpected key" in str(error):
                raise TrainingError(
                    f"{checkpoint} was written for another architecture than model.name={config.model.name!r}; "
                    "resume with the model it was trained with, or start a new run with run.name=NAME"
                ) from None
            logger.warning("cannot read checkpoint %s (%s); trying the one before it", checkpoint, error)
            continue
        except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as error:
            # a damaged file: safetensors and json report these as ValueError/OSError subclasses
            logger.warning(
                "cannot read checkpoint %s (%s: %s); trying the one before it", checkpoint, type(error).__name__, error
            )
            continue
        warn_changed_settings(ckpt.read_state(checkpoint).get("config"), config)
        return restored
    raise TrainingError(
        f"none of the checkpoints {[str(path) for path in checkpoints]} could be read; "
        "start a new run with run.name=NAME, or run.resume=none after moving the run directory away"
    )


def warn_changed_settings(saved: dict[str, Any] | None, config: Config) -> None:
    """Warn about optimizer and model settings that differ from the checkpoint's."""
    if not saved:
        return
    current = config_to_dict(config)
    changed = [
        f"{section}.{key} ({saved[section].get(key)!r} -> {value!r})"
        for section in ("model", "optim")
        for key, value in current[section].items()
        if section in saved and saved[section].get(key) != value
    ]
    if changed:
        logger.warning(
            "resuming with settings that differ from the checkpoint's: %s. The optimizer's own settings "
            "(learning rate, betas, weight decay) come from the checkpoint; the schedule follows the config",
            ", ".join(changed),
        )


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

    With several micro-batches the negatives span all of them. Embeddings are first
    computed without gradients, and the loss over the whole effective batch gives the
    gradients of those embeddings. Each micro-batch is then recomputed with gradients
    and back-propagated against them (the GradCache method).
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
    image_emb = at_least_float32(torch.cat([out[0] for out in outputs])).requires_grad_()  # (k*B, D)
    text_emb = at_least_float32(torch.cat([out[1] for out in outputs])).requires_grad_()  # (k*B, D)
    logit_scale = at_least_float32(outputs[0][2].detach()).requires_grad_()

    # 2. the loss of the whole effective batch, differentiated to the embeddings only
    loss = loss_fn(image_emb, text_emb, logit_scale)
    loss.backward()

    # 3. recompute each micro-batch with gradients; gradients are synchronised on the last one
    size = micro_batches[0]["image"].shape[0]
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        rows = slice(index * size, (index + 1) * size)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                image_out, text_out, scale_out = model(batch["image"], batch["text"])[:3]
            surrogate = (at_least_float32(image_out) * image_emb.grad[rows]).sum()
            surrogate = surrogate + (at_least_float32(text_out) * text_emb.grad[rows]).sum()
            if last:
                surrogate = surrogate + at_least_float32(scale_out) * logit_scale.grad
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
    micro_batches, infos = [], []
    for _ in range(count):
        batch = next(batches)
        progress.record(batch["info"])
        infos.append(batch["info"])
        micro_batches.append(
            {
                "image": batch["image"].to(device, non_blocking=True),
                "text": batch["text"].to(device, non_blocking=True),
                "keys": batch["keys"],
                "shards": batch["info"].get("shards", []),
            }
        )
    return micro_batches, infos


def train(config: Config) -> Path:
    """Train a model as ``config`` sets out; return the run directory.

    Writes config.yaml, metrics.jsonl, checkpoints/, the final model
    (model.safetensors, open_clip_config.json), data_report.json and eval.json.
    """
    # bad shards or keys fail here, before a run directory exists
    urls = check_urls(config.data.train_shards, "data.train_shards")
    check_schema(urls[0], field_spec(config), "data")
    if config.eval.shards is not None:
        check_urls(config.eval.shards, "eval.shards")
        if config.eval.classes is not None:
            read_class_file(config.eval.classes)

    run_dir = Path(config.run.output_dir) / config.run.name
    accelerator = create_run_accelerator(config, run_dir)
    run_dir, checkpoints = prepare_run_dir(config, accelerator)

    set_seed(config.run.seed)
    model = create_model(config.model)
    optimizer = create_optimizer(model, config.optim)
    total_steps = budget_steps(config, accelerator.num_processes)
    scheduler = create_scheduler(optimizer, config.optim, total_steps)
    if config.model.compile:
        compile_towers(model)
    text_cache = cache_text_embeddings(model, config.model.text_cache_size)
    if text_cache is not None:
        logger.info("text tower frozen: its embeddings of up to %d captions are cached", text_cache.capacity)
    elif config.model.text_cache_size > 0:
        logger.info("text cache off: text-side parameters train, so caption embeddings change")
    model, optimizer = accelerator.prepare(model, optimizer)

    def order(pass_index: int) -> list[str]:
        return pass_order(urls, config.run.seed, pass_index, config.data.shuffle_shards)

    start_step, data_state, report = 0, None, DataReport(warn_every=config.data.warn_every)
    if checkpoints:
        start_step, data_state, saved_report = resume_from(
            checkpoints, config, model, optimizer, scheduler, accelerator, order
        )
        report = DataReport.from_dict(saved_report, warn_every=config.data.warn_every)
        if accelerator.is_main_process:
            moved = set_aside_later_records(run_dir / "metrics.jsonl", start_step)
            if moved:
                logger.info("moved %d metrics records after step %d to metrics.superseded.jsonl", moved, start_step)
    if accelerator.is_main_process:
        save_config(config, run_dir / "config.yaml")
    loader = create_loader(config, accelerator, urls, accelerator.unwrap_model(model), data_state)
    log_run_start(config, accelerator, model, total_steps, start_step)
    if config.train.tensorboard:
        accelerator.init_trackers(config.run.name, config=flat_hparams(config))

    progress = Progress(step=start_step)
    if data_state is not None:
        progress.batches = data_state["batches"]
        progress.workers = data_state["workers"]
    if start_step >= total_steps and already_finished(config, run_dir):
        logger.info("%s already finished its %d steps; nothing to do", run_dir, total_steps)
        accelerator.end_training()
        return run_dir
    run = TrainingRun(
        config, accelerator, run_dir, model, optimizer, scheduler, loader, progress, report, total_steps, order
    )
    try:
        run_loop(run)
    except KeyboardInterrupt:
        latest = ckpt.latest_checkpoint(run_dir)
        logger.error(
            "interrupted at step %d; %s",
            progress.step,
            f"run.resume=auto continues from {latest}" if latest else "no checkpoint was written yet",
        )
        raise
    if text_cache is not None:
        logger.info(
            "text cache: %d captions stored; %d embeddings looked up, %d encoded",
            len(text_cache.entries),
            text_cache.hits,
            text_cache.misses,
        )
    finish(config, accelerator, run_dir, model, report, progress)
    return run_dir


def already_finished(config: Config, run_dir: Path) -> bool:
    """Return whether the run directory has the final model and, if evaluation is on, its scores."""
    evaluated = config.eval.shards is None or (run_dir / "eval.json").is_file()
    return (run_dir / "model.safetensors").is_file() and evaluated


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
        "model %s: %.1fM parameters (%.1fM trainable); %d process(es) on %s, mixed precision %s",
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


@dataclass
class TrainingRun:
    """Everything the step loop uses, built by :func:`train`."""

    config: Config
    accelerator: Accelerator
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: DataLoader
    progress: Progress
    report: DataReport
    total_steps: int
    shard_order: Callable[[int], list[str]]


def run_loop(run: TrainingRun) -> None:
    """Train from ``run.progress.step`` to ``run.total_steps``, logging and checkpointing on the way."""
    config, accelerator, progress = run.config, run.accelerator, run.progress
    loss_fn = InfoNCELoss()
    monitor = Monitor(config, accelerator, run.run_dir, run.report)
    batches = iter(run.loader)
    set_train_mode(accelerator.unwrap_model(run.model))
    bar = tqdm(total=run.total_steps, initial=progress.step, disable=not accelerator.is_main_process, desc="train")
    # log lines go above the progress bar instead of onto it
    with logging_redirect_tqdm():
        while progress.step < run.total_steps:
            wait_start = time.perf_counter()
            micro_batches, infos = next_micro_batches(
                batches, config.train.accumulation_steps, progress, accelerator.device
            )
            compute_start = time.perf_counter()
            loss = train_step(run.model, loss_fn, micro_batches, accelerator)
            global_loss = accelerator.reduce(loss, reduction="mean").item()
            if not math.isfinite(global_loss):
                shards = sorted({shard for batch in micro_batches for shard in batch["shards"]})
                raise TrainingError(
                    f"non-finite loss {global_loss} at step {progress.step + 1}; shards in flight: {shards}"
                )
            grad_norm = optimizer_step(run.model, run.optimizer, run.scheduler, config, accelerator)
            progress.step += 1
            bar.update(1)
            monitor.record(
                infos, global_loss, grad_norm, compute_start - wait_start, time.perf_counter() - compute_start
            )
            last = progress.step == run.total_steps
            if progress.step % config.train.log_every == 0 or last:
                monitor.log(progress.step, accelerator.unwrap_model(run.model), run.scheduler.get_last_lr()[0])
            if progress.step % config.train.checkpoint_every == 0 or last:
                save_checkpoint(run, monitor.report)
    bar.close()


def save_checkpoint(run: TrainingRun, report: DataReport) -> None:
    ckpt.save_checkpoint(
        run.run_dir,
        run.progress.step,
        run.progress.data_state(),
        run.model,
        run.optimizer,
        run.scheduler,
        run.accelerator,
        report.to_dict(),
        run.config.train.keep_checkpoints,
        run.shard_order,
        config_to_dict(run.config),
    )


def finish(
    config: Config, accelerator: Accelerator, run_dir: Path, model: nn.Module, report: DataReport, progress: Progress
) -> None:
    """Save the final model and data report, then evaluate on the held-out shards."""
    unwrapped = accelerator.unwrap_model(model)
    processes = gather_object(
        [{"rank": accelerator.process_index, "batches": progress.batches, "shards": sorted(progress.shards)}]
    )
    if accelerator.is_main_process:
        save_model(unwrapped, run_dir, extra={"trained_steps": budget_steps(config, accelerator.num_processes)})
        # shards are those this run's batches came from (after a resume, since the resume)
        ckpt.write_json(run_dir / "data_report.json", {**report.to_dict(), "processes": processes})
        logger.info("data: %s", report.summary())
        logger.info("saved the final model to %s (model.safetensors, open_clip_config.json)", run_dir)
    accelerator.wait_for_everyone()
    if config.eval.shards is not None:
        results = evaluate_model(unwrapped, config, accelerator, run_dir)
        if accelerator.is_main_process:
            sys.stdout.write(format_table(results) + "\n")
        if config.eval.build_index and accelerator.is_main_process:
            build_index(
                run_dir, config.eval.shards, run_dir / "index", field_spec(config), progress=False, overwrite=True
            )
        accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
