"""Evaluation of a trained model on held-out shards, on one process or many (``mmalign eval``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mmalign.api import is_template
from mmalign.cli import eval_parser
from mmalign.config import Config, ConfigError, apply_overrides, build_config, read_config_file
from mmalign.data.reader import DataError, FieldSpec, ShardError, check_urls
from mmalign.data.report import DataReport
from mmalign.data.stream import EvalStream, StreamSettings
from mmalign.logs import configure_logging
from mmalign.metrics import DEFINITIONS, linear_probe_metrics, retrieval_metrics, zeroshot_metrics

logger = logging.getLogger("mmalign.eval")


@dataclass
class ClassFile:
    classnames: list[str]
    templates: list[str]
    labels: dict[str, int] | None


def read_class_file(path: str | Path) -> ClassFile:
    """Read a zero-shot class file: {"classnames": [...], "templates": [...], "labels": {key: index}}.

    Raises:
        ConfigError: missing file or field, a template without ``{}``, a label out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"eval.classes={str(path)!r}: class file not found (working directory {Path.cwd()}); "
            "fix the path or run from the folder it is relative to"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"eval.classes={str(path)!r} is not valid JSON: {error}") from None
    classnames = data.get("classnames")
    if not isinstance(classnames, list) or not classnames or not all(isinstance(c, str) for c in classnames):
        raise ConfigError(f"{path}: 'classnames' must be a non-empty list of strings")
    templates = data.get("templates", ["{}"])
    if not isinstance(templates, list) or not templates:
        raise ConfigError(f"{path}: 'templates' must be a non-empty list of strings")
    bad = [template for template in templates if not is_template(template)]
    if bad:
        raise ConfigError(
            f"{path}: every template needs exactly one {{}} for the class name and no other braces; got {bad[:3]}"
        )
    labels = data.get("labels")
    if labels is not None:
        if not isinstance(labels, dict):
            raise ConfigError(f"{path}: 'labels' must be an object mapping sample keys to class indices")
        out_of_range = [
            key
            for key, value in labels.items()
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(classnames)
        ]
        if out_of_range:
            raise ConfigError(
                f"{path}: the labels of {out_of_range[:3]} are not class indices 0..{len(classnames) - 1}"
            )
        labels = {str(key): int(value) for key, value in labels.items()}
    return ClassFile(classnames, templates, labels)


@dataclass
class EvalEmbeddings:
    """Embeddings of a held-out set, in one order on every process."""

    keys: list[str]
    image_emb: torch.Tensor  # (N, D), normalised
    labels: torch.Tensor  # (N,), -1 when unknown
    caption_texts: list[str]
    caption_owner: list[int]
    text_emb: torch.Tensor  # (T, D), normalised
    report: DataReport


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer, texts: list[str], device: torch.device, batch_size: int) -> torch.Tensor:
    """Return normalised text embeddings (T, D) for a list of strings."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start : start + batch_size]).to(device)  # (b, L)
        chunks.append(model.encode_text(tokens, normalize=True).float().cpu())  # (b, D)
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


@torch.no_grad()
def embed_eval_set(model: nn.Module, tokenizer, loader: DataLoader, device: torch.device, autocast) -> dict[str, Any]:
    """Embed this process's share of the held-out set."""
    keys, labels, image_chunks, captions, owners = [], [], [], [], []
    report = DataReport()
    for batch in loader:
        report.add(batch["report"])
        if batch["image"] is None:
            continue
        with autocast():
            image_chunks.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        for key, captions_of_image in zip(batch["keys"], batch["captions"], strict=True):
            owners.extend([len(keys)] * len(captions_of_image))
            captions.extend(captions_of_image)
            keys.append(key)
        labels.extend(batch["labels"])
    with autocast():
        text_emb = encode_texts(model, tokenizer, captions, device, 256)
    image_emb = torch.cat(image_chunks) if image_chunks else torch.empty(0, 0)
    return {
        "keys": keys,
        "labels": labels,
        "image_emb": image_emb,
        "captions": captions,
        "owners": owners,
        "text_emb": text_emb,
        "report": report.to_dict(),
    }


