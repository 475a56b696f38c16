"""Summaries of a builder's cache records: what the exporter exports. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from .models import INTERNAL_TYPES, RECORD_TYPES, STATES, CacheRecord


@dataclass(frozen=True)
class UsageSummary:
    """Counts and bytes by (record_type, state), plus idle bytes per window (seconds -> bytes)."""

    by_type_state: dict[tuple[str, str], tuple[int, int]]
    idle_bytes: dict[float, int]
    total_bytes: int
    total_records: int


def summarize(
    records: Iterable[CacheRecord], now: datetime, idle_windows: Sequence[float] = (),
    fresh_cache_mounts: bool = False,
) -> UsageSummary:
    """Partition records by type and state, with zeros for every known type and state.

    Idle bytes per window are what a prune keeping that duration (`prune-idle`) would take, by
    BuildKit's rule: a record is spared only if its lastUsedAt is set and within the window, so one
    never used since it was made is idle in every window, however new. `fresh_cache_mounts`: the
    builder marks cache mounts used as a prune starts (the docker driver), so they are never idle."""
    by: dict[tuple[str, str], list[int]] = {(t, s): [0, 0] for t in RECORD_TYPES for s in STATES}
    idle = {w: 0 for w in idle_windows}
    total_bytes = total_records = 0
    for r in records:
        rtype = r.record_type or "regular"
        cell = by.setdefault((rtype, r.state), [0, 0])
        cell[0] += 1
        cell[1] += r.size
        total_bytes += r.size
        total_records += 1
        if is_prunable(r, prune_all=False) and not (fresh_cache_mounts and r.record_type == "exec.cachemount"):
            unused_for = None if r.last_used_at is None else (now - r.last_used_at) / timedelta(seconds=1)
            for w in idle_windows:
                if unused_for is None or unused_for >= w:
                    idle[w] += r.size
    return UsageSummary(
        by_type_state={k: (v[0], v[1]) for k, v in by.items()},
        idle_bytes=idle,
        total_bytes=total_bytes,
        total_records=total_records,
    )


def is_prunable(record: CacheRecord, prune_all: bool) -> bool:
    """Whether BuildKit's prune may delete this record at all.

    In-use records never; shared, internal and frontend records only with `all`.
    """
    if record.in_use:
        return False
    if prune_all:
        return True
    return not record.shared and record.record_type not in INTERNAL_TYPES

