"""Runs accepted prunes in the background: once per incident, one at a time per builder.

`submit` is synchronous and runs on the event loop, so the cooldown check and the claim that
follows it cannot interleave: of 50 copies of a notification arriving together, one is accepted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from buildkit_cache.builders import FILESYSTEM, Builder
from buildkit_cache.config import Config
from buildkit_cache.errors import BuilderError
from buildkit_cache.inventory import Inventory
from buildkit_cache.models import CacheRecord, PruneResult
from buildkit_cache.prune_plan import plan_prune
from buildkit_cache.units import format_bytes

from . import decide as D
from .audit import AuditLog
from .metrics import ActuatorMetrics

log = logging.getLogger("actuator")

LOOKUP_TIMEOUT = 60.0
MAX_PASSES = 5  # prune calls per incident when BuildKit stops short of its target


class PruneRunner:
    def __init__(self, cfg: Config, inventory: Inventory, metrics: ActuatorMetrics, audit: AuditLog, *,
                 dry_run: bool, clock: Callable[[], float] = time.time, max_pending: int = 64):
        self.cfg = cfg
        self.inventory = inventory
        self.metrics = metrics
        self.audit = audit
        self.dry_run = dry_run
        self.clock = clock
        self.max_pending = max_pending
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="prune")
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.last_started: dict[tuple[str, str, str], float] = {}
        self.active: set[tuple[str, str, str]] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepting = True

    def can_accept(self) -> bool:
        return self.accepting and len(self.tasks) < self.max_pending

    def submit(self, d: D.Decision) -> D.Decision:
        """Claim an accepted decision and start it, or turn it into a cooldown/duplicate skip."""
        assert d.accepted and d.action is not None
        key = (d.host, d.builder, d.action.name)
        if key in self.active:
            return replace(d, decision=D.BUSY, reason="the same prune is already queued or running")
        last = self.last_started.get(key)
        if D.in_cooldown(last, self.clock(), self.cfg.actuator.cooldown):
            assert last is not None
            left = self.cfg.actuator.cooldown - (self.clock() - last)
            return replace(d, decision=D.COOLDOWN,
                           reason=f"{d.action.name} ran on {d.host}/{d.builder} {self.clock() - last:.0f}s ago; "
                                  f"cooldown ends in {left:.0f}s")
        self.last_started[key] = self.clock()
        self.active.add(key)
        task = asyncio.get_running_loop().create_task(self._run(d), name=f"prune {d.host}/{d.builder}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return d

    async def _run(self, d: D.Decision) -> None:
        assert d.action is not None
        key = (d.host, d.builder, d.action.name)
        ok = False
        try:
            lock = self.locks.setdefault((d.host, d.builder), asyncio.Lock())
            async with lock:
                ok = await self._handle(d)
        except Exception:  # noqa: BLE001 - a bug must not kill the service or leave a claim behind
            log.exception("prune of %s/%s failed unexpectedly", d.host, d.builder)
        finally:
            self.active.discard(key)
            if not ok:
                # Nothing was pruned: the next notification may try again at once.
                self.last_started.pop(key, None)

    async def _thread(self, fn: Callable[[], Any], timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self.executor, fn), timeout)

    async def _handle(self, d: D.Decision) -> bool:
        assert d.action is not None and d.request is not None
        action = d.action.name
        common = {"host": d.host, "builder": d.builder, "action": action, "fingerprint": d.fingerprint}
        try:
            builder: Builder | None = await self._thread(lambda: self.inventory.find(d.host, d.builder), LOOKUP_TIMEOUT)
        except (BuilderError, TimeoutError) as exc:
            self.metrics.alerts.labels(action, D.ACCEPTED).inc()
            self.audit.record("failed", **common, reason=f"cannot look the builder up: {exc or 'timed out'}")
            self.metrics.prunes.labels(d.host, d.builder, action, "failure").inc()
            return False
        if builder is None:
            self.metrics.alerts.labels(action, D.UNKNOWN_BUILDER).inc()
            self.audit.record("skipped", **common, decision=D.UNKNOWN_BUILDER,
                              reason=f"no builder {d.builder[:64]!r} on host {d.host[:64]!r}")
            return False
        self.metrics.alerts.labels(action, D.ACCEPTED).inc()
        request = {k: v for k, v in (("keep_storage", d.request.keep_storage), ("all", d.request.all),
                                     ("keep_duration_seconds", d.request.keep_duration_seconds)) if v}
        if self.dry_run:
            return await self._dry_run(d, builder, common, request)
        return await self._prune(d, builder, common, request)

    async def _cache_bytes(self, builder: Builder) -> int | None:
        try:
            records = await self._thread(builder.records, LOOKUP_TIMEOUT)
        except (BuilderError, TimeoutError):
            return None
        return sum(r.size for r in records)

    async def _disk_avail(self, builder: Builder) -> int | None:
        """Bytes available on the filesystem holding the builder's cache, where it can be seen:
        what `df` shows, and what a prune really gives back (records shared with images free no disk)."""
        if FILESYSTEM not in builder.measurements:
            return None
        try:
            usage = await self._thread(builder.filesystem, LOOKUP_TIMEOUT)
        except (BuilderError, OSError, TimeoutError):
            return None
        return usage.avail_bytes

    async def _dry_run(self, d: D.Decision, builder: Builder, common: dict, request: dict) -> bool:
        assert d.request is not None
        req = d.request

        def estimate() -> tuple[list[CacheRecord], list[CacheRecord]]:
            records = builder.records()
            return records, plan_prune(records, req, datetime.now(UTC), builder.fresh_cache_mounts())

        try:
            records, plan = await self._thread(estimate, LOOKUP_TIMEOUT)
        except (BuilderError, TimeoutError) as exc:
            self.audit.record("failed", **common, dry_run=True, reason=f"cannot read the records: {exc or 'timed out'}")
            self.metrics.prunes.labels(d.host, d.builder, common["action"], "failure").inc()
            return False
        size = sum(r.size for r in plan)
        log.warning("DRY-RUN would prune %d records, %s, on %s/%s (%s): %s", len(plan), format_bytes(size),
                    d.host, d.builder, common["action"], ", ".join(r.id[:12] for r in plan[:20]) or "nothing")
        self.audit.record("dry_run", **common, request=request, records=len(plan), bytes=size,
                          cache_bytes=sum(r.size for r in records), record_ids=[r.id for r in plan[:100]])
        self.metrics.prunes.labels(d.host, d.builder, common["action"], "dry_run").inc()
        return True

    async def _prune(self, d: D.Decision, builder: Builder, common: dict, request: dict) -> bool:
        assert d.request is not None
        action = common["action"]
        timeout = self.cfg.actuator.prune_timeout
        before = await self._cache_bytes(builder)
        disk_before = await self._disk_avail(builder)
        self.audit.record("started", **common, request=request, cache_bytes=before, disk_avail_bytes=disk_before)
        started = time.monotonic()
        deadline = started + timeout
        deleted = reclaimed = passes = 0
        self.metrics.in_progress.inc()
        try:
            while True:
                passes += 1
                outcome = await self._prune_pass(d, builder, deadline - time.monotonic())
                if isinstance(outcome, str):
                    result_label = "timeout" if outcome.startswith("the prune did not finish") else "failure"
                    self.audit.record("failed", **common, reason=outcome, passes=passes, records=deleted,
                                      reclaimed_bytes=reclaimed)
                    self.metrics.prunes.labels(d.host, d.builder, action, result_label).inc()
                    return False
                deleted += outcome.records_deleted
                reclaimed += outcome.bytes_reclaimed
                if outcome.records_deleted == 0 or passes >= MAX_PASSES or not await self._more_to_do(d, builder):
                    break
                log.info("prune of %s/%s stopped short of its target; pass %d", d.host, d.builder, passes + 1)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.duration.labels(action).observe(time.monotonic() - started)
        # BuildKit releases files slightly after a prune returns: measure again after a pause.
        await asyncio.sleep(self.cfg.actuator.settle_delay)
        after = await self._cache_bytes(builder)
        disk_after = await self._disk_avail(builder)
        cache_freed = before - after if before is not None and after is not None else None
        disk_freed = disk_after - disk_before if disk_before is not None and disk_after is not None else None
        self.audit.record("pruned", **common, request=request, records=deleted, reclaimed_bytes=reclaimed,
                          passes=passes, cache_bytes_before=before, cache_bytes_after=after, cache_freed_bytes=cache_freed,
                          disk_avail_bytes_before=disk_before, disk_avail_bytes_after=disk_after,
                          disk_freed_bytes=disk_freed,
                          duration_seconds=round(time.monotonic() - started, 3))
        self.metrics.prunes.labels(d.host, d.builder, action, "success").inc()
        self.metrics.reclaimed.labels(d.host, d.builder, action).inc(reclaimed)
        if disk_freed is not None:
            self.metrics.disk_freed.labels(d.host, d.builder, action).inc(max(disk_freed, 0))
        self.metrics.last_prune.labels(d.host, d.builder, action).set(self.clock())
        return True

    async def _prune_pass(self, d: D.Decision, builder: Builder, timeout: float) -> PruneResult | str:
        """One prune call; its result, or why it failed. Waits for BuildKit even past the timeout."""
        assert d.request is not None
        if timeout <= 0:
            return f"the prune did not finish within {self.cfg.actuator.prune_timeout:g}s"
        fut = asyncio.get_running_loop().run_in_executor(self.executor, builder.prune, d.request, timeout)
        done, _ = await asyncio.wait({fut}, timeout=timeout)
        if not done:
            # Keep the builder's lock until BuildKit is really done: never two prunes at once.
            await asyncio.wait({fut})
            return f"the prune did not finish within {self.cfg.actuator.prune_timeout:g}s"
        try:
            return fut.result()
        except BuilderError as exc:
            return str(exc)

    async def _more_to_do(self, d: D.Decision, builder: Builder) -> bool:
        """Whether a keep-storage prune stopped short of its target.

        BuildKit deletes one record at a time in that mode and stops when it finds none to take;
        BuildKit 0.8 (dockerd 20.10) finds none early when a `/system/df` runs meanwhile (any
        exporter, or `docker system df`), as the size computation holds records. Idle and full
        prunes take every candidate in batches and are not repeated.
        """
        assert d.request is not None
        if not d.request.keep_storage:
            return False
        try:
            current = await self._thread(builder.records, LOOKUP_TIMEOUT)
        except (BuilderError, TimeoutError):
            return False
        return sum(r.size for r in current if not r.shared) >= d.request.keep_storage

    async def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running prunes finish for up to `timeout`, then stop."""
        self.accepting = False
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
        for t in list(self.tasks):
            t.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