def merge_parts(parts: list[dict[str, Any]]) -> EvalEmbeddings:
    """Concatenate the per-process parts in process order."""
    keys, labels, owners, captions, image_chunks, text_chunks = [], [], [], [], [], []
    report = DataReport()
    for part in parts:
        owners.extend(owner + len(keys) for owner in part["owners"])
        keys.extend(part["keys"])
        labels.extend(part["labels"])
        captions.extend(part["captions"])
        if part["image_emb"].numel():
            image_chunks.append(part["image_emb"])
        if part["text_emb"].numel():
            text_chunks.append(part["text_emb"])
        report.add(DataReport.from_dict(part["report"]).delta(DataReport()))
    if not image_chunks:
        raise ConfigError("the evaluation shards held no usable sample: " + report.summary())
    return EvalEmbeddings(
        keys=keys,
        image_emb=torch.cat(image_chunks),
        labels=torch.tensor(labels, dtype=torch.long),
        caption_texts=captions,
        caption_owner=owners,
        text_emb=torch.cat(text_chunks) if text_chunks else torch.empty(0, image_chunks[0].shape[1]),
        report=report,
    )


def zeroshot_classifier(
    model: nn.Module, tokenizer, classes: ClassFile, device: torch.device, autocast
) -> torch.Tensor:
    """Return normalised class embeddings (C, D): the mean of each class's normalised prompt embeddings."""
    prompts = [template.format(name) for name in classes.classnames for template in classes.templates]
    with autocast():
        prompt_emb = encode_texts(model, tokenizer, prompts, device, 256)  # (C * P, D)
    prompt_emb = prompt_emb.view(len(classes.classnames), len(classes.templates), -1)  # (C, P, D)
    return torch.nn.functional.normalize(prompt_emb.mean(dim=1), dim=-1)  # (C, D)


def compute_metrics(
    data: EvalEmbeddings,
    classifier: torch.Tensor | None,
    ks: Sequence[int],
    probe_folds: int = 0,
    probe_max_images: int = 10_000,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, float], dict[str, Any]]:
    """Return (eval.json scores, details) for embedded data.

    The linear probe runs on labelled images, on ``device``, when ``probe_folds`` is 2 or more.
    """
    results: dict[str, float] = {}
    details: dict[str, Any] = {"definitions": DEFINITIONS, "images": len(data.keys)}
    known = data.labels >= 0
    if classifier is not None:
        details["zeroshot_images"] = int(known.sum())
        details["zeroshot_classes"] = int(classifier.shape[0])
        if known.any():
            results.update(zeroshot_metrics(data.image_emb[known], data.labels[known], classifier))
        else:
            logger.warning("no evaluation image has a class label; zero-shot scores are skipped")
    if probe_folds >= 2 and known.any():
        probe_results, probe_details = linear_probe_metrics(
            data.image_emb[known], data.labels[known], probe_folds, probe_max_images, device=device
        )
        results.update(probe_results)
        details.update(probe_details)
    if data.caption_texts:
        details["captions"] = len(data.caption_texts)

        def score_rows(rows: slice) -> torch.Tensor:
            return data.text_emb[rows] @ data.image_emb.T  # (c, N)

        results.update(retrieval_metrics(score_rows, data.caption_texts, data.caption_owner, len(data.keys), ks))
    details["data"] = data.report.to_dict()
    return results, details


