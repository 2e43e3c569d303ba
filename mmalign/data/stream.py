"""Stream batches from shards: shard order, splitting, shuffling, decoding and batching.

Every loader worker of every process runs one *stream*. With R processes and W
workers each there are N = R x W streams; stream ``s = rank * W + worker``.

Shard order. Pass ``p`` reads the shards in an order that depends only on
(seed, p): the same on every process, different between passes. The order is
fixed before it is split across streams.

Splitting. The first ``N * (S // N)`` shards of the order are dealt whole,
stream ``s`` taking every N-th one. The remaining ``S % N`` shards (all of them
when there are fewer shards than streams) are read by every stream, and each
keeps every N-th sample of them. So each pass visits every sample exactly once
across all streams, and no stream is ever left without data. This choice is
logged at start-up.

Equal steps. A training stream never ends: after pass p it starts pass p+1.
The budget is a number of optimizer steps, so every process runs the same
number of steps and no process waits at the end of a pass for another.

Resume. A training batch records its stream's (pass, position, batches) where
``position`` counts samples taken from the pass's shuffled order. A stream
restarted from that record replays the pass's undecoded samples and the same
shuffle to that position, and reseeds augmentation per batch, so the batches
after a resume are the batches an uninterrupted run would have produced.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmalign.data.decode import SampleError, decode_image, split_captions
from mmalign.data.reader import (
    DataError,
    FieldSpec,
    RawSample,
    ShardEnd,
    ShardTruncated,
    iter_shard,
)
from mmalign.data.report import DataReport
from mmalign.data.sample import decode_sample, parse_json

logger = logging.getLogger("mmalign.data")


@dataclass(frozen=True)
class StreamSettings:
    """Everything a stream needs besides the transform and the tokenizer."""

    urls: tuple[str, ...]
    fields: FieldSpec
    batch_size: int
    seed: int = 0
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000
    max_pixels: int = 25_000_000
    encoding_fallback: str = "cp1252"
    warn_every: int = 1000
    max_skip_fraction: float = 1.0
    skip_check_after: int = 1000
    rank: int = 0
    world_size: int = 1
    workers: int = 0


def derive_seed(*parts: Any) -> int:
    """Return a 63-bit seed from any parts, stable across processes and Python runs."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def pass_order(urls: Sequence[str], seed: int, pass_index: int, shuffle: bool) -> list[str]:
    """Return the shard order of one pass: a function of (seed, pass) only."""
    order = list(urls)
    if shuffle:
        random.Random(derive_seed("shards", seed, pass_index)).shuffle(order)
    return order


def partition(order: Sequence[str], stream: int, num_streams: int) -> list[tuple[str, int | None]]:
    """Return the shards stream ``stream`` reads: (url, None) for a whole shard, (url, k) for a shared one.

    In a shared shard the stream keeps sample ``i`` when ``(i + k) % num_streams == stream``.
    """
    whole = len(order) // num_streams * num_streams
    mine: list[tuple[str, int | None]] = [(url, None) for url in order[stream:whole:num_streams]]
    mine += [(url, position) for position, url in enumerate(order[whole:])]
    return mine


def describe_split(num_shards: int, num_streams: int) -> str:
    whole, shared = divmod(num_shards, num_streams)
    if shared == 0:
        return f"{num_shards} shards over {num_streams} loader streams: {whole} whole shards per stream each pass"
    return (
        f"{num_shards} shards over {num_streams} loader streams: {whole} whole shards per stream, and the "
        f"remaining {shared} read by every stream, each keeping 1 sample in {num_streams}"
    )


def read_pass(
    settings: StreamSettings, pass_index: int, stream: int, num_streams: int, report: DataReport
) -> Iterator[RawSample]:
    """Yield this stream's complete samples of one pass, in shard order, counting what is skipped."""
    order = pass_order(settings.urls, settings.seed, pass_index, settings.shuffle_shards)
    for url, share in partition(order, stream, num_streams):
        for item in iter_shard(url, settings.fields):
            if isinstance(item, ShardEnd):
                break
            index = item.complete_samples if isinstance(item, ShardTruncated) else item.index
            if share is not None and (index + share) % num_streams != stream:
                continue
            if isinstance(item, ShardTruncated):
                report.truncated(item)
                break
            report.read += 1
            if item.duplicate_fields:
                logger.warning("sample %s in %s repeats field(s) %s", item.key, url, item.duplicate_fields)
            if settings.fields.image_field(item) is None:
                report.skip("missing_image", url, item.key, f"fields found: {sorted(item.fields)}")
            elif not settings.fields.has_caption(item):
                report.skip("missing_caption", url, item.key, f"fields found: {sorted(item.fields)}")
            else:
                yield item
                continue
            report.check_fraction(settings.max_skip_fraction, settings.skip_check_after)


