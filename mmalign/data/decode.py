"""The one image decoder and the one caption policy.

Training, evaluation, ``mmalign shards build``, the Python API and the demo all
decode through :func:`decode_image` and clean captions through
:func:`clean_caption`, so every path sees the same pixels and the same text.

Image rules:
- the format is taken from the bytes, never from the file name;
- the pixel count is checked against a cap from the header, before any pixel
  data is decoded;
- pixel data is fully loaded here, so a truncated file fails here and not later
  inside a transform (Pillow's ``LOAD_TRUNCATED_IMAGES`` is never turned on);
  NOTE: a JPEG cut short that still ends with an end-of-image marker decodes with
  grey rows, because libjpeg reports that only as a warning, which Pillow drops;
- the EXIF orientation is applied;
- transparency is composited on white (as img2dataset does), 16-bit images are
  scaled (not clipped) to 8 bits, and every other mode is converted to RGB.

Caption rules (one caption per text, or a list split on ``\\n`` only):
- text with a UTF-16 byte-order mark is decoded as UTF-16;
- other bytes are decoded as UTF-8 with a leading byte-order mark removed; invalid
  UTF-8 is decoded as Windows-1252 (the usual source of such bytes) and
  counted, or skipped when ``caption_encoding_fallback="skip"``;
- ftfy repairs mojibake, HTML tags are removed and HTML entities unescaped;
- control characters (NUL included) become spaces and runs of whitespace
  (U+2028 included) become one space;
- a caption that is empty after this is skipped with reason ``empty_caption``.
Each repair is counted under its own name (``caption_*``) in the run's data report.
"""

from __future__ import annotations

import html
import io
import re
import unicodedata
import warnings
from dataclasses import dataclass, field

import ftfy
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

WHITE = (255, 255, 255)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(\s[^<>]*)?/?>")
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    image: Image.Image
    source_mode: str
    source_format: str | None
    exif_rotated: bool = False


def decode_image(data: bytes, max_pixels: int = 25_000_000) -> DecodedImage:
    """Decode image bytes into an 8-bit RGB PIL image.

    Args:
        data: encoded image (JPEG, PNG, WebP, or any format Pillow reads).
        max_pixels: width x height above which the image is rejected unread.

    Raises:
        SampleError: with reason ``empty_image``, ``not_an_image``, ``too_many_pixels``,
            ``truncated_image`` or ``corrupt_image``.
    """
    if not data:
        raise SampleError("empty_image", "0 bytes")
    with warnings.catch_warnings():
        # our own cap applies below; Pillow's bomb warning would only repeat it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise SampleError("too_many_pixels", "the header declares more than twice Pillow's pixel limit") from None
        except UnidentifiedImageError:
            raise SampleError("not_an_image", f"{len(data)} bytes starting {data[:8]!r}") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise SampleError(_failure_reason(error), str(error)) from None
        return prepare_image(image, max_pixels)


def prepare_image(image: Image.Image, max_pixels: int = 25_000_000) -> DecodedImage:
    """Apply the decoder's rules to an already opened PIL image: pixel cap, EXIF rotation, RGB.

    Raises:
        SampleError: ``too_many_pixels``, or ``truncated_image``/``corrupt_image`` if loading fails.
    """
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError("too_many_pixels", f"{width}x{height} exceeds the cap of {max_pixels} pixels")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise SampleError(_failure_reason(error), str(error)) from None
    return _upright_rgb(image)


def _upright_rgb(image: Image.Image) -> DecodedImage:
    source_mode, source_format = image.mode, image.format
    rotated = False
    try:
        orientation = image.getexif().get(0x0112, 1)
        # 2 to 8 are the orientations that flip or rotate; other values are ignored
        if orientation in range(2, 9):
            image = ImageOps.exif_transpose(image)
            rotated = True
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        # NOTE: broken EXIF blocks are ignored, so the stored pixel order is used
        pass
    return DecodedImage(to_rgb(image), source_mode, source_format, rotated)


