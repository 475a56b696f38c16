"""The audit trail: every decision and every outcome as one JSON line, in the log and, if
configured, in a file, counted in the actuator's metrics by the same call."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from buildkit_cache.units import format_bytes

from .decide import Decision
from .executor import DRY_RUN, INTERRUPTED, SUCCESS, UNDER_BUDGET, Outcome
from .metrics import ActuatorMetrics

log = logging.getLogger("actuator.audit")

_MAX_TEXT = 200  # values that came from an alert are cut: the log is not a place for payloads
MAX_IDS = 100  # record ids in a dry run's or a prune's line; the rest are counted
MAX_PENDING = 10_000  # audit lines kept in memory while the file cannot be written


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    return value


class AuditError(Exception):
    """A line that had to be on disk could not be written."""


class AuditLog:
    """Appends JSON lines to stderr and, with a path, to a file."""

    def __init__(self, path: str | None = None, clock: Callable[[], float] = time.time, create: bool = True):
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        if path and create:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # Fail at start, not at the first prune, if the file cannot be written.
            with open(path, "a", encoding="utf-8"):
                pass
        elif path:
            # --check-config: say whether start-up could write it, and write nothing.
            target = path if os.path.exists(path) else os.path.dirname(os.path.abspath(path))
            while not os.path.exists(target):
                target = os.path.dirname(target)
            if not os.access(target, os.W_OK):
                raise PermissionError(13, "Permission denied", path)

        self.pending: list[str] = []  # lines not yet in the file: written as soon as it can be
        # Lines recorded and not yet taken by a write: appended without the lock (the event loop
        # records, and must not wait behind a write to a slow disk), in order.
        self._incoming: collections.deque[str] = collections.deque()
        # The file is written by one thread of its own: the event loop never waits on the disk.
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self.failure = ""  # why the file cannot be written now ("" while it can)
        self.on_failure: Callable[[], None] = lambda: None

    def record(self, event: str, durable: bool = False, **fields: Any) -> dict[str, Any]:
        """Append one line. Without `durable` it is written by the audit thread, in order, and this
        returns at once. `durable` (never on the event loop): it is on disk (fsync) when this
        returns, with every line before it, or AuditError is raised and the line is not kept: what
        must be on record before something is done."""
        entry = {"ts": round(self.clock(), 3), "event": event,
                 **{k: _clean(v) for k, v in fields.items() if v is not None}}
        line = json.dumps(entry, sort_keys=False, separators=(",", ":"))
        log.info(line)
        if not self.path:
            return entry
        if not durable:
            self._incoming.append(line)
            with contextlib.suppress(RuntimeError):  # closed: close() wrote what was left
                self._writer.submit(self._write_pending)
            return entry
        with self._lock:
            self._take_incoming()
            self.pending.append(line)
            self._flush(durable)
            if self.failure:
                self.pending.remove(line)
                raise AuditError(self.failure)
        return entry

    def _take_incoming(self) -> None:
        """Move recorded lines to `pending` (under the lock), oldest first."""
        while self._incoming:
            self.pending.append(self._incoming.popleft())

    def _write_pending(self) -> None:
        with self._lock:
            self._take_incoming()
            if self.pending:
                self._flush()

    def flush(self) -> None:
        """Return once every line recorded so far was written (or found the file unwritable)."""
        with contextlib.suppress(RuntimeError):
            self._writer.submit(self._write_pending).result()

    async def check_writable(self) -> bool:
        """`writable()` in the audit thread, for the event loop."""
        return await asyncio.wrap_future(self._writer.submit(self.writable))

    def close(self) -> None:
        """Write what is left and stop the audit thread."""
        self._writer.shutdown(wait=True)
        self._write_pending()

    def writable(self) -> bool:
        """Whether the file takes lines now, writing any it could not take before. The probe asks
        the filesystem for a page past the end of the file (and gives it back): an empty append
        succeeds on a full disk, this fails where the next real line would."""
        if not self.path:
            return True
        with self._lock:
            self._take_incoming()
            self._flush()
            if not self.failure:
                self._probe()
            return not self.failure

    def _probe(self) -> None:
        if not self.path:
            return
        try:
            with open(self.path, "ab") as f:
                end = f.tell()
                try:
                    os.posix_fallocate(f.fileno(), end, 4096)
                finally:
                    f.truncate(end)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
                return  # a filesystem without fallocate: the real write is the check
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        """The file cannot take lines now: said once, counted each time, kept as the reason."""
        if not self.failure:
            log.error("cannot write the audit trail %s: %s; no new prunes until it can be written "
                      "(%d lines kept to write then)", self.path, exc.strerror or exc, len(self.pending))
        self.failure = f"cannot write the audit trail {self.path}: {exc.strerror or exc}"
        self.on_failure()

    def _flush(self, durable: bool = False) -> None:
        if not self.path:
            return
        try:
            with open(self.path, "ab") as f:
                start = f.tell()
                try:
                    f.write("".join(line + "\n" for line in self.pending).encode())
                    f.flush()
                    if durable:
                        os.fsync(f.fileno())
                except OSError:
                    # A line cut short by a full disk must not be glued to the next one: take back
                    # whatever of this write reached the file.
                    with contextlib.suppress(OSError):
                        f.truncate(start)
                    raise
        except OSError as exc:
            self._failed(exc)
            del self.pending[:-MAX_PENDING]
            return
        if self.failure:
            log.warning("the audit trail %s can be written again", self.path)
        self.failure = ""
        self.pending.clear()


def _request(d: Decision) -> dict[str, Any]:
    r = d.request
    if r is None:
        return {}
    return {k: v for k, v in (("keep_storage", r.keep_storage), ("all", r.all),
                              ("keep_duration_seconds", r.keep_duration_seconds)) if v}


def _target(d: Decision) -> dict[str, Any]:
    t = d.target
    if t is None:
        return {}
    return {k: v for k, v in (("driver", t.driver), ("container", t.container), ("address", t.address)) if v}


def _ids(ids: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The first MAX_IDS record ids, and how many more there were: to compare a dry run with the
    prune that follows it."""
    return {"record_ids": list(ids[:MAX_IDS]), "record_ids_more": max(len(ids) - MAX_IDS, 0) or None} if ids else {}


