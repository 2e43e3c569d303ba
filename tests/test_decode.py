import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmalign.data.decode import SampleError, clean_caption, decode_image, split_captions
from tests.helpers import encode


def tar_members(path):
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar if member.isfile()}


def mean_rgb(image: Image.Image) -> list[int]:
    return np.asarray(image).reshape(-1, 3).mean(axis=0).round().astype(int).tolist()


def test_image_modes_case_gives_correct_colours(cases):
    manifest = json.loads((cases / "manifest.json").read_text())["cases"]["image_modes"]["expected"]
    members = tar_members(cases / "image_modes" / "shard-000000.tar")
    for key, expected in manifest.items():
        name = next(name for name in members if name.startswith(key) and not name.endswith(".txt"))
        if "correct_rgb_mean" not in expected and "source_mode" not in expected:
            continue
        decoded = decode_image(members[name])
        assert decoded.image.mode == "RGB", key
        assert decoded.source_mode == expected["source_mode"], key
        assert list(decoded.image.size) == expected["size"], key
        target = expected.get("correct_rgb_mean", expected["naive_convert_rgb_mean"])
        assert mean_rgb(decoded.image) == pytest.approx(target, abs=1), key


def test_image_modes_case_skips_html_and_truncated_jpeg(cases):
    members = tar_members(cases / "image_modes" / "shard-000000.tar")
    with pytest.raises(SampleError) as html_page:
        decode_image(members["000009.jpg"])
    assert html_page.value.reason == "not_an_image"
    with pytest.raises(SampleError) as truncated:
        decode_image(members["000010.jpg"])
    assert truncated.value.reason == "truncated_image"


def test_exif_rotation_case_is_honoured(cases):
    manifest = json.loads((cases / "manifest.json").read_text())["cases"]["exif_rotation"]["expected"]
    members = tar_members(cases / "exif_rotation" / "shard-000000.tar")
    for key, expected in manifest.items():
        image = decode_image(members[f"{key}.jpg"]).image
        assert list(image.size) == expected["displayed_size"], key
        pixels = np.asarray(image)
        assert pixels[1, 1].tolist() == pytest.approx(expected["displayed_top_left_rgb"], abs=12), key
        assert pixels[-2, -2].tolist() == pytest.approx(expected["displayed_bottom_right_rgb"], abs=12), key


def test_decompression_bomb_case_is_skipped_before_decoding(cases):
    members = tar_members(cases / "decompression_bomb" / "shard-000000.tar")
    for key in ("000000.png", "000001.png"):
        with pytest.raises(SampleError) as error:
            decode_image(members[key], max_pixels=25_000_000)
        assert error.value.reason == "too_many_pixels"
    assert decode_image(members["000002.jpg"], max_pixels=25_000_000).image.size == (32, 32)


def test_pixel_cap_is_configurable():
    data = encode(Image.new("RGB", (100, 100), "red"), "PNG")
    assert decode_image(data, max_pixels=10_000).image.size == (100, 100)
    with pytest.raises(SampleError, match="too_many_pixels"):
        decode_image(data, max_pixels=9_999)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (b"this is not an image at all", "not_an_image"),
        (encode(Image.new("RGB", (64, 64), "blue"))[:300], "truncated_image"),
    ],
)
def test_bad_image_bytes_have_reasons(data, reason):
    with pytest.raises(SampleError) as error:
        decode_image(data)
    assert error.value.reason == reason


def test_png_under_jpg_name_decodes_by_content():
    png = encode(Image.new("RGB", (8, 8), (10, 200, 30)), "PNG")
    decoded = decode_image(png)
    assert decoded.source_format == "PNG"
    assert mean_rgb(decoded.image) == [10, 200, 30]


def test_sixteen_bit_full_scale_is_white():
    array = np.zeros((4, 4, 3), dtype=np.uint16)
    array[..., 0] = 65535
    buffer = io.BytesIO()
    # Pillow writes 48-bit PNGs only from raw data; build one through a 16-bit grayscale channel
    Image.fromarray(array[..., 0].astype(np.uint16)).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue())
    assert mean_rgb(decoded.image) == [255, 255, 255]


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    decoded = decode_image(encode(image, "PNG"))
    assert mean_rgb(decoded.image) == [255, 255, 255]


def test_cmyk_jpeg_becomes_rgb():
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    decoded = decode_image(encode(image, "JPEG"))
    assert decoded.source_mode == "CMYK"
    assert mean_rgb(decoded.image) == pytest.approx([255, 0, 0], abs=2)


def test_bad_captions_case_follows_policy(cases):
    members = tar_members(cases / "bad_captions" / "shard-000000.tar")
    results = {}
    for name, raw in members.items():
        if not name.endswith(".txt"):
            continue
        try:
            results[name[:6]] = clean_caption(raw)
        except SampleError as error:
            results[name[:6]] = error.reason
    assert results["000000"].text == "a photo of a red square with a black stripe"
    assert results["000001"].text == "the dog\u2019s ball on the grass"
    assert "caption_decoded_cp1252" in results["000001"].repairs
    assert results["000002"].text == "a cat on a sofa"
    assert "caption_bom_removed" in results["000002"].repairs
    assert results["000003"] == "empty_caption"
    assert results["000004"] == "empty_caption"
    assert results["000005"].text == "a red car"
    assert results["000007"].text == "first part second part"
    assert results["000008"].text == "red car & truck"
    assert results["000009"].text == "café terrace at night"


def test_strict_caption_policy_skips_invalid_utf8(cases):
    members = tar_members(cases / "bad_captions" / "shard-000000.tar")
    for key in ("000001", "000009"):
        with pytest.raises(SampleError) as error:
            clean_caption(members[f"{key}.txt"], encoding_fallback="skip")
        assert error.value.reason == "caption_not_utf8"


def test_mojibake_is_repaired():
    result = clean_caption("cafÃ© au lait".encode())
    assert result.text == "café au lait"
    assert "caption_mojibake_fixed" in result.repairs


def test_multi_caption_split_on_newline_only():
    captions, _ = split_captions("first\u2028still first\nsecond\r\n\n  \nthird".encode())
    assert captions == ["first still first", "second", "third"]


def test_multi_caption_all_empty_is_skipped():
    with pytest.raises(SampleError, match="empty_caption"):
        split_captions(["", "  "])


def test_truncated_image_loading_stays_off():
    from PIL import ImageFile

    import mmalign.data.decode  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
