"""mmalign shards build / verify / inspect, on generated inputs and the bad-input cases."""

import csv
import io
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmalign.cli import main
from mmalign.data.build import BuildError, BuildOptions, build
from mmalign.data.reader import FieldSpec, check_urls
from mmalign.data.stream import StreamSettings, TrainStream
from mmalign.data.verify import verify
from tests.helpers import encode, shape_image, write_tar


def make_folder(root):
    """A folder of images with same-named captions, including every kind of bad input."""
    root.mkdir(parents=True, exist_ok=True)
    good = {
        "a_red_circle.jpg": encode(shape_image("red", "circle", 48)),
        "b_green_square.png": encode(shape_image("green", "square", 48), "PNG"),
        "c_rgba.png": encode(Image.new("RGBA", (20, 10), (0, 0, 0, 0)), "PNG"),
        "d_cmyk.jpg": encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0))),
        "e_upper.JPG": encode(shape_image("blue", "cross", 40)),
        "sub/f_nested.webp": encode(shape_image("yellow", "triangle", 30), "WEBP"),
    }
    bad = {
        "x_truncated.jpg": encode(shape_image("red", "square", 64))[:200],
        "y_not_image.jpg": b"<html>404</html>",
    }
    for name, data in {**good, **bad}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.with_suffix(".txt").write_bytes(f"caption of {path.stem}".encode())
    (root / "z_no_caption.jpg").write_bytes(encode(shape_image("black", "circle", 32)))
    (root / "orphan.txt").write_text("a caption without an image")
    (root / "b_green_square.txt").write_bytes(b"caf\xe9 green square")  # Windows-1252, not UTF-8
    return len(good)


def test_build_from_folder_counts_every_input(tmp_path):
    good = make_folder(tmp_path / "in")
    stats = build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "out", shard_size=4), progress=False)
    assert stats["samples"] == good
    assert stats["skipped_by_reason"] == {
        "missing_caption": 1,
        "missing_image": 1,
        "not_an_image": 1,
        "truncated_image": 1,
    }
    assert stats["captions_repaired"] == {"caption_decoded_cp1252": 1}
    assert stats["shards"] == 2
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert [shard["samples"] for shard in manifest["shards"]] == [4, 2]
    assert manifest["shards"][0]["first_key"] == "000000000"
    assert json.loads((tmp_path / "out" / "_stats.json").read_text())["samples"] == good

    result = verify(check_urls(str(tmp_path / "out" / "shard-{000000..000001}.tar"), "k"), FieldSpec(), progress=False)
    assert result["ok"]
    assert result["samples"] == good
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000000.json").read())
        caption = tar.extractfile("000000001.txt").read().decode()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert meta["original_path"] == "a_red_circle.jpg"
    assert (meta["width"], meta["height"]) == (48, 48)
    assert caption == "café green square"
    # alpha is composited on white and written as JPEG, not kept transparent
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        rgba = Image.open(io.BytesIO(tar.extractfile("000000002.png").read()))
    assert rgba.mode in ("RGBA", "RGB")


def test_build_is_deterministic_and_refuses_to_overwrite(tmp_path):
    make_folder(tmp_path / "in")
    build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "one"), progress=False)
    build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "two", workers=2), progress=False)
    assert (tmp_path / "one" / "shard-000000.tar").read_bytes() == (tmp_path / "two" / "shard-000000.tar").read_bytes()
    with pytest.raises(BuildError, match=r"already contains shards.*--overwrite"):
        build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "one"), progress=False)
    build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "one", overwrite=True), progress=False)


def write_table_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        name = f"img{index}.png"
        (folder / name).write_bytes(encode(shape_image("red" if index % 2 else "blue", "circle", 24), "PNG"))
        rows.append({"file_name": name, "alt_text": f"shape number {index}", "source": f"site-{index}"})
    return rows


def test_build_from_semicolon_csv_with_named_columns(tmp_path):
    rows = write_table_images(tmp_path / "t", 5)
    table = tmp_path / "t" / "pairs.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "alt_text", "source"], delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
    options = BuildOptions(out=tmp_path / "out", image_column="file_name", caption_column="alt_text")
    stats = build(str(table), options, progress=False)
    assert stats["samples"] == 5
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000003.json").read())
    assert meta["source"] == "site-3"
    assert meta["caption"] == "shape number 3"


def test_build_reports_found_columns(tmp_path):
    rows = write_table_images(tmp_path / "t", 2)
    table = tmp_path / "t" / "pairs.tsv"
    table.write_text("file_name\talt_text\n" + "".join(f"{r['file_name']}\t{r['alt_text']}\n" for r in rows))
    with pytest.raises(BuildError, match=r"no image column among \['file_name', 'alt_text'\].*--image-column"):
        build(str(table), BuildOptions(out=tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_build_from_jsonl_and_parquet(tmp_path):
    rows = write_table_images(tmp_path / "t", 4)
    jsonl = tmp_path / "t" / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"image": r["file_name"], "caption": r["alt_text"]}) + "\n" for r in rows))
    assert build(str(jsonl), BuildOptions(out=tmp_path / "a"), progress=False)["samples"] == 4
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    table = pyarrow.table({"image": [r["file_name"] for r in rows], "text": [r["alt_text"] for r in rows]})
    parquet.write_table(table, tmp_path / "t" / "pairs.parquet")
    assert (
        build(str(tmp_path / "t" / "pairs.parquet"), BuildOptions(out=tmp_path / "b"), progress=False)["samples"] == 4
    )


