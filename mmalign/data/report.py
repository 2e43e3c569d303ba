"""The one handler for bad samples: skip, count by reason, warn, and report.

Every stage that drops a sample (missing fields, undecodable images, empty
captions, truncated shards) calls :meth:`DataReport.skip`; every repair that
keeps a sample but changes its text (a byte-order mark removed, a legacy
encoding decoded, a caption truncated to the context length) calls
:meth:`DataReport.repair`. Counts travel with each batch as deltas, so the
training process can sum them over loader workers and over processes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mmalign.data.reader import DataError, ShardTruncated

logger = logging.getLogger("mmalign.data")


@dataclass
class DataReport:
    """Counts of samples read, used, skipped (by reason) and repaired (by kind)."""

    warn_every: int = 1000
    read: int = 0
    used: int = 0
    # samples that decoded and wait to be used: read - kept - skipped are still undecoded
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    truncated_shards: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, url: str, key: str, detail: str = "") -> None:
        """Count one skipped sample; log the first one and every ``warn_every``-th after it."""
        self.skipped[reason] += 1
        total = self.total_skipped
        if total == 1 or total % self.warn_every == 0:
            logger.warning(
                "%sskipped sample %s in %s: %s%s (%d skipped so far: %s)",
                f"{self.source}: " if self.source else "",
                key,
                url,
                reason,
                f" ({detail})" if detail else "",
                total,
                format_counts(self.skipped),
            )

    def repair(self, kinds: list[str]) -> None:
        for kind in kinds:
            self.repaired[kind] += 1

    def truncated(self, event: ShardTruncated) -> None:
        """Record a cut-off shard; the sample the cut broke, if any, counts as read and skipped."""
        self.truncated_shards.append({"shard": event.url, "key": event.key, "complete_samples": event.complete_samples})
        if event.broken:
            self.read += 1
            self.skipped["truncated_shard"] += 1
        logger.warning(
            "shard %s is truncated %s, after %d complete samples (%s); "
            "the rest of the shard is lost: re-copy it, or run `mmalign shards verify` for the count",
            event.url,
            f"inside sample {event.key}" if event.broken else event.key,
            event.complete_samples,
            event.error,
        )

    def check_fraction(self, max_fraction: float, min_read: int) -> None:
        """Raise DataError when more than ``max_fraction`` of the samples checked so far were skipped.

        Samples still waiting undecoded in a shuffle buffer are not counted yet.
        """
        checked = self.kept + self.total_skipped
        if checked < min_read or checked == 0:
            return
        fraction = self.total_skipped / checked
        if fraction > max_fraction:
            raise DataError(
                f"{self.total_skipped} of {checked} samples checked ({fraction:.1%}) were skipped, more than "
                f"data.max_skip_fraction={max_fraction}: {format_counts(self.skipped)}. "
                "Run `mmalign shards verify` on the shards and fix the data or the image/caption keys; "
                "raise data.max_skip_fraction only if losing that share of the data is acceptable"
            )

    def delta(self, since: DataReport) -> dict[str, Any]:
        """Return what changed since the snapshot ``since``, as a plain dict."""
        return {
            "read": self.read - since.read,
            "used": self.used - since.used,
            "kept": self.kept - since.kept,
            "skipped": dict(self.skipped - since.skipped),
            "repaired": dict(self.repaired - since.repaired),
            "truncated_shards": self.truncated_shards[len(since.truncated_shards) :],
        }

    def snapshot(self) -> DataReport:
        return DataReport(
            warn_every=self.warn_every,
            read=self.read,
            used=self.used,
            kept=self.kept,
            skipped=Counter(self.skipped),
            repaired=Counter(self.repaired),
            truncated_shards=list(self.truncated_shards),
            source=self.source,
        )

    def add(self, delta: dict[str, Any]) -> None:
        """Add a delta produced by :meth:`delta` (from a loader worker or another process)."""
        self.read += delta.get("read", 0)
        self.used += delta.get("used", 0)
        self.kept += delta.get("kept", 0)
        self.skipped.update(delta.get("skipped", {}))
        self.repaired.update(delta.get("repaired", {}))
        self.truncated_shards.extend(delta.get("truncated_shards", []))

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "used": self.used,
            "kept": self.kept,
            "skipped": self.total_skipped,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "repaired_by_kind": dict(sorted(self.repaired.items())),
            "truncated_shards": list(self.truncated_shards),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], warn_every: int = 1000) -> DataReport:
        return cls(
            warn_every=warn_every,
            read=data.get("read", 0),
            used=data.get("used", 0),
            kept=data.get("kept", data.get("used", 0)),
            skipped=Counter(data.get("skipped_by_reason", {})),
            repaired=Counter(data.get("repaired_by_kind", {})),
            truncated_shards=list(data.get("truncated_shards", [])),
        )

    def summary(self) -> str:
        ahead = self.read - self.used - self.total_skipped
        text = f"{self.read} samples read, {self.used} used, {self.total_skipped} skipped"
        if ahead > 0:
            # the shuffle buffer and the prefetched batches hold samples read but not yet trained on
            text += f", {ahead} read ahead but not used yet"
        if self.skipped:
            text += f" ({format_counts(self.skipped)})"
        if self.repaired:
            text += f"; repaired: {format_counts(self.repaired)}"
        if self.truncated_shards:
            shards = ", ".join(f"{item['shard']} at {item['key']}" for item in self.truncated_shards[:5])
            text += f"; truncated shards: {shards}"
        return text


def format_counts(counts: Counter | dict[str, int]) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in sorted(counts.items())) or "none"
