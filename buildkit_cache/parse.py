"""Parsers for what Docker and BuildKit print. Pure functions, tested on recorded real outputs.

Record lists in JSON are decoded in one place, decode.py; the functions here for them are its
entry points under the names the rest of the project knows, beside the text fallbacks."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from . import decode
from .errors import ParseError
from .models import CacheRecord, FilesystemUsage, GCRule, WorkerInfo
from .units import parse_go_duration, parse_human_size

__all__ = ["ParseError"]

_GO_ZERO_YEAR = 1


def parse_timestamp(value: Any) -> datetime | None:
    """RFC 3339 with nanoseconds ('...:00.710569901Z'), Go's default format, or null; Go's zero time is None."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    # Go's time.String(): "2026-11-22 15:37:00.710569901 +0000 UTC"
    m = re.match(r"^(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d+)?) ([+-]\d{4})(?: \S+)?$", text)
    if m:
        text = f"{m.group(1)}T{m.group(2)}{m.group(3)[:3]}:{m.group(3)[3:]}"
    # Python keeps microseconds: longer fractions are rounded to them, as msgspec does (decode.py),
    # so a record read from text and from JSON has one time.
    fraction = re.search(r"\.(\d+)", text)
    extra = timedelta(0)
    if fraction and len(fraction.group(1)) > 6:
        nanos = int(fraction.group(1)[:9].ljust(9, "0"))
        micros = (nanos + 500) // 1000
        extra = timedelta(microseconds=micros)
        text = text[:fraction.start()] + text[fraction.end():]
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00")) + extra
    except ValueError as exc:
        raise ParseError(f"bad timestamp {value!r}") from exc
    if ts.year == _GO_ZERO_YEAR:
        return None
    return ts


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParseError(f"{what}: expected a number, got {value!r}")
    return int(value)


def parse_engine_build_cache(df: Mapping[str, Any] | bytes) -> list[CacheRecord]:
    """Records from the Engine API's `GET /system/df` (API 1.39 to 1.52 shapes)."""
    if not isinstance(df, (Mapping, bytes)):
        raise ParseError("system/df: expected a JSON object")
    return decode.engine_records(df)


def parse_buildctl_du_json(text: str) -> list[CacheRecord]:
    """`buildctl du --format json` (or `'{{json .}}'`): one JSON array of records."""
    return decode.buildctl_records(text)


def _verbose_blocks(text: str) -> list[dict[str, str]]:
    """Split `Key:\\tvalue` blocks separated by blank lines (buildctl's -v output)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ParseError(f"unexpected line {line!r}")
        current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def parse_buildctl_du_verbose(text: str) -> list[CacheRecord]:
    """`buildctl du -v`, for buildctl releases without `--format`. Sizes have two decimals of their unit."""
    records = []
    for block in _verbose_blocks(text):
        if "ID" not in block:
            continue  # the closing "Reclaimable:/Total:" summary
        try:
            records.append(
                CacheRecord(
                    id=block["ID"],
                    record_type=block.get("Type", ""),
                    size=parse_human_size(block.get("Size", "0B")),
                    # -v prints "Reclaimable", which buildctl computes as "not in use".
                    in_use=block.get("Reclaimable", "true") != "true",
                    shared=block.get("Shared", "false") == "true",
                    mutable=block.get("Mutable", "false") == "true",
                    created_at=parse_timestamp(block.get("Created at")),
                    last_used_at=parse_timestamp(block.get("Last used")),
                    usage_count=int(block.get("Usage count", "0") or 0),
                    parents=tuple(p for p in re.split(r"[\s,;]+", block.get("Parents", "")) if p),
                    description=block.get("Description", ""),
                )
            )
        except ValueError as exc:
            raise ParseError(f"buildctl du -v, record {block.get('ID')}: {exc}") from exc
    return records


def _gc_rule_json(item: Mapping[str, Any], what: str) -> GCRule:
    if not isinstance(item, Mapping):
        raise ParseError(f"{what}: not a GC rule")
    # BuildKit before v0.17 had only keepBytes, which capped total use: today's maxUsedSpace.
    max_used = item.get("maxUsedSpace") or item.get("keepBytes") or 0
    return GCRule(
        all=bool(item.get("all", False)),
        filters=tuple(str(f) for f in (item.get("filter") or item.get("filters") or ())),
        keep_duration_seconds=_int(item.get("keepDuration", 0) or 0, f"{what}.keepDuration") / 1e9,
        reserved_bytes=_int(item.get("reservedSpace", 0) or 0, f"{what}.reservedSpace"),
        max_used_bytes=_int(max_used, f"{what}.maxUsedSpace"),
        min_free_bytes=_int(item.get("minFreeSpace", 0) or 0, f"{what}.minFreeSpace"),
    )


def parse_debug_workers_json(text: str) -> WorkerInfo:
    """`buildctl debug workers --format json`: the first worker's GC policy and BuildKit version."""
    if not text.strip():
        raise ParseError("buildctl debug workers: printed nothing")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"buildctl debug workers: not JSON ({exc.msg})") from exc
    if not isinstance(data, list) or not data or not isinstance(data[0], Mapping):
        raise ParseError("buildctl debug workers: expected a non-empty JSON array of workers")
    worker = data[0]
    rules = tuple(
        _gc_rule_json(r, f"workers[0].gcPolicy[{i}]") for i, r in enumerate(worker.get("gcPolicy") or ())
    )
    version = worker.get("buildkitVersion") or {}
    return WorkerInfo(gc_rules=rules, buildkit_version=str(version.get("version", "")))