def eval_loader(config: Config, transform, classes: ClassFile | None, rank: int, world: int) -> DataLoader:
    urls = check_urls(config.eval.shards, "eval.shards")
    data = config.data
    settings = StreamSettings(
        urls=tuple(urls),
        fields=FieldSpec(
            image_keys=tuple(key.lower() for key in data.image_keys),
            caption_key=data.caption_key.lower(),
            caption_json_field=data.caption_json_field,
        ),
        batch_size=config.eval.batch_size,
        shuffle_shards=False,
        shuffle_buffer=0,
        max_pixels=data.max_pixels,
        encoding_fallback=data.caption_encoding_fallback,
        warn_every=data.warn_every,
        rank=rank,
        world_size=world,
        workers=config.eval.workers,
    )
    stream = EvalStream(
        settings,
        transform,
        config.eval.retrieval_captions,
        classes.labels if classes else None,
        config.eval.label_key,
        len(classes.classnames) if classes else None,
    )
    return DataLoader(stream, batch_size=None, num_workers=config.eval.workers)


def evaluate_model(model: nn.Module, config: Config, accelerator, run_dir: Path | None) -> dict[str, float]:
    """Evaluate on ``config.eval.shards`` on every process; write eval.json and eval_details.json.

    Each held-out sample is read by exactly one loader stream of one process;
    the embeddings are then gathered so every process computes the same scores.
    """
    from accelerate.utils import gather_object

    from mmalign.model import create_tokenizer, image_transforms

    model.eval()
    tokenizer = create_tokenizer(model)
    _, transform = image_transforms(model)
    classes = read_class_file(config.eval.classes) if config.eval.classes else None
    loader = eval_loader(config, transform, classes, accelerator.process_index, accelerator.num_processes)
    part = embed_eval_set(model, tokenizer, loader, accelerator.device, accelerator.autocast)
    data = merge_parts(gather_object([part]))
    classifier = None
    if classes is not None and (classes.labels is not None or config.eval.label_key):
        classifier = zeroshot_classifier(model, tokenizer, classes, accelerator.device, accelerator.autocast)
    results, details = compute_metrics(
        data,
        classifier,
        config.eval.recall_k,
        config.eval.linear_probe_folds,
        config.eval.linear_probe_max_images,
        accelerator.device,
    )
    if run_dir is not None and accelerator.is_main_process:
        (run_dir / "eval.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        (run_dir / "eval_details.json").write_text(json.dumps(details, indent=1) + "\n", encoding="utf-8")
        logger.info("wrote %s", run_dir / "eval.json")
    accelerator.wait_for_everyone()
    return results


def format_table(results: dict[str, float]) -> str:
    """Return a small text table of scores with their chance levels and the ratio between them."""
    rows = [
        (key, value, results.get(f"chance/{key}")) for key, value in results.items() if not key.startswith("chance/")
    ]
    width = max((len(key) for key, _, _ in rows), default=10)
    lines = [f"{'metric':<{width}}  {'score':>7}  {'chance':>7}  {'x chance':>8}"]
    for key, value, chance in rows:
        ratio = f"{value / chance:8.1f}" if chance else f"{'-':>8}"
        lines.append(f"{key:<{width}}  {value:7.4f}  {chance if chance is not None else float('nan'):7.4f}  {ratio}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmalign eval``: score a run directory or a saved model folder."""
    args = eval_parser().parse_args(argv)
    configure_logging()
    try:
        return run_eval(args)
    except (ConfigError, DataError, ShardError, FileNotFoundError) as error:
        logging.getLogger("mmalign").error("%s", error)
        return 2


def run_eval(args: argparse.Namespace) -> int:
    from mmalign.distributed import create_accelerator
    from mmalign.model import load_model

    model_dir = Path(args.model)
    config_path = Path(args.config) if args.config else model_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"no config for evaluation: {config_path} not found; pass --config FILE")
    data = read_config_file(config_path)
    config = build_config(apply_overrides(data, args.overrides))
    if config.eval.shards is None:
        raise ConfigError("eval.shards is not set; pass eval.shards=PATTERN")
    accelerator = create_accelerator(mixed_precision=config.train.mixed_precision)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    model = load_model(model_dir, accelerator.device)
    output = Path(args.output) if args.output else model_dir
    output.mkdir(parents=True, exist_ok=True)
    results = evaluate_model(model, config, accelerator, output)
    if accelerator.is_main_process:
        sys.stdout.write(format_table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
