"""``mmalign shards build``: write WebDataset shards from a folder, a table, or other shards.

Inputs:
- a folder of images, each with a caption in a ``.txt`` file of the same name;
- a CSV or TSV (delimiter detected), JSONL or Parquet file with an image-path
  column and a caption column (paths relative to the file's folder);
- existing WebDataset shards, such as img2dataset output, to re-shard.

Output, in img2dataset's layout: ``PREFIX-000000.tar`` ... with ``KEY.jpg|png|webp``,
``KEY.txt`` and ``KEY.json`` (original path, caption, width, height, source mode
and any extra columns), plus ``_stats.json`` (counts, skips by reason, sizes)
and ``_manifest.json`` (per shard: samples, bytes, first and last key, SHA-256).
Every image goes through mmalign's decoder and every caption through its
caption policy, so what is written is what training will read. Keys are the
9-digit position of the sample in the output, so the same input and options
give the same shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm.auto import tqdm

from mmalign.data.build_inputs import BuildError, Record, input_records
from mmalign.data.decode import SampleError, decode_image, split_captions
from mmalign.data.report import format_counts
from mmalign.data.sample import json_caption_text

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
OUTPUT_FILES = ("_stats.json", "_manifest.json")


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    prefix: str = "shard"
    shard_size: int | None = 1000
    shard_mb: float | None = None
    resize: str = "none"
    max_side: int = 512
    image_format: str = "keep"
    quality: int = 90
    dedup: str = "none"
    workers: int = 1
    overwrite: bool = False
    max_pixels: int = 25_000_000
    image_column: str | None = None
    caption_column: str | None = None
    input_format: str = "auto"


@dataclass
class Processed:
    source: str
    image: bytes
    extension: str
    caption: str
    width: int
    height: int
    source_mode: str
    image_hash: str
    extra: dict[str, Any]
    repairs: list[str]


def resize(image: Image.Image, mode: str, max_side: int) -> Image.Image:
    """Resize as --resize says: keep_ratio (longest side <= max_side), shorter_side, or center_crop."""
    if mode == "none":
        return image
    if mode == "keep_ratio":
        if max(image.size) > max_side:
            image = image.copy()
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return image
    if mode == "shorter_side":
        scale = max_side / min(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        return image
    if mode == "center_crop":
        return ImageOps.fit(image, (max_side, max_side), Image.Resampling.LANCZOS)
    raise BuildError(f"unknown --resize mode {mode!r}; use none, keep_ratio, shorter_side or center_crop")


def process(record: Record, options: BuildOptions) -> Processed | tuple[str, str]:
    """Decode, check and re-encode one sample; return it, or (source, skip reason)."""
    try:
        data = record.image_bytes if record.image_bytes is not None else Path(record.image_path).read_bytes()
    except OSError:
        return record.source, "image_file_unreadable"
    try:
        decoded = decode_image(data, options.max_pixels)
        raw = record.caption
        if raw is None or (isinstance(raw, float) and raw != raw):
            # a missing cell: None from JSON or Parquet, NaN from some table writers
            raise SampleError("missing_caption")
        if not isinstance(raw, bytes):
            raw = json_caption_text(raw, "caption")
        # several captions (a list, or lines of text) are kept one per line
        captions, repairs = split_captions(raw)
        caption = "\n".join(captions)
        repairs = record.repairs + repairs
    except SampleError as error:
        return record.source, error.reason

    image = resize(decoded.image, options.resize, options.max_side)
    keep = (
        options.resize == "none"
        and options.image_format == "keep"
        and decoded.source_format in KEPT_FORMATS
        and not decoded.exif_rotated
    )
    if keep:
        # the original bytes decode to exactly these pixels, so nothing is re-compressed
        payload, extension = data, KEPT_FORMATS[decoded.source_format]
    else:
        extension = "jpg" if options.image_format == "keep" else options.image_format
        payload = encode_image(image, extension, options.quality)
    return Processed(
        source=record.source,
        image=payload,
        extension=extension,
        caption=caption,
        width=image.width,
        height=image.height,
        source_mode=decoded.source_mode,
        image_hash=hashlib.sha256(image.tobytes()).hexdigest(),
        extra=record.extra,
        repairs=repairs,
    )


def encode_image(image: Image.Image, extension: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if extension == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
    elif extension == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    elif extension == "png":
        image.save(buffer, format="PNG", optimize=True)
    else:
        raise BuildError(f"unknown --image-format {extension!r}; use keep, jpg, png or webp")
    return buffer.getvalue()


def _process_star(arguments: tuple[Record, BuildOptions]) -> Processed | tuple[str, str]:
    return process(*arguments)


class ShardWriter:
    """Writes numbered tar shards, each under a temporary name until it is complete."""

    def __init__(self, options: BuildOptions) -> None:
        self.options = options
        self.shards: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.bytes = 0

    def _open(self) -> None:
        name = f"{self.options.prefix}-{len(self.shards):06d}.tar"
        self.path = self.options.out / name
        self.temporary = self.options.out / f".{name}.tmp"
        # closed, and renamed into place, by close()
        self.tar = tarfile.open(self.temporary, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.shards.append({"name": name, "samples": 0, "bytes": 0, "first_key": None, "last_key": None})
        self.count = self.bytes = 0

    def _full(self, extra_bytes: int) -> bool:
        if self.options.shard_mb is not None:
            return self.count > 0 and self.bytes + extra_bytes > self.options.shard_mb * 1e6
        return self.count >= (self.options.shard_size or 1000)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        size = sum(len(data) + 1024 for _, data in members)
        if self.tar is None or self._full(size):
            self.close()
            self._open()
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))
        entry = self.shards[-1]
        entry["samples"] += 1
        entry["first_key"] = entry["first_key"] or key
        entry["last_key"] = key
        self.count += 1
        self.bytes += size

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.tar = None
        entry = self.shards[-1]
        entry["bytes"] = self.temporary.stat().st_size
        entry["sha256"] = hashlib.sha256(self.temporary.read_bytes()).hexdigest()
        os.replace(self.temporary, self.path)


def check_options(options: BuildOptions) -> None:
    """Raise BuildError for an option out of range, naming it and what it takes."""
    problems = []
    if options.shard_mb is None and (options.shard_size is None or options.shard_size < 1):
        problems.append(f"--shard-size {options.shard_size} (a positive number of samples)")
    if options.shard_mb is not None and options.shard_mb <= 0:
        problems.append(f"--shard-mb {options.shard_mb} (a positive number of megabytes)")
    if options.max_side < 1:
        problems.append(f"--max-side {options.max_side} (a positive number of pixels)")
    if not 1 <= options.quality <= 100:
        problems.append(f"--quality {options.quality} (1 to 100)")
    if options.dedup not in ("none", "image", "pair"):
        problems.append(f"--dedup {options.dedup!r} (none, image or pair)")
    if problems:
        raise BuildError("invalid option: " + "; ".join(problems))


def existing_output(options: BuildOptions) -> list[Path]:
    """Return the files of an earlier build in the output folder; raise unless ``overwrite`` is set."""
    if not options.out.is_dir():
        return []
    existing = sorted(options.out.glob(f"{options.prefix}-*.tar")) + [
        options.out / name for name in OUTPUT_FILES if (options.out / name).exists()
    ]
    if existing and not options.overwrite:
        raise BuildError(
            f"{options.out} already contains shards ({existing[0].name}, {len(existing)} files in all); "
            "pass --overwrite to replace them or choose another --out"
        )
    return existing


def publish(staging: Path, options: BuildOptions, replaced: list[Path]) -> None:
    """Replace the earlier build's files with the staged ones, now that the new build is complete."""
    for path in replaced:
        path.unlink()
    for path in sorted(staging.iterdir()):
        os.replace(path, options.out / path.name)
    staging.rmdir()


