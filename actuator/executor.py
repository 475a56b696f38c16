"""Runs prunes, and only that: one at a time per builder, with a hard timeout, further passes when
BuildKit stops short of a keep-storage target, and the measurements before and after that say what
a prune gave back. It decides nothing and records nothing: it returns an `Outcome`.

Every blocking call runs in a daemon thread (buildkit_cache/threads.py): a prune of 200,000 records
that takes minutes never holds a stopping actuator past its drain time. Each step has a deadline of
its own, and a deadline that runs out says which step it was."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from buildkit_cache.builders import Builder
from buildkit_cache.errors import BuilderError, TimedOut
from buildkit_cache.models import FILESYSTEM, CacheRecord, PruneRequest, PruneResult
from buildkit_cache.prune_plan import Plan, plan_prune
from buildkit_cache.threads import DaemonPool
from buildkit_cache.units import format_bytes

log = logging.getLogger("actuator")
T = TypeVar("T")

RECORDS_TIMEOUT = 120.0  # reading a builder's records (in parts, past BuildKit's message limit)
PLAN_TIMEOUT = 60.0  # playing BuildKit's prune over them (0.9 s of CPU at 100,000 records)
LOOKUP_TIMEOUT = 60.0  # the filesystem's figures
PROGRESS_EVERY = 30.0  # seconds between log lines of a running prune
MAX_PASSES = 5  # prune calls per incident when BuildKit stops short of its target

SUCCESS, FAILURE, TIMEOUT, DRY_RUN, UNDER_BUDGET = "success", "failure", "timeout", "dry_run", "under_budget"
INTERRUPTED = "interrupted"  # the actuator stopped while the prune ran (audit.Recorder.interrupted)
RESULTS = (SUCCESS, FAILURE, TIMEOUT, DRY_RUN, UNDER_BUDGET, INTERRUPTED)  # prunes_total's `result`


@dataclass(frozen=True)
class Outcome:
    """What one prune (or dry run) did. Byte figures are None where they could not be measured."""

    result: str
    reason: str = ""
    records: int = 0
    reclaimed_bytes: int = 0  # as BuildKit reported them
    passes: int = 0
    cache_bytes_before: int | None = None
    cache_bytes_after: int | None = None
    disk_avail_before: int | None = None
    disk_avail_after: int | None = None
    duration_seconds: float = 0.0
    plan: Plan | None = field(default=None, repr=False)  # a dry run's
    deleted_ids: tuple[str, ...] = field(default=(), repr=False)  # what BuildKit says it deleted

    @property
    def ran(self) -> bool:
        """Whether it counts as the incident's run (and so starts its cooldown): it succeeded, or it
        failed or timed out after deleting something (a re-send must not prune again at once)."""
        return self.result in (SUCCESS, DRY_RUN) or self.records > 0 or self.reclaimed_bytes > 0

    @property
    def cache_freed_bytes(self) -> int | None:
        if self.cache_bytes_before is None or self.cache_bytes_after is None:
            return None
        return self.cache_bytes_before - self.cache_bytes_after

    @property
    def disk_freed_bytes(self) -> int | None:
        if self.disk_avail_before is None or self.disk_avail_after is None:
            return None
        return self.disk_avail_after - self.disk_avail_before


class PruneExecutor:
    def __init__(self, *, prune_timeout: float, settle_delay: float, workers: int = 4):
        self.prune_timeout = prune_timeout
        self.settle_delay = settle_delay
        self.pool = DaemonPool(workers, "prune")
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.running = 0
        # Each running prune's start (Unix time) and its progress so far (records, bytes deleted).
        self.started: dict[tuple[str, str], float] = {}
        self.progress: dict[tuple[str, str], tuple[int, int]] = {}

    async def _thread(self, fn: Callable[[], T], seconds: float) -> T:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self.pool, fn), seconds)

    async def run(self, builder: Builder, req: PruneRequest, *, dry_run: bool,
                  on_start: Callable[[int | None, int | None], None] | None = None) -> Outcome:
        """Prune `builder` with `req` (or estimate it), after any prune of it still running.
        `on_start` hears the cache's bytes and the disk's available bytes just before it prunes."""
        lock = self.locks.setdefault(builder.ref.key, asyncio.Lock())
        async with lock:
            if dry_run:
                return await self._estimate(builder, req)
            return await self._prune(builder, req, on_start)

    async def _records(self, builder: Builder) -> list[CacheRecord]:
        """The builder's records; BuilderError names the step when it cannot (or not in time)."""
        try:
            return await self._thread(builder.records, RECORDS_TIMEOUT)
        except TimeoutError:
            raise BuilderError(f"reading the records took longer than {RECORDS_TIMEOUT:g}s") from None
        except BuilderError as exc:
            raise BuilderError(f"cannot read the records: {exc}") from exc

    async def _estimate(self, builder: Builder, req: PruneRequest) -> Outcome:
        try:
            records = await self._records(builder)
        except BuilderError as exc:
            return Outcome(FAILURE, str(exc))
        try:
            plan = await self._thread(lambda: plan_prune(records, req, datetime.now(UTC), builder.fresh_cache_mounts()),
                                      PLAN_TIMEOUT)
        except TimeoutError:
            return Outcome(FAILURE, f"planning the prune of {len(records)} records took longer than {PLAN_TIMEOUT:g}s")
        return Outcome(DRY_RUN, records=len(plan), reclaimed_bytes=plan.bytes,
                       cache_bytes_before=sum(r.size for r in records), plan=plan)

    async def _cache_bytes(self, builder: Builder) -> tuple[int | None, int | None]:
        """The cache's bytes, and those BuildKit counts against keep-storage (not shared), or Nones."""
        # Twice: an engine busy deleting can fail one listing (containerd store: "snapshot ... not found").
        for attempt in (1, 2):
            try:
                records = await self._records(builder)
            except BuilderError as exc:
                log.info("%s of %s (attempt %d)", exc, builder.ref, attempt)
                await asyncio.sleep(0.5)
                continue
            return sum(r.size for r in records), sum(r.size for r in records if not r.shared)
        return None, None

    async def _disk_avail(self, builder: Builder) -> int | None:
        """Bytes available on the filesystem holding the builder's cache, where it can be seen:
        what `df` shows, and what a prune really gives back (records shared with images free no disk)."""
        if FILESYSTEM not in builder.measurements:
            return None
        try:
            usage = await self._thread(builder.filesystem, LOOKUP_TIMEOUT)
        except (BuilderError, OSError, TimeoutError):
            return None
        return int(usage.avail_bytes)

    async def _prune(self, builder: Builder, req: PruneRequest,
                     on_start: Callable[[int | None, int | None], None] | None) -> Outcome:
        before, counted = await self._cache_bytes(builder)
        if req.keep_storage and counted is not None and counted <= req.keep_storage:
            # At or under the budget now (the alert's figures are older): a prune would take
            # nothing, and its cooldown would stand in the way of the next incident's.
            return Outcome(UNDER_BUDGET, f"the cache counts {counted:,} bytes ({format_bytes(counted)}) against its "
                           f"budget of {req.keep_storage:,} ({format_bytes(req.keep_storage)}): at or under it, "
                           "nothing to prune",
                           cache_bytes_before=before)
        disk_before = await self._disk_avail(builder)
        if on_start:
            on_start(before, disk_before)
        started = time.monotonic()
        deadline = started + self.prune_timeout
        deleted = reclaimed = passes = 0
        ids: list[str] = []
        key = builder.ref.key
        self.running += 1
        self.started[key] = time.time()
        watcher = asyncio.get_running_loop().create_task(self._watch(builder))
        try:
            while True:
                passes += 1
                outcome, error = await self._pass(builder, req, deadline - time.monotonic())
                if outcome is not None:
                    deleted += outcome.records_deleted
                    reclaimed += outcome.bytes_reclaimed
                    ids += outcome.deleted_ids
                if error:
                    # What earlier passes (or this one, finishing late) deleted is kept and reported.
                    result = TIMEOUT if error.startswith("the prune did not finish") else FAILURE
                    if deleted:  # measured as after a prune that finished: BuildKit lets go a moment later
                        await asyncio.sleep(self.settle_delay)
                    after = (await self._cache_bytes(builder))[0] if deleted else None
                    return Outcome(result, error, deleted, reclaimed, passes, before, after,
                                   duration_seconds=time.monotonic() - started, deleted_ids=tuple(ids))
                if outcome is None:  # _pass gives a result or an error, never neither
                    raise RuntimeError("a prune pass returned neither a result nor an error")
                if outcome.records_deleted == 0 or passes >= MAX_PASSES or not await self._more_to_do(builder, req):
                    break
                log.info("prune of %s stopped short of its target; pass %d", builder.ref, passes + 1)
        finally:
            watcher.cancel()
            self.running -= 1
            self.started.pop(key, None)
            self.progress.pop(key, None)
        duration = time.monotonic() - started
        # BuildKit releases files slightly after a prune returns: measure again after a pause.
        await asyncio.sleep(self.settle_delay)
        after, disk_after = (await self._cache_bytes(builder))[0], await self._disk_avail(builder)
        return Outcome(SUCCESS, "", deleted, reclaimed, passes, before, after, disk_before, disk_after, duration,
                       deleted_ids=tuple(ids))

    async def _watch(self, builder: Builder) -> None:
        """A log line every PROGRESS_EVERY seconds while a prune runs: how long, and what BuildKit
        has deleted so far where it says (buildctl prints each record as it goes)."""
        key = builder.ref.key
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            since = time.time() - self.started.get(key, time.time())
            done = self.progress.get(key)
            so_far = f": {done[0]} records, {format_bytes(done[1])} deleted so far" if done else ""
            log.info("prune of %s running for %.0fs (its timeout: %gs)%s", builder.ref, since, self.prune_timeout,
                     so_far)

    async def _pass(self, builder: Builder, req: PruneRequest, seconds: float) -> tuple[PruneResult | None, str]:
        """One prune call: its result (if it has one) and why it failed ("" if it did not). Waits
        for BuildKit even past the timeout, and keeps what a late finish reports."""
        late = f"the prune did not finish within {self.prune_timeout:g}s"
        if seconds <= 0:
            return None, late
        key = builder.ref.key
        before = self.progress.get(key, (0, 0))  # what earlier passes deleted, for the log
        heard = [0, 0]  # what BuildKit said this pass deleted, as it went

        def progress(records: int, size: int) -> None:
            heard[:] = [records, size]
            self.progress[key] = (before[0] + records, before[1] + size)

        started = time.monotonic()
        fut = asyncio.get_running_loop().run_in_executor(self.pool, builder.prune, req, seconds, progress)
        done, _ = await asyncio.wait({fut}, timeout=seconds)
        if not done:
            # Keep the builder's lock until BuildKit is really done: never two prunes at once.
            await asyncio.wait({fut})
        try:
            result: PruneResult = fut.result()
        except BuilderError as exc:
            # The command's deadline is the prune's: whichever noticed first, it is the timeout. What
            # BuildKit said it deleted before it was stopped is deleted (it stops after its pass).
            timed_out = not done or (isinstance(exc, TimedOut) and time.monotonic() - started >= seconds - 1.0)
            partial = PruneResult(heard[0], heard[1]) if heard[0] else None
            return partial, late if timed_out else str(exc)
        return result, "" if done else late

    async def _more_to_do(self, builder: Builder, req: PruneRequest) -> bool:
        """Whether a keep-storage prune stopped short of its target.

        BuildKit deletes one record at a time in that mode and stops when it finds none to take;
        BuildKit 0.8 (dockerd 20.10) finds none early when a `/system/df` runs meanwhile (any
        exporter, or `docker system df`), as the size computation holds records. Idle and full
        prunes take every candidate in batches and are not repeated.
        """
        if not req.keep_storage:
            return False
        counted = (await self._cache_bytes(builder))[1]
        return counted is not None and counted >= req.keep_storage

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
