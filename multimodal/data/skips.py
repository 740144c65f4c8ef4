"""Skipped samples: counted by reason and by shard, logged without flooding, and a budget that stops
the run when too many are skipped.

A bad sample never stops training (the Design's rule), but a data set that is mostly bad is a
broken data set, or a bug in the code reading it: past `max_fraction` skipped, SkipBudgetExceeded
names the worst shards.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("multimodal.data")


class SkipBudgetExceeded(RuntimeError):
    """Too many samples were skipped: the data (or the code reading it) is broken."""


@dataclass
class SkipCounter:
    """Counts skipped samples by reason and by shard and logs them: the first `log_first` of each
    reason one by one (with shard and key), then at most one summary per reason every `log_every_s`
    seconds, so a broken shard of ten thousand samples writes a few lines, not ten thousand.

    The skip budget: once `min_samples` samples were seen (accepted + skipped), more than
    `max_fraction` of them skipped raises SkipBudgetExceeded naming the worst shards."""

    log_first: int = 5
    log_every_s: float = 60.0
    max_fraction: float | None = None
    min_samples: int = 1000
    reader: str = ""
    since_batch: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    unlogged: Counter = field(default_factory=Counter)
    last_log: dict[str, float] = field(default_factory=dict)
    by_shard: Counter = field(default_factory=Counter)
    accepted_by_shard: Counter = field(default_factory=Counter)
    skipped: int = 0
    accepted: int = 0

    def accept(self, shard: str) -> None:
        """A sample that became a tokenized sample."""
        self.accepted += 1
        self.accepted_by_shard[shard] += 1
        self.check_budget()

    def check_budget(self) -> None:
        seen = self.skipped + self.accepted
        if self.max_fraction is None or seen < self.min_samples or self.skipped <= self.max_fraction * seen:
            return
        worst = ", ".join(f"{shard} ({count} skipped, {self.accepted_by_shard[shard]} read)"
                          for shard, count in self.by_shard.most_common(3))
        raise SkipBudgetExceeded(
            f"{self.reader or 'reader'}: skipped {self.skipped} of {seen} samples "
            f"({self.skipped / seen:.1%} > max_skip_fraction {self.max_fraction:.1%}); worst shards: {worst}; "
            f"reasons: {dict(self.total)}")

    def skip(self, reason: str, shard: str, key: str | None, detail: str = "") -> None:
        self.since_batch[reason] += 1
        self.total[reason] += 1
        self.by_shard[shard] += 1
        self.skipped += 1
        where = f"{shard} key {key}" if key is not None else shard
        now = time.monotonic()
        if self.total[reason] <= self.log_first:
            logger.warning("skipped %s (%s): %s", where, reason, detail or "-")
            self.last_log[reason] = now
        elif now - self.last_log.get(reason, 0.0) >= self.log_every_s:
            logger.warning("skipped %d more samples (%s) since the last message; latest: %s: %s",
                           self.unlogged[reason] + 1, reason, where, detail or "-")
            self.unlogged[reason] = 0
            self.last_log[reason] = now
        else:
            self.unlogged[reason] += 1
        self.check_budget()

    def take(self) -> dict[str, int]:
        """The counts since the previous call (what the next Batch reports), and reset them."""
        counts = dict(self.since_batch)
        self.since_batch.clear()
        return counts

    def state(self) -> dict[str, Any]:
        """The counts (not the log's rate limiting), as plain dicts for a checkpoint."""
        return {name: dict(getattr(self, name)) for name in COUNTER_FIELDS} | {
            "skipped": self.skipped, "accepted": self.accepted}

    def restore(self, state: Mapping[str, Any]) -> None:
        for name in COUNTER_FIELDS:
            setattr(self, name, Counter(state[name]))
        self.skipped, self.accepted = state["skipped"], state["accepted"]


COUNTER_FIELDS = ("since_batch", "total", "by_shard", "accepted_by_shard")
