"""Inputs of ``mmalign shards build``: image folders, tables (CSV/TSV, JSONL, Parquet) and shards.

Each reader yields a :class:`Record` per sample, or a ``(source, reason)`` pair
for an input that cannot become a sample (an image without a caption, ...), so
that every input is either written or counted.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmalign.data.decode import SampleError
from mmalign.data.reader import FieldSpec, RawSample, ShardTruncated, check_urls, iter_shard
from mmalign.data.sample import caption_candidates, parse_json

logger = logging.getLogger("mmalign.build")

if TYPE_CHECKING:
    from mmalign.data.build import BuildOptions

# suffixes taken as images in a folder; the decoder still decides by content, and counts what it cannot read
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic"}
# a file in an input folder that is neither an image nor a caption: counted, but not as a skipped sample
IGNORED = "ignored_file"
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "filepath", "img")
GENERATED_FIELDS = ("key", "caption", "width", "height", "source_mode")
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
    # the row of a table the sample came from, for example "pairs.csv line 7"
    location: str | None = None

    def describe(self) -> str:
        return f"{self.source} ({self.location})" if self.location else self.source


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


def walk_files(root: Path, exclude: Path | None = None) -> list[Path]:
    """Return every file under ``root``, following symlinked folders but never into a loop.

    The folder ``exclude`` (a build's own output inside its input) is left out.
    """
    files = []
    seen = {os.path.realpath(exclude)} if exclude is not None else set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        files += [Path(folder) / name for name in names]
    return sorted(path for path in files if path.is_file())


def folder_records(root: Path, exclude: Path | None = None) -> Iterator[Record | tuple[str, str]]:
    """Yield a Record per image with a same-named .txt, or (source, skip reason) for an unpaired file."""
    files = walk_files(root, exclude)
    captions = {path.with_suffix("").as_posix(): path for path in files if path.suffix.lower() == ".txt"}
    used_captions = set()
    for path in files:
        relative = path.relative_to(root).as_posix()
        if path.suffix.lower() == ".txt":
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            yield relative, IGNORED
            continue
        caption_path = captions.get(path.with_suffix("").as_posix())
        if caption_path is None:
            yield relative, "missing_caption"
            continue
        used_captions.add(caption_path)
        yield Record(source=relative, caption=caption_path.read_bytes(), image_path=str(path))
    for caption_path in captions.values():
        if caption_path not in used_captions:
            yield caption_path.relative_to(root).as_posix(), "missing_image"


# one CSV cell may hold a whole document; the csv module's default cap is 128 KiB
CSV_FIELD_LIMIT = 2**31 - 1
DELIMITERS = ",\t;|"


@dataclass
class Table:
    """Rows of a CSV/TSV, JSONL or Parquet file, with rows that could not be parsed set aside."""

    columns: list[str]
    # (where the row is, for example "line 7", and the row or None for one that could not be parsed)
    rows: Iterator[tuple[str, dict[str, Any] | None]]


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise BuildError(f"{path} is not UTF-8 text ({error}); save it as UTF-8 and run again") from None


def guess_delimiter(path: Path, text: str) -> str:
    """Return the delimiter of a CSV file: a tab for .tsv, else the best of ``DELIMITERS`` on the first lines.

    Each candidate parses the header and up to 20 rows, quotes respected. It scores by, in
    order: splitting the header at all, leaving no stray quote inside a header cell, giving
    as many cells to each row as to the header, and the number of header cells. A comma
    wins a tie.
    """
    if path.suffix.lower() == ".tsv":
        return "\t"
    sample = text[:65536].rpartition("\n")[0] or text

    def score(delimiter: str) -> tuple[bool, bool, int, int]:
        records = list(itertools.islice(csv.reader(io.StringIO(sample), delimiter=delimiter), 21))
        header = records[0] if records else []
        consistent = sum(len(record) == len(header) for record in records[1:] if record)
        stray_quote = any('"' in cell for cell in header)
        return len(header) > 1, not stray_quote, consistent, len(header)

    return max(DELIMITERS, key=score)


def csv_table(path: Path, delimiter: str | None) -> Table:
    text = read_text(path)
    if not text.strip():
        raise BuildError(f"{path} is empty; a header line with the column names comes first")
    delimiter = delimiter or guess_delimiter(path, text)
    csv.field_size_limit(CSV_FIELD_LIMIT)
    # strict: a character after a closing quote is an error, not silently glued to the cell
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as error:
        raise BuildError(f"{path} line 1 is not a CSV header: {error}") from None
    columns = [name.strip() or f"column_{number}" for number, name in enumerate(header, 1)]
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise BuildError(f"{path}: column name(s) {repeated} appear more than once in the header; rename them")

    def rows() -> Iterator[tuple[str, dict[str, Any] | None]]:
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                if "unexpected end of data" in str(error):
                    raise BuildError(
                        f"{path} line {start}: a quoted cell opens here and is never closed, so every line after "
                        'it would be read into that cell; close the quote (a quote inside a cell is written "")'
                    ) from None
                # the reader starts afresh on the next line
                yield lines(start, reader.line_num), None
                continue
            if not cells:
                # a blank line
                continue
            where = lines(start, reader.line_num)
            yield where, dict(zip(columns, cells, strict=True)) if len(cells) == len(columns) else None

    return Table(columns, rows())


def lines(first: int, last: int) -> str:
    return f"line {first}" if first >= last else f"lines {first}-{last}"


def jsonl_table(path: Path) -> Table:
    rows: list[tuple[str, dict[str, Any] | None]] = []
    first_error = ""
    # only "\n" ends a line: U+2028 and other separators that str.splitlines() honours can sit inside a string
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            first_error = first_error or f"line {number} is not JSON: {error}"
            row = None
        if row is not None and not isinstance(row, dict):
            first_error = first_error or f"line {number} is a JSON {type(row).__name__}, not an object of columns"
            row = None
        rows.append((f"line {number}", row))
    if first_error and not any(row for _, row in rows):
        raise BuildError(f"{path} {first_error}; each line must be one JSON object")
    columns = sorted({key for _, row in rows if row for key in row})
    return Table(columns, iter(rows))


def parquet_table(path: Path) -> Table:
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ImportError:
        raise BuildError("reading Parquet needs pyarrow: pip install 'mmalign[parquet]'") from None
    try:
        table = parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise BuildError(f"{path} is not a readable Parquet file: {error}") from None
    rows = ((f"row {number}", row) for number, row in enumerate(table.to_pylist(), 1))
    return Table(list(table.column_names), rows)


def read_table(path: Path, fmt: str, delimiter: str | None = None) -> Table:
    """Return the columns and rows of a CSV/TSV, JSONL or Parquet file."""
    if fmt == "csv":
        return csv_table(path, delimiter)
    if fmt == "jsonl":
        return jsonl_table(path)
    return parquet_table(path)


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


def table_records(path: Path, fmt: str, options: BuildOptions) -> Iterator[Record | tuple[str, str]]:
    """Check the table's columns now, then return a generator of its rows as Records or skips."""
    table = read_table(path, fmt, options.delimiter)
    image_column = pick_column(table.columns, options.image_column, IMAGE_COLUMNS, "image", path)
    caption_column = pick_column(table.columns, options.caption_column, CAPTION_COLUMNS, "caption", path)

    def records() -> Iterator[Record | tuple[str, str]]:
        for where, row in table.rows:
            location = f"{path.name} {where}"
            if row is None:
                yield location, "malformed_row"
                continue
            image = row.get(image_column)
            extra = {key: value for key, value in row.items() if key not in (image_column, caption_column)}
            if isinstance(image, dict):
                # the Hugging Face datasets layout: {"bytes": ..., "path": ...}, bytes if embedded
                if image.get("bytes"):
                    name = image.get("path")
                    yield Record(
                        str(name) if name else location,
                        row.get(caption_column),
                        image_bytes=bytes(image["bytes"]),
                        extra=extra,
                        location=location if name else None,
                    )
                    continue
                image = image.get("path")
            if isinstance(image, bytes | bytearray):
                yield Record(location, row.get(caption_column), image_bytes=bytes(image), extra=extra)
                continue
            image = "" if image is None else str(image).strip()
            if not image:
                yield location, "missing_image"
                continue
            if image.startswith(("http://", "https://")):
                raise BuildError(
                    f"{path}: image {image!r} is a URL; shards build reads local files only, "
                    "so download the images first (for example with img2dataset)"
                )
            image_path = Path(image) if Path(image).is_absolute() else path.parent / image
            yield Record(
                source=image,
                caption=row.get(caption_column),
                image_path=str(image_path),
                extra=extra,
                location=location,
            )

    return records()


def shard_records(pattern: str) -> Iterator[Record | tuple[str, str]]:
    fields = FieldSpec(caption_json_field="caption")
    for url in check_urls(pattern, "input"):
        for item in iter_shard(url, fields):
            if isinstance(item, ShardTruncated):
                logger.warning("input shard %s is truncated at %s; the samples after it are lost", url, item.key)
                if item.broken:
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
            except SampleError as error:
                yield f"{url}#{item.key}", error.reason
                continue
            try:
                extra = parse_json(item)
            except SampleError:
                # the caption came from KEY.txt, so training reads this sample; keep it, and the text of KEY.json
                extra = {"source_json_text": item.fields["json"].decode("utf-8", "replace")}
            # fields that the build writes anew; the rest (img2dataset's url, status, ...) travel on
            extra = {key: value for key, value in extra.items() if key not in GENERATED_FIELDS}
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
        return folder_records(path, exclude=options.out)
    if fmt in ("csv", "jsonl", "parquet"):
        return table_records(path, fmt, options)
    raise BuildError(f"unknown input format {fmt!r}; use folder, csv, jsonl, parquet or shards")
