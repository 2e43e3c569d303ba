import itertools

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from mmalign.data.reader import DataError, FieldSpec, check_urls
from mmalign.data.report import DataReport
from mmalign.data.stream import (
    EvalStream,
    StreamSettings,
    TrainStream,
    partition,
    pass_order,
    read_pass,
    shuffled,
)
from tests.helpers import encode, shape_image, write_labelled_shards, write_tar


def to_tensor(image):
    return pil_to_tensor(image).float()


def fake_tokenize(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def settings_for(pattern, **overrides):
    values = {"urls": tuple(check_urls(pattern, "data.train_shards")), "fields": FieldSpec(), "batch_size": 4}
    values.update(overrides)
    return StreamSettings(**values)


def train_loader(settings, workers=0, resume=None):
    stream = TrainStream(settings, to_tensor, fake_tokenize, lambda texts: 0, resume)
    return DataLoader(stream, batch_size=None, num_workers=workers)


@pytest.mark.parametrize(("num_shards", "num_streams"), [(8, 4), (8, 3), (3, 4), (1, 2), (5, 5), (7, 2)])
def test_partition_covers_every_sample_once(num_shards, num_streams):
    order = [f"s{index}" for index in range(num_shards)]
    samples_per_shard = 5
    seen = []
    for stream in range(num_streams):
        for url, share in partition(order, stream, num_streams):
            for index in range(samples_per_shard):
                if share is None or (index + share) % num_streams == stream:
                    seen.append((url, index))
    assert sorted(seen) == sorted((url, index) for url in order for index in range(samples_per_shard))


def test_partition_gives_every_stream_data():
    for stream in range(4):
        assert partition(["only"], stream, 4)


def test_pass_order_depends_on_seed_and_pass_only():
    urls = [f"s{index}" for index in range(20)]
    assert pass_order(urls, 1, 0, True) == pass_order(urls, 1, 0, True)
    assert pass_order(urls, 1, 0, True) != pass_order(urls, 1, 1, True)
    assert pass_order(urls, 1, 0, True) != pass_order(urls, 2, 0, True)
    assert sorted(pass_order(urls, 1, 3, True)) == sorted(urls)
    assert pass_order(urls, 1, 3, False) == urls


def test_shuffle_buffer_is_a_seeded_permutation():
    import random

    first = list(shuffled(iter(range(100)), 10, random.Random(5)))
    again = list(shuffled(iter(range(100)), 10, random.Random(5)))
    assert first == again
    assert sorted(first) == list(range(100))
    assert first != list(range(100))


def test_read_pass_in_shard_order(tmp_path):
    pattern = write_labelled_shards(tmp_path, shards=3, per_shard=4)
    settings = settings_for(pattern, shuffle_shards=False)
    keys = [sample.key for sample in read_pass(settings, 0, 0, 1, DataReport())]
    assert keys == [f"{shard:03d}{index:04d}" for shard in range(3) for index in range(4)]


def collect_keys(loader, batches):
    keys, infos = [], []
    for batch in itertools.islice(loader, batches):
        keys.extend(batch["keys"])
        infos.append(batch["info"])
    return keys, infos


def test_two_workers_see_each_sample_once_per_pass(tmp_path):
    pattern = write_labelled_shards(tmp_path, shards=4, per_shard=6)
    settings = settings_for(pattern, workers=2, shuffle_buffer=5)
    keys, infos = collect_keys(train_loader(settings, workers=2), 6)  # 24 samples = one pass
    assert sorted(keys) == sorted(f"{shard:03d}{index:04d}" for shard in range(4) for index in range(6))
    # batches alternate between workers, and each worker read its own shards
    assert [info["worker"] for info in infos] == [0, 1, 0, 1, 0, 1]
    shards_by_worker = {0: set(), 1: set()}
    for info in infos:
        shards_by_worker[info["worker"]].update(info["shards"])
    assert not shards_by_worker[0] & shards_by_worker[1]


def test_two_processes_split_uneven_shards(tmp_path):
    pattern = write_labelled_shards(tmp_path, shards=3, per_shard=[5, 9, 2])
    first_pass = []
    for rank in range(2):
        settings = settings_for(pattern, rank=rank, world_size=2, shuffle_buffer=0, batch_size=1)
        for batch in itertools.islice(train_loader(settings), 30):
            if batch["info"]["pass"] == 0:
                first_pass.extend(batch["keys"])
    # every sample of the pass is read by exactly one process, and both processes keep streaming
    expected = [f"{shard:03d}{index:04d}" for shard, count in enumerate([5, 9, 2]) for index in range(count)]
    assert sorted(first_pass) == sorted(expected)


def test_passes_are_reported_with_distinct_counts(tmp_path):
    pattern = write_labelled_shards(tmp_path, shards=2, per_shard=4)
    settings = settings_for(pattern, shuffle_buffer=3, batch_size=4)
    _, infos = collect_keys(train_loader(settings), 5)
    passes = [summary for info in infos for summary in info["passes_done"]]
    assert passes[0] == {"pass": 0, "distinct": 8, "repeated": 0, "read": 8, "usable": 8, "skipped": 0}
    assert passes[1]["pass"] == 1


def test_stream_resumes_with_the_same_batches(tmp_path):
    pattern = write_labelled_shards(tmp_path, shards=3, per_shard=7)
    settings = settings_for(pattern, workers=2, shuffle_buffer=6, batch_size=3)
    full = list(itertools.islice(train_loader(settings, workers=2), 12))
    consumed = 5
    state = {"batches": consumed, "workers": {}}
    for batch in full[:consumed]:
        info = batch["info"]
        state["workers"][str(info["worker"])] = {
            "pass": info["pass"],
            "position": info["position"],
            "batches": info["batches"],
        }
    resumed = list(itertools.islice(train_loader(settings, workers=2, resume=state), 7))
    for expected, actual in zip(full[consumed:], resumed, strict=True):
        assert actual["keys"] == expected["keys"]
        assert torch.equal(actual["image"], expected["image"])


def test_stream_without_usable_samples_fails(tmp_path):
    write_tar(tmp_path / "x-0.tar", [("a.jpg", b"1"), ("b.txt", b"no image for this caption")])
    settings = settings_for(str(tmp_path / "x-0.tar"), skip_check_after=1000)
    with pytest.raises(DataError, match="no usable sample"):
        next(iter(train_loader(settings)))


def test_skip_fraction_turns_broken_data_into_error(tmp_path):
    members = []
    for index in range(20):
        image = b"not an image" if index % 2 else encode(shape_image("red", "circle"))
        members += [(f"{index:04d}.jpg", image), (f"{index:04d}.txt", b"a red circle")]
    write_tar(tmp_path / "half-0.tar", members)
    settings = settings_for(str(tmp_path / "half-0.tar"), max_skip_fraction=0.3, skip_check_after=10)
    with pytest.raises(DataError, match="not_an_image"):
        list(itertools.islice(train_loader(settings), 3))


def test_eval_stream_reads_each_sample_exactly_once(tmp_path):
    pattern = write_labelled_shards(tmp_path, shards=3, per_shard=[4, 5, 6], prefix="val")
    keys = []
    for rank in range(2):
        settings = settings_for(pattern, rank=rank, world_size=2, workers=2, batch_size=2, shuffle_buffer=0)
        loader = DataLoader(EvalStream(settings, to_tensor), batch_size=None, num_workers=2)
        for batch in loader:
            keys.extend(batch["keys"])
    assert sorted(keys) == sorted(
        f"{shard:03d}{index:04d}" for shard, count in enumerate([4, 5, 6]) for index in range(count)
    )


def test_eval_stream_skips_labels_outside_the_classes(tmp_path):
    members = []
    for index, label in enumerate([b"0", b"2", b"9", b"-3", b"x"]):
        members += [
            (f"{index:04d}.jpg", encode(shape_image("red", "circle"))),
            (f"{index:04d}.txt", b"a red circle"),
            (f"{index:04d}.cls", label),
        ]
    write_tar(tmp_path / "labels-0.tar", members)
    settings = settings_for(str(tmp_path / "labels-0.tar"), shuffle_buffer=0, batch_size=8)
    stream = EvalStream(settings, to_tensor, label_key="cls", num_classes=3)
    [batch] = list(DataLoader(stream, batch_size=None))
    assert batch["labels"] == [0, 2]
    # 9 is not one of 3 classes, -3 is not a class at all, x is not a number
    assert batch["report"]["skipped"] == {"bad_label": 3}
