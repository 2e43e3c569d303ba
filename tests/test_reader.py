import pytest

from mmalign.data.reader import DataError, FieldSpec, RawSample, ShardError, ShardTruncated, check_urls, iter_shard
from mmalign.data.report import DataReport
from mmalign.data.schema import check_schema
from mmalign.data.stream import StreamSettings, read_pass
from tests.helpers import manifest, write_tar


def usable_keys(pattern: str, fields: FieldSpec, report: DataReport | None = None) -> list[str]:
    settings = StreamSettings(urls=tuple(check_urls(pattern, "data.train_shards")), fields=fields, batch_size=1)
    samples = read_pass(settings, 0, 0, 1, report or DataReport())
    return [sample.key for sample in samples]


def test_truncated_tar_case_keeps_complete_samples(cases):
    expected = manifest(cases, "truncated_tar")["expected"]
    report = DataReport()
    keys = usable_keys(str(cases / "truncated_tar" / "shard-{000000..000001}.tar"), FieldSpec(), report)
    assert sorted(keys) == expected["good_keys"]
    assert [item["shard"].rsplit("/", 1)[1] for item in report.truncated_shards] == expected["truncated_shards"]
    assert report.truncated_shards[0]["key"] == expected["lost_keys"][0]
    assert report.truncated_shards[0]["complete_samples"] == 3
    assert report.skipped == {"truncated_shard": 1}
    # good + skipped adds up to what was read
    assert report.read == len(keys) + report.total_skipped


def test_truncated_shard_yields_event_after_complete_samples(cases):
    items = list(iter_shard(str(cases / "truncated_tar" / "shard-000000.tar"), FieldSpec()))
    assert [item.key for item in items[:-1]] == ["000000", "000001", "000002"]
    assert isinstance(items[-1], ShardTruncated)
    assert items[-1].key == "000003"


def test_missing_keys_case_txt_only(cases):
    expected = manifest(cases, "missing_keys")["expected"]
    report = DataReport()
    keys = usable_keys(str(cases / "missing_keys" / "shard-000000.tar"), FieldSpec(), report)
    assert keys == expected["usable_keys_txt_only"]
    assert report.skipped["missing_caption"] == 2  # 000001 and 000006 (caption only in json)
    assert report.skipped["missing_image"] == 1


def test_missing_keys_case_with_json_fallback(cases):
    expected = manifest(cases, "missing_keys")["expected"]
    report = DataReport()
    fields = FieldSpec(caption_json_field="caption")
    keys = usable_keys(str(cases / "missing_keys" / "shard-000000.tar"), fields, report)
    assert keys == expected["usable_keys_with_json_fallback"]
    assert dict(report.skipped) == {"missing_caption": 1, "missing_image": 1}


def test_uppercase_extensions_are_fields(cases):
    samples = [item for item in iter_shard(str(cases / "missing_keys" / "shard-000000.tar"), FieldSpec())]
    sample = next(item for item in samples if isinstance(item, RawSample) and item.key == "000003")
    assert set(sample.fields) == {"jpg", "txt"}


def test_dotted_basenames_keep_their_keys(cases):
    expected = manifest(cases, "multi_dot_keys")["expected"]["dotted_basename.tar"]
    keys = usable_keys(str(cases / "multi_dot_keys" / "dotted_basename.tar"), FieldSpec())
    assert len(keys) == expected["samples_with_image_and_caption"]
    assert "img_v1.5_0001" in keys
    assert "photo.final" in keys


def test_double_extensions_fail_fast_naming_suffixes(cases):
    url = str(cases / "multi_dot_keys" / "input_output.tar")
    with pytest.raises(DataError) as error:
        check_schema(url, FieldSpec())
    message = str(error.value)
    assert "input.jpg" in message
    assert "outputs.txt" in message
    assert "data.image_keys" in message


def test_double_extensions_work_when_configured(cases):
    expected = manifest(cases, "multi_dot_keys")["expected"]["input_output.tar"]
    fields = FieldSpec(image_keys=(expected["image_ext"],), caption_key=expected["caption_ext"])
    url = str(cases / "multi_dot_keys" / "input_output.tar")
    assert check_schema(url, fields) == expected["samples_with_image_and_caption"]
    assert len(usable_keys(url, fields)) == expected["samples_with_image_and_caption"]


