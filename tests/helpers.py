"""Builders for tiny tar shards and images used across the tests."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 170),
    "black": (10, 10, 10),
}
SHAPES = ("circle", "square", "triangle", "cross")


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def shape_image(color: str, shape: str, size: int = 32) -> Image.Image:
    """A coloured shape on white: a tiny image whose caption can be learnt."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    else:
        third = size // 3
        draw.rectangle((third, box[1], size - third, box[3]), fill=fill)
        draw.rectangle((box[0], third, box[2], size - third), fill=fill)
    return image


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """Write a tar with the given (name, bytes) members in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def labelled_samples(shard: int, count: int, size: int = 32) -> list[tuple[str, bytes, str]]:
    """Return (key, jpeg, caption) triples; the key and caption encode shard and index."""
    combos = [(color, shape) for color in COLORS for shape in SHAPES]
    samples = []
    for index in range(count):
        color, shape = combos[(shard * 7 + index) % len(combos)]
        key = f"{shard:03d}{index:04d}"
        caption = f"a {color} {shape}"
        samples.append((key, encode(shape_image(color, shape, size)), caption))
    return samples


def write_labelled_shards(folder: Path, shards: int, per_shard: int | list[int], prefix: str = "train") -> str:
    """Write shards of labelled shapes; return the brace pattern that names them."""
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * shards
    for shard, count in enumerate(counts):
        members = []
        for key, jpeg, caption in labelled_samples(shard, count):
            members += [(f"{key}.jpg", jpeg), (f"{key}.txt", caption.encode())]
        write_tar(folder / f"{prefix}-{shard:03d}.tar", members)
    return str(folder / f"{prefix}-{{000..{len(counts) - 1:03d}}}.tar")


def manifest(cases: Path, name: str) -> dict:
    """Return the entry of one bad-input case in the cases' manifest.json."""
    return json.loads((cases / "manifest.json").read_text())["cases"][name]
