"""Inputs of ``mmalign shards build``: image folders, tables (CSV/TSV, JSONL, Parquet) and shards.

Each reader yields a :class:`Record` per sample, or a ``(source, reason)`` pair
for an input that cannot become a sample (an image without a caption, ...), so
that every input is either written or counted.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmalign.data.decode import SampleError
from mmalign.data.reader import FieldSpec, RawSample, ShardTruncated, check_urls, iter_shard
from mmalign.data.sample import caption_candidates, parse_json

if TYPE_CHECKING:
    from mmalign.data.build import BuildOptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "filepath", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "description", "alt", "label")


class BuildError(ValueError):
    """An input or option that ``shards build`` cannot work with; the message says how to fix it."""


@dataclass
class Record:
    """One input sample before decoding: where it came from, its image, caption and extra fields."""

    source: str
    caption: Any
    image_path: str | None = None
    image_bytes: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    repairs: list[str] = field(default_factory=list)


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
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            raise BuildError(f"{path} is not UTF-8 text ({error}); save it as UTF-8 and run again") from None
        try:
            dialect = csv.Sniffer().sniff(text[:65536], delimiters=",\t;|")
        except csv.Error as error:
            raise BuildError(f"cannot detect the delimiter of {path}: {error}") from None
        reader = csv.DictReader(io.StringIO(text), dialect=dialect)
        return list(reader.fieldnames or []), iter(reader)
    if fmt == "jsonl":
        rows = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise BuildError(f"{path} is not UTF-8 text ({error}); save it as UTF-8 and run again") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as error:
                raise BuildError(f"{path} line {number} is not JSON: {error}") from None
            if not isinstance(row, dict):
                raise BuildError(f"{path} line {number} is a JSON {type(row).__name__}, not an object of columns")
            rows.append(row)
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
                captions, repairs = caption_candidates(item, fields, "cp1252")
                extra = parse_json(item)
            except SampleError as error:
                yield f"{url}#{item.key}", error.reason
                continue
            extra = {key: value for key, value in extra.items() if key not in ("key", "caption", "width", "height")}
            source = extra.pop("original_path", None) or f"{Path(url).name}#{item.key}"
            yield Record(
                source=source,
                caption="\n".join(captions),
                image_bytes=item.fields[image_key],
                extra=extra,
                repairs=repairs,
            )


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
