"""Summaries straight from the bytes of a large answer (`GET /system/df`, `buildctl du --format json`).

The exporter only needs each record's type, state, size and last use, so these answers are decoded
by msgspec into small typed structs, skipping every other field, and summarised without building a
CacheRecord per record: at 100,000 records that is ~0.1 s instead of ~1.5 s with `json` and
`parse.parse_*` (docs/benchmarks.md). Wrong types are errors naming the field's path, like the full
parsers'; the choice of record list in an engine's reply is `parse.engine_record_list`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import msgspec

from .models import INTERNAL_TYPES, RECORD_TYPES, STATES
from .parse import ParseError, engine_record_list
from .usage import UsageSummary

_GO_ZERO_YEAR = 1


class _EngineRecord(msgspec.Struct):
    ID: str
    Type: str | None = None
    InUse: bool = False
    Shared: bool = False
    Size: int = 0
    LastUsedAt: datetime | None = None


class _EngineUsage(msgspec.Struct):
    Items: list[_EngineRecord] | None = None
    TotalCount: int | None = None


class _EngineDF(msgspec.Struct):
    BuildCache: list[_EngineRecord] | None | msgspec.UnsetType = msgspec.UNSET
    BuildCacheUsage: _EngineUsage | None = None


class _BuildctlRecord(msgspec.Struct):
    id: str
    recordType: str | None = None
    inUse: bool = False
    shared: bool = False
    size: int = 0
    lastUsedAt: datetime | None = None


_ENGINE = msgspec.json.Decoder(_EngineDF)
_BUILDCTL = msgspec.json.Decoder(list[_BuildctlRecord] | None)

# (record_type, in_use, shared, size, last_used_at) for each record.
Row = tuple[str, bool, bool, int, datetime | None]


def engine_rows(raw: bytes) -> list[Row]:
    try:
        df = _ENGINE.decode(raw)
    except msgspec.DecodeError as exc:
        raise ParseError(f"system/df: {exc}") from exc
    # The same rules as the full parser for which list holds the records (API 1.52's BuildCacheUsage).
    shape: dict[str, object] = {}
    if df.BuildCache is not msgspec.UNSET:
        shape["BuildCache"] = df.BuildCache if df.BuildCache is not None else None
    if df.BuildCacheUsage is not None:
        shape["BuildCacheUsage"] = {k: v for k, v in (("Items", df.BuildCacheUsage.Items),
                                                      ("TotalCount", df.BuildCacheUsage.TotalCount)) if v is not None}
    items: list[_EngineRecord] = engine_record_list(shape)
    return [(r.Type or "regular", r.InUse, r.Shared, r.Size, r.LastUsedAt) for r in items]


def buildctl_rows(raw: bytes) -> list[Row]:
    try:
        items = _BUILDCTL.decode(raw) if raw.strip() else None
    except msgspec.DecodeError as exc:
        raise ParseError(f"buildctl du: {exc}") from exc
    return [(r.recordType or "regular", r.inUse, r.shared, r.size, r.lastUsedAt) for r in items or ()]


def summarize_rows(rows: Sequence[Row], now: datetime, idle_windows: Sequence[float] = (),
                   fresh_cache_mounts: bool = False) -> UsageSummary:
    """`usage.summarize` on rows: the same partition and idle bytes (tests hold them equal)."""
    by: dict[tuple[str, str], list[int]] = {(t, s): [0, 0] for t in RECORD_TYPES for s in STATES}
    cutoffs = [(w, now - timedelta(seconds=w)) for w in idle_windows]
    idle = dict.fromkeys(idle_windows, 0)
    total = 0
    for rtype, in_use, shared, size, last_used in rows:
        state = "in_use" if in_use else "shared" if shared else "reclaimable"
        cell = by.get((rtype, state))
        if cell is None:
            cell = by[(rtype, state)] = [0, 0]
        cell[0] += 1
        cell[1] += size
        total += size
        if state != "reclaimable" or rtype in INTERNAL_TYPES or (fresh_cache_mounts and rtype == "exec.cachemount"):
            continue
        if last_used is not None and last_used.year == _GO_ZERO_YEAR:
            last_used = None
        for w, cutoff in cutoffs:
            if last_used is None or last_used <= cutoff:
                idle[w] += size
    return UsageSummary(by_type_state={k: (v[0], v[1]) for k, v in by.items()}, idle_bytes=idle,
                        total_bytes=total, total_records=len(rows))
