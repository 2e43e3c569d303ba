"""Read WebDataset tar shards into samples: URL expansion, opening and key grouping.

A sample is the run of consecutive tar members that share a key. The key of a
member is its name minus the longest *field suffix* it ends with, compared
case-insensitively: ``img_v1.5_0001.jpg`` has key ``img_v1.5_0001`` and field
``jpg``, and ``x.input.jpg`` has key ``x`` and field ``input.jpg`` when
``input.jpg`` is one of the configured image fields. A member whose name ends in
no known field is split at the first dot of its base name, as webdataset does.

Samples never span two shards. A shard cut short in the middle of a member
ends with a :class:`ShardTruncated` event naming the key where it broke; the
complete samples before it are kept. A shard that cannot be opened at all
raises :class:`ShardError`.
"""

from __future__ import annotations

import hashlib
import os
import select
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
from webdataset.gopen import gopen

REMOTE_SCHEMES = ("pipe", "http", "https", "s3", "gs", "ais", "sftp", "scp")


class ShardError(RuntimeError):
    """A shard that cannot be opened or read at all."""


class DataError(RuntimeError):
    """A dataset that cannot be trained on as configured (wrong keys, too many bad samples)."""


@dataclass(frozen=True)
class FieldSpec:
    """The tar member suffixes a sample is built from (all lower case)."""

    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    caption_key: str = "txt"
    caption_json_field: str | None = None
    extra_keys: tuple[str, ...] = ("json",)

    @property
    def caption_member(self) -> str:
        """The member suffix the caption is read from (``json`` for ``caption_key="json:FIELD"``)."""
        return "json" if self.caption_key.startswith("json:") else self.caption_key

    @property
    def caption_field_in_json(self) -> str | None:
        """FIELD of ``caption_key="json:FIELD"``, else None."""
        return self.caption_key.partition(":")[2] if self.caption_key.startswith("json:") else None

    @property
    def known_suffixes(self) -> tuple[str, ...]:
        suffixes = {*self.image_keys, self.caption_member, *self.extra_keys}
        # longest first, so "input.jpg" wins over "jpg"
        return tuple(sorted((s.lower() for s in suffixes), key=len, reverse=True))

    def image_field(self, sample: RawSample) -> str | None:
        """Return the first configured image field the sample has."""
        return next((key for key in self.image_keys if key in sample.fields), None)

    def has_caption(self, sample: RawSample) -> bool:
        if self.caption_member in sample.fields:
            return True
        return self.caption_json_field is not None and "json" in sample.fields


@dataclass
class RawSample:
    """Undecoded fields of one sample, with where it came from."""

    key: str
    url: str
    index: int
    fields: dict[str, bytes] = field(default_factory=dict)
    duplicate_fields: list[str] = field(default_factory=list)

    @property
    def uid(self) -> str:
        return f"{self.url}#{self.key}"


@dataclass(frozen=True)
class ShardTruncated:
    """A shard cut off before its end.

    ``key`` is the sample the cut broke, or ``after KEY`` (``at the start``) when
    the cut fell between samples; the samples after it are lost either way.
    """

    url: str
    key: str
    complete_samples: int
    error: str

    @property
    def broken(self) -> bool:
        """Whether the cut broke a sample, which then counts as skipped (``truncated_shard``)."""
        return not self.key.startswith(("after ", "at the start"))


