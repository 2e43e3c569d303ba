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

import base64
import contextlib
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm.auto import tqdm

from mmalign.data.build_inputs import IGNORED, BuildError, Record, input_records
from mmalign.data.decode import SampleError, decode_image, split_captions
from mmalign.data.reader import file_sha256
from mmalign.data.report import format_counts
from mmalign.data.sample import json_caption_text
from mmalign.data.verify import MANIFEST, is_plain_shard_name, load_manifest

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SKIPS_LOGGED = 10
OUTPUT_FILES = ("_stats.json", "_manifest.json", "_skipped.jsonl")
STAGING_PREFIX = ".mmalign-staging-"
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
logger = logging.getLogger("mmalign.build")


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
    delimiter: str | None = None


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
    except FileNotFoundError:
        return record.describe(), "image_not_found"
    except IsADirectoryError:
        return record.describe(), "image_not_a_file"
    except OSError:
        return record.describe(), "image_file_unreadable"
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
        return record.describe(), error.reason

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


def _process_chunk(chunk: list[tuple[Record, BuildOptions]]) -> list[Processed | tuple[str, str]]:
    return [process(*arguments) for arguments in chunk]


def ordered_pool_map(
    pool: ProcessPoolExecutor, jobs: Iterator[tuple[Record, BuildOptions]], workers: int, chunk: int = 16
) -> Iterator[Processed | tuple[str, str]]:
    """Process jobs on the pool in chunks, yielding results in input order.

    At most two chunks per worker are in flight, so memory stays bounded however large
    the input is (``Executor.map`` would submit every job, image bytes included, at once).
    """
    pending: deque[Future] = deque()
    while batch := list(itertools.islice(jobs, chunk)):
        pending.append(pool.submit(_process_chunk, batch))
        if len(pending) > 2 * workers:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


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
        entry["sha256"] = file_sha256(self.temporary)
        os.replace(self.temporary, self.path)


def check_options(options: BuildOptions) -> None:
    """Raise BuildError for an option out of range, naming it and what it takes."""
    problems = []
    if options.shard_mb is None and (options.shard_size is None or options.shard_size < 1):
        problems.append(f"--shard-size {options.shard_size} (a positive number of samples)")
    if options.shard_mb is not None and not (math.isfinite(options.shard_mb) and options.shard_mb > 0):
        problems.append(f"--shard-mb {options.shard_mb} (a positive number of megabytes)")
    if options.max_side < 1:
        problems.append(f"--max-side {options.max_side} (a positive number of pixels)")
    if not 1 <= options.quality <= 100:
        problems.append(f"--quality {options.quality} (1 to 100)")
    if options.dedup not in ("none", "image", "pair"):
        problems.append(f"--dedup {options.dedup!r} (none, image or pair)")
    if not PREFIX_PATTERN.fullmatch(options.prefix):
        problems.append(
            f"--prefix {options.prefix!r} (up to 200 letters, digits, '.', '_' and '-', not starting with '.')"
        )
    if options.delimiter is not None and len(options.delimiter) != 1:
        problems.append(f"--delimiter {options.delimiter!r} (one character, for example ',' or '\\t')")
    if options.out.exists() and not options.out.is_dir():
        problems.append(f"--out {options.out} (a folder, but this is a file)")
    if problems:
        raise BuildError("invalid option: " + "; ".join(problems))


def existing_output(options: BuildOptions) -> list[Path]:
    """Return the files of an earlier build in the output folder; raise unless ``overwrite`` is set.

    These are the ``.tar`` files its ``_manifest.json`` lists, any ``PREFIX-NNNNNN.tar`` of
    this build's prefix, and the build's own record files. Nothing else in the folder is touched.
    """
    if not options.out.is_dir():
        return []
    names = {path.name for path in options.out.iterdir() if is_shard_name(path.name, options.prefix)}
    names.update(name for name in OUTPUT_FILES if (options.out / name).exists())
    manifest = options.out / MANIFEST
    if manifest.is_file():
        try:
            listed = [entry["name"] for entry in load_manifest(manifest)]
        except ValueError as error:
            raise BuildError(f"{manifest} is {error}; move it away and run again") from None
        names.update(name for name in listed if is_plain_shard_name(name) and (options.out / name).exists())
    existing = sorted(options.out / name for name in names)
    folders = [path.name for path in existing if path.is_dir()]
    if folders:
        raise BuildError(f"{options.out} contains folders named like build files ({folders}); move them away")
    if existing and not options.overwrite:
        raise BuildError(
            f"{options.out} already contains shards ({existing[0].name}, {len(existing)} files in all); "
            "pass --overwrite to replace them or choose another --out"
        )
    return existing


