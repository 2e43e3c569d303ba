"""Bad inputs found by trying to break mmalign: each gets a clear error or a counted skip."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

import mmalign
import mmalign.data.reader as reader
from mmalign.config import ConfigError, apply_overrides, build_config
from mmalign.data.build import BuildError, BuildOptions, build
from mmalign.data.decode import SampleError, clean_caption, decode_image
from mmalign.data.inspect import contact_sheet
from mmalign.data.reader import FieldSpec, RawSample, ShardError, check_urls, iter_shard
from mmalign.data.report import DataReport
from mmalign.data.sample import caption_candidates
from mmalign.data.verify import verify
from tests.helpers import encode, manifest, shape_image, write_labelled_shards, write_tar


def numbered_members(first: int, count: int) -> list[tuple[str, bytes]]:
    members = []
    for index in range(first, first + count):
        members += [(f"{index:06d}.jpg", encode(shape_image("red", "circle"))), (f"{index:06d}.txt", b"a red circle")]
    return members


def cut_at_header(tmp_path, sample: int, inside: int = 0):
    """Write shard cut-0.tar, cut at (or `inside` bytes into) the header of sample `sample`, and cut-1.tar."""
    whole = write_tar(tmp_path / "whole.tar", numbered_members(0, 10))
    with tarfile.open(whole) as tar:
        offsets = [member.offset for member in tar]
    (tmp_path / "cut-0.tar").write_bytes(whole.read_bytes()[: offsets[2 * sample] + inside])
    write_tar(tmp_path / "cut-1.tar", numbered_members(10, 2))
    return check_urls(str(tmp_path / "cut-{0..1}.tar"), "k")


@pytest.mark.parametrize("inside", [0, 100])
def test_shard_cut_at_a_header_is_reported_truncated(tmp_path, inside):
    urls = cut_at_header(tmp_path, sample=6, inside=inside)
    result = verify(urls, FieldSpec(), progress=False)
    assert result["ok"] is False
    assert result["samples"] == 8
    assert result["truncated_shards"][0]["key"] == "after 000005"
    assert result["truncated_shards"][0]["lost_keys"] == ["000006", "000007", "000008", "000009"]


def test_complete_shards_are_not_reported_truncated():
    result = verify(check_urls("shards", "k"), FieldSpec(), progress=False)
    assert result["ok"]
    assert result["truncated_shards"] == []


def test_deeply_nested_json_is_a_counted_skip(tmp_path):
    nested = b"[" * 100_000 + b"]" * 100_000
    write_tar(tmp_path / "n.tar", [("a.jpg", encode(shape_image("red", "circle"))), ("a.json", nested)])
    sample = next(item for item in iter_shard(str(tmp_path / "n.tar"), FieldSpec()) if isinstance(item, RawSample))
    with pytest.raises(SampleError) as error:
        caption_candidates(sample, FieldSpec(caption_key="json:caption"), "cp1252")
    assert error.value.reason == "bad_json"


def test_json_caption_that_is_not_text_is_skipped(tmp_path):
    members = [
        ("a.jpg", b"x"),
        ("a.json", json.dumps({"caption": None, "n": 42, "ok": ["one", 2]}).encode()),
    ]
    write_tar(tmp_path / "j.tar", members)
    sample = next(item for item in iter_shard(str(tmp_path / "j.tar"), FieldSpec()) if isinstance(item, RawSample))
    with pytest.raises(SampleError):
        caption_candidates(sample, FieldSpec(caption_key="json:caption"), "cp1252")
    assert caption_candidates(sample, FieldSpec(caption_key="json:n"), "cp1252")[0] == ["42"]
    assert caption_candidates(sample, FieldSpec(caption_key="json:ok"), "cp1252")[0] == ["one", "2"]
    bad = [("b.jpg", b"x"), ("b.json", json.dumps({"caption": {"en": "a cat"}}).encode())]
    write_tar(tmp_path / "k.tar", bad)
    other = next(item for item in iter_shard(str(tmp_path / "k.tar"), FieldSpec()) if isinstance(item, RawSample))
    with pytest.raises(SampleError, match="caption_not_text"):
        caption_candidates(other, FieldSpec(caption_key="json:caption"), "cp1252")


def test_stalled_pipe_fails_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(reader, "STALL_TIMEOUT_S", 1.0)
    with pytest.raises(ShardError, match="sent no data for 1 s"):
        list(iter_shard("pipe:sleep 30", FieldSpec()))


def test_unbalanced_braces_and_object_store_urls_are_explained():
    with pytest.raises(ShardError, match="unbalanced braces"):
        check_urls("shards/train-{000..007.tar", "data.train_shards")
    with pytest.raises(ShardError, match="pipe:aws s3 cp"):
        list(iter_shard("s3://bucket/train-000.tar", FieldSpec()))


def test_utf16_caption_is_decoded():
    result = clean_caption("a red square".encode("utf-16"))
    assert result.text == "a red square"
    assert result.repairs == ["caption_decoded_utf16"]


def test_rgb_png_with_transparent_colour_goes_on_white():
    image = Image.new("RGB", (4, 4), (0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=(0, 0, 0))
    assert decode_image(buffer.getvalue()).image.getpixel((1, 1)) == (255, 255, 255)


def test_contact_sheet_draws_a_one_pixel_strip(tmp_path):
    strip = encode(Image.new("RGB", (100_000, 1), "red"), "PNG")
    sample = RawSample(key="strip", url="x", index=0, fields={"png": strip})
    path = contact_sheet([(sample, "a long red strip")], FieldSpec(), tmp_path / "sheet.png")
    assert path.is_file()


def write_folder(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"{index}.png").write_bytes(encode(shape_image("blue", "square", 24), "PNG"))
        (folder / f"{index}.txt").write_text(f"square {index}")


def test_failed_overwrite_keeps_the_earlier_shards(tmp_path):
    write_folder(tmp_path / "in", 3)
    build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "out"), progress=False)
    before = (tmp_path / "out" / "shard-000000.tar").read_bytes()
    table = tmp_path / "in" / "bad.jsonl"
    rows = [{"image": "0.png", "caption": "ok"}, {"image": "https://example.com/1.png", "caption": "remote"}]
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(BuildError, match="is a URL"):
        build(str(table), BuildOptions(out=tmp_path / "out", overwrite=True), progress=False)
    assert (tmp_path / "out" / "shard-000000.tar").read_bytes() == before
    # the half-written build's staging folder is gone
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "_manifest.json",
        "_skipped.jsonl",
        "_stats.json",
        "shard-000000.tar",
    ]


def test_build_table_captions_and_columns(tmp_path):
    write_folder(tmp_path / "in", 3)
    rows = [
        {"image": "0.png", "caption": 42, "key": "theirs", "width": "wide"},
        {"image": "1.png", "caption": True},
        {"image": "2.png", "caption": "plain"},
    ]
    table = tmp_path / "in" / "pairs.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stats = build(str(table), BuildOptions(out=tmp_path / "out"), progress=False)
    assert stats["samples"] == 2
    assert stats["skipped_by_reason"] == {"caption_not_text": 1}
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    # the generated fields win; colliding columns are kept under source_NAME
    assert meta["key"] == "000000000"
    assert meta["caption"] == "42"
    assert meta["source_key"] == "theirs"
    assert meta["source_width"] == "wide"


def test_build_rejects_bad_options_and_empty_input(tmp_path):
    write_folder(tmp_path / "in", 1)
    for options, message in [
        ({"shard_size": 0}, "--shard-size 0"),
        ({"max_side": -3}, "--max-side -3"),
        ({"quality": 0}, "--quality 0"),
    ]:
        with pytest.raises(BuildError, match=message):
            build(str(tmp_path / "in"), BuildOptions(out=tmp_path / "o", **options), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="no usable sample"):
        build(str(tmp_path / "empty"), BuildOptions(out=tmp_path / "o2"), progress=False)
    latin = tmp_path / "in" / "latin.csv"
    latin.write_bytes("image,caption\n0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(BuildError, match="not UTF-8"):
        build(str(latin), BuildOptions(out=tmp_path / "o3"), progress=False)


def test_reshard_counts_caption_repairs(tmp_path):
    write_tar(tmp_path / "r-0.tar", [("a.jpg", encode(shape_image("red", "circle"))), ("a.txt", b"\xef\xbb\xbfa cat")])
    stats = build(str(tmp_path / "r-0.tar"), BuildOptions(out=tmp_path / "out"), progress=False)
    assert stats["captions_repaired"] == {"caption_bom_removed": 1}


def test_verify_flags_empty_shards_and_never_counts_negative_losses(tmp_path):
    write_tar(tmp_path / "e-0.tar", [])
    result = verify(check_urls(str(tmp_path / "e-0.tar"), "k"), FieldSpec(), progress=False)
    assert result["ok"] is False
    assert result["empty_shards"] == [str(tmp_path / "e-0.tar")]
    # the next shard's keys are lower than where the first one broke
    whole = write_tar(tmp_path / "w.tar", numbered_members(50, 4))
    (tmp_path / "x-0.tar").write_bytes(whole.read_bytes()[:1700])
    write_tar(tmp_path / "x-1.tar", numbered_members(0, 2))
    result = verify(check_urls(str(tmp_path / "x-{0..1}.tar"), "k"), FieldSpec(), progress=False)
    # the count after the break is unknown, not negative
    assert result["truncated_shards"][0]["lost_keys"] is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.inf", "finite"),
        ("train.steps=true", "must be a number"),
        ("eval.recall_k=[0]", "greater than or equal to 1"),
        ("data.caption_key=jpg", "is one of the image_keys"),
        ("run.name=../..", "letters, digits"),
    ],
)
def test_config_rejects_values_that_were_accepted_before(override, message):
    minimal = {"data": {"train_shards": "x"}, "train": {"steps": 1}}
    with pytest.raises(ConfigError, match=message):
        build_config(apply_overrides(minimal, [override]))


def test_resume_words_ignore_case():
    config = build_config(apply_overrides({"data": {"train_shards": "x"}, "train": {"steps": 1}}, ["run.resume=AUTO"]))
    assert config.run.resume == "auto"


def test_pretrained_file_that_is_not_weights_is_explained(tmp_path):
    from mmalign.config import ModelConfig
    from mmalign.model import create_model

    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    with pytest.raises(ConfigError, match=r"model\.pretrained=.*cannot load it as weights"):
        create_model(ModelConfig(name="mm-test", pretrained=str(text)))


def test_api_rejects_bad_labels_templates_and_images(tiny_run):
    model = mmalign.load(tiny_run, device="cpu")
    image = shape_image("red", "circle")
    with pytest.raises(ValueError, match="distinct"):
        model.zero_shot([image], ["cat", "cat"])
    with pytest.raises(TypeError, match="list of strings"):
        model.zero_shot([image], ["cat", None])
    with pytest.raises(ValueError, match="no other braces"):
        model.zero_shot([image], ["cat", "dog"], templates=["{{}}"])
    with pytest.raises(ValueError, match="top_k"):
        model.zero_shot([image], ["cat", "dog"], top_k=0)
    with pytest.raises(ValueError, match="batch_size"):
        model.encode_images([image], batch_size=-1)
    with pytest.raises(TypeError, match="wrap a single image"):
        model.encode_images("photo.jpg")
    with pytest.raises(TypeError, match="file path, bytes"):
        model.encode_images([3])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.encode_images(torch.zeros(2, 4, 32, 32))


def test_skip_fraction_ignores_samples_still_in_the_buffer():
    report = DataReport(read=1000, kept=50, skipped={"not_an_image": 10})
    report.check_fraction(max_fraction=0.2, min_read=10)
    with pytest.raises(Exception, match="10 of 60 samples checked"):
        report.check_fraction(max_fraction=0.1, min_read=10)


def test_training_checks_the_class_file_before_starting(tmp_path):
    from mmalign.train import train

    pattern = write_labelled_shards(tmp_path / "s", 1, 8)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classnames": ["a", "b"], "templates": ["{} {x}"]}))
    config = build_config(
        {
            "run": {"name": "early", "output_dir": str(tmp_path / "runs")},
            "model": {"name": "mm-test"},
            "data": {"train_shards": pattern, "workers": 0},
            "train": {"steps": 2, "batch_size": 4},
            "eval": {"shards": pattern, "classes": str(classes)},
        }
    )
    with pytest.raises(ConfigError, match="no other braces"):
        train(config)
    assert not (tmp_path / "runs").exists()


def tiny_train_config(tmp_path, pattern, **train):
    return build_config(
        {
            "run": {"name": "r", "output_dir": str(tmp_path / "runs")},
            "model": {"name": "mm-test"},
            "data": {"train_shards": pattern, "workers": 0, "shuffle_buffer": 4},
            "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 3, **train},
            "optim": {"warmup_steps": 1},
        }
    )


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    import logging

    from mmalign.train import train

    caplog.set_level(logging.INFO, logger="mmalign")
    pattern = write_labelled_shards(tmp_path / "s", 1, 16)
    config = tiny_train_config(tmp_path, pattern)
    run_dir = train(config)
    newest = run_dir / "checkpoints" / "step-4" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    (run_dir / "model.safetensors").unlink()
    resumed = config.model_copy(update={"run": config.run.model_copy(update={"resume": "auto"})})
    train(resumed)
    assert "cannot read checkpoint" in caplog.text
    assert "step-2 at step 2" in caplog.text


def test_resume_with_another_architecture_stops_and_keeps_config(tmp_path):
    from mmalign.train import TrainingError, train

    pattern = write_labelled_shards(tmp_path / "s", 1, 16)
    config = tiny_train_config(tmp_path, pattern)
    run_dir = train(config)
    other = config.model_copy(
        update={
            "run": config.run.model_copy(update={"resume": "auto"}),
            "model": config.model.model_copy(update={"name": "mm-tiny"}),
        }
    )
    with pytest.raises(TrainingError, match="another architecture"):
        train(other)
    assert "mm-test" in (run_dir / "config.yaml").read_text()


def test_fresh_run_sets_aside_records_of_a_failed_attempt(tmp_path):
    from mmalign.train import train

    pattern = write_labelled_shards(tmp_path / "s", 1, 16)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 7, "train/loss": 9.0}) + "\n")
    train(tiny_train_config(tmp_path, pattern))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 7 not in steps
    assert "9.0" in (run_dir / "metrics.superseded.jsonl").read_text()


def test_index_resumed_with_other_shards_embeds_them(tiny_run, tmp_path):
    from mmalign.index import build_index

    first = write_labelled_shards(tmp_path / "a", 1, 5)
    second = write_labelled_shards(tmp_path / "b", 1, 7)
    out = tmp_path / "index"
    build_index(tiny_run, first, out, progress=False)
    (out / "parts").mkdir()
    # an interrupted build of the first shard left its part behind
    (out / "parts" / "000000.json").write_text(json.dumps({"url": check_urls(first, "k")[0], "items": []}))
    info = build_index(tiny_run, second, out, progress=False, overwrite=True)
    assert info["images"] == 7


def test_index_of_unusable_shards_is_an_error(tiny_run, tmp_path):
    from mmalign.index import IndexFolderError, build_index

    write_tar(tmp_path / "bad-0.tar", [("a.jpg", b"not an image"), ("a.txt", b"caption")])
    with pytest.raises(IndexFolderError, match="no usable sample"):
        build_index(tiny_run, str(tmp_path / "bad-0.tar"), tmp_path / "index", progress=False)


def built_shards(tmp_path, samples: int = 12, shard_size: int = 4):
    """Build numbered shards with a manifest from a folder of small images and captions."""
    source = tmp_path / "in"
    source.mkdir()
    for index in range(samples):
        shape_image("red" if index % 2 else "blue", "circle", 16).save(source / f"{index:03d}.png")
        (source / f"{index:03d}.txt").write_text(f"caption {index}")
    out = tmp_path / "out"
    build(str(source), BuildOptions(out=out, shard_size=shard_size), progress=False)
    return out


def test_verify_counts_at_every_cut(tmp_path):
    out = built_shards(tmp_path)
    whole = (out / "shard-000001.tar").read_bytes()
    for cut in range(512, len(whole), 256):
        (out / "shard-000001.tar").write_bytes(whole[:cut])
        result = verify(check_urls(str(out), "k"), FieldSpec(), progress=False)
        # a cut inside the zero padding after the last member loses nothing
        lost = sum(len(truncated["lost_keys"]) for truncated in result["truncated_shards"])
        # readable + skipped + lost after the break is what the build wrote, each sample counted once
        assert result["samples"] + result["skipped"] + lost == 12, (cut, result)
        assert set(result["skipped_by_reason"]) <= {"truncated_shard"}, (cut, result)


def test_truncated_case_reports_broken_and_lost_keys(cases):
    expected = manifest(cases, "truncated_tar")["expected"]
    result = verify(
        check_urls(str(cases / "truncated_tar" / "shard-{000000..000001}.tar"), "k"), FieldSpec(), progress=False
    )
    [truncated] = result["truncated_shards"]
    assert [truncated["key"], *truncated["lost_keys"]] == expected["lost_keys"]
    assert result["samples"] == len(expected["good_keys"])
    assert result["skipped_by_reason"] == {"truncated_shard": 1}


def test_verify_checks_the_build_manifest(tmp_path):
    out = built_shards(tmp_path)
    assert verify(check_urls(str(out), "k"), FieldSpec(), progress=False)["ok"]
    # a changed caption keeps every sample readable, but not the recorded checksum
    shard = out / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes().replace(b"caption 1", b"caption 9"))
    (out / "shard-000002.tar").unlink()
    result = verify(check_urls(str(out), "k"), FieldSpec(), progress=False)
    assert result["ok"] is False
    assert result["samples"] == 8
    problems = {item["shard"].rsplit("/", 1)[1]: item["problem"] for item in result["manifest_problems"]}
    assert problems["shard-000000.tar"] == "its SHA-256 differs from the manifest's"
    assert problems["shard-000002.tar"] == "listed in _manifest.json with 4 samples, but not found"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{bad", "not a build manifest (JSONDecodeError"),
        ("[1]", "not a build manifest (TypeError"),
        ('{"shards": [{"samples": 3}]}', "not a build manifest (its 'shards' must be a list of objects"),
        ('{"shards": [{"name": "../elsewhere.tar"}]}', "lists '../elsewhere.tar', which is not a shard file name"),
    ],
)
def test_verify_reports_unusable_manifest(tmp_path, content, problem):
    out = built_shards(tmp_path)
    (out / "_manifest.json").write_text(content)
    result = verify(check_urls(str(out), "k"), FieldSpec(), progress=False)
    assert result["ok"] is False
    assert result["samples"] == 12
    assert result["manifest_problems"][0]["problem"].startswith(problem)


def test_verify_reports_shards_the_manifest_omits(tmp_path):
    out = built_shards(tmp_path)
    (out / "shard-000003.tar").write_bytes((out / "shard-000000.tar").read_bytes())
    result = verify(check_urls(str(out / "shard-00000{0,3}.tar"), "k"), FieldSpec(), progress=False)
    assert result["manifest_problems"] == [
        {"shard": str(out / "shard-000003.tar"), "problem": "not listed in the _manifest.json next to it"}
    ]
