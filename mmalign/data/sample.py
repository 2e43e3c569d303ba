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
    captions, more = split_captions(json_caption_text(value, json_field), fallback)
    return captions, repairs + more


def json_caption_text(value: Any, field_name: str | None) -> str | list[str]:
    """Return a JSON caption value as text or a list of texts; numbers become their digits.

    Raises:
        SampleError: ``caption_not_text`` for true/false, null, objects, or lists of those.
    """
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise SampleError("caption_not_text", f"json field {field_name!r} holds {type(item).__name__}")
    return [str(item) for item in items] if isinstance(value, list) else str(value)


def parse_json(sample: RawSample) -> dict[str, Any]:
    """Return the sample's KEY.json object ({} when there is none or it is not an object).

    Raises:
        SampleError: ``bad_json`` when the member is not UTF-8 JSON.
    """
    raw = sample.fields.get("json")
    if raw is None:
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        # RecursionError: deeply nested arrays exceed the parser's recursion limit
        raise SampleError("bad_json", f"{type(error).__name__}: {str(error)[:200]}") from None
    return value if isinstance(value, dict) else {}
