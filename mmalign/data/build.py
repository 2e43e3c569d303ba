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

import csv
import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm.auto import tqdm

from mmalign.data.decode import SampleError, decode_image, split_captions
from mmalign.data.reader import FieldSpec, RawSample, ShardTruncated, check_urls, iter_shard
from mmalign.data.sample import caption_candidates, parse_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "filepath", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "description", "alt", "label")
OUTPUT_FILES = ("_stats.json", "_manifest.json")


class BuildError(ValueError):
    """An input or option that ``shards build`` cannot work with; the message says how to fix it."""


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
class Record:
    """One input sample before decoding: where it came from, its image, caption and extra fields."""

    source: str
    caption: Any
    image_path: str | None = None
    image_bytes: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "shards" if any(path.glob("*.tar")) and not _has_images(path) else "folder"
    suffix = path.suffix.lower()
    formats = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".parquet": "parquet", ".tar": "shards"}
    if suffix in formats:
        return formats[suffix]
    if "{" in str(path) or "::" in str(path):
        return "shards"
    raise BuildError(f"cannot tell the input format of {path}; pass --format folder|csv|jsonl|parquet|shards")


def _has_images(folder: Path) -> bool:
    return any(item.suffix.lower() in IMAGE_SUFFIXES for item in folder.iterdir() if item.is_file())


def folder_records(root: Path) -> Iterator[Record | tuple[str, str]]:
    """Yield a Record per image with a same-named .txt, or (source, skip reason) for an unpaired file."""
    files = sorted(path for path in root.rglob("*") if path.is_file())
    captions = {path.with_suffix("").as_posix(): path for path in files if path.suffix.lower() == ".txt"}
    used_captions = set()
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        relative = path.relative_to(root).as_posix()
        caption_path = captions.get(path.with_suffix("").as_posix())
        if caption_path is None:
            yield relative, "missing_caption"
            continue
        used_captions.add(caption_path)
        yield Record(source=relative, caption=caption_path.read_bytes(), image_path=str(path))
    for caption_path in captions.values():
        if caption_path not in used_captions:
            yield caption_path.relative_to(root).as_posix(), "missing_image"


def table_rows(path: Path, fmt: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """Return the column names and the rows of a CSV/TSV, JSONL or Parquet file."""
    if fmt == "csv":
        text = path.read_text(encoding="utf-8-sig")
        try:
            dialect = csv.Sniffer().sniff(text[:65536], delimiters=",\t;|")
        except csv.Error as error:
            raise BuildError(f"cannot detect the delimiter of {path}: {error}") from None
        reader = csv.DictReader(io.StringIO(text), dialect=dialect)
        return list(reader.fieldnames or []), iter(reader)
    if fmt == "jsonl":
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise BuildError(f"{path} line {number} is not JSON: {error}") from None
        columns = sorted({key for row in rows for key in row})
        return columns, iter(rows)
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise BuildError("reading Parquet needs pyarrow: pip install 'mmalign[parquet]'") from None
    table = parquet.read_table(path)
    return list(table.column_names), iter(table.to_pylist())


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise BuildError(f"{path} has no {what} column {wanted!r}; columns found: {columns}")
        return wanted
    lower = {column.lower(): column for column in columns}
    for candidate in candidates:
        if candidate in lower:
            return lower[candidate]
    option = "--image-column" if what == "image" else "--caption-column"
    raise BuildError(f"{path}: no {what} column among {columns}; name it with {option} NAME")


def table_records(path: Path, fmt: str, options: BuildOptions) -> Iterator[Record]:
    """Check the table's columns now, then return a generator of its rows as Records."""
    columns, rows = table_rows(path, fmt)
    image_column = pick_column(columns, options.image_column, IMAGE_COLUMNS, "image", path)
    caption_column = pick_column(columns, options.caption_column, CAPTION_COLUMNS, "caption", path)

    def records() -> Iterator[Record]:
        for row in rows:
            image = str(row.get(image_column) or "")
            if image.startswith(("http://", "https://")):
                raise BuildError(
                    f"{path}: image {image!r} is a URL; shards build reads local files only, "
                    "so download the images first (for example with img2dataset)"
                )
            image_path = Path(image) if Path(image).is_absolute() else path.parent / image
            extra = {key: value for key, value in row.items() if key not in (image_column, caption_column)}
            yield Record(source=image, caption=row.get(caption_column), image_path=str(image_path), extra=extra)

    return records()


def shard_records(pattern: str) -> Iterator[Record | tuple[str, str]]:
    fields = FieldSpec(caption_json_field="caption")
    for url in check_urls(pattern, "input"):
        for item in iter_shard(url, fields):
            if isinstance(item, ShardTruncated):
                yield f"{url}#{item.key}", "truncated_shard"
                break
            if not isinstance(item, RawSample):
                continue
            image_key = fields.image_field(item)
            if image_key is None:
                yield f"{url}#{item.key}", "missing_image"
                continue
            try:
                captions, _ = caption_candidates(item, fields, "cp1252")
                extra = parse_json(item)
            except SampleError as error:
                yield f"{url}#{item.key}", error.reason
                continue
            extra = {key: value for key, value in extra.items() if key not in ("key", "caption", "width", "height")}
            source = extra.pop("original_path", None) or f"{Path(url).name}#{item.key}"
            yield Record(source=source, caption="\n".join(captions), image_bytes=item.fields[image_key], extra=extra)


def input_records(source: str, options: BuildOptions) -> Iterator[Record | tuple[str, str]]:
    path = Path(source)
    fmt = options.input_format if options.input_format != "auto" else detect_format(path)
    if fmt == "shards":
        pattern = "::".join(str(item) for item in sorted(path.glob("*.tar"))) if path.is_dir() else source
        return shard_records(pattern)
    if not path.exists():
        raise BuildError(f"input not found: {source}")
    if fmt == "folder":
        return folder_records(path)
    if fmt in ("csv", "jsonl", "parquet"):
        return table_records(path, fmt, options)
    raise BuildError(f"unknown input format {fmt!r}; use folder, csv, jsonl, parquet or shards")


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
        # several captions (a list, or lines of text) are kept one per line
        captions, repairs = split_captions([str(item) for item in raw] if isinstance(raw, list) else raw)
        caption = "\n".join(captions)
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


def prepare_output(options: BuildOptions) -> None:
    """Create the output folder; refuse to replace earlier output unless ``overwrite`` is set."""
    options.out.mkdir(parents=True, exist_ok=True)
    existing = sorted(options.out.glob(f"{options.prefix}-*.tar")) + [
        options.out / name for name in OUTPUT_FILES if (options.out / name).exists()
    ]
    if existing and not options.overwrite:
        raise BuildError(
            f"{options.out} already contains shards ({existing[0].name}, {len(existing)} files in all); "
            "pass --overwrite to replace them or choose another --out"
        )
    for path in existing:
        path.unlink()


def build(source: str, options: BuildOptions, progress: bool = True) -> dict[str, Any]:
    """Build shards from ``source``; return the statistics also written to _stats.json."""
    if options.dedup not in ("none", "image", "pair"):
        raise BuildError(f"unknown --dedup {options.dedup!r}; use none, image or pair")
    records = input_records(source, options)
    prepare_output(options)
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
            meta = {
                "key": key,
                "original_path": result.source,
                "caption": result.caption,
                "width": result.width,
                "height": result.height,
                "source_mode": result.source_mode,
                **result.extra,
            }
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