_RULE_HEADER = re.compile(r"^GC Policy rule#(\d+):\s*$")


def parse_debug_workers_verbose(text: str) -> WorkerInfo:
    """`buildctl debug workers --verbose`, for buildctl releases without `--format`."""
    version = ""
    rules: list[dict[str, str]] = []
    in_worker = False
    for line in text.splitlines():
        if _RULE_HEADER.match(line):
            rules.append({})
            continue
        if line.startswith("ID:"):
            if in_worker:
                break  # first worker only
            in_worker = True
        if line.startswith("BuildKit:") and not version:
            parts = line.split()
            version = parts[2] if len(parts) > 2 else ""
        if rules and line.startswith("\t"):
            key, _, value = line.strip().partition(":")
            rules[-1][key.strip()] = value.strip()
    parsed = []
    for i, r in enumerate(rules):
        try:
            parsed.append(
                GCRule(
                    all=r.get("All", "false") == "true",
                    filters=tuple(r.get("Filters", "").split()),
                    keep_duration_seconds=parse_go_duration(r.get("Keep duration", "0s")),
                    reserved_bytes=parse_human_size(r.get("Reserved space", "0B")),
                    max_used_bytes=parse_human_size(
                        r.get("Maximum used space") or r.get("Keep bytes") or "0B"
                    ),
                    min_free_bytes=parse_human_size(r.get("Minimum free space", "0B")),
                )
            )
        except ValueError as exc:
            raise ParseError(f"buildctl debug workers -v, rule#{i}: {exc}") from exc
    return WorkerInfo(gc_rules=tuple(parsed), buildkit_version=version)


def _df_numbers(text: str, what: str) -> tuple[int, int, int]:
    """The total, used and available columns of `df` output for one path.

    Columns are read by position after the header, never by the mount name: in a container,
    "Mounted on" may name another mount of the same device. GNU df wraps a long device name onto
    its own line, so the data lines are joined first.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or not lines[0].startswith("Filesystem"):
        raise ParseError(f"{what}: expected a header line and one filesystem")
    tokens = " ".join(lines[1:]).split()
    for i in range(1, len(tokens) - 3):
        a, b, c, pct = tokens[i : i + 4]
        if a.isdigit() and b.isdigit() and c.isdigit() and (pct.endswith("%") or pct == "-"):
            return int(a), int(b), int(c)
    raise ParseError(f"{what}: no numeric columns in {text!r}")


def parse_df(df_k: str, df_i: str) -> FilesystemUsage:
    """`df -k PATH` and `df -i PATH` into node_exporter's size/free/avail/files/files_free."""
    blocks, used, avail = _df_numbers(df_k, "df -k")
    inodes, _iused, ifree = _df_numbers(df_i, "df -i")
    return FilesystemUsage(
        size_bytes=blocks * 1024, avail_bytes=avail * 1024, files=inodes, files_free=ifree,
        free_bytes=(blocks - used) * 1024,
    )


def parse_du_sk(text: str) -> int:
    """`du -sk PATH` into bytes."""
    first = text.strip().split()
    if not first or not first[0].isdigit():
        raise ParseError(f"du -sk: expected '<kilobytes> <path>', got {text.strip()[:80]!r}")
    return int(first[0]) * 1024


def parse_buildctl_prune_json(text: str) -> list[CacheRecord]:
    """`buildctl prune --format json` / `'{{json .}}'`: one JSON record per deleted record and line."""
    return decode.buildctl_prune_records(text)


def parse_buildctl_prune_table(text: str) -> tuple[list[str], int]:
    """`buildctl prune` table: ids deleted and the reported total (bytes, to two decimals of its unit)."""
    ids: list[str] = []
    total = 0
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] == "ID":
            continue
        if parts[0] == "Total:":
            total = parse_human_size(parts[1])
            continue
        ids.append(parts[0].rstrip("*"))
    return ids, total
