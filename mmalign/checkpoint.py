"""Training checkpoints: written atomically, read without pickle.

A checkpoint is the folder ``checkpoints/step-N/`` of a run directory:

- ``model.safetensors``: the model's state dict;
- ``optimizer.safetensors``: every tensor of the optimizer state;
- ``rng-rank-R.safetensors``: each process's torch (and CUDA) and numpy generator state;
- ``trainer_state.json``: the step, optimizer hyperparameters, scheduler and
  gradient-scaler state, Python generator states, and each process's data
  stream positions.

All files are written into a hidden ``.tmp-step-N`` folder which is renamed
to ``step-N`` only when complete, so a killed run never leaves a checkpoint that
``resume=auto`` would pick up half-written.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger("mmalign.train")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Return the complete checkpoints of a run, oldest first."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and the rest (for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return this process's generator states as (tensors, JSON-able values)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    values = {
        "numpy": [kind, int(position), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, values


def restore_rng(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, position, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def staging_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f".tmp-step-{step}"


def commit(run_dir: Path, step: int, keep: int) -> Path:
    """Rename a complete staging folder to ``step-N`` and delete all but the newest ``keep`` checkpoints."""
    final = run_dir / CHECKPOINT_DIR / f"step-{step}"
    if final.exists():
        # the same step saved again (the final save after a periodic one)
        shutil.rmtree(final)
    staging_dir(run_dir, step).rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_staging(run_dir: Path) -> None:
    """Delete staging folders left by a run killed while writing a checkpoint."""
    folder = run_dir / CHECKPOINT_DIR
    if folder.is_dir():
        for path in folder.glob(".tmp-step-*"):
            logger.info("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def save_model_state(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    save_file_tensors(path, state_dict)


def save_file_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({key: value.detach().contiguous().cpu() for key, value in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


# DeepSpeed and FSDP shard the model and optimizer state across processes;
# their checkpoints are written by Accelerate's own save_state into engine/.
SHARDED_ENGINES = (DistributedType.DEEPSPEED, DistributedType.FSDP)


def save_checkpoint(
    run_dir: Path,
    step: int,
    data_state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Accelerator,
    report: dict[str, Any],
    keep: int,
    shard_order: Callable[[int], list[str]],
    config: dict[str, Any] | None = None,
) -> None:
    """Write checkpoints/step-N atomically. Every process must call this at the same step.

    ``shard_order(pass)`` returns the shard order of a pass. The orders of the passes the
    loader streams are in are stored, so that a resume can tell whether the shards changed.
    """
    staging = staging_dir(run_dir, step)
    data_states = gather_object([data_state])
    passes = sorted({worker["pass"] for state in data_states for worker in state["workers"].values()})
    rng_tensors, rng_values = rng_state()
    rng_values_all = gather_object([rng_values])
    if accelerator.is_main_process:
        staging.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    save_file_tensors(staging / f"rng-rank-{accelerator.process_index}.safetensors", rng_tensors)
    state = {
        "step": step,
        "world_size": accelerator.num_processes,
        "scheduler": scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "data": data_states,
        "shard_orders": {str(pass_index): shard_order(pass_index) for pass_index in passes},
        "data_report": report,
        "rng": rng_values_all,
        "config": config,
    }
    if accelerator.distributed_type in SHARDED_ENGINES:
        # NOTE: this path follows Accelerate's documentation but has not been run here (no GPU)
        accelerator.save_state(str(staging / "engine"), safe_serialization=True)
    elif accelerator.is_main_process:
        save_model_state(staging / "model.safetensors", accelerator.unwrap_model(model).state_dict())
        tensors, state["optimizer"] = optimizer_to_files(optimizer.state_dict())
        save_file_tensors(staging / "optimizer.safetensors", tensors)
    if accelerator.is_main_process:
        # written last: a staging folder with this file is complete
        write_json(staging / STATE_FILE, state)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        logger.info("saved checkpoint %s", commit(run_dir, step, keep))
    accelerator.wait_for_everyone()


def restore_checkpoint(
    checkpoint: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Accelerator,
    loader_workers: int,
    shard_order: Callable[[int], list[str]],
) -> tuple[int, dict[str, Any] | None, dict[str, Any]]:
    """Load a checkpoint into model, optimizer and scheduler.

    Returns the step, this process's data stream state (None when the number of
    processes or loader workers, or the shard order, changed, so the streams cannot
    be placed exactly) and the data report saved with the checkpoint.
    """
    state = read_state(checkpoint)
    if (checkpoint / "engine").is_dir():
        accelerator.load_state(str(checkpoint / "engine"))
    else:
        accelerator.unwrap_model(model).load_state_dict(load_tensors(checkpoint / "model.safetensors"))
        tensors = load_tensors(checkpoint / "optimizer.safetensors")
        optimizer.load_state_dict(optimizer_from_files(tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])

    rank = accelerator.process_index
    saved_workers = {len(item["workers"]) for item in state["data"] if item["batches"]}
    same_layout = state["world_size"] == accelerator.num_processes and saved_workers <= {max(1, loader_workers)}
    changed = [key for key, order in state.get("shard_orders", {}).items() if shard_order(int(key)) != order]
    data_state = None
    if changed:
        logger.warning(
            "the shards or their order differ from those %s was trained on (pass %s); the model and optimizer "
            "resume exactly, but the data streams start again from the first pass",
            checkpoint,
            changed[0],
        )
    elif same_layout:
        restore_rng(load_tensors(checkpoint / f"rng-rank-{rank}.safetensors"), state["rng"][rank])
        data_state = state["data"][rank]
    else:
        logger.warning(
            "%s was written by %d processes with %s loader workers each, now %d with %d: the model and optimizer "
            "resume exactly, but the data streams start again from the first pass",
            checkpoint,
            state["world_size"],
            "/".join(str(count) for count in sorted(saved_workers)) or "?",
            accelerator.num_processes,
            max(1, loader_workers),
        )
    logger.info("resumed from %s at step %d", checkpoint, state["step"])
    return state["step"], data_state, state.get("data_report", {})
