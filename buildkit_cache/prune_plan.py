"""Which records a prune would delete, by BuildKit's own algorithm. Pure functions, for dry runs.

BuildKit v0.32's cache manager (`cache/manager.go`: `prune`, `pruneOnce`, `sortDeleteRecords`):

- `prune` sums the sizes of the records DiskUsage lists that are not shared (`totalSize`), and
  takes `keepBytes` from the request (`calculateKeepBytes`): max-used-space, lowered so that
  min-free-space is free, never below reserved-space. keep-storage is max-used-space for buildctl
  and API 1.48+, reserved-space below 1.48: alone, each is that cap.
- Each `pruneOnce` takes the records with no references at all: not in use, and no child left
  (a child holds its parents; deleting it releases them for the next `pruneOnce`). Of those it
  skips, unless `all`, the internal, frontend and shared ones (the engine's `private` filter says
  the same), and with a keep duration those used within it (a record never used is never spared).
- With keepBytes (gc mode) it deletes ONE record per `pruneOnce`, while `totalSize` is at or above
  keepBytes, taking the lowest `lastUsedIndex/max + usageCountIndex/max` (`sortDeleteRecords`:
  the rank of its last use among the distinct last uses, and of its usage count among the distinct
  counts, both from 1, over the records it may take now); `totalSize` drops by each one's size.
  Without keepBytes it deletes every record it may take, over and over until none is left.

BuildKit sorts with Go's unstable sort over a map's order: where records tie on that score, which
one goes first is not known. The plan breaks ties towards the smallest record, and says the order
was open (`Plan.ties`). Where it was, the bytes freed are given as a range (`Plan.low`, `high`):
ties decide which records go, not where BuildKit stops (once the total is under keepBytes), so it
frees at least what takes the total under and less than that plus the largest record it may take.
Without a cap, which records go does not depend on the order at all.

The score is the same float64 arithmetic as BuildKit's, so ties are the same ties. Scores are kept
per usage count (the lowest score in a class is its least recently used record), so a plan of
100,000 records takes a fraction of a second where re-sorting for every deletion, as BuildKit does,
would take minutes (docs/benchmarks.md, "Big caches").

One engine behaviour is modelled (`fresh_cache_mounts`): dockerd's embedded BuildKit before Docker
29 marks every `RUN --mount=type=cache` record used whenever it computes disk usage, which a prune
does: at the prune they count as just used (measured on 20.10, 26.1 and 28.5; see builders.py).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from .models import CacheRecord, PruneRequest
from .usage import is_prunable


@dataclass(frozen=True)
class Plan:
    """What a prune would delete: `records` in BuildKit's order (ties broken towards the smallest),
    and the bytes it would free, from `low` to `high` where ties leave the order open."""

    records: tuple[CacheRecord, ...]
    low: int
    high: int
    total_before: int  # the non-shared bytes BuildKit counts against keep-storage
    keep_bytes: int  # 0: no cap, every record it may take
    ties: bool = False  # records tied for BuildKit's next choice: the order is not known

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.records)

    @property
    def tied(self) -> bool:
        return self.low != self.high

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.records)


def keep_bytes(total: int, req: PruneRequest, disk_free: int | None = None, *, max_used: int = 0,
               reserved: int = 0, min_free: int = 0) -> int:
    """BuildKit's calculateKeepBytes. `req.keep_storage` is max-used-space (buildctl, API 1.48+) or
    reserved-space (API < 1.48): alone, both are the cap itself."""
    max_used = max_used or req.keep_storage
    if not (max_used or reserved or min_free):
        return 0
    keep = max_used
    if min_free and disk_free is not None and min_free - disk_free > 0:
        excess = min_free - disk_free
        keep = total - excess if keep == 0 else min(keep, total - excess)
    elif min_free and keep == 0:
        keep = total
    return max(keep, reserved)


def _eligible(r: CacheRecord, req: PruneRequest, cutoff: datetime | None) -> bool:
    if not is_prunable(r, prune_all=req.all):
        return False
    return not (cutoff is not None and r.last_used_at is not None and r.last_used_at > cutoff)


def plan_prune(records: Iterable[CacheRecord], req: PruneRequest, now: datetime,
               fresh_cache_mounts: bool = False, disk_free: int | None = None) -> Plan:
    """What a prune with `req` would delete now, in the order BuildKit would delete it."""
    if fresh_cache_mounts:
        records = [replace(r, last_used_at=now) if r.record_type == "exec.cachemount" else r for r in records]
    recs = list({r.id: r for r in records}.values())
    total = sum(r.size for r in recs if not r.shared)
    keep = keep_bytes(total, req, disk_free)
    cutoff = now - timedelta(seconds=req.keep_duration_seconds) if req.keep_duration_seconds else None
    if not keep:
        deleted = _prune_all_eligible(recs, req, cutoff)
        freed = sum(r.size for r in deleted)
        return Plan(tuple(deleted), freed, freed, total, 0)
    deleted, ties = _gc_prune(recs, req, cutoff, total, keep)
    freed = sum(r.size for r in deleted)
    low = high = freed
    if ties and total - freed < keep:
        # Ties leave BuildKit's order open, not where it stops: once the total is under `keep`. So
        # it frees at least what takes the total under, and less than that plus its last record,
        # which may be any record it may take.
        reachable = _prune_all_eligible(recs, req, cutoff)
        low = total - keep + 1
        high = min(total - keep + max(r.size for r in reachable), sum(r.size for r in reachable))
    return Plan(tuple(deleted), low, high, total, keep, ties)


def _children(recs: Sequence[CacheRecord]) -> Counter[str]:
    return Counter(p for r in recs for p in set(r.parents))


def _prune_all_eligible(recs: Sequence[CacheRecord], req: PruneRequest, cutoff: datetime | None) -> list[CacheRecord]:
    """Without a cap: every record it may take, leaves first, until none is left."""
    by_id = {r.id: r for r in recs}
    children = _children(recs)
    eligible = {r.id for r in recs if _eligible(r, req, cutoff)}
    ready = [i for i in eligible if children[i] == 0]
    deleted: list[CacheRecord] = []
    while ready:
        batch, ready = ready, []
        for i in batch:
            deleted.append(by_id[i])
            for p in set(by_id[i].parents):
                children[p] -= 1
                if children[p] == 0 and p in eligible:
                    ready.append(p)
    return deleted


class _Fenwick:
    """Counts over positions 1..n, with prefix sums."""

    def __init__(self, n: int):
        self.tree = [0] * (n + 1)

    def add(self, i: int, delta: int) -> None:
        tree, n = self.tree, len(self.tree)
        while i < n:
            tree[i] += delta
            i += i & -i

    def prefix(self, i: int) -> int:
        tree, total = self.tree, 0
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total


class _Candidates:
    """The records BuildKit may delete now, ready for `sortDeleteRecords`' first choice.

    Kept per usage count in a heap by last use: a class's first is its lowest score. The rank of a
    class's first last use among the candidates' distinct last uses (a Fenwick tree over all last
    uses) is kept up to date as distinct last uses come and go, so a choice costs a few steps per
    usage count, not a sort."""

    def __init__(self, recs: Sequence[CacheRecord]):
        stamps = sorted({r.last_used_at for r in recs if r.last_used_at is not None})
        position = {t: i + 1 for i, t in enumerate(stamps)}
        self.pos = [position[r.last_used_at] if r.last_used_at is not None else 0 for r in recs]  # 0: never
        self.usage = [r.usage_count for r in recs]
        self.size = [r.size for r in recs]
        self.fenwick = [0] * (len(stamps) + 1)  # 1 where some candidate was last used at that time
        self.at_time = [0] * (len(stamps) + 1)
        self.distinct = 0  # distinct last uses among candidates
        self.counts: list[int] = []  # distinct non-zero usage counts among candidates, sorted
        self.in_class: dict[int, int] = {}
        self.heaps: dict[int, list[tuple[int, int, int]]] = {}  # per usage count: (position, size, k)
        self.first: dict[int, list[int]] = {}  # per usage count: [its first's k, its last use's rank]
        self.live = [False] * len(recs)

    def _shift(self, q: int, delta: int) -> None:
        """A distinct last use at position q came (+1) or went (-1): ranks at or after it move."""
        self.distinct += delta
        tree, i = self.fenwick, q
        while i < len(tree):
            tree[i] += delta
            i += i & -i
        for first in self.first.values():
            if self.pos[first[0]] >= q:
                first[1] += delta

    def _rank(self, q: int) -> int:
        tree, total = self.fenwick, 0
        while q > 0:
            total += tree[q]
            q -= q & -q
        return total

    def add(self, k: int) -> None:
        q, u = self.pos[k], self.usage[k]
        if q:
            if self.at_time[q] == 0:
                self._shift(q, 1)
            self.at_time[q] += 1
        c = self.in_class.get(u, 0)
        if c == 0:
            self.heaps[u] = []
            if u:
                insort(self.counts, u)
        self.in_class[u] = c + 1
        heapq.heappush(self.heaps[u], (q, self.size[k], k))
        self.live[k] = True

    def take(self, k: int) -> None:
        q, u = self.pos[k], self.usage[k]
        self.live[k] = False
        if q:
            self.at_time[q] -= 1
            if self.at_time[q] == 0:
                self._shift(q, -1)
        self.in_class[u] -= 1
        if self.in_class[u] == 0:
            del self.heaps[u]
            self.first.pop(u, None)
            if u:
                del self.counts[bisect_left(self.counts, u)]

    def choose(self) -> tuple[int, bool]:
        """BuildKit's next deletion (ties: the smallest record), and whether another tied with it;
        -1 when there is none."""
        max_last, max_count = 1.0 + self.distinct, 1.0 + len(self.counts)
        best: tuple[float, int, int] | None = None
        best_u, tied = 0, False
        for u, heap in self.heaps.items():
            while not self.live[heap[0][2]]:
                heapq.heappop(heap)
            q, size, k = heap[0]
            first = self.first.get(u)
            if first is None or first[0] != k:
                first = self.first[u] = [k, self._rank(q) if q else 0]
            count_index = 1.0 + (bisect_right(self.counts, u) if u else 0)
            score = (1.0 + first[1]) / max_last + count_index / max_count  # BuildKit's float64 arithmetic
            if best is not None and score == best[0]:
                tied = True
            elif best is None or score < best[0]:
                tied = False
            if best is None or (score, size, k) < best:
                best, best_u = (score, size, k), u
        if best is None:
            return -1, False
        # Another record of that class, last used at the same time, has the same score.
        heap, q = self.heaps[best_u], self.pos[best[2]]
        return best[2], tied or any(j < len(heap) and heap[j][0] == q and self.live[heap[j][2]] for j in (1, 2))


def _gc_prune(recs: Sequence[CacheRecord], req: PruneRequest, cutoff: datetime | None, total: int,
              keep: int) -> tuple[list[CacheRecord], bool]:
    """gc mode: one record at a time, the lowest score among those it may take now, while the
    total is at or above `keep`. Ties go to the smallest record; whether any choice was tied is
    returned with the records."""
    index = {r.id: k for k, r in enumerate(recs)}
    parents = [[index[p] for p in set(r.parents) if p in index] for r in recs]
    children = [0] * len(recs)
    for ps in parents:
        for p in ps:
            children[p] += 1
    eligible = [_eligible(r, req, cutoff) for r in recs]
    candidates = _Candidates(recs)
    for k, ok in enumerate(eligible):
        if ok and children[k] == 0:
            candidates.add(k)
    deleted: list[CacheRecord] = []
    ties = False
    while total >= keep:
        k, tied = candidates.choose()
        if k < 0:
            break
        ties = ties or tied
        candidates.take(k)
        deleted.append(recs[k])
        total -= recs[k].size
        for p in parents[k]:
            children[p] -= 1
            if children[p] == 0 and eligible[p]:
                candidates.add(p)
    return deleted, ties


def delete_order(candidates: Sequence[CacheRecord]) -> list[CacheRecord]:
    """BuildKit's sortDeleteRecords over a fixed set of records: the order of their scores (ties to
    the smallest record)."""
    stamps = sorted({r.last_used_at for r in candidates if r.last_used_at is not None})
    counts = sorted({r.usage_count for r in candidates if r.usage_count})
    max_last, max_count = 1.0 + len(stamps), 1.0 + len(counts)

    def score(r: CacheRecord) -> tuple[float, int, str]:
        last = 1.0 + (bisect_right(stamps, r.last_used_at) if r.last_used_at is not None else 0)
        count = 1.0 + (bisect_right(counts, r.usage_count) if r.usage_count else 0)
        return last / max_last + count / max_count, r.size, r.id

    return sorted(candidates, key=score)
