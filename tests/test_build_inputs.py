"""shards build on messy tables, folders and output folders: every input is written, skipped or refused clearly."""

import json
import math
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.data.build import BuildError, BuildOptions, build, ordered_pool_map
from mmalign.data.build_inputs import Record
from mmalign.data.reader import FieldSpec, check_urls
from mmalign.data.verify import verify
from tests.helpers import encode, shape_image, write_tar


def images(folder, count, captions=False):
    """Write INDEX.png circles, and with ``captions`` an INDEX.txt "circle INDEX" beside each."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"{index}.png").write_bytes(encode(shape_image("red", "circle", 16), "PNG"))
        if captions:
            (folder / f"{index}.txt").write_text(f"circle {index}")


def metadata(out, shard="shard-000000.tar"):
    """Return every KEY.json of a shard, in order."""
    with tarfile.open(out / shard) as tar:
        return [json.loads(tar.extractfile(name).read()) for name in tar.getnames() if name.endswith(".json")]


def skipped_inputs(out):
    lines = (out / "_skipped.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_csv_rows_with_wrong_field_count_are_skipped(tmp_path):
    images(tmp_path, 4)
    table = tmp_path / "pairs.csv"
    table.write_text(
        "image,caption,source\n"
        "0.png,a red circle,web\n"
        "1.png,short row\n"
        "2.png,red, blue car,web\n"
        '3.png,"red, blue car",web\n'
    )
    stats = build(str(table), BuildOptions(out=tmp_path / "out"), progress=False)
    assert stats["samples"] == 2
    assert stats["skipped_by_reason"] == {"malformed_row": 2}
    assert [meta["caption"] for meta in metadata(tmp_path / "out")] == ["a red circle", "red, blue car"]
    assert [meta["source"] for meta in metadata(tmp_path / "out")] == ["web", "web"]
    assert skipped_inputs(tmp_path / "out") == [
        {"input": "pairs.csv line 3", "reason": "malformed_row"},
        {"input": "pairs.csv line 4", "reason": "malformed_row"},
    ]


def test_csv_delimiter_comes_from_the_header(tmp_path):
    images(tmp_path, 2)
    # captions full of commas and semicolons do not sway the choice
    table = tmp_path / "pairs.csv"
    table.write_text("image|caption\n0.png|one, two; three\n1.png|four; five, six\n")
    stats = build(str(table), BuildOptions(out=tmp_path / "out"), progress=False)
    assert stats["samples"] == 2
    assert metadata(tmp_path / "out")[0]["caption"] == "one, two; three"
    # an explicit delimiter wins over the guess
    table.write_text("image;caption\n0.png;one, two\n")
    stats = build(str(table), BuildOptions(out=tmp_path / "semi", delimiter=";"), progress=False)
    assert stats["samples"] == 1


def test_csv_long_caption_is_read_whole(tmp_path):
    images(tmp_path, 1)
    caption = "word " * 40_000
    (tmp_path / "pairs.csv").write_text(f"image,caption\n0.png,{caption}\n")
    build(str(tmp_path / "pairs.csv"), BuildOptions(out=tmp_path / "out"), progress=False)
    assert metadata(tmp_path / "out")[0]["caption"] == caption.strip()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "is empty"),
        ("single.csv", "image\n0.png\n", r"no caption column among \['image'\]"),
        ("twice.csv", "image,caption,caption\n0.png,a,b\n", r"\['caption'\] appear more than once"),
        ("broken.jsonl", "not json\n[1, 2]\n", "line 1 is not JSON"),
        ("fake.parquet", "image,caption\n", "not a readable Parquet file"),
    ],
)
def test_unusable_table_is_refused_with_reason(tmp_path, name, content, message):
    pytest.importorskip("pyarrow")
    images(tmp_path, 1)
    (tmp_path / name).write_text(content)
    with pytest.raises(BuildError, match=message):
        build(str(tmp_path / name), BuildOptions(out=tmp_path / "out"), progress=False)


def test_jsonl_keeps_line_separators_inside_strings(tmp_path):
    images(tmp_path, 3)
    rows = [
        json.dumps({"image": "0.png", "caption": "a\u2028b"}, ensure_ascii=False),
        json.dumps({"image": "1.png", "caption": "c\x85d"}, ensure_ascii=False),
        "[1, 2]",
        "{broken",
        json.dumps({"image": "2.png", "caption": "plain"}),
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    stats = build(str(tmp_path / "pairs.jsonl"), BuildOptions(out=tmp_path / "out"), progress=False)
    assert stats["samples"] == 3
    assert stats["skipped_by_reason"] == {"malformed_row": 2}
    assert [item["input"] for item in skipped_inputs(tmp_path / "out")] == ["pairs.jsonl line 3", "pairs.jsonl line 4"]


def test_image_cells_are_skipped_by_reason(tmp_path):
    images(tmp_path, 1)
    (tmp_path / "folder.png").mkdir()
    rows = [
        {"image": "0.png", "caption": "good"},
        {"image": None, "caption": "no image"},
        {"image": "  ", "caption": "blank image"},
        {"image": "gone.png", "caption": "missing file"},
        {"image": "folder.png", "caption": "a folder"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    stats = build(str(tmp_path / "pairs.jsonl"), BuildOptions(out=tmp_path / "out"), progress=False)
    assert stats["samples"] == 1
    assert stats["skipped_by_reason"] == {"image_not_a_file": 1, "image_not_found": 1, "missing_image": 2}
    assert skipped_inputs(tmp_path / "out")[2] == {
        "input": "gone.png (pairs.jsonl line 4)",
        "reason": "image_not_found",
    }


def test_extra_columns_never_overwrite_each_other(tmp_path):
    images(tmp_path, 1)
    (tmp_path / "pairs.csv").write_text("image,caption,key,source_key,score\n0.png,a cat,K,SK,nan\n")
    build(str(tmp_path / "pairs.csv"), BuildOptions(out=tmp_path / "out"), progress=False)
    [meta] = metadata(tmp_path / "out")
    assert meta["key"] == "000000000"
    assert meta["source_key"] == "SK"
    assert meta["source_source_key"] == "K"
    # CSV cells stay text
    assert meta["score"] == "nan"


def test_parquet_extras_are_written_as_standard_json(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    images(tmp_path, 1)
    table = pyarrow.table(
        {"image": ["0.png"], "caption": ["a cat"], "score": [math.nan], "blob": [b"\x00\xff"], "rank": [3]}
    )
    parquet.write_table(table, tmp_path / "pairs.parquet")
    build(str(tmp_path / "pairs.parquet"), BuildOptions(out=tmp_path / "out"), progress=False)
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        raw = tar.extractfile("000000000.json").read().decode()
    # NaN is not JSON; strict readers reject it
    assert "NaN" not in raw
    meta = json.loads(raw)
    assert meta["score"] is None
    assert meta["blob"] == "AP8="
    assert meta["rank"] == 3


def test_resharding_twice_does_not_nest_fields(tmp_path):
    images(tmp_path / "in", 2, captions=True)
    build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "one"), progress=False)
    build(str(tmp_path / "one"), BuildOptions(out=tmp_path / "two"), progress=False)
    build(str(tmp_path / "two"), BuildOptions(out=tmp_path / "three"), progress=False)
    meta = metadata(tmp_path / "three")[1]
    assert sorted(meta) == ["caption", "height", "key", "original_path", "source_mode", "width"]
    assert meta["original_path"] == "1.png"


def test_overwrite_replaces_only_the_earlier_build(tmp_path):
    images(tmp_path / "in", 3, captions=True)
    out = tmp_path / "out"
    build(str(tmp_path / "in"), BuildOptions(out=out, prefix="data-val"), progress=False)
    (out / "shard-important-backup.tar").write_bytes(b"mine")
    # the folder contains a build, whatever its prefix
    with pytest.raises(BuildError, match="already contains shards"):
        build(str(tmp_path / "in"), BuildOptions(out=out, prefix="data"), progress=False)
    build(str(tmp_path / "in"), BuildOptions(out=out, prefix="data", shard_size=2, overwrite=True), progress=False)
    names = sorted(path.name for path in out.iterdir())
    # data-val-000000.tar was the earlier build's (its manifest listed it), the backup never was
    assert names == [
        "_manifest.json",
        "_skipped.jsonl",
        "_stats.json",
        "data-000000.tar",
        "data-000001.tar",
        "shard-important-backup.tar",
    ]
    result = verify(check_urls(str(out / "data-{000000..000001}.tar"), "k"), FieldSpec(), progress=False)
    assert result["ok"]
    assert result["samples"] == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefix": "sub/x"}, "--prefix 'sub/x'"),
        ({"prefix": "run[1]"}, r"--prefix 'run\[1\]'"),
        ({"prefix": ".hidden"}, "--prefix '.hidden'"),
        ({"shard_size": None, "shard_mb": math.nan}, "--shard-mb nan"),
        ({"shard_size": None, "shard_mb": math.inf}, "--shard-mb inf"),
        ({"delimiter": ",,"}, "--delimiter ',,'"),
    ],
)
def test_bad_build_option_is_named(tmp_path, options, message):
    images(tmp_path / "in", 1)
    with pytest.raises(BuildError, match=message):
        build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "out", **options), progress=False)


def test_output_that_is_a_file_is_refused(tmp_path):
    images(tmp_path / "in", 1)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(BuildError, match="a folder, but this is a file"):
        build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "afile"), progress=False)
    with pytest.raises(BuildError, match="cannot create the output folder"):
        build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "afile" / "out"), progress=False)
    assert (tmp_path / "afile").read_text() == "mine"


def test_folder_input_counts_every_file(tmp_path):
    source = tmp_path / "in"
    images(source, 2, captions=True)
    (source / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (source / "photo.txt").write_text("a phone photo")
    (source / "README.md").write_text("notes")
    elsewhere = tmp_path / "elsewhere"
    images(elsewhere, 1)
    (elsewhere / "0.txt").write_text("linked circle")
    (source / "linked").symlink_to(elsewhere, target_is_directory=True)
    # a link back up the tree is followed once, not forever
    (elsewhere / "loop").symlink_to(source, target_is_directory=True)
    stats = build(str(source), BuildOptions(out=tmp_path / "out"), progress=False)
    assert stats["samples"] == 3
    assert stats["skipped_by_reason"] == {"not_an_image": 1}
    assert stats["ignored_files"] == 1
    assert sorted(meta["original_path"] for meta in metadata(tmp_path / "out")) == ["0.png", "1.png", "linked/0.png"]


def test_inspect_sheet_under_a_file_is_refused(tmp_path, caplog):
    (tmp_path / "afile").write_text("mine")
    status = main(["shards", "inspect", "shards/val-000.tar", "--sheet", str(tmp_path / "afile" / "x.png")])
    assert status == 2
    assert "--sheet" in caplog.text


def test_csv_unclosed_quote_is_refused_not_swallowed(tmp_path):
    images(tmp_path, 3)
    table = tmp_path / "pairs.csv"
    table.write_text('image,caption\n0.png,"The ""best"" cat\n1.png,a dog\n2.png,a bird\n')
    with pytest.raises(BuildError, match="line 2: a quoted cell opens here and is never closed"):
        build(str(table), BuildOptions(out=tmp_path / "out"), progress=False)


def test_csv_bad_quoting_skips_rows(tmp_path):
    images(tmp_path, 3)
    table = tmp_path / "pairs.csv"
    table.write_text('image,caption\n0.png,"bad" quote\n1.png,"two\nlines",extra\n2.png,"a quoted\ncaption"\n')
    stats = build(str(table), BuildOptions(out=tmp_path / "out"), progress=False)
    assert stats["samples"] == 1
    assert [item["input"] for item in skipped_inputs(tmp_path / "out")] == ["pairs.csv line 2", "pairs.csv lines 3-4"]
    assert metadata(tmp_path / "out")[0]["caption"] == "a quoted\ncaption"


def test_csv_delimiter_respects_quoted_header(tmp_path):
    images(tmp_path, 1)
    table = tmp_path / "pairs.csv"
    table.write_text('image;"caption, en"\n0.png;"a cat, sitting"\n')
    build(str(table), BuildOptions(out=tmp_path / "out", caption_column="caption, en"), progress=False)
    assert metadata(tmp_path / "out")[0]["caption"] == "a cat, sitting"


def test_parquet_image_bytes_are_read(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    png = encode(shape_image("red", "circle", 16), "PNG")
    table = pyarrow.table(
        {
            "image": [png, None],
            # the Hugging Face datasets layout
            "picture": [{"bytes": png, "path": "cat.png"}, {"bytes": None, "path": "gone.png"}],
            "caption": ["a red circle", "nothing"],
        }
    )
    parquet.write_table(table, tmp_path / "pairs.parquet")
    stats = build(str(tmp_path / "pairs.parquet"), BuildOptions(out=tmp_path / "a"), progress=False)
    assert stats["samples"] == 1
    assert stats["skipped_by_reason"] == {"missing_image": 1}
    assert metadata(tmp_path / "a")[0]["original_path"] == "pairs.parquet row 1"
    options = BuildOptions(out=tmp_path / "b", image_column="picture")
    stats = build(str(tmp_path / "pairs.parquet"), options, progress=False)
    assert stats["skipped_by_reason"] == {"image_not_found": 1}
    assert metadata(tmp_path / "b")[0]["original_path"] == "cat.png"


def test_reshard_keeps_samples_whose_json_is_broken(tmp_path):
    png = encode(shape_image("red", "circle", 16), "PNG")
    write_tar(tmp_path / "in.tar", [("a.png", png), ("a.txt", b"a red circle"), ("a.json", b"{not json")])
    stats = build(str(tmp_path / "in.tar"), BuildOptions(out=tmp_path / "out"), progress=False)
    # training reads the caption from a.txt, so the sample is usable there too
    assert stats["samples"] == 1
    assert metadata(tmp_path / "out")[0]["source_json_text"] == "{not json"


def test_reshard_of_shard_cut_between_samples(tmp_path):
    png = encode(shape_image("red", "circle", 16), "PNG")
    whole = write_tar(tmp_path / "whole.tar", [("a.png", png), ("a.txt", b"one"), ("b.png", png), ("b.txt", b"two")])
    with tarfile.open(whole) as tar:
        second = [member.offset for member in tar][2]
    (tmp_path / "cut.tar").write_bytes(whole.read_bytes()[:second])
    stats = build(str(tmp_path / "cut.tar"), BuildOptions(out=tmp_path / "out"), progress=False)
    # sample a is whole; the cut broke no sample, so none is counted as skipped
    assert stats["samples"] == 1
    assert stats["skipped"] == 0


def test_parallel_build_keeps_few_jobs_in_flight():
    pulled = 0

    def jobs():
        nonlocal pulled
        for index in range(1000):
            pulled += 1
            yield Record(f"{index}", "caption", image_bytes=b""), BuildOptions(out=Path("unused"))

    with ProcessPoolExecutor(max_workers=2) as pool:
        results = ordered_pool_map(pool, jobs(), workers=2, chunk=4)
        first = next(results)
        assert pulled <= (2 * 2 + 1) * 4
        rest = list(results)
    assert first == ("0", "empty_image")
    assert [result[0] for result in rest] == [str(index) for index in range(1, 1000)]


def test_overwrite_stops_at_folders_named_like_shards(tmp_path):
    images(tmp_path / "in", 1, captions=True)
    (tmp_path / "out" / "shard-000000.tar").mkdir(parents=True)
    with pytest.raises(BuildError, match=r"folders named like build files \(\['shard-000000.tar'\]\)"):
        build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "out", overwrite=True), progress=False)


def test_overwrite_ignores_odd_manifest_names(tmp_path):
    images(tmp_path / "in", 1, captions=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "_manifest.json").write_text(json.dumps({"shards": [{"name": 5}, {"name": "keep.txt"}, {"name": "../x"}]}))
    build(str(tmp_path / "in"), BuildOptions(out=out, overwrite=True), progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_build_inside_its_input_skips_its_own_files(tmp_path):
    source = tmp_path / "in"
    images(source, 2, captions=True)
    build(str(source), BuildOptions(out=source / "shards"), progress=False)
    stats = build(str(source), BuildOptions(out=source / "shards", overwrite=True), progress=False)
    assert stats["samples"] == 2
    assert stats["ignored_files"] == 0


def test_failed_build_leaves_no_empty_output(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(BuildError, match="no usable sample"):
        build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_long_prefix_is_refused(tmp_path):
    images(tmp_path / "in", 1)
    with pytest.raises(BuildError, match="up to 200 letters"):
        build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "out", prefix="p" * 250), progress=False)


def test_inspect_sheet_needs_samples(tmp_path, caplog):
    status = main(["shards", "inspect", "shards/val-000.tar", "--sheet", str(tmp_path / "s.png"), "--samples", "0"])
    assert status == 2
    assert "--samples 0" in caplog.text
