"""``mmalign shards verify``: read every sample of a set of shards and report what is wrong.

Each shard is read in order on its own, with the same decoder and caption
policy as training, so the counts here are the counts a training pass gets:
for every shard, readable pairs + skipped samples = samples read.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mmalign.data.decode import SampleError
from mmalign.data.reader import (
    FieldSpec,
    RawSample,
    ShardEnd,
    ShardError,
    ShardTruncated,
    file_sha256,
    is_local,
    iter_shard,
    local_path,
)
from mmalign.data.report import DataReport, format_counts
from mmalign.data.sample import decode_sample

MANIFEST = "_manifest.json"


@dataclass
class ShardResult:
    """What one shard held."""

    url: str
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    error: str | None = None
    truncated_at: str | None = None
    first_key: str | None = None
    last_key: str | None = None
    first_incomplete: bool = False
    last_incomplete: bool = False
    lost_keys: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"shard": self.url, "samples": self.samples, "skipped_by_reason": dict(self.skipped)}
        if self.error:
            data["error"] = self.error
        if self.truncated_at is not None:
            data["truncated_at"] = self.truncated_at
            data["lost_keys"] = self.lost_keys
        return data


def verify_shard(url: str, fields: FieldSpec, max_pixels: int, report: DataReport, keys: Counter) -> ShardResult:
    """Read and decode every sample of one shard, counting into ``report`` and ``keys``."""
    result = ShardResult(url)
    samples: list[RawSample] = []
    try:
        for item in iter_shard(url, fields):
            if isinstance(item, ShardEnd):
                break
            if isinstance(item, ShardTruncated):
                result.truncated_at = item.key
                report.truncated(item)
                if item.broken:
                    result.skipped["truncated_shard"] += 1
                break
            report.read += 1
            samples.append(item)
            keys[item.key] += 1
            try:
                decoded = decode_sample(item, fields, max_pixels)
            except SampleError as error:
                result.skipped[error.reason] += 1
                report.skipped[error.reason] += 1
                continue
            report.repair(decoded.repairs)
            report.used += 1
            report.kept += 1
            result.samples += 1
    except ShardError as error:
        result.error = str(error)
    if samples:
        result.first_key, result.last_key = samples[0].key, samples[-1].key
        result.first_incomplete = not _complete(samples[0], fields)
        result.last_incomplete = not _complete(samples[-1], fields)
    return result


def _complete(sample: RawSample, fields: FieldSpec) -> bool:
    return fields.image_field(sample) is not None and fields.has_caption(sample)


def infer_lost_keys(results: list[ShardResult], manifests: dict[str, dict[str, Any]]) -> None:
    """Fill in ``lost_keys`` of truncated shards: the samples after the break, never read.

    The sample the cut broke is not among them, because it is counted as skipped
    (``truncated_shard``), so readable + skipped + lost is what the shard held.
    With a manifest written by ``mmalign shards build`` the count is exact. Without
    one, img2dataset-style numeric keys are assumed to run on without gaps into
    the next shard, so the lost keys are those up to the next shard's first key.
    Otherwise the count is unknown and ``lost_keys`` stays None.
    """
    for index, result in enumerate(results):
        if result.truncated_at is None:
            continue
        entry = manifests.get(local_path(result.url)) if is_local(result.url) else None
        following = results[index + 1].first_key if index + 1 < len(results) else None
        first = result.truncated_at.removeprefix("after ")
        if not first.isdigit():
            continue
        start, width = int(first) + 1, len(first)
        if entry and str(entry.get("last_key", "")).isdigit():
            end = int(entry["last_key"]) + 1
        elif following and following.isdigit() and len(following) == width and int(following) >= start:
            end = int(following)
        else:
            continue
        result.lost_keys = [f"{number:0{width}d}" for number in range(start, end)]


def load_manifest(path: Path) -> list[dict[str, Any]]:
    """Return the shard entries of a build manifest, each with a ``name``.

    Raises:
        ValueError: the file is not JSON, or not a manifest (a ``shards`` list of objects with a name).
    """
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["shards"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not a build manifest ({type(error).__name__}: {error})") from None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) and "name" in entry for entry in entries):
        raise ValueError("not a build manifest (its 'shards' must be a list of objects with a 'name')")
    return entries


def is_plain_shard_name(name: Any) -> bool:
    """Return whether a manifest entry's name is a ``.tar`` file in the manifest's own folder."""
    return isinstance(name, str) and Path(name).name == name and name.endswith(".tar")


def read_manifests(urls: list[str]) -> tuple[dict[Path, dict[str, Any]], list[dict[str, Any]]]:
    """Return the per-shard entries of the build manifests next to local shards, by shard path.

    Also returns the problems of manifests that cannot be used: not JSON, not a manifest,
    or an entry whose name is not a plain ``.tar`` file name in the manifest's folder.
    """
    entries: dict[Path, dict[str, Any]] = {}
    problems: list[dict[str, Any]] = []
    folders = {local_path(url).parent for url in urls if is_local(url)}
    for folder in sorted(folders):
        path = folder / MANIFEST
        if not path.is_file():
            continue
        try:
            listed = load_manifest(path)
        except ValueError as error:
            problems.append({"shard": str(path), "problem": str(error)})
            continue
        for entry in listed:
            if not is_plain_shard_name(entry["name"]):
                problems.append(
                    {"shard": str(path), "problem": f"lists {entry['name']!r}, which is not a shard file name"}
                )
                continue
            entries[folder / entry["name"]] = entry
    return entries, problems


def check_manifests(results: list[ShardResult], manifests: dict[Path, dict[str, Any]]) -> list[dict[str, Any]]:
    """Compare each shard with its build manifest entry; return the differences found.

    A shard listed in a manifest but no longer on disk is a difference too.
    """
    problems = []
    for result in results:
        entry = manifests.get(local_path(result.url)) if is_local(result.url) else None
        if entry is None or result.error or result.truncated_at is not None:
            # unreadable and truncated shards are reported on their own
            continue
        held = result.samples + sum(result.skipped.values())
        if held != entry.get("samples", held):
            problems.append(
                {"shard": result.url, "problem": f"holds {held} samples, the manifest lists {entry['samples']}"}
            )
        elif "sha256" in entry:
            digest = file_sha256(local_path(result.url))
            if digest != entry["sha256"]:
                problems.append({"shard": result.url, "problem": "its SHA-256 differs from the manifest's"})
    problems.extend(
        {"shard": str(path), "problem": f"listed in {MANIFEST} with {entry.get('samples', '?')} samples, but not found"}
        for path, entry in manifests.items()
        if not path.exists()
    )
    listed_folders = {path.parent for path in manifests}
    problems.extend(
        {"shard": result.url, "problem": f"not listed in the {MANIFEST} next to it"}
        for result in results
        if is_local(result.url)
        and local_path(result.url).parent in listed_folders
        and local_path(result.url) not in manifests
    )
    return problems


def verify(urls: list[str], fields: FieldSpec, max_pixels: int = 25_000_000, progress: bool = True) -> dict[str, Any]:
    """Verify shards; return the report that ``mmalign shards verify --json`` prints."""
    report = DataReport()
    keys: Counter = Counter()
    results = [
        verify_shard(url, fields, max_pixels, report, keys)
        for url in tqdm(urls, desc="verify", unit="shard", disable=not progress)
    ]
    manifests, manifest_problems = read_manifests(urls)
    infer_lost_keys(results, manifests)
    manifest_problems += check_manifests(results, manifests)
    split_keys = [
        {"key": left.last_key, "shards": [left.url, right.url]}
        for left, right in itertools.pairwise(results)
        if left.last_key is not None
        and left.last_key == right.first_key
        and (left.last_incomplete or right.first_incomplete)
    ]
    duplicates = {key: count for key, count in keys.items() if count > 1}
    unreadable = [{"shard": result.url, "error": result.error} for result in results if result.error]
    empty = [result.url for result in results if not result.error and not result.samples and not result.skipped]
    truncated = [
        {"shard": result.url, "key": result.truncated_at, "lost_keys": result.lost_keys}
        for result in results
        if result.truncated_at is not None
    ]
    ok = not (report.total_skipped or unreadable or truncated or duplicates or split_keys or empty or manifest_problems)
    return {
        "ok": ok,
        "shards": len(urls),
        "samples": report.used,
        "read": report.read,
        "skipped": report.total_skipped,
        "skipped_by_reason": dict(sorted(report.skipped.items())),
        "repaired_by_kind": dict(sorted(report.repaired.items())),
        "unreadable_shards": unreadable,
        "empty_shards": empty,
        "truncated_shards": truncated,
        "duplicate_keys": {"count": len(duplicates), "examples": sorted(duplicates)[:10]},
        "split_keys": split_keys,
        "manifest_problems": manifest_problems,
        "per_shard": [result.to_dict() for result in results],
    }


def describe_break(key: str) -> str:
    if key.startswith(("after ", "at the start")):
        return key.replace("after ", "after sample ")
    return f"inside sample {key}"


def format_verify(result: dict[str, Any]) -> str:
    """Return the human-readable form of a verify report."""
    lines = [f"{'shard':<50} {'pairs':>7} {'skipped':>8}"]
    for shard in result["per_shard"]:
        skipped = sum(shard["skipped_by_reason"].values())
        note = " UNREADABLE" if "error" in shard else (" TRUNCATED" if "truncated_at" in shard else "")
        lines.append(f"{shard['shard'][-50:]:<50} {shard['samples']:>7} {skipped:>8}{note}")
    lines.append(
        f"{result['shards']} shards, {result['samples']} readable pairs, {result['skipped']} skipped"
        + (f" ({format_counts(result['skipped_by_reason'])})" if result["skipped"] else "")
    )
    for item in result["unreadable_shards"]:
        lines.append(f"unreadable shard: {item['error']}")
    for url in result["empty_shards"]:
        lines.append(f"empty shard (no sample at all): {url}")
    for item in result["truncated_shards"]:
        lost = item["lost_keys"]
        if lost is None:
            after = "the number of samples lost after it is unknown (no build manifest, and the keys are not numbered)"
        else:
            after = f"{len(lost)} sample(s) after it lost: {', '.join(lost[:10])}{' ...' if len(lost) > 10 else ''}"
        lines.append(f"truncated shard {item['shard']}: breaks {describe_break(item['key'])}; {after}")
    if result["duplicate_keys"]["count"]:
        lines.append(
            f"{result['duplicate_keys']['count']} keys appear more than once, e.g. "
            + ", ".join(result["duplicate_keys"]["examples"][:5])
        )
    for item in result["manifest_problems"]:
        lines.append(f"shard {item['shard']}: {item['problem']}")
    for item in result["split_keys"]:
        lines.append(f"sample {item['key']} is split across {item['shards'][0]} and {item['shards'][1]}")
    if result["repaired_by_kind"]:
        lines.append(f"caption repairs (samples kept): {format_counts(result['repaired_by_kind'])}")
    lines.append("OK" if result["ok"] else "PROBLEMS FOUND")
    return "\n".join(lines)