@dataclass(frozen=True)
class ShardEnd:
    url: str
    samples: int


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand shard patterns into URLs.

    A pattern is a brace pattern (``train-{000..007}.tar``), several of them joined by
    ``::`` or given as a list, or a local folder, which stands for every ``.tar`` file
    in it, in name order.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in patterns:
        for part in pattern.split("::"):
            part = part.strip()
            if part and is_local(part) and local_path(part).is_dir():
                urls.extend(str(path) for path in sorted(local_path(part).glob("*.tar")))
            elif part:
                try:
                    urls.extend(braceexpand.braceexpand(part))
                except braceexpand.UnbalancedBracesError:
                    raise ShardError(
                        f"shard pattern {part!r} has unbalanced braces; write e.g. train-{{000..007}}.tar"
                    ) from None
    return urls


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file:") else url)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Return the SHA-256 hex digest of a file, read in chunks so that memory stays flat."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_urls(spec: str | Sequence[str], config_key: str) -> list[str]:
    """Expand a shard spec and check that every local shard exists.

    Raises:
        ShardError: the spec expands to nothing, or local shards are missing
            (the message names ``config_key`` and the missing files).
    """
    urls = expand_urls(spec)
    if not urls:
        raise ShardError(f"{config_key}={spec!r} expands to no shard; give a path like shards/train-{{000..007}}.tar")
    missing = [url for url in urls if is_local(url) and not local_path(url).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ShardError(
            f"{config_key}={spec!r}: {len(missing)} of {len(urls)} shards not found: {shown} "
            f"(working directory {Path.cwd()}); fix the pattern or run from the folder it is relative to"
        )
    return urls


def split_name(name: str, suffixes: Sequence[str]) -> tuple[str, str] | None:
    """Split a member name into (key, field) by the longest known suffix, else at the first dot."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith("." + suffix) and len(name) > len(suffix) + 1:
            return name[: -len(suffix) - 1], suffix
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, _, rest = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), rest.lower()


def first_dot_suffix(name: str) -> str:
    """Return the suffix webdataset would use: everything after the first dot of the base name."""
    base = name.rpartition("/")[2]
    return base.partition(".")[2].lower()


# a complete tar archive ends with two 512-byte blocks of zeros after its last member
END_BLOCKS = 1024
# tarfile reads a stream in records of 20 blocks; keep enough of the tail to see the end blocks
_TAIL = 3 * tarfile.RECORDSIZE
STALL_TIMEOUT_S = float(os.environ.get("MMALIGN_STALL_TIMEOUT", "300"))
CURL_EXITS = {
    6: "could not resolve the host",
    7: "could not connect",
    18: "the transfer closed early",
    22: "the server answered with an HTTP error (such as 404)",
    28: "the transfer timed out",
    56: "the connection was reset",
}


class TrackedStream:
    """A shard stream that counts the bytes read and keeps the last ones, to check the end of the archive.

    A ``pipe:`` or ``http(s)://`` stream also fails when no data arrives for
    ``STALL_TIMEOUT_S`` seconds (environment variable ``MMALIGN_STALL_TIMEOUT``),
    so a stalled server or command cannot hang training.
    """

    def __init__(self, raw, url: str) -> None:
        self.raw = raw
        self.url = url
        self.position = 0
        self.tail = bytearray()
        self.fd = raw.stream.fileno() if hasattr(raw, "proc") else None

    def read(self, size: int = -1) -> bytes:
        data = self._read_pipe(size) if self.fd is not None else self.raw.read(size)
        self.position += len(data)
        self.tail = (self.tail + data)[-_TAIL:]
        return data

    def _read_pipe(self, size: int) -> bytes:
        wanted = size if size is not None and size >= 0 else 1 << 62
        chunks = []
        while wanted > 0:
            ready, _, _ = select.select([self.fd], [], [], STALL_TIMEOUT_S)
            if not ready:
                raise ShardError(f"shard {self.url} sent no data for {STALL_TIMEOUT_S:.0f} s")
            chunk = os.read(self.fd, min(wanted, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            wanted -= len(chunk)
        return b"".join(chunks)

    def has_end_blocks(self, offset: int) -> bool:
        """Return whether the zero blocks that close an archive follow its last member, ending at ``offset``."""
        while self.position < offset + END_BLOCKS and self.read(tarfile.RECORDSIZE):
            pass
        if self.position < offset + END_BLOCKS:
            return False
        start = len(self.tail) - (self.position - offset)
        return start >= 0 and not any(self.tail[start : start + END_BLOCKS])

    def close(self) -> None:
        self.raw.close()


def open_url(url: str) -> TrackedStream:
    """Open a shard for streaming: a local path, ``pipe:COMMAND`` or an http(s) URL."""
    try:
        return TrackedStream(gopen(str(local_path(url)) if is_local(url) else url, "rb"), url)
    except OSError as error:
        raise ShardError(f"cannot open shard {url}: {error}") from error
    except ValueError as error:
        raise ShardError(
            f"cannot open shard {url}: {error}; read s3:// and other object stores through a command, "
            "e.g. pipe:aws s3 cp s3://bucket/shard.tar -"
        ) from error


def explain_failure(url: str, error: Exception) -> str:
    """Describe a failed read, naming curl's exit status for http(s) URLs."""
    text = str(error)
    if url.startswith(("http://", "https://")):
        for code, meaning in CURL_EXITS.items():
            if f"exit {code} " in text or text.endswith(f"exit {code}"):
                return f"reading shard {url} failed: {meaning} (curl exit status {code})"
    return f"reading shard {url} failed: {text}"


def iter_members(url: str, stream: TrackedStream) -> Iterator[tuple[str, bytes] | ShardTruncated]:
    """Yield (name, data) for each regular member; a cut-off stream ends with a ShardTruncated event.

    A stream cut inside a member's data yields the event with that member's name. A
    stream cut at or inside a header (which Python's tarfile takes for the end of the
    archive) is found by the missing end blocks, and yields the event with an empty name.
    """
    try:
        # the caller owns and closes the stream
        archive = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError) as error:
        if stream.position == 0 and stream.fd is not None:
            raise ShardError(explain_failure(url, OSError("no data"))) from error
        raise ShardError(f"shard {url} is not a readable tar file: {error}") from error
    name = ""
    try:
        for info in archive:
            name = info.name
            if not info.isreg():
                continue
            reader = archive.extractfile(info)
            data = reader.read() if reader is not None else b""
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {name} has {len(data)} of {info.size} bytes")
            yield name, data
            # the member is complete, so a failure from here on is in the next header
            name = ""
            # the stream-mode TarFile keeps every header unless this list is cleared
            archive.members = []
        # a compressed stream's byte count is not the archive's, so only plain tar files are checked
        plain = getattr(archive.fileobj, "comptype", "tar") == "tar"
        if plain and not stream.has_end_blocks(archive.offset):
            yield ShardTruncated(url=url, key="", complete_samples=-1, error="the end-of-archive blocks are missing")
    except (tarfile.TarError, EOFError) as error:
        yield ShardTruncated(url=url, key=name, complete_samples=-1, error=str(error))
    except OSError as error:
        # a failed read or a pipe: command that exited with an error status
        raise ShardError(explain_failure(url, error)) from error


