"""mmalign: train and use CLIP-style image-text embedding spaces."""

__version__ = "0.1.0"