def test_dotted_keys_warn_about_webdataset_merging(cases, caplog):
    check_schema(str(cases / "multi_dot_keys" / "dotted_basename.tar"), FieldSpec())
    assert "first-dot rule" in caplog.text


def test_same_key_in_consecutive_shards_stays_two_samples(tmp_path):
    write_tar(tmp_path / "a-0.tar", [("x.jpg", b"1"), ("x.txt", b"first")])
    write_tar(tmp_path / "a-1.tar", [("x.jpg", b"2"), ("x.txt", b"second")])
    samples = [item for url in check_urls(str(tmp_path / "a-{0..1}.tar"), "k") for item in iter_shard(url, FieldSpec())]
    captions = [item.fields["txt"] for item in samples if isinstance(item, RawSample)]
    assert captions == [b"first", b"second"]


def test_key_split_across_shards_is_counted(tmp_path):
    write_tar(tmp_path / "b-0.tar", [("a.jpg", b"1"), ("a.txt", b"ok"), ("z.jpg", b"2")])
    write_tar(tmp_path / "b-1.tar", [("z.txt", b"orphan caption"), ("c.jpg", b"3"), ("c.txt", b"ok")])
    report = DataReport()
    keys = usable_keys(str(tmp_path / "b-{0..1}.tar"), FieldSpec(), report)
    assert keys == ["a", "c"]
    assert dict(report.skipped) == {"missing_caption": 1, "missing_image": 1}


def test_repeated_member_starts_a_new_sample(tmp_path):
    write_tar(tmp_path / "d.tar", [("k.jpg", b"1"), ("k.txt", b"one"), ("k.jpg", b"2"), ("k.txt", b"two")])
    samples = [item for item in iter_shard(str(tmp_path / "d.tar"), FieldSpec()) if isinstance(item, RawSample)]
    assert [sample.fields["txt"] for sample in samples] == [b"one", b"two"]
    assert samples[0].duplicate_fields == ["jpg"]


def test_missing_shard_names_the_file(tmp_path):
    write_tar(tmp_path / "s-0.tar", [("a.jpg", b"1")])
    with pytest.raises(ShardError) as error:
        check_urls(str(tmp_path / "s-{0..2}.tar"), "data.train_shards")
    assert "data.train_shards" in str(error.value)
    assert "s-1.tar" in str(error.value)
    assert "2 of 3 shards not found" in str(error.value)


def test_file_that_is_not_a_tar_is_an_error(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"this is not a tar file" * 10)
    with pytest.raises(ShardError, match="not a readable tar file"):
        list(iter_shard(str(path), FieldSpec()))


def test_failing_pipe_command_is_an_error(tmp_path):
    with pytest.raises(ShardError):
        list(iter_shard("pipe:cat /nonexistent/shard.tar", FieldSpec()))


def test_pipe_url_streams_a_shard(tmp_path):
    write_tar(tmp_path / "p.tar", [("a.jpg", b"1"), ("a.txt", b"cap")])
    samples = [
        item for item in iter_shard(f"pipe:cat {tmp_path / 'p.tar'}", FieldSpec()) if isinstance(item, RawSample)
    ]
    assert [sample.key for sample in samples] == ["a"]


@pytest.fixture
def http_folder(tmp_path):
    """Serve tmp_path over HTTP on the loopback interface."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_and_pipe_curl_urls_stream_shards(http_folder):
    folder, base = http_folder
    write_tar(folder / "web-0.tar", [("a.jpg", b"1"), ("a.txt", b"one"), ("b.jpg", b"2"), ("b.txt", b"two")])
    write_tar(folder / "web-1.tar", [("c.jpg", b"3"), ("c.txt", b"three")])
    keys = usable_keys(f"{base}/web-{{0..1}}.tar", FieldSpec())
    assert keys == ["a", "b", "c"]
    keys = usable_keys(f"pipe:curl -s -f {base}/web-0.tar", FieldSpec())
    assert keys == ["a", "b"]


def test_http_shard_that_does_not_exist_is_an_error(http_folder):
    _, base = http_folder
    with pytest.raises(ShardError):
        list(iter_shard(f"{base}/missing.tar", FieldSpec()))