def sample_metadata(key: str, result: Processed) -> dict[str, Any]:
    """Return KEY.json: the generated fields, then the input's extra columns.

    An extra column whose name a generated field uses is kept as ``source_NAME``.
    """
    meta = {
        "key": key,
        "original_path": result.source,
        "caption": result.caption,
        "width": result.width,
        "height": result.height,
        "source_mode": result.source_mode,
    }
    for name, value in result.extra.items():
        meta[f"source_{name}" if name in meta else name] = value
    return meta


def build(source: str, options: BuildOptions, progress: bool = True) -> dict[str, Any]:
    """Build shards from ``source``; return the statistics also written to _stats.json.

    The shards are written into a hidden staging folder inside ``options.out`` and
    moved into place only when the whole input has been read, so a build that fails
    leaves an earlier build's files as they were.

    Raises:
        BuildError: an invalid option or input, output already there without ``overwrite``,
            or no usable sample in the input.
    """
    check_options(options)
    replaced = existing_output(options)
    records = input_records(source, options)
    staging = options.out / ".build-staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        stats = write_shards(source, records, replace(options, out=staging), progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if stats["samples"] == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BuildError(
            f"no usable sample in {source}: {stats['skipped']} skipped "
            f"({format_counts(stats['skipped_by_reason'])}); nothing was written"
        )
    stats["options"]["out"] = str(options.out)
    (staging / "_stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    publish(staging, options, replaced)
    return stats


def write_shards(
    source: str, records: Iterator[Record | tuple[str, str]], options: BuildOptions, progress: bool
) -> dict[str, Any]:
    """Process the records in parallel and write shards, _stats.json and _manifest.json to ``options.out``."""
    started = time.monotonic()
    writer = ShardWriter(options)
    skipped: Counter = Counter()
    repairs: Counter = Counter()
    duplicates: Counter = Counter()
    seen_images: set[str] = set()
    seen_pairs: set[str] = set()
    written = 0

    def jobs() -> Iterator[tuple[Record, BuildOptions]]:
        for record in records:
            if isinstance(record, tuple):
                skipped[record[1]] += 1
                continue
            yield record, options

    with ProcessPoolExecutor(max_workers=max(1, options.workers)) as pool:
        results = pool.map(_process_star, jobs(), chunksize=16) if options.workers > 1 else map(_process_star, jobs())
        for result in tqdm(results, desc="build", unit=" samples", disable=not progress):
            if isinstance(result, tuple):
                skipped[result[1]] += 1
                continue
            normalised_caption = " ".join(result.caption.lower().split())
            pair = hashlib.sha256(f"{result.image_hash}|{normalised_caption}".encode()).hexdigest()
            if options.dedup == "image" and result.image_hash in seen_images:
                duplicates["same_image"] += 1
                continue
            if options.dedup == "pair" and pair in seen_pairs:
                duplicates["same_image_and_caption"] += 1
                continue
            seen_images.add(result.image_hash)
            seen_pairs.add(pair)
            repairs.update(result.repairs)
            key = f"{written:09d}"
            meta = sample_metadata(key, result)
            writer.add(
                key,
                [
                    (f"{key}.{result.extension}", result.image),
                    (f"{key}.txt", result.caption.encode("utf-8")),
                    (f"{key}.json", json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8")),
                ],
            )
            written += 1
    writer.close()
    stats = {
        "input": source,
        "samples": written,
        "shards": len(writer.shards),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "duplicates_removed": dict(sorted(duplicates.items())),
        "captions_repaired": dict(sorted(repairs.items())),
        "bytes": sum(shard["bytes"] for shard in writer.shards),
        "seconds": round(time.monotonic() - started, 2),
        "options": {key: str(value) for key, value in options.__dict__.items()},
    }
    (options.out / "_stats.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    manifest = {"shards": writer.shards}
    (options.out / "_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return stats