REJECTED_PER_SECOND = 5  # audit lines for rejected requests; the rest are only counted


class Recorder:
    """Each decision and outcome: one audit line and its counters, in one call."""

    def __init__(self, audit: AuditLog, metrics: ActuatorMetrics, clock: Callable[[], float] = time.time):
        self.audit = audit
        self.metrics = metrics
        self.clock = clock
        self._rejected_second = 0
        self._rejected_lines = 0

    def rejected(self, reason: str, remote: str) -> None:
        """A request refused before any alert was read. Anyone can send these: past a few lines a
        second they are counted, not written (the audit file must not fill the disk it watches)."""
        second = int(time.monotonic())
        if second != self._rejected_second:
            self._rejected_second, self._rejected_lines = second, 0
        self._rejected_lines += 1
        if self._rejected_lines > REJECTED_PER_SECOND:
            self.metrics.audit_dropped.labels("rejected").inc()
            return
        self.audit.record("rejected", reason=reason, remote=remote)

    def received(self, **fields: Any) -> None:
        self.audit.record("received", **fields)

    def decision(self, d: Decision) -> None:
        """An alert's decision: counted; audited unless accepted (its outcome is audited then)."""
        self.metrics.alerts.labels(d.action_name, d.decision).inc()
        if not d.accepted:
            self.audit.record("skipped", decision=d.decision, reason=d.reason, action=d.action_name,
                              host=d.host or None, builder=d.builder or None, fingerprint=d.fingerprint)

    def accepted(self, d: Decision) -> None:
        """An accepted prune, on disk before it starts (raises AuditError if it cannot be)."""
        self.audit.record("accepted", durable=True, **self._common(d), request=_request(d))

    def started(self, d: Decision, cache_bytes: int | None, disk_avail_bytes: int | None) -> None:
        self.audit.record("started", **self._common(d), request=_request(d), cache_bytes=cache_bytes,
                          disk_avail_bytes=disk_avail_bytes)

    def interrupted(self, d: Decision) -> None:
        """The actuator stopped while this prune ran; BuildKit may finish it on its own."""
        self.metrics.prunes.labels(d.host, d.builder, d.action_name, INTERRUPTED).inc()
        self.audit.record("failed", **self._common(d), result=INTERRUPTED,
                          reason="the actuator stopped while the prune was running; BuildKit may still finish it",
                          cooldown="kept: the claim holds until the prune's time is up")

    def outcome(self, d: Decision, o: Outcome) -> None:
        """A prune's or dry run's outcome: its audit line, `prunes_total` and the byte counters."""
        labels = (d.host, d.builder, d.action_name)
        self.metrics.prunes.labels(*labels, o.result).inc()
        common = self._common(d)
        if o.result == DRY_RUN and o.plan is not None:
            plan = o.plan
            span = (f" (between {format_bytes(plan.low)} and {format_bytes(plan.high)}: records tie in BuildKit's "
                    "order)" if plan.low != plan.high else "")
            log.warning("DRY-RUN would prune %d records, %s%s, on %s/%s (%s): %s", o.records,
                        format_bytes(o.reclaimed_bytes), span, d.host, d.builder, d.action_name,
                        ", ".join(r.id[:12] for r in plan.records[:20]) or "nothing")
            self.audit.record("dry_run", **common, request=_request(d), records=o.records, bytes=o.reclaimed_bytes,
                              bytes_low=plan.low, bytes_high=plan.high, ties=plan.ties or None,
                              cache_bytes=o.cache_bytes_before, **_ids([r.id for r in plan.records]))
            return
        if o.result == UNDER_BUDGET:
            self.audit.record("skipped", decision=UNDER_BUDGET, reason=o.reason, **common, request=_request(d),
                              cache_bytes=o.cache_bytes_before, cooldown="none: nothing was pruned")
            return
        if o.result != SUCCESS:
            if o.passes:
                self.metrics.duration.labels(d.action_name).observe(o.duration_seconds)
            if o.reclaimed_bytes:  # deleted before it failed or ran out of time: freed all the same
                self.metrics.reclaimed.labels(*labels).inc(o.reclaimed_bytes)
            self.audit.record("failed", **common, result=o.result, reason=o.reason, passes=o.passes or None,
                              records=o.records, **_ids(o.deleted_ids), reclaimed_bytes=o.reclaimed_bytes,
                              cache_bytes_before=o.cache_bytes_before, cache_bytes_after=o.cache_bytes_after,
                              cache_freed_bytes=o.cache_freed_bytes,
                              cooldown="kept: it deleted records" if o.ran else "none: retry at once")
            return
        self.metrics.duration.labels(d.action_name).observe(o.duration_seconds)
        self.metrics.reclaimed.labels(*labels).inc(o.reclaimed_bytes)
        if o.disk_freed_bytes is not None:
            self.metrics.disk_freed.labels(*labels).inc(max(o.disk_freed_bytes, 0))
        self.metrics.last_prune.labels(*labels).set(self.clock())
        self.audit.record("pruned", **common, request=_request(d), records=o.records, **_ids(o.deleted_ids),
                          reclaimed_bytes=o.reclaimed_bytes, passes=o.passes,
                          cache_bytes_before=o.cache_bytes_before, cache_bytes_after=o.cache_bytes_after,
                          cache_freed_bytes=o.cache_freed_bytes, disk_avail_bytes_before=o.disk_avail_before,
                          disk_avail_bytes_after=o.disk_avail_after, disk_freed_bytes=o.disk_freed_bytes,
                          duration_seconds=round(o.duration_seconds, 3))

    @staticmethod
    def _common(d: Decision) -> dict[str, Any]:
        return {"host": d.host, "builder": d.builder, "action": d.action_name, **_target(d),
                "fingerprint": d.fingerprint}
