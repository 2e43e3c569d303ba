"""Turn a raw sample into a decoded image and cleaned captions, the same way on every path."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mmalign.data.decode import DecodedImage, SampleError, decode_image, split_captions
from mmalign.data.reader import FieldSpec, RawSample


@dataclass
class DecodedSample:
    """A usable sample: its image, its captions (one or more) and the caption repairs made."""

    image: DecodedImage
    captions: list[str]
    repairs: list[str] = field(default_factory=list)


def decode_sample(
    sample: RawSample, fields: FieldSpec, max_pixels: int, encoding_fallback: str = "cp1252"
) -> DecodedSample:
    """Decode the image and the captions of a sample.

    Raises:
        SampleError: the image or the caption is missing or unusable; ``reason`` says which.
    """
    image_key = fields.image_field(sample)
    if image_key is None:
        raise SampleError("missing_image", f"fields found: {sorted(sample.fields)}")
    image = decode_image(sample.fields[image_key], max_pixels)
    captions, repairs = caption_candidates(sample, fields, encoding_fallback)
    return DecodedSample(image, captions, repairs)


def caption_candidates(sample: RawSample, fields: FieldSpec, fallback: str) -> tuple[list[str], list[str]]:
    """Return the cleaned captions of a sample and the repairs made (see the caption policy)."""
    json_field = fields.caption_field_in_json
    if json_field is None and fields.caption_member in sample.fields:
        return split_captions(sample.fields[fields.caption_member], fallback)
    json_field = json_field or fields.caption_json_field
    value = parse_json(sample).get(json_field) if json_field else None
    if value is None or (isinstance(value, list) and not value):
        raise SampleError("missing_caption", f"no {fields.caption_key!r} caption and no json field {json_field!r}")
    repairs = [] if fields.caption_field_in_json else ["caption_from_json"]
    if isinstance(value, list):
        captions, more = split_captions([str(item) for item in value], fallback)
    else:
        captions, more = split_captions(str(value), fallback)
    return captions, repairs + more


def parse_json(sample: RawSample) -> dict[str, Any]:
    raw = sample.fields.get("json")
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as error:
        raise SampleError("bad_json", str(error)) from None
    return value if isinstance(value, dict) else {}