def iter_shard(url: str, spec: FieldSpec, stream=None) -> Iterator[RawSample | ShardTruncated | ShardEnd]:
    """Group the members of one shard into samples.

    Yields every sample in tar order, then a ShardEnd; or, for a shard cut off
    inside a member, the complete samples and then a ShardTruncated event.
    """
    own_stream = stream is None
    stream = open_url(url) if own_stream else stream
    suffixes = spec.known_suffixes
    current: RawSample | None = None
    count = 0
    finished = False
    try:
        for item in iter_members(url, stream):
            if isinstance(item, ShardTruncated):
                finished = True
                parts = split_name(item.key, suffixes) if item.key else None
                if parts is not None:
                    # cut inside the data of a member: its sample is broken
                    broken_key = parts[0]
                elif current is None:
                    broken_key = "at the start"
                elif spec.image_field(current) is None or not spec.has_caption(current):
                    # cut at a header, and the sample before it lacks a field: the cut took the rest of it
                    broken_key = current.key
                else:
                    broken_key = f"after {current.key}"
                if current is not None and current.key != broken_key:
                    yield current
                    count += 1
                yield ShardTruncated(url, broken_key, count, item.error)
                return
            name, data = item
            parts = split_name(name, suffixes)
            if parts is None or name.rpartition("/")[2].startswith("__"):
                continue
            key, suffix = parts
            if current is not None and (key != current.key or suffix in current.fields):
                if key == current.key:
                    current.duplicate_fields.append(suffix)
                yield current
                count += 1
                current = None
            if current is None:
                current = RawSample(key=key, url=url, index=count)
            current.fields[suffix] = data
        if current is not None:
            yield current
            count += 1
        finished = True
        yield ShardEnd(url, count)
    finally:
        if own_stream:
            try:
                stream.close()
            except OSError as error:
                # a pipe: command that failed after its output was read; when the
                # reader stopped early, the command's exit status is of no interest
                if finished:
                    raise ShardError(explain_failure(url, error)) from error
