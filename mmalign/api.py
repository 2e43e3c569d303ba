"""Using a trained model: load it, embed images and texts, label images zero-shot.

    import mmalign
    model = mmalign.load("runs/emoji-tiny")
    model.zero_shot(["cat.jpg"], ["cat", "dog", "car"])   # [[(label, probability), ...]], best first

Shapes: N = images, T = texts, C = labels, D = embedding width.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from mmalign.config import ModelConfig
from mmalign.data.decode import decode_image, prepare_image
from mmalign.model import MODEL_CONFIG, create_model, create_tokenizer, image_transforms, load_model

DEFAULT_TEMPLATES = ("{}", "a photo of a {}.", "a picture of a {}.", "an image of a {}.")
ImageInput = str | Path | bytes | Image.Image | torch.Tensor


class AlignedModel:
    """A trained image-text model with its tokenizer and image preprocessing.

    Create it with :func:`load`. Embeddings are L2-normalised float32 tensors on the CPU.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, max_pixels: int = 25_000_000) -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.tokenizer = create_tokenizer(model)
        _, self.preprocess = image_transforms(model)
        self.max_pixels = max_pixels

    @property
    def uses_sigmoid_loss(self) -> bool:
        """Whether the model was trained with a sigmoid (SigLIP-style) loss: it has a logit bias."""
        return getattr(self.model, "logit_bias", None) is not None

    def _pixels(self, image: ImageInput) -> torch.Tensor:
        """Return one preprocessed image (3, H, W); tensors are taken as already preprocessed."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"an image tensor must have shape (3, H, W), got {tuple(image.shape)}")
            return image
        if not isinstance(image, str | Path | bytes | Image.Image):
            raise TypeError(
                f"an image must be a file path, bytes, a PIL image or a (3, H, W) tensor; got {type(image).__name__}"
            )
        if isinstance(image, Image.Image):
            return self.preprocess(prepare_image(image, self.max_pixels).image)
        if isinstance(image, bytes):
            return self.preprocess(decode_image(image, self.max_pixels).image)
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
        return self.preprocess(decode_image(path.read_bytes(), self.max_pixels).image)

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = 64, progress: bool | None = None
    ) -> torch.Tensor:
        """Embed images: paths, bytes, PIL images, or preprocessed tensors (N, 3, H, W).

        Files and PIL images go through mmalign's decoder (EXIF rotation, alpha on
        white, pixel cap). Returns normalised embeddings of shape (N, D).

        Raises:
            SampleError: an image cannot be decoded (``reason`` names the cause).
            FileNotFoundError: a path does not exist.
        """
        _check_batch_size(batch_size)
        if isinstance(images, str | Path | bytes | Image.Image):
            raise TypeError("encode_images takes a list of images; wrap a single image as [image]")
        if isinstance(images, torch.Tensor):
            images = images[None] if images.ndim == 3 else images
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"an image tensor must have shape (N, 3, H, W); got {tuple(images.shape)}")
        count = len(images)
        chunks = []
        for start in self._progress(range(0, count, batch_size), count, batch_size, progress, "images"):
            batch = torch.stack([self._pixels(image) for image in images[start : start + batch_size]])  # (b, 3, H, W)
            chunks.append(self.model.encode_image(batch.to(self.device), normalize=True).float().cpu())  # (b, D)
        return torch.cat(chunks) if chunks else torch.empty(0, self.embedding_dim)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool | None = None) -> torch.Tensor:
        """Embed texts; returns normalised embeddings of shape (T, D)."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings; wrap a single text as [text]")
        _check_batch_size(batch_size)
        chunks = []
        for start in self._progress(range(0, len(texts), batch_size), len(texts), batch_size, progress, "texts"):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)  # (t, L)
            chunks.append(self.model.encode_text(tokens, normalize=True).float().cpu())  # (t, D)
        return torch.cat(chunks) if chunks else torch.empty(0, self.embedding_dim)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.mmalign_model_cfg["embed_dim"])

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Embed each label through every template and average: normalised (C, D)."""
        labels = _check_labels(labels)
        templates = _check_templates(templates)
        prompts = [template.format(label) for label in labels for template in templates]
        prompt_emb = self.encode_texts(prompts, progress=False).view(len(labels), len(templates), -1)  # (C, P, D)
        return F.normalize(prompt_emb.mean(dim=1), dim=-1)  # (C, D)

    @torch.no_grad()
    def scores(
        self, images: Sequence[ImageInput] | torch.Tensor, labels: Sequence[str], templates: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Return the raw logits (N, C): logit_scale * cosine similarity, plus the logit bias if the model has one.

        For a sigmoid-loss model, ``torch.sigmoid(scores)`` gives each label's independent probability.
        """
        image_emb = self.encode_images(images)  # (N, D)
        label_emb = self.label_embeddings(labels, templates)  # (C, D)
        logits = self.model.logit_scale.exp().float().cpu() * image_emb @ label_emb.T  # (N, C)
        if self.uses_sigmoid_loss:
            logits = logits + self.model.logit_bias.float().cpu()
        return logits

    def zero_shot(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Rank labels for each image; probabilities over the given labels sum to one.

        InfoNCE models: softmax of logit_scale * cosine similarity. Sigmoid-loss
        models: each label's sigmoid probability, divided by their sum over the labels.

        Args:
            images: paths, bytes, PIL images or preprocessed tensors.
            labels: class names, e.g. ["cat", "dog"].
            templates: prompt templates with one ``{}`` (default: :data:`DEFAULT_TEMPLATES`).
            top_k: keep only the k most probable labels per image.

        Returns:
            One list per image of (label, probability) pairs, most probable first.
        """
        labels = _check_labels(labels)
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None for all labels); got {top_k}")
        logits = self.scores(images, labels, templates)  # (N, C)
        if self.uses_sigmoid_loss:
            independent = torch.sigmoid(logits)
            probabilities = independent / independent.sum(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            probabilities = logits.softmax(dim=1)
        keep = len(labels) if top_k is None else min(top_k, len(labels))
        values, indices = probabilities.topk(keep, dim=1)
        return [
            [(labels[index], float(value)) for value, index in zip(row_values, row_indices, strict=True)]
            for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    @staticmethod
    def _progress(steps: range, count: int, batch_size: int, progress: bool | None, unit: str) -> Any:
        show = count > 4 * batch_size if progress is None else progress
        return tqdm(steps, desc=f"embedding {unit}", unit="batch", disable=not show)


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
        raise TypeError(f"labels must be a list of strings, e.g. ['cat', 'dog']; got {labels!r}")
    cleaned = [label.strip() for label in labels]
    if not cleaned or any(not label for label in cleaned):
        raise ValueError(f"labels must be non-empty strings; got {list(labels)!r}")
    repeated = sorted({label for label in cleaned if cleaned.count(label) > 1})
    if repeated:
        # a repeated label would count twice in the probabilities
        raise ValueError(f"labels must be distinct; repeated: {repeated}")
    return cleaned


def is_template(template: Any) -> bool:
    """Return whether ``template`` is a string with exactly one ``{}`` and no other format field."""
    if not isinstance(template, str):
        return False
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:
        # an unmatched { or }
        return False
    return fields == [""] and template.format("x").count("x") >= 1


def _check_templates(templates: Sequence[str] | None) -> list[str]:
    templates = list(DEFAULT_TEMPLATES if templates is None else templates)
    bad = [template for template in templates if not is_template(template)]
    if not templates or bad:
        raise ValueError(
            f"each template needs exactly one {{}} for the label and no other braces; got {(bad or templates)!r}"
        )
    return templates


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load(path: str | Path, device: str | torch.device | None = None, weights: str | Path | None = None) -> AlignedModel:
    """Load a model for inference.

    Args:
        path: a run directory or model folder written by mmalign (``model.safetensors``
            and ``open_clip_config.json``), that folder's ``model.safetensors``, or an open_clip architecture name
            (``ViT-B-32``) together with ``weights``.
        device: where to run (default: CUDA if available, else CPU).
        weights: a local weights file for an architecture name (``.safetensors``, or
            ``.pt``/``.bin`` read with ``torch.load(weights_only=True)``).

    Raises:
        FileNotFoundError: the folder or weights file does not exist.
        ConfigError: the name is not a known architecture.
    """
    device = torch.device(device) if device is not None else default_device()
    folder = Path(path)
    if folder.is_file() and (folder.parent / MODEL_CONFIG).is_file():
        # the model.safetensors of a saved model: its folder describes it
        folder = folder.parent
    if (folder / MODEL_CONFIG).is_file():
        return AlignedModel(load_model(folder, device), device)
    if weights is None:
        raise FileNotFoundError(
            f"{path} is not an mmalign model folder (no {MODEL_CONFIG}); to load an open_clip architecture, "
            "pass its name with weights=PATH"
        )
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    return AlignedModel(create_model(ModelConfig(name=str(path), pretrained=str(weights))), device)


def image_from_bytes(data: bytes) -> Image.Image:
    """Decode image bytes with mmalign's decoder (for callers that want the PIL image itself)."""
    return decode_image(data).image


__all__ = ["DEFAULT_TEMPLATES", "AlignedModel", "image_from_bytes", "is_template", "load"]
