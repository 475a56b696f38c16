"""The one decoder of record answers: `GET /system/df`, `buildctl du --format json` and `buildctl
prune --format json`, by msgspec into typed structs. (buildctl releases without `--format` print text:
parse.py reads that, into the same CacheRecord.)

Two shapes per answer: *rows*, the fields the exporter's summary reads (type, state, size, last use)
and nothing else, summarised as they are (`usage.summarize`): at 100,000 records ~0.1 s instead of
~1.5 s with `json` and a record object each (docs/benchmarks.md); and full `CacheRecord`s for the
actuator's prune planning. Wrong types are errors naming the field's path.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from .errors import ParseError
from .models import CacheRecord

T = TypeVar("T")


class EngineRow(msgspec.Struct, gc=False):
    """The fields of a `/system/df` record the summary needs, under the names both kinds share."""

    id: str = msgspec.field(name="ID")
    record_type: str | None = msgspec.field(default=None, name="Type")
    in_use: bool = msgspec.field(default=False, name="InUse")
    shared: bool = msgspec.field(default=False, name="Shared")
    size: int = msgspec.field(default=0, name="Size")
    last_used_at: datetime | None = msgspec.field(default=None, name="LastUsedAt")
    usage_count: int = msgspec.field(default=0, name="UsageCount")


class BuildctlRow(msgspec.Struct, gc=False):
    """The same fields of a `buildctl du --format json` record."""

    id: str
    record_type: str | None = msgspec.field(default=None, name="recordType")
    in_use: bool = msgspec.field(default=False, name="inUse")
    shared: bool = False
    size: int = 0
    last_used_at: datetime | None = msgspec.field(default=None, name="lastUsedAt")
    usage_count: int = msgspec.field(default=0, name="usageCount")


class EngineFull(EngineRow, gc=False):
    created_at: datetime | None = msgspec.field(default=None, name="CreatedAt")
    description: str | None = msgspec.field(default=None, name="Description")
    # API <= 1.41: `Parent`, a string. From 1.42 a list, which 26.1 and 28.5 send under the key
    # " Parents" with a leading space (a typo in the engine's struct tag); "Parents" as documented.
    parent: str | None = msgspec.field(default=None, name="Parent")
    parents: list[str] | None = msgspec.field(default=None, name="Parents")
    parents_typo: list[str] | None = msgspec.field(default=None, name=" Parents")


class BuildctlFull(BuildctlRow, gc=False):
    mutable: bool = False
    created_at: datetime | None = msgspec.field(default=None, name="createdAt")
    description: str | None = None
    parents: list[str] | None = None


class _Usage(msgspec.Struct, gc=False):
    Items: list[Any] | None = None
    TotalCount: int | None = None


class _DF(msgspec.Struct, gc=False):
    BuildCache: list[Any] | None | msgspec.UnsetType = msgspec.UNSET
    BuildCacheUsage: _Usage | None = None


def _record_list(df: _DF) -> list[Any]:
    """The record list of a `GET /system/df` reply, from whichever shape the engine sent.

    API 1.52 (Docker 29) adds `BuildCacheUsage`, whose `Items` lists the records when asked with
    `verbose`; the legacy `BuildCache` list is sent only without `verbose` and is to be dropped. A
    reply with neither is not "no records": it is a reply this exporter does not understand.
    """
    usage = df.BuildCacheUsage
    if usage is not None:
        if usage.Items is not None:
            return usage.Items
        # Docker 29 omits every zero or empty field of BuildCacheUsage: an empty cache answers
        # `{"BuildCacheUsage":{}}` (recorded: tests/fixtures/docker-engine-29.7). A count without
        # the list means the list was not sent.
        if df.BuildCache is msgspec.UNSET:
            if not usage.TotalCount:
                return []
            raise ParseError(f"system/df: BuildCacheUsage counts {usage.TotalCount!r} records but lists none "
                             "(Items is missing: was the request made without verbose?)")
    if df.BuildCache is msgspec.UNSET:
        raise ParseError("system/df: the reply has neither BuildCache nor BuildCacheUsage; "
                         "the engine did not report its build cache")
    return df.BuildCache or []  # null: an empty cache, as older engines say it


def _engine(answer: bytes | Mapping[str, Any], kind: type[T]) -> list[T]:
    try:
        df = msgspec.json.decode(answer, type=_DF) if isinstance(answer, bytes) else msgspec.convert(answer, _DF)
        return msgspec.convert(_record_list(df), list[kind])  # type: ignore[valid-type]
    except msgspec.ValidationError as exc:
        raise ParseError(f"system/df: not the answer expected: {_where(exc, '$', 'BuildCache')}") from exc
    except msgspec.DecodeError as exc:
        raise ParseError(f"system/df: not JSON: {exc}") from exc


def _where(exc: Exception, root: str, name: str) -> str:
    return str(exc).replace(f"`{root}[", f"`{name}[").replace(f"`{root}`", f"`{name}`")


def engine_rows(answer: bytes | Mapping[str, Any]) -> list[EngineRow]:
    """The rows of a `/system/df` answer (its bytes, or the decoded JSON)."""
    return _engine(answer, EngineRow)


def engine_records(answer: bytes | Mapping[str, Any]) -> list[CacheRecord]:
    """The full records of a `/system/df` answer (API 1.39 to 1.52 shapes)."""
    out = []
    for r in _engine(answer, EngineFull):
        parents = r.parents or r.parents_typo or ([r.parent] if r.parent else [])
        out.append(_record(r, r.record_type or "regular", None, parents))
    return out


def _buildctl(text: bytes | str, kind: type[T]) -> list[T]:
    raw = text.encode() if isinstance(text, str) else text
    if not raw.strip():  # buildctl prints `[]` or `null` for none: nothing at all is a lost answer
        raise ParseError("buildctl du: printed nothing (no records would be `[]`)")
    try:
        items = msgspec.json.decode(raw, type=list[kind] | None)  # type: ignore[valid-type]
    except msgspec.ValidationError as exc:
        raise ParseError(f"buildctl du: not the records expected (a JSON array): {_where(exc, '$', 'du')}") from exc
    except msgspec.DecodeError as exc:
        raise ParseError(f"buildctl du: not JSON: {exc}") from exc
    return items or []


def buildctl_rows(text: bytes | str) -> list[BuildctlRow]:
    """The rows of `buildctl du --format json` (or `'{{json .}}'`)."""
    return _buildctl(text, BuildctlRow)


def buildctl_records(text: bytes | str) -> list[CacheRecord]:
    """The full records of `buildctl du --format json` (or `'{{json .}}'`)."""
    return [_record(r, r.record_type or "", r.mutable, r.parents or []) for r in _buildctl(text, BuildctlFull)]


def buildctl_prune_records(text: str) -> list[CacheRecord]:
    """`buildctl prune --format json` / `'{{json .}}'`: one JSON record per deleted record and line."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = msgspec.json.decode(line, type=BuildctlFull)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ParseError(f"buildctl prune line {n}: not a JSON record ({exc})") from exc
        out.append(_record(r, r.record_type or "", r.mutable, r.parents or []))
    return out


def _record(r: EngineFull | BuildctlFull, record_type: str, mutable: bool | None, parents: list[str]) -> CacheRecord:
    return CacheRecord(id=r.id, record_type=record_type, size=r.size, in_use=r.in_use, shared=r.shared,
                       mutable=mutable, created_at=_time(r.created_at), last_used_at=_time(r.last_used_at),
                       usage_count=r.usage_count, parents=tuple(parents), description=r.description or "")


def _time(t: datetime | None) -> datetime | None:
    return None if t is None or t.year == 1 else t  # Go's zero time: never
