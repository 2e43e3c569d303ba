"""Start-up check of a shard's layout, so a wrong image or caption key fails in seconds.

Without it, a stream that filters out every sample (no member named like the
configured image or caption field) would read forever without yielding a batch.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from itertools import islice

from mmalign.data.decode import SampleError
from mmalign.data.reader import (
    DataError,
    FieldSpec,
    RawSample,
    ShardTruncated,
    first_dot_suffix,
    iter_members,
    iter_shard,
    open_url,
)
from mmalign.data.sample import caption_candidates, parse_json

logger = logging.getLogger("mmalign.data")

SCAN_SAMPLES = 64


def check_schema(url: str, fields: FieldSpec, section: str = "data", scan_samples: int = SCAN_SAMPLES) -> int:
    """Read the first samples of a shard; return how many have an image and a caption.

    Raises:
        DataError: none of them has both, with the field names expected and found.
    """
    samples = [item for item in islice(iter_shard(url, fields), scan_samples) if isinstance(item, RawSample)]
    complete = [sample for sample in samples if fields.image_field(sample) and _caption_readable(sample, fields)]
    if complete:
        _warn_dotted_keys(url)
        return len(complete)
    json_field = fields.caption_field_in_json
    with_json = [sample for sample in samples if "json" in sample.fields]
    if json_field and with_json and all(fields.image_field(sample) for sample in with_json):
        keys = sorted({key for sample in with_json[:8] for key in parse_json_keys(sample)})
        raise DataError(
            f"no sample among the first {len(samples)} of {url} has a caption in KEY.json field {json_field!r} "
            f"(data.caption_key={fields.caption_key!r}); the JSON fields found are: {', '.join(keys) or 'none'}. "
            f"Set {section}.caption_key to json:FIELD for one of them, or to txt for KEY.txt captions"
        )
    found = Counter(suffix for sample in samples for suffix in sample.fields)
    raw_suffixes = _raw_suffixes(url)
    caption = f"{fields.caption_key!r}" + (
        f" (or json field {fields.caption_json_field!r})" if fields.caption_json_field else ""
    )
    raise DataError(
        f"no sample among the first {len(samples)} of {url} has both an image and a caption: "
        f"expected an image field in {list(fields.image_keys)} and the caption field {caption}; "
        f"member suffixes seen: {', '.join(sorted(raw_suffixes)) or 'none'} "
        f"(grouped as fields {dict(found)}). Set {section}.image_keys and {section}.caption_key to the suffixes "
        f"your shards use, e.g. {section}.image_keys=[{_guess(raw_suffixes, ('jpg', 'png', 'webp', 'jpeg'))}] "
        f"{section}.caption_key={_guess(raw_suffixes, ('txt', 'caption', 'text'))}"
    )


def _caption_readable(sample: RawSample, fields: FieldSpec) -> bool:
    try:
        caption_candidates(sample, fields, "cp1252")
    except SampleError:
        return False
    return True


def parse_json_keys(sample: RawSample) -> list[str]:
    try:
        return list(parse_json(sample))
    except SampleError:
        return []


def _raw_suffixes(url: str, limit: int = 200) -> set[str]:
    stream = open_url(url)
    try:
        return {
            first_dot_suffix(item[0])
            for item in islice(iter_members(url, stream), limit)
            if not isinstance(item, ShardTruncated)
        }
    finally:
        with contextlib.suppress(OSError):
            stream.close()


def _guess(suffixes: set[str], endings: tuple[str, ...]) -> str:
    for suffix in sorted(suffixes):
        if suffix.endswith(endings):
            return suffix
    return endings[0]


def _warn_dotted_keys(url: str, limit: int = 200) -> None:
    """Warn when webdataset's first-dot rule would merge several samples into one key."""
    stream = open_url(url)
    images_per_key: Counter = Counter()
    try:
        for item in islice(iter_members(url, stream), limit):
            if isinstance(item, ShardTruncated):
                break
            base = item[0].rpartition("/")[2]
            if base.lower().endswith((".jpg", ".jpeg", ".png", ".webp")):
                images_per_key[base.partition(".")[0]] += 1
    finally:
        with contextlib.suppress(OSError):
            stream.close()
    merged = [key for key, count in images_per_key.items() if count > 1]
    if merged:
        logger.warning(
            "%s has member names with dots before the extension (e.g. key %r holds %d images under webdataset's "
            "first-dot rule); mmalign splits at the longest known field suffix instead, but other webdataset "
            "readers will merge these samples",
            url,
            merged[0],
            images_per_key[merged[0]],
        )