def is_shard_name(name: str, prefix: str) -> bool:
    """Return whether ``name`` is a shard that a build with ``prefix`` writes: PREFIX-NNNNNN.tar."""
    number = name.removeprefix(f"{prefix}-").removesuffix(".tar")
    return name.startswith(f"{prefix}-") and name.endswith(".tar") and len(number) >= 6 and number.isdigit()


def publish(staging: Path, options: BuildOptions, replaced: list[Path]) -> None:
    """Replace the earlier build's files with the staged ones, now that the new build is complete.

    The new files go in first, each replacing any old file of its name in one step. Then
    the old files that no new one replaced are deleted.
    """
    written = set()
    for path in sorted(staging.iterdir()):
        os.replace(path, options.out / path.name)
        written.add(path.name)
    for path in replaced:
        if path.name not in written:
            path.unlink()
    staging.rmdir()


def sample_metadata(key: str, result: Processed) -> dict[str, Any]:
    """Return KEY.json: the generated fields, then the input's extra columns.

    An extra column whose name a generated field uses is kept as ``source_NAME``
    (``source_source_NAME`` if the input has a ``source_NAME`` column too, and so on).
    """
    meta = {
        "key": key,
        "original_path": result.source,
        "caption": result.caption,
        "width": result.width,
        "height": result.height,
        "source_mode": result.source_mode,
    }
    generated = set(meta)
    extra = {name: plain_json(value) for name, value in result.extra.items()}
    meta.update((name, value) for name, value in extra.items() if name not in generated)
    for name, value in extra.items():
        if name in generated:
            target = f"source_{name}"
            while target in meta:
                target = f"source_{target}"
            meta[target] = value
    return meta


def plain_json(value: Any) -> Any:
    """Return ``value`` in standard JSON terms: NaN and infinity become null, bytes become base64 text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {str(key): plain_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(item) for item in value]
    return value


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
    created = not options.out.exists()
    try:
        options.out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=options.out))
    except OSError as error:
        raise BuildError(f"cannot create the output folder {options.out}: {error}") from None
    stale = [path.name for path in options.out.glob(f"{STAGING_PREFIX}*") if path != staging]
    if stale:
        logger.warning("%s contains %s, left by builds that did not finish; delete them", options.out, stale)
    try:
        stats = write_shards(source, records, replace(options, out=staging), progress)
        if stats["samples"] == 0:
            raise BuildError(
                f"no usable sample in {source}: {stats['skipped']} skipped "
                f"({format_counts(stats['skipped_by_reason'])}); nothing was written"
            )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            # a folder this build made and left empty is not kept
            with contextlib.suppress(OSError):
                options.out.rmdir()
        raise
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
    ignored = 0
    # every input that is not written, with the reason: skips and removed duplicates
    dropped = (options.out / "_skipped.jsonl").open("w", encoding="utf-8")

    def note_skip(where: str, reason: str) -> None:
        nonlocal ignored
        if reason == IGNORED:
            ignored += 1
            return
        skipped[reason] += 1
        dropped.write(json.dumps({"input": where, "reason": reason}, ensure_ascii=False) + "\n")
        if sum(skipped.values()) <= SKIPS_LOGGED:
            logger.warning("skipped %s: %s", where, reason)

    def jobs() -> Iterator[tuple[Record, BuildOptions]]:
        for record in records:
            if isinstance(record, tuple):
                note_skip(*record)
                continue
            yield record, options

    with dropped, ProcessPoolExecutor(max_workers=max(1, options.workers)) as pool:
        if options.workers > 1:
            results = ordered_pool_map(pool, jobs(), options.workers)
        else:
            results = map(_process_star, jobs())
        for result in tqdm(results, desc="build", unit=" samples", disable=not progress):
            if isinstance(result, tuple):
                note_skip(*result)
                continue
            normalised_caption = " ".join(result.caption.lower().split())
            pair = hashlib.sha256(f"{result.image_hash}|{normalised_caption}".encode()).hexdigest()
            duplicate = None
            if options.dedup == "image" and result.image_hash in seen_images:
                duplicate = "same_image"
            elif options.dedup == "pair" and pair in seen_pairs:
                duplicate = "same_image_and_caption"
            if duplicate:
                duplicates[duplicate] += 1
                dropped.write(json.dumps({"input": result.source, "reason": duplicate}, ensure_ascii=False) + "\n")
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
                    (f"{key}.json", json.dumps(meta, ensure_ascii=False, allow_nan=False, default=str).encode("utf-8")),
                ],
            )
            written += 1
    writer.close()
    if sum(skipped.values()) > SKIPS_LOGGED:
        logger.warning("%d inputs skipped in all; _skipped.jsonl lists each with its reason", sum(skipped.values()))
    stats = {
        "input": source,
        "samples": written,
        "shards": len(writer.shards),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "ignored_files": ignored,
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
