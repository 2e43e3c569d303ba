"""``mmalign shards inspect``: what a set of shards holds, and a contact sheet of random samples."""

from __future__ import annotations

import io
import math
import random
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from mmalign.data.decode import SampleError, decode_image
from mmalign.data.reader import FieldSpec, RawSample, iter_shard
from mmalign.data.sample import caption_candidates

THUMBNAIL = 160
CAPTION_LINES = 3
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}


def header_info(data: bytes) -> tuple[int, int, str, str] | None:
    """Return (width, height, mode, format) from the image header, as displayed, or None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in _ROTATING_ORIENTATIONS:
                width, height = height, width
            return width, height, image.mode, image.format or "?"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(fraction: float) -> int:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return {"min": ordered[0], "p5": at(0.05), "p50": at(0.5), "p95": at(0.95), "max": ordered[-1]}


def inspect(
    urls: list[str],
    fields: FieldSpec,
    token_count: Callable[[str], int] | None = None,
    context_length: int | None = None,
    sheet_samples: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], list[tuple[RawSample, str]]]:
    """Summarise shards; return the summary and up to ``sheet_samples`` random (sample, caption) pairs."""
    rng = random.Random(seed)
    widths, heights, tokens = [], [], []
    modes, formats, sizes = Counter(), Counter(), Counter()
    chosen: list[tuple[RawSample, str]] = []
    count = unreadable_images = no_caption = 0
    for url in tqdm(urls, desc="inspect", unit="shard", disable=not progress):
        for item in iter_shard(url, fields):
            if not isinstance(item, RawSample) or fields.image_field(item) is None:
                continue
            count += 1
            info = header_info(item.fields[fields.image_field(item)])
            if info is None:
                unreadable_images += 1
            else:
                widths.append(info[0])
                heights.append(info[1])
                sizes[f"{info[0]}x{info[1]}"] += 1
                modes[info[2]] += 1
                formats[info[3]] += 1
            try:
                caption = caption_candidates(item, fields, "cp1252")[0][0]
            except SampleError:
                no_caption += 1
                continue
            if token_count is not None:
                tokens.append(token_count(caption))
            # reservoir sampling keeps a uniform random subset of the whole stream
            if len(chosen) < sheet_samples:
                chosen.append((item, caption))
            elif sheet_samples and (slot := rng.randrange(count)) < sheet_samples:
                chosen[slot] = (item, caption)
    summary: dict[str, Any] = {
        "shards": len(urls),
        "samples": count,
        "unreadable_images": unreadable_images,
        "without_caption": no_caption,
        "width": percentiles(widths),
        "height": percentiles(heights),
        "common_sizes": dict(sizes.most_common(5)),
        "modes": dict(modes.most_common()),
        "formats": dict(formats.most_common()),
    }
    if token_count is not None:
        summary["caption_tokens"] = percentiles(tokens)
        if context_length is not None:
            summary["context_length"] = context_length
            summary["captions_truncated"] = sum(length > context_length for length in tokens)
    return summary, chosen


def contact_sheet(samples: list[tuple[RawSample, str]], fields: FieldSpec, path: Path, columns: int = 6) -> Path:
    """Draw thumbnails with their captions into one PNG; undecodable images show their skip reason."""
    font = ImageFont.load_default(size=12)
    rows = max(1, math.ceil(len(samples) / columns))
    cell_height = THUMBNAIL + 8 + 14 * CAPTION_LINES
    sheet = Image.new("RGB", (columns * (THUMBNAIL + 8), rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (sample, caption) in enumerate(samples):
        left = (index % columns) * (THUMBNAIL + 8) + 4
        top = (index // columns) * cell_height + 4
        try:
            image = decode_image(sample.fields[fields.image_field(sample)]).image
            scale = THUMBNAIL / max(image.size)
            # round each side separately, keeping at least one pixel (a 100000 x 1 strip stays visible)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
            sheet.paste(image, (left + (THUMBNAIL - image.width) // 2, top + (THUMBNAIL - image.height) // 2))
        except SampleError as error:
            draw.rectangle((left, top, left + THUMBNAIL, top + THUMBNAIL), outline="red")
            draw.text((left + 4, top + 4), error.reason, fill="red", font=font)
        lines = textwrap.wrap(caption, width=26)[:CAPTION_LINES]
        for line_index, line in enumerate(lines):
            draw.text((left, top + THUMBNAIL + 2 + 14 * line_index), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def format_inspect(summary: dict[str, Any]) -> str:
    """Return the human-readable form of an inspect summary."""
    lines = [
        f"{summary['samples']} samples in {summary['shards']} shards "
        f"({summary['unreadable_images']} unreadable image headers, {summary['without_caption']} without a caption)",
        f"width  {summary['width']}",
        f"height {summary['height']}",
        f"common sizes {summary['common_sizes']}",
        f"modes {summary['modes']}; formats {summary['formats']}",
    ]
    if "caption_tokens" in summary:
        lines.append(f"caption tokens {summary['caption_tokens']}")
    if "captions_truncated" in summary:
        lines.append(
            f"{summary['captions_truncated']} captions longer than the context length of {summary['context_length']}"
            " tokens (they are truncated, keeping the end-of-text token)"
        )
    return "\n".join(lines)
