"""mmalign: train and use CLIP-style image-text embedding spaces.

import mmalign
model = mmalign.load("runs/emoji-tiny")
model.zero_shot(["photo.jpg"], ["cat", "dog"])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmalign.api import DEFAULT_TEMPLATES, AlignedModel, load
    from mmalign.loss import InfoNCELoss

__version__ = "0.1.0"
__all__ = ["DEFAULT_TEMPLATES", "AlignedModel", "InfoNCELoss", "load"]

# imported on first use, so that `mmalign --help` and the shard commands start without loading torch
_LAZY = {
    "DEFAULT_TEMPLATES": "mmalign.api",
    "AlignedModel": "mmalign.api",
    "load": "mmalign.api",
    "InfoNCELoss": "mmalign.loss",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
