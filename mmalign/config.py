"""Typed configuration: frozen sections read from YAML or TOML, with dotted overrides.

A config file contains the sections below. Any field can be overridden on the
command line as ``section.field=value`` (``optim.lr=5e-4``), where the value is
parsed as YAML (``true``, ``[1, 5]``, ``null``). Unknown keys, wrong types and
missing required values raise :class:`ConfigError` naming the key and what is
allowed.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = "emoji-tiny"


class ConfigError(ValueError):
    """Invalid configuration: the message names the key, the value and what is allowed."""


class _Section(BaseModel):
    # allow_inf_nan: an infinite or NaN learning rate, scale or fraction is a typo, not a setting
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        # pydantic reads true as 1; a number field given true or false is a mistake
        if isinstance(data, dict):
            for name, value in data.items():
                field_info = cls.model_fields.get(name)
                if isinstance(value, bool) and field_info is not None and _takes_number(field_info.annotation):
                    raise ValueError(f"{name} must be a number, not {str(value).lower()}")
        return data


class RunConfig(_Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run directory name, no slashes")
    output_dir: str = "runs"
    seed: int = 0
    resume: str = Field("none", description="'none', 'auto' (newest complete checkpoint) or a checkpoint path")

    @field_validator("resume")
    @classmethod
    def _resume_words(cls, value: str) -> str:
        return value.lower() if value.lower() in ("none", "auto") else value


class ModelConfig(_Section):
    name: str = Field("mm-tiny", description="open_clip architecture, shipped mmalign architecture or a .json file")
    pretrained: str | None = Field(None, description="local weights file (.safetensors, or .pt/.bin loaded safely)")
    init_logit_scale: float = Field(1 / 0.07, gt=0, description="initial logit scale (1 / temperature)")
    max_logit_scale: float = Field(100.0, gt=0, description="the logit scale is clamped to this value")
    freeze_image: bool = False
    freeze_text: bool = False
    freeze_logit_scale: bool = False
    grad_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each tower")
    text_cache_size: int = Field(
        100_000,
        ge=0,
        description="with a frozen text tower, cache the embeddings of up to this many captions; 0 turns it off",
    )


class DataConfig(_Section):
    train_shards: str | list[str] = Field(
        ..., description="shard URL pattern(s): local paths with braces, pipe: commands or http(s) URLs"
    )
    image_keys: list[str] = Field(["jpg", "jpeg", "png", "webp"], min_length=1)
    caption_key: str = Field(
        "txt", description="tar member suffix of the caption, or json:FIELD for a field of KEY.json"
    )
    caption_json_field: str | None = Field(
        None, description="field of KEY.json used when the caption member is missing"
    )
    shuffle_buffer: int = Field(1000, ge=0, description="samples held for shuffling; 0 disables")
    shuffle_shards: bool = True
    workers: int = Field(2, ge=0, description="DataLoader worker processes per training process")
    max_pixels: int = Field(25_000_000, gt=0, description="images with more pixels are skipped before decoding")
    max_skip_fraction: float = Field(0.1, ge=0, le=1, description="fail when more of the samples read are skipped")
    skip_check_after: int = Field(1000, ge=1, description="samples to read before max_skip_fraction applies")
    warn_every: int = Field(1000, ge=1, description="log a skipped sample once, then every N skips")
    caption_encoding_fallback: Literal["cp1252", "skip"] = "cp1252"

    @model_validator(mode="after")
    def _caption_is_not_an_image(self) -> DataConfig:
        if self.caption_key.lower() in (key.lower() for key in self.image_keys):
            raise ValueError(f"caption_key {self.caption_key!r} is one of the image_keys {self.image_keys}")
        return self

    augment_scale: tuple[float, float] = Field(
        (0.9, 1.0), description="RandomResizedCrop area range for training images; (1, 1) turns cropping off"
    )


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")


class TrainConfig(_Section):
    batch_size: int = Field(128, gt=0, le=1 << 20, description="pairs per process per micro-batch")
    accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step; negatives span all of them")
    steps: int | None = Field(None, gt=0, description="optimizer steps to train")
    samples: int | None = Field(None, gt=0, description="pairs to train on, over all processes")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    tensorboard: bool = False
    data_wait_warn_fraction: float = Field(
        0.3, ge=0, le=1, description="warn when waiting for data takes more than this share of a log interval"
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false
        return "no" if value is False else value

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        if (self.steps is None) == (self.samples is None):
            raise ValueError("set exactly one of train.steps and train.samples (both or neither were given)")
        return self


class EvalConfig(_Section):
    shards: str | list[str] | None = Field(None, description="held-out shard pattern(s); null skips evaluation")
    classes: str | None = Field(None, description="zero-shot class file (JSON with classnames, templates, labels)")
    label_key: str | None = Field(None, description="tar member suffix holding an integer label (e.g. 'cls')")
    retrieval_captions: str = Field(
        "caption", description="'caption' (the training caption, split on newlines) or a KEY.json list field"
    )
    batch_size: int = Field(256, gt=0)
    recall_k: list[Annotated[int, Field(ge=1)]] = Field([1, 5, 10], min_length=1)
    workers: int = Field(1, ge=0)
    build_index: bool = Field(False, description="after training, build a search index of eval.shards in RUN/index")
    linear_probe_folds: int = Field(
        5, ge=0, description="cross-validation folds of the linear probe on labelled images; 0 turns it off"
    )
    linear_probe_max_images: int = Field(
        10_000, gt=1, description="labelled images the linear probe uses at most (a seeded random subset above)"
    )

    @field_validator("linear_probe_folds")
    @classmethod
    def _probe_folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one fold leaves nothing to test on; use 0 (off) or 2 and more")
        return value


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()


def shipped_config_path(name: str) -> Path:
    """Return the path of a config shipped with mmalign (``emoji-tiny`` → ``.../configs/emoji-tiny.yaml``)."""
    path = Path(str(resources.files("mmalign") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no shipped config named {name!r}; shipped: {', '.join(list_shipped_configs())}")
    return path


def list_shipped_configs() -> list[str]:
    folder = Path(str(resources.files("mmalign") / "configs"))
    return sorted(path.stem for path in folder.glob("*.yaml"))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot parse config file {path}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` override applied."""
    result = json.loads(json.dumps(data))
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not of the form section.key=value (e.g. optim.lr=5e-4)")
        parts = key.split(".")
        annotation = _check_key_path(parts)
        node = result
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
            node = child
        try:
            value = yaml.safe_load(raw_value) if raw_value != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: cannot parse value {raw_value!r}: {error}") from error
        if value is not None and not isinstance(value, str) and _takes_text(annotation):
            # a text field keeps what was typed: `no`, `1e-3` or `0001` are not turned into other types
            value = raw_value
        node[parts[-1]] = value
    return result


