"""Which records a prune would delete, by BuildKit's own selection rules. Pure functions.

Used for dry runs. The rules, from BuildKit's cache manager (`cache/manager.go`, prune and
sortDeleteRecords):
- a record in use is never deleted; shared, internal and frontend records only with `all`;
- with a keep duration, records used more recently than that are kept;
- a record is deletable only once no other record has it as a parent (children go first). Deleting
  an immutable record frees its parent within the same prune; deleting a mutable one does not (its
  parent goes in a later prune): so recorded real prunes of buildkitd show (tests/fixtures/buildctl);
- with keep-storage, BuildKit deletes one record at a time while the total of non-shared records
  is at or above the target, each time taking the lowest of (rank by last use / highest rank) +
  (rank by usage count / highest rank) among the deletable records: least recently and least often
  used first. Without keep-storage it deletes every eligible record, leaves first.

It is an estimate: BuildKit also holds records no listing reveals (such as a finished session's
local sources for a while), so the bytes of a keep-storage prune agree closely (BuildKit stops once
under the target either way) while the exact records may differ. One engine behaviour is known and
modelled (`fresh_cache_mounts`): dockerd's embedded BuildKit (measured on 20.10, 26.1 and 28.5, both
image stores) marks every `RUN --mount=type=cache` record as used whenever it computes disk usage,
which every `/system/df` and every keep-storage prune does. At the moment of a prune they therefore
count as just used: a keep-storage prune takes them last, an `until` prune never, while a prune
without either (and `all`) takes them. A standalone buildkitd does not (recorded prunes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from .models import CacheRecord, PruneRequest
from .usage import is_prunable


def _eligible(r: CacheRecord, req: PruneRequest, cutoff: datetime | None) -> bool:
    if not is_prunable(r, prune_all=req.all):
        return False
    if cutoff is not None and r.last_used_at is not None and r.last_used_at > cutoff:
        return False
    return True


def delete_order(candidates: list[CacheRecord]) -> list[CacheRecord]:
    """BuildKit's sortDeleteRecords: least recently and least often used first."""
    if not candidates:
        return []
    by_last = sorted(candidates, key=lambda r: (r.last_used_at is not None, r.last_used_at or datetime.min))
    last_index: dict[str, int] = {}
    max_last, latest = 0, None
    for r in by_last:
        if r.last_used_at is not None and (latest is None or r.last_used_at > latest):
            latest = r.last_used_at
            max_last += 1
        last_index[r.id] = max_last
    by_count = sorted(by_last, key=lambda r: r.usage_count)
    count_index: dict[str, int] = {}
    max_count, current = 0, 0
    for r in by_count:
        if r.usage_count != current:
            current = r.usage_count
            max_count += 1
        count_index[r.id] = max_count

    def score(r: CacheRecord) -> float:
        a = last_index[r.id] / max_last if max_last else 0.0
        b = count_index[r.id] / max_count if max_count else 0.0
        return a + b

    return sorted(by_count, key=score)


def plan_prune(records: Iterable[CacheRecord], req: PruneRequest, now: datetime,
               fresh_cache_mounts: bool = False) -> list[CacheRecord]:
    """The records a prune with `req` would delete, in the order BuildKit would delete them.

    `fresh_cache_mounts`: the builder marks cache mounts used as the prune starts (see above).
    """
    if fresh_cache_mounts:
        records = [replace(r, last_used_at=now) if r.record_type == "exec.cachemount" else r for r in records]
    remaining = {r.id: r for r in records}
    children = Counter(p for r in remaining.values() for p in r.parents)
    cutoff = now - timedelta(seconds=req.keep_duration_seconds) if req.keep_duration_seconds else None
    deleted: list[CacheRecord] = []

    def deletable() -> list[CacheRecord]:
        return [r for r in remaining.values() if children[r.id] == 0 and _eligible(r, req, cutoff)]

    def delete(r: CacheRecord) -> None:
        del remaining[r.id]
        deleted.append(r)
        if r.mutable:
            return
        for p in r.parents:
            children[p] -= 1

    if req.keep_storage:
        total = sum(r.size for r in remaining.values() if not r.shared)
        while total >= req.keep_storage:
            order = delete_order(deletable())
            if not order:
                break
            delete(order[0])
            total -= order[0].size
    else:
        while batch := deletable():
            for r in batch:
                delete(r)
    return deleted
