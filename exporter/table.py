"""`--once` for people: a table per Docker host, a line per builder, like `docker system df`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from buildkit_cache.config import Config
from buildkit_cache.models import FILESYSTEM, RECORDS, STATE_VOLUME, BuilderRef, CacheRecord, FilesystemUsage, TreeUsage
from buildkit_cache.units import format_duration
from buildkit_cache.usage import UsageSummary

from .collect import BuilderState, Snapshot

COLUMNS = ("BUILDER", "DRIVER", "RECORDS", "TOTAL", "RECLAIMABLE", "IDLE {window}", "STATE VOLUME",
           "FILES", "DISK USED", "INODES USED", "BUDGET")


def size(n: float | None) -> str:
    """Bytes in docker's units (powers of 1000), three significant digits: `46.4MB`."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.3g}{unit}"
        n /= 1000
    return f"{n}B"


def _value(state: BuilderState, measurement: str) -> Any:
    r = state.results.get(measurement)
    return r.value if r is not None and r.success else None


def _ratio(used: float, total: float) -> str:
    return f"{used / total:.0%}" if total else "-"


def row(state: BuilderState, cfg: Config, window: float) -> list[str]:
    ref = state.ref
    usage: UsageSummary | None = _value(state, RECORDS)
    tree: TreeUsage | None = _value(state, STATE_VOLUME)
    disk: FilesystemUsage | None = _value(state, FILESYSTEM)
    as_of = state.results[RECORDS].last_success_timestamp if usage is not None else None
    reclaimable = (sum(b for (_, s), (_, b) in usage.by_type_state.items() if s == "reclaimable")
                   if usage is not None else None)
    idle = usage.idle_bytes(as_of or 0.0, [window])[window] if usage is not None else None
    budget = cfg.budget_for(ref.host, ref.name)
    over = ""
    if budget is not None and usage is not None:
        unshared = usage.total_bytes - sum(b for (_, s), (_, b) in usage.by_type_state.items() if s == "shared")
        over = f" ({size(unshared - budget)} over)" if unshared > budget else " (under)"
    return [ref.name, ref.driver,
            str(usage.total_records) if usage is not None else "-",
            size(usage.total_bytes if usage is not None else None), size(reclaimable), size(idle),
            size(tree.bytes if tree is not None else None), f"{tree.files:,}" if tree is not None else "-",
            f"{disk.used_ratio:.0%}" if disk is not None else "-",
            _ratio(disk.files - disk.files_free, disk.files) if disk is not None else "-",
            (size(budget) + over) if budget is not None else "-"]


def render(snapshot: Snapshot, cfg: Config, failures: list[str]) -> str:
    """The tables, hosts in order, then what failed."""
    window = max(cfg.exporter.idle_windows)
    header = [c.format(window=format_duration(window)) for c in COLUMNS]
    by_host: dict[str, list[BuilderState]] = {}
    for key, state in sorted(snapshot.builders.items()):
        by_host.setdefault(key[0], []).append(state)
    out = []
    for host in sorted(set(by_host) | set(snapshot.hosts)):
        hs = snapshot.hosts.get(host)
        what = f"Docker {hs.version}, API {hs.api_version}" if hs and hs.up else ("unreachable" if hs else "remote")
        out.append(f"host {host} ({what})")
        rows = [header] + [row(s, cfg, window) for s in by_host.get(host, [])]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        out.append("")
    out.append(f"failed: {len(failures)}: " + "; ".join(failures) if failures else "all measured")
    return "\n".join(out) + "\n"


def _ago(t: datetime | None, now: datetime) -> str:
    if t is None:
        return "never"
    seconds = max((now - t).total_seconds(), 0.0)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def render_top(ref: BuilderRef, records: Sequence[CacheRecord], n: int, now: datetime, width: int = 120) -> str:
    """A builder's `n` largest records: what fills its cache (`--once --top N`). The description is
    cut to fit `width` columns."""
    largest = sorted(records, key=lambda r: r.size, reverse=True)[:n]
    total = sum(r.size for r in records)
    once = sum(r.size for r in records if r.usage_count <= 1 and not r.in_use)
    out = [f"builder {ref} ({len(records):,} records, {size(total)}; {size(once)} of them used once at most): "
           f"the {len(largest)} largest"]
    rows = [["TYPE", "STATE", "SIZE", "LAST USED", "USES", "DESCRIPTION"]]
    rows += [[r.record_type or "regular", r.state, size(r.size), _ago(r.last_used_at, now), str(r.usage_count),
              " ".join(r.description.split())] for r in largest]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    room = max(width - sum(widths) - 2 * 5 - 2, 20)
    for r in rows:
        text = r[5] if len(r[5]) <= room else r[5][:room - 1] + "…"
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + text)
    return "\n".join(line.rstrip() for line in out) + "\n"