def _takes_number(annotation: Any) -> bool:
    """Return whether a field's type is a number (int or float, or either or None)."""
    options = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    return any(option in (int, float) for option in options)


def _takes_text(annotation: Any) -> bool:
    """Return whether a field's type is text only (str, a Literal of strings, or either or None)."""
    options = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    options = [option for option in options if option is not type(None)]
    if not options:
        return False
    for option in options:
        if typing.get_origin(option) is Literal:
            if not all(isinstance(choice, str) for choice in typing.get_args(option)):
                return False
        elif option is not str:
            return False
    return True


def _check_key_path(parts: list[str]) -> Any:
    """Check that a dotted key names a config field; return the field's type."""
    model: type[BaseModel] = Config
    annotation: Any = None
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown config key {'.'.join(parts)!r}: {where} allows {', '.join(fields)}")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth < len(parts) - 1 and not is_section:
            raise ConfigError(f"unknown config key {'.'.join(parts)!r}: {'.'.join(parts[: depth + 1])} is a value")
        if is_section:
            model = annotation
    return annotation


def build_config(data: Mapping[str, Any]) -> Config:
    """Validate a plain dict into a :class:`Config`, turning pydantic errors into :class:`ConfigError`."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"] if not isinstance(part, int)) or "config"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(item["loc"][:-1])
            lines.append(f"unknown config key {key!r}; allowed here: {', '.join(allowed)}")
        elif item["type"] == "missing":
            lines.append(f"missing required config key {key!r}")
        elif item["type"] == "value_error":
            # a section-level check: its message names the key
            lines.append(f"invalid config in {key!r}: {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "string_pattern_mismatch":
            lines.append(
                f"invalid value for {key!r}: {item.get('input')!r}: use letters, digits, '.', '_' and '-' only"
            )
        else:
            value = item.get("input")
            lines.append(f"invalid value for {key!r}: {value!r}: {item['msg']}")
    return "; ".join(lines)


def _allowed_keys(location: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in location:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a config file (the shipped default when ``path`` is None) and apply dotted overrides.

    Raises:
        ConfigError: the file is missing or unreadable, a key is unknown, or a value has the wrong type.
    """
    data = read_config_file(path if path is not None else shipped_config_path(DEFAULT_CONFIG))
    return build_config(apply_overrides(data, overrides))


def config_to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(mode="json")


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML, in the same form :func:`load_config` reads."""
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
