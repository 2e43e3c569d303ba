"""mmalign: train and use CLIP-style image-text embedding spaces.

import mmalign
model = mmalign.load("runs/emoji-tiny")
model.zero_shot(["photo.jpg"], ["cat", "dog"])
"""

from mmalign.api import DEFAULT_TEMPLATES, AlignedModel, load
from mmalign.loss import InfoNCELoss

__version__ = "0.1.0"
__all__ = ["DEFAULT_TEMPLATES", "AlignedModel", "InfoNCELoss", "load"]
