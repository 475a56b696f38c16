"""What the exporter exports of a builder's cache records, and the one statement of which records are
reclaimable and which idle. Pure functions."""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from .models import INTERNAL_TYPES, RECORD_TYPES, STATES, state_of

_GO_ZERO_YEAR = 1  # Go's zero time: "never used"


class RecordLike(Protocol):
    """The fields of a record the summary reads: a `CacheRecord`, or the exporter's decoded rows
    (decode.py), which skip every other field."""

    @property
    def record_type(self) -> str | None: ...
    @property
    def size(self) -> int: ...
    @property
    def in_use(self) -> bool: ...
    @property
    def shared(self) -> bool: ...
    @property
    def last_used_at(self) -> datetime | None: ...
    @property
    def usage_count(self) -> int: ...


def is_prunable(record: RecordLike, prune_all: bool) -> bool:
    """Whether BuildKit's prune may delete this record at all.

    In-use records never; shared, internal and frontend records only with `all`.
    """
    if record.in_use:
        return False
    if prune_all:
        return True
    return not record.shared and (record.record_type or "regular") not in INTERNAL_TYPES


@dataclass(frozen=True)
class IdleIndex:
    """What is kept of the records to tell idle bytes at any later time, without the records: the
    bytes never used, and the last use (Unix seconds, ascending) of every other idle-eligible record
    with the running total of their sizes. A few bytes a record."""

    never_used: int = 0
    last_used: array[float] = field(default_factory=lambda: array("d"))
    cumulative: array[int] = field(default_factory=lambda: array("q"))

    def idle_bytes(self, now: float, windows: Iterable[float]) -> dict[float, int]:
        """Bytes a prune keeping `window` seconds (`prune-idle`) would take at `now`, per window."""
        out = {}
        for w in windows:
            n = bisect_right(self.last_used, now - w)
            out[w] = self.never_used + (self.cumulative[n - 1] if n else 0)
        return out


@dataclass(frozen=True)
class UsageSummary:
    """Counts and bytes by (record_type, state), and what idle bytes are computed from."""

    by_type_state: dict[tuple[str, str], tuple[int, int]]
    total_bytes: int
    total_records: int
    idle: IdleIndex = field(default_factory=IdleIndex)
    never_reused_bytes: int = 0  # records not in use that were used once at most: built, never a cache hit (no cache mounts)

    def idle_bytes(self, now: float | datetime, windows: Sequence[float]) -> dict[float, int]:
        return self.idle.idle_bytes(now.timestamp() if isinstance(now, datetime) else now, windows)


def summarize(records: Iterable[RecordLike], fresh_cache_mounts: bool = False) -> UsageSummary:
    """Partition records by type and state, with zeros for every known type and state.

    Idle bytes are what a prune keeping a duration (`prune-idle`) would take, by BuildKit's rule: a
    record is spared only if its lastUsedAt is set and within the duration, so one never used since it
    was made is idle in every window, however new. `fresh_cache_mounts`: the builder marks cache
    mounts used as a prune starts (the docker driver), so they are never idle."""
    by: dict[tuple[str, str], list[int]] = {(t, s): [0, 0] for t in RECORD_TYPES for s in STATES}
    never_used = total = count = once = 0
    used: list[tuple[float, int]] = []
    for r in records:
        rtype, size = r.record_type or "regular", r.size
        # Never reused: a result built and never a cache hit since. Not cache mounts, which are
        # mutable and written, not hit (and whose count the engine raises whenever it measures them).
        if r.usage_count <= 1 and not r.in_use and rtype != "exec.cachemount" and rtype not in INTERNAL_TYPES:
            once += size
        cell = by.get((rtype, state := state_of(r.in_use, r.shared)))
        if cell is None:
            cell = by[(rtype, state)] = [0, 0]
        cell[0] += 1
        cell[1] += size
        total += size
        count += 1
        if state != "reclaimable" or rtype in INTERNAL_TYPES or (fresh_cache_mounts and rtype == "exec.cachemount"):
            continue
        last = r.last_used_at
        if last is None or last.year == _GO_ZERO_YEAR:
            never_used += size
        else:
            used.append((last.timestamp(), size))
    used.sort()
    running, cumulative = 0, array("q")
    for _, size in used:
        running += size
        cumulative.append(running)
    return UsageSummary(by_type_state={k: (v[0], v[1]) for k, v in by.items()}, total_bytes=total,
                        total_records=count, never_reused_bytes=once,
                        idle=IdleIndex(never_used, array("d", (t for t, _ in used)), cumulative))