def shuffled(items: Iterator[RawSample], buffer_size: int, rng: random.Random) -> Iterator[RawSample]:
    """Shuffle a stream through a buffer of ``buffer_size`` items; drain it at the end."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[RawSample] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def stream_identity(settings: StreamSettings, rotation: int) -> tuple[int, int, int]:
    """Return (logical worker, stream index, number of streams) for the calling worker process."""
    info = get_worker_info()
    workers = info.num_workers if info is not None else 1
    physical = info.id if info is not None else 0
    # after a resume the DataLoader asks worker 0 first; rotate so the stream due next comes first
    logical = (physical + rotation) % workers
    return logical, settings.rank * workers + logical, settings.world_size * workers


class TrainStream(IterableDataset):
    """An endless stream of training batches for one process (see the module docstring).

    Each batch is a dict with ``image`` (B, 3, H, W) float, ``text`` (B, L) long,
    ``keys`` (B strings) and ``info``: the stream's position, the data report
    delta since its previous batch, and the passes it finished since then.
    """

    def __init__(
        self,
        settings: StreamSettings,
        transform: Callable,
        tokenize: Callable[[list[str]], torch.Tensor],
        count_truncated: Callable[[list[str]], int],
        resume: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.transform = transform
        self.tokenize = tokenize
        self.count_truncated = count_truncated
        self.resume = resume or {}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        logical, stream, num_streams = stream_identity(self.settings, self.resume.get("batches", 0))
        state = self.resume.get("workers", {}).get(str(logical), {"pass": 0, "position": 0, "batches": 0})
        run = _StreamRun(self, logical, stream, num_streams, state["batches"])
        return run.batches(state["pass"], state["position"])


class _StreamRun:
    """The state of one stream inside one loader worker."""

    def __init__(self, dataset: TrainStream, logical: int, stream: int, num_streams: int, batches: int) -> None:
        self.dataset = dataset
        self.settings = dataset.settings
        self.logical = logical
        self.stream = stream
        self.num_streams = num_streams
        self.batches_done = batches
        self.report = DataReport(warn_every=self.settings.warn_every, source=f"stream {stream}/{num_streams}")
        self.last_report = self.report.snapshot()
        self.passes_done: list[dict[str, int]] = []
        self.pending: list[tuple[torch.Tensor, str, str, str]] = []

    def batches(self, pass_index: int, skip_to: int) -> Iterator[dict[str, Any]]:
        while True:
            yield from self.one_pass(pass_index, skip_to)
            pass_index += 1
            skip_to = 0

    def one_pass(self, pass_index: int, skip_to: int) -> Iterator[dict[str, Any]]:
        settings = self.settings
        rng = random.Random(derive_seed("samples", settings.seed, pass_index, self.stream))
        raw = read_pass(settings, pass_index, self.stream, self.num_streams, self.report)
        samples = shuffled(raw, settings.shuffle_buffer, rng)
        # NOTE: one int per sample of the pass; about 60 MB per million samples per stream
        seen: set[int] = set()
        repeated = usable = 0
        position = 0
        read_before, skipped_before = self.report.read, self.report.total_skipped
        if skip_to:
            # replay to the checkpointed position; those samples were counted before the checkpoint
            for sample in samples:
                position += 1
                seen.add(hash(sample.uid))
                if position >= skip_to:
                    break
            self.last_report = self.report.snapshot()
        batch_rng = self.seed_batch()
        for sample in samples:
            position += 1
            uid = hash(sample.uid)
            repeated += uid in seen
            seen.add(uid)
            try:
                image, caption = self.dataset_prepare(sample, batch_rng)
            except SampleError as error:
                self.report.skip(error.reason, sample.url, sample.key, error.detail)
                self.report.check_fraction(settings.max_skip_fraction, settings.skip_check_after)
                continue
            usable += 1
            self.report.kept += 1
            self.pending.append((image, caption, sample.key, sample.url))
            if len(self.pending) == settings.batch_size:
                yield self.emit(pass_index, position)
                batch_rng = self.seed_batch()
        if not usable and not skip_to:
            order = pass_order(settings.urls, settings.seed, pass_index, settings.shuffle_shards)
            shards = [url for url, _ in partition(order, self.stream, self.num_streams)]
            raise DataError(
                f"loader stream {self.stream} of {self.num_streams} found no usable sample in its shards "
                f"{shards[:5]}{' ...' if len(shards) > 5 else ''} in pass {pass_index} ({self.report.summary()}). "
                "Each stream (data.workers per process, times the processes) needs usable samples: fix or "
                "remove those shards, check data.image_keys / data.caption_key, or use fewer data.workers"
            )
        # samples of an unfinished batch stay pending and open the next pass's first batch
        self.passes_done.append(
            {
                "pass": pass_index,
                "distinct": len(seen),
                "repeated": repeated,
                "read": self.report.read - read_before,
                "usable": usable,
                "skipped": self.report.total_skipped - skipped_before,
            }
        )

    def seed_batch(self) -> random.Random:
        seed = derive_seed("batch", self.settings.seed, self.stream, self.batches_done)
        torch.manual_seed(seed)
        return random.Random(seed)

    def dataset_prepare(self, sample: RawSample, rng: random.Random) -> tuple[torch.Tensor, str]:
        settings = self.settings
        decoded = decode_sample(sample, settings.fields, settings.max_pixels, settings.encoding_fallback)
        self.report.repair(decoded.repairs)
        captions = decoded.captions
        caption = captions[0] if len(captions) == 1 else rng.choice(captions)
        return self.dataset.transform(decoded.image.image), caption

    def emit(self, pass_index: int, position: int) -> dict[str, Any]:
        images, captions, keys, urls = zip(*self.pending, strict=True)
        self.pending = []
        truncated = self.dataset.count_truncated(list(captions))
        if truncated:
            self.report.repaired["caption_truncated"] += truncated
        self.report.used += len(keys)
        self.batches_done += 1
        info = {
            "worker": self.logical,
            "pass": pass_index,
            "position": position,
            "batches": self.batches_done,
            "report": self.report.delta(self.last_report),
            "passes_done": self.passes_done,
            "shards": sorted(set(urls)),
        }
        self.last_report = self.report.snapshot()
        self.passes_done = []
        return {
            "image": torch.stack(images),  # (B, 3, H, W)
            "text": self.dataset.tokenize(list(captions)),  # (B, L)
            "keys": list(keys),
            "info": info,
        }


class EvalStream(IterableDataset):
    """One pass over held-out shards, each sample read by exactly one stream, in shard order.

    Each batch is a dict with ``image`` (B, 3, H, W), ``keys`` (B), ``captions``
    (B lists of strings), ``labels`` (B ints, -1 when unknown) and ``report``
    (the data report delta). The last batch of a stream may be smaller.
    """

    def __init__(
        self,
        settings: StreamSettings,
        transform: Callable,
        caption_field: str = "caption",
        labels: dict[str, int] | None = None,
        label_key: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.transform = transform
        self.caption_field = caption_field
        self.labels = labels
        self.label_key = label_key
        # labels read from ``label_key`` must be below this, when a class file gives the classes
        self.num_classes = num_classes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        _, stream, num_streams = stream_identity(self.settings, 0)
        report = DataReport(warn_every=self.settings.warn_every, source=f"eval stream {stream}/{num_streams}")
        last = report.snapshot()
        pending: list[tuple[torch.Tensor, str, list[str], int]] = []
        for sample in read_pass(self.settings, 0, stream, num_streams, report):
            try:
                pending.append(self._prepare(sample, report))
                report.kept += 1
            except SampleError as error:
                report.skip(error.reason, sample.url, sample.key, error.detail)
                continue
            if len(pending) == self.settings.batch_size:
                report.used += len(pending)
                yield self._collate(pending, report.delta(last))
                last = report.snapshot()
                pending = []
        report.used += len(pending)
        if pending or report.read:
            yield self._collate(pending, report.delta(last))

    def _prepare(self, sample: RawSample, report: DataReport) -> tuple[torch.Tensor, str, list[str], int]:
        settings = self.settings
        if self.caption_field == "caption":
            decoded = decode_sample(sample, settings.fields, settings.max_pixels, settings.encoding_fallback)
            image, captions, repairs = decoded.image, decoded.captions, decoded.repairs
        else:
            image = decode_image(sample.fields[settings.fields.image_field(sample)], settings.max_pixels)
            value = parse_json(sample).get(self.caption_field)
            if value is None:
                raise SampleError("missing_caption", f"KEY.json has no field {self.caption_field!r}")
            captions, repairs = split_captions(value if isinstance(value, list) else str(value))
        report.repair(repairs)
        return self.transform(image.image), sample.key, captions, self._label(sample)

    def _label(self, sample: RawSample) -> int:
        if self.labels is not None:
            return self.labels.get(sample.key, -1)
        if self.label_key and self.label_key in sample.fields:
            raw = sample.fields[self.label_key]
            try:
                label = int(raw.decode("utf-8").strip())
            except ValueError:
                raise SampleError("bad_label", repr(raw[:20])) from None
            if label < 0 or (self.num_classes is not None and label >= self.num_classes):
                allowed = f"0..{self.num_classes - 1}" if self.num_classes is not None else "0 or more"
                raise SampleError("bad_label", f"label {label} is not a class index {allowed}")
            return label
        return -1

    @staticmethod
    def _collate(pending: list, report_delta: dict[str, Any]) -> dict[str, Any]:
        if not pending:
            return {"image": None, "keys": [], "captions": [], "labels": [], "report": report_delta}
        images, keys, captions, labels = zip(*pending, strict=True)
        return {
            "image": torch.stack(images),  # (B, 3, H, W)
            "keys": list(keys),
            "captions": list(captions),
            "labels": list(labels),
            "report": report_delta,
        }