def test_reshard_keeps_samples_and_metadata(tmp_path):
    stats = build("shards/val-{000..001}.tar", BuildOptions(out=tmp_path / "out", shard_size=200), progress=False)
    assert stats["samples"] == 595
    assert stats["shards"] == 3
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert "group" in meta
    assert meta["original_path"].startswith("val-000.tar#")


def test_dedup_by_image_and_by_pair(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image = encode(shape_image("red", "circle", 24), "PNG")
    for name, caption in [("a", "a red circle"), ("b", "A  red circle"), ("c", "something else")]:
        (folder / f"{name}.png").write_bytes(image)
        (folder / f"{name}.txt").write_text(caption)
    by_pair = build(str(folder), BuildOptions(out=tmp_path / "pair", dedup="pair"), progress=False)
    assert by_pair["samples"] == 2
    assert by_pair["duplicates_removed"] == {"same_image_and_caption": 1}
    by_image = build(str(folder), BuildOptions(out=tmp_path / "image", dedup="image"), progress=False)
    assert by_image["samples"] == 1
    assert by_image["duplicates_removed"] == {"same_image": 2}


@pytest.mark.parametrize(
    ("mode", "size"), [("keep_ratio", (32, 24)), ("shorter_side", (43, 32)), ("center_crop", (32, 32))]
)
def test_resize_modes(tmp_path, mode, size):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "wide.png").write_bytes(encode(Image.new("RGB", (64, 48), "red"), "PNG"))
    (folder / "wide.txt").write_text("a wide red picture")
    build(str(folder), BuildOptions(out=tmp_path / "out", resize=mode, max_side=32), progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert Image.open(io.BytesIO(tar.extractfile("000000000.jpg").read())).size == size


def test_shard_size_in_megabytes(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for index in range(6):
        noise = Image.fromarray(generator.integers(0, 255, (200, 200, 3), dtype=np.uint8))
        (folder / f"{index}.png").write_bytes(encode(noise, "PNG"))
        (folder / f"{index}.txt").write_text(f"noise {index}")
    stats = build(str(folder), BuildOptions(out=tmp_path / "out", shard_size=None, shard_mb=0.25), progress=False)
    assert stats["shards"] == 3
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert all(shard["bytes"] < 0.4e6 for shard in manifest["shards"])


def test_verify_reports_every_kind_of_problem(tmp_path, cases, capsys):
    jpeg = encode(shape_image("red", "circle"))
    write_tar(tmp_path / "p-0.tar", [("k1.jpg", jpeg), ("k1.txt", b"one"), ("k2.jpg", jpeg)])
    write_tar(tmp_path / "p-1.tar", [("k2.txt", b"split"), ("k1.jpg", jpeg), ("k1.txt", b"again")])
    (tmp_path / "p-2.tar").write_bytes(b"garbage" * 100)
    status = main(["shards", "verify", str(tmp_path / "p-{0..2}.tar"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert status == 1
    assert result["ok"] is False
    assert result["shards"] == 3
    assert result["samples"] == 2
    assert result["skipped_by_reason"] == {"missing_caption": 1, "missing_image": 1}
    assert result["duplicate_keys"]["examples"] == ["k1", "k2"]
    assert result["split_keys"][0]["key"] == "k2"
    assert "not a readable tar file" in result["unreadable_shards"][0]["error"]


def test_verify_missing_keys_case(cases, capsys):
    status = main(["shards", "verify", str(cases / "missing_keys" / "shard-000000.tar"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert status == 1
    assert result["samples"] == 5
    assert result["skipped_by_reason"] == {"missing_caption": 2, "missing_image": 1}


def test_verify_clean_shards_exit_zero(capsys):
    assert main(["shards", "verify", "shards/val-{000..001}.tar", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 595


def test_training_pass_counts_equal_verify(cases):
    pattern = str(cases / "image_modes" / "shard-000000.tar") + "::" + str(cases / "bad_captions" / "shard-000000.tar")
    urls = check_urls(pattern, "k")
    expected = verify(urls, FieldSpec(), progress=False)
    settings = StreamSettings(urls=tuple(urls), fields=FieldSpec(), batch_size=2, shuffle_buffer=4)
    stream = TrainStream(settings, lambda image: torch.zeros(1), lambda texts: torch.zeros(len(texts)), lambda t: 0)
    passes = []
    for batch in itertools.islice(DataLoader(stream, batch_size=None), 40):
        passes.extend(batch["info"]["passes_done"])
        if passes:
            break
    # one training pass reads, uses and skips exactly what verify counts
    assert passes[0]["read"] == expected["read"]
    assert passes[0]["usable"] == expected["samples"]
    assert passes[0]["skipped"] == expected["skipped"]
    assert passes[0]["usable"] + passes[0]["skipped"] == passes[0]["read"]


def test_inspect_summarises_and_draws_contact_sheet(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    status = main(["shards", "inspect", "shards/val-000.tar", "--sheet", str(sheet), "--samples", "8", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert status == 0
    assert summary["samples"] == 298
    assert summary["common_sizes"] == {"64x64": 298}
    assert summary["modes"] == {"RGB": 298}
    assert summary["caption_tokens"]["max"] <= 32
    assert summary["captions_truncated"] == 0
    assert Image.open(sheet).size[0] > 0


def test_build_cli_reports_bad_input(tmp_path, caplog):
    assert main(["shards", "build", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "input not found" in caplog.text