def _failure_reason(error: Exception) -> str:
    # Pillow reports a short file as OSError("image file is truncated ...") or "Truncated File Read"
    return "truncated_image" if "truncated" in str(error).lower() else "corrupt_image"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: alpha on white, 16 bits scaled, CMYK through Pillow."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return _scale_to_8_bit(image).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def _scale_to_8_bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
    else:
        # 16-bit sources are scaled by their type's range, not by the image's own maximum
        top = 65535.0
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


@dataclass
class CaptionResult:
    text: str
    repairs: list[str] = field(default_factory=list)


def decode_caption_bytes(raw: bytes, encoding_fallback: str = "cp1252") -> tuple[str, list[str]]:
    """Decode caption bytes as UTF-8 (BOM removed), with the caption policy's fallback for invalid UTF-8."""
    repairs = []
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        # a UTF-16 byte-order mark: the text is UTF-16, not UTF-8
        try:
            return raw.decode("utf-16"), ["caption_decoded_utf16"]
        except UnicodeDecodeError:
            pass
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        repairs.append("caption_bom_removed")
    try:
        return raw.decode("utf-8"), repairs
    except UnicodeDecodeError:
        if encoding_fallback == "skip":
            raise SampleError("caption_not_utf8", repr(raw[:40])) from None
        repairs.append("caption_decoded_cp1252")
        # cp1252 leaves 5 byte values undefined; those map to the replacement character
        return raw.decode("cp1252", errors="replace"), repairs


def clean_caption_text(text: str) -> CaptionResult:
    """Apply the caption policy to one decoded caption.

    Raises:
        SampleError: ``empty_caption`` when nothing but whitespace is left.
    """
    repairs = []
    if text.startswith("\ufeff"):
        text = text[1:]
        repairs.append("caption_bom_removed")
    # only encoding repairs: quotes, widths, ligatures and line breaks are the user's text
    fixed = ftfy.fix_text(
        text,
        unescape_html=False,
        uncurl_quotes=False,
        fix_line_breaks=False,
        fix_character_width=False,
        fix_latin_ligatures=False,
        remove_control_chars=False,
        normalization="NFC",
    )
    if fixed != text:
        repairs.append("caption_mojibake_fixed")
        text = fixed
    if _TAG.search(text):
        text = _TAG.sub(" ", text)
        repairs.append("caption_html_removed")
    unescaped = html.unescape(text)
    if unescaped != text:
        repairs.append("caption_html_unescaped")
        text = unescaped
    if any(unicodedata.category(ch) == "Cc" and not ch.isspace() for ch in text):
        text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
        repairs.append("caption_control_removed")
    text = " ".join(text.split())
    if not text:
        raise SampleError("empty_caption")
    return CaptionResult(text, repairs)


def clean_caption(raw: bytes | str, encoding_fallback: str = "cp1252") -> CaptionResult:
    """Decode and clean one caption (see the module docstring for the policy)."""
    repairs: list[str] = []
    if isinstance(raw, bytes):
        raw, repairs = decode_caption_bytes(raw, encoding_fallback)
    result = clean_caption_text(raw)
    result.repairs = repairs + result.repairs
    return result


def split_captions(raw: bytes | str | list, encoding_fallback: str = "cp1252") -> tuple[list[str], list[str]]:
    """Return the cleaned captions of a multi-caption field and the repairs made.

    A text field is split on ``\\n`` only (U+2028 and other separators stay inside
    a caption); a list is taken item by item. Empty items are dropped; if none is
    left, ``SampleError("empty_caption")`` is raised.
    """
    repairs: list[str] = []
    if isinstance(raw, bytes):
        raw, repairs = decode_caption_bytes(raw, encoding_fallback)
    items = raw.split("\n") if isinstance(raw, str) else [str(item) for item in raw]
    captions = []
    for item in items:
        try:
            result = clean_caption_text(item.rstrip("\r"))
        except SampleError:
            continue
        captions.append(result.text)
        repairs.extend(result.repairs)
    if not captions:
        raise SampleError("empty_caption")
    return captions, repairs
