"""Collection: what every builder and host looks like now, measured only when it changed.

Every check interval (`exporter.intervals.records`, 30 s) each builder is checked before it is
asked anything: its state directory's databases are stat'ed (BuildKit writes them whenever records
are added, used, pruned or collected; `fs.databases_fingerprint`), along with its container's id and
state and its host's reachability. Unchanged, nothing is asked of Docker or BuildKit: no `docker
exec`, no `/system/df`, no walk; idle bytes, which age with the clock, are recomputed from what the
last answer left (`usage.IdleIndex`). Changed, each measurement runs again, no sooner than its own
interval. A safety refresh (`exporter.intervals.refresh`, 10 min) measures everything anyway.
Builders whose state directory this process cannot see (ssh and tcp hosts without `host_root`,
remote buildkitd) are measured on their intervals, as before.

A builder's measurements run one after another, builders side by side on a bounded thread pool;
the event loop only swaps in a new frozen `Snapshot`, which scrapes render (metrics.py). `--once`,
the server and the tests go through this same path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from buildkit_cache import deadline
from buildkit_cache.builders import Builder
from buildkit_cache.checks import unmatched_builder_settings
from buildkit_cache.config import Config
from buildkit_cache.errors import BuilderError, Unavailable
from buildkit_cache.fs import Fingerprint, databases_fingerprint, statvfs_usage
from buildkit_cache.inventory import BuilderSource
from buildkit_cache.models import FILESYSTEM, RECORDS, STATE_VOLUME, BuilderRef
from buildkit_cache.threads import DaemonPool

from .measurements import BY_NAME, DISCOVERY, REFRESH, Measurement, intervals

log = logging.getLogger("exporter")
T = TypeVar("T")

Key = tuple[str, str]  # (host, builder)


@dataclass(frozen=True)
class Result:
    """One measurement's last run: its value if it succeeded, how long it took, and when it was last
    known right (a success, or a check that found nothing changed since one)."""

    success: bool
    duration_seconds: float
    value: Any = None
    error: str = ""
    last_success_timestamp: float | None = None
    failures: int = 0  # failed runs in a row: a builder that keeps failing is asked less and less often


@dataclass(frozen=True)
class BuilderState:
    builder: Builder
    results: Mapping[str, Result] = field(default_factory=dict)

    @property
    def ref(self) -> BuilderRef:
        return self.builder.ref


@dataclass(frozen=True)
class HostState:
    up: bool
    error: str = ""
    version: str = ""
    api_version: str = ""
    renamed: tuple[str, ...] = ()  # builders named after their nodes to tell them apart
    refused: tuple[str, ...] = ()  # containers or volumes left out: their builder name is not theirs alone
    unmatched: tuple[str, ...] = ()  # builder settings of the config that match no builder here


@dataclass(frozen=True)
class Snapshot:
    """What a scrape shows: replaced whole on every change, never changed in place."""

    builders: Mapping[Key, BuilderState] = field(default_factory=dict)
    hosts: Mapping[str, HostState] = field(default_factory=dict)
    threads: int = 0  # the measurement threads there are
    threads_stuck: int = 0  # of them, held by a call given up on (past exporter.timeout) that has not returned


@dataclass
class _Mark:
    """What the collection remembers of one measurement of one builder between checks."""

    ran: float = float("-inf")  # monotonic time of the check that last ran it
    seen: Fingerprint | tuple[Any, ...] | None = None  # the builder's fingerprint it last succeeded on
    disk: int | None = None  # the bytes used on the disk under the state when it last succeeded
    tried: tuple[Any, ...] | None = None  # the fingerprint it was last run on, success or not


@dataclass(frozen=True)
class _Look:
    """What a check sees of a builder before it asks anything: its fingerprint (None: cannot tell)
    and the bytes used on the filesystem under its state (None: not visible)."""

    fingerprint: tuple[Any, ...] | None
    disk: int | None


# The state volume is walked again, at its interval, when the disk under it moved by more than this
# since the last walk (1% of the volume, at least 64 MB): a long build writing into a cache mount
# changes no database until it ends, but it fills the disk.
DISK_MOVED_RATIO = 0.01
DISK_MOVED_BYTES = 64 * 1024 * 1024


class Collection:
    """Discovers builders and measures them; `snapshot` is always the latest whole picture."""

    def __init__(self, cfg: Config, source: BuilderSource, *, clock: Callable[[], float] = time.time,
                 workers: int = 4):
        self.cfg = cfg
        self.source = source
        self.intervals = intervals(cfg)
        self.clock = clock
        self.on_change: Callable[[], None] = lambda: None  # told after each new snapshot (the server's renderer)
        self.snapshot = Snapshot({r.ref.key: BuilderState(r) for r in source.remotes}, {}, threads=workers)
        # Daemon threads, at most `workers`: a call that never returns (a Docker host or buildkitd
        # that stopped answering mid-call) holds one, is counted in threads_stuck, and never keeps a
        # stopping exporter alive.
        self._pool = DaemonPool(workers, "collect")
        self._stuck: set[concurrent.futures.Future[Any]] = set()
        self._marks: dict[tuple[Key, str], _Mark] = {}
        self._walks: dict[str, threading.Lock] = {h: threading.Lock() for h in source.hosts}
        self._running: dict[tuple[str, ...], asyncio.Task[None]] = {}
        self._due: dict[tuple[str, ...], float] = {}
        self._blind: set[Key] = set()  # builders told to be measured on intervals (said once)
        self._info: dict[str, tuple[float, Mapping[str, Any]]] = {}  # each engine's /info, and when asked

    # -- the snapshot ---------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @snapshot.setter
    def snapshot(self, value: Snapshot) -> None:
        self._snapshot = value
        self.on_change()

    def _set_builder(self, key: Key, state: BuilderState | None) -> None:
        builders = dict(self.snapshot.builders)
        if state is None:
            builders.pop(key, None)
        else:
            builders[key] = state
        self.snapshot = replace(self.snapshot, builders=builders)

    def _set_result(self, key: Key, measurement: str, result: Result) -> None:
        state = self.snapshot.builders.get(key)
        if state is None:
            return  # the builder left while it was being measured
        previous = state.results.get(measurement)
        if not result.success and previous is not None:
            result = replace(result, last_success_timestamp=previous.last_success_timestamp,
                             failures=previous.failures + 1)
        elif not result.success:
            result = replace(result, failures=1)
        self._set_builder(key, replace(state, results={**state.results, measurement: result}))

    def _confirm(self, key: Key, measurements: Sequence[str]) -> None:
        """The check found nothing changed: these figures are still right as of now."""
        state = self.snapshot.builders.get(key)
        if state is None or not measurements:
            return
        now = self.clock()
        results = dict(state.results)
        for m in measurements:
            r = results.get(m)
            if r is not None and r.success:
                results[m] = replace(r, last_success_timestamp=now)
        self._set_builder(key, replace(state, results=results))

    # -- work off the loop ----------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """`fn` in a measurement thread, given up on after exporter.timeout (waiting for a free
        thread included). A call given up on keeps its thread until it returns: it is counted as
        stuck meanwhile, and when every thread is stuck, calls say so instead of waiting in line."""
        loop = asyncio.get_running_loop()
        timeout = self.cfg.exporter.timeout
        call = self._pool.submit(fn)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(call)), timeout)
        except TimeoutError:
            if call.cancel():  # never started: every thread was busy the whole time
                raise Unavailable(f"no measurement thread was free within {timeout:g}s: "
                                  f"{len(self._stuck)} of {self._pool.size} are held by calls that did not return "
                                  "(buildkit_cache_exporter_threads_stuck)") from None
            if not call.done():
                self._stuck.add(call)
                self._count_stuck()
                call.add_done_callback(functools.partial(self._returned, loop))
            raise

    def _returned(self, loop: asyncio.AbstractEventLoop, call: concurrent.futures.Future[Any]) -> None:
        """A call given up on returned (in its thread): its thread is free again."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to count
            loop.call_soon_threadsafe(self._unstuck, call)

    def _unstuck(self, call: concurrent.futures.Future[Any]) -> None:
        self._stuck.discard(call)
        self._count_stuck()

    def _count_stuck(self) -> None:
        if self.snapshot.threads_stuck != len(self._stuck):
            if len(self._stuck) > self.snapshot.threads_stuck:
                log.warning("a call given up on after %gs still holds a measurement thread (%d of %d held)",
                            self.cfg.exporter.timeout, len(self._stuck), self._pool.size)
            self.snapshot = replace(self.snapshot, threads_stuck=len(self._stuck))

    # -- discovery ------------------------------------------------------------------------------

    async def discover(self, host: str) -> None:
        """List the builders of one Docker host; keep what is known of those still there."""
        def work() -> tuple[list[Builder], HostState]:
            docker = self.source.hosts[host]
            info = self._engine_info(host)
            found = self.source.discover(host, info)
            unmatched = unmatched_builder_settings(self.cfg, {host: [b.ref.name for b in found.builders]})
            return found.builders, HostState(True, version=str(info.get("ServerVersion", "")),
                                             api_version=docker.api_version, renamed=found.renamed,
                                             refused=found.refused, unmatched=tuple(unmatched))

        previous = self.snapshot.hosts.get(host)
        try:
            builders, state = await self._in_thread(work)
        except (TimeoutError, BuilderError) as exc:
            message = str(exc) or f"no answer within {self.cfg.exporter.timeout:g}s"
            if previous is None or previous.up:
                log.warning("docker host %s: discovery failed: %s", host, message)
            # Keep the builders known: their next check sees the host down and measures, and fails.
            self.snapshot = replace(self.snapshot, hosts={**self.snapshot.hosts, host: HostState(False, error=message)})
            return
        if previous is not None and not previous.up:
            log.info("docker host %s: reachable again", host)
        said = set(previous.renamed + previous.refused + previous.unmatched) if previous else set()
        for level, lines, where in ((logging.WARNING, state.unmatched, self.cfg.source),
                                    (logging.WARNING, state.renamed, f"docker host {host}"),
                                    (logging.ERROR, state.refused, f"docker host {host}")):
            for line in lines:
                if line not in said:
                    log.log(level, "%s: %s", where, line)
        self.snapshot = replace(self.snapshot, hosts={**self.snapshot.hosts, host: state})
        self._replace_builders(host, builders)

    def _engine_info(self, host: str) -> Mapping[str, Any]:
        """The engine's `GET /info` (its data root, storage driver, version), asked again only when
        the engine may have restarted (it was unreachable since), or at the refresh: the engine's
        own CPU for it was the largest cost of a check at rest (5.9 ms each, 0.7 CPU-s an hour)."""
        cached = self._info.get(host)
        up = self.snapshot.hosts.get(host)
        if cached is None or (up is not None and not up.up) or time.monotonic() - cached[0] >= self.intervals[REFRESH]:
            self._info[host] = (time.monotonic(), self.source.hosts[host].info())
        return self._info[host][1]

    def _replace_builders(self, host: str, builders: list[Builder]) -> None:
        current = {k: v for k, v in self.snapshot.builders.items() if k[0] == host and v.builder.ref.driver != "remote"}
        updated = {k: v for k, v in self.snapshot.builders.items() if k not in current}
        for b in builders:
            old = current.get(b.ref.key)
            if old is None or old.builder.ref != b.ref:
                log.info("found builder %s (%s)", b.ref, b.describe())
                self._forget(b.ref.key)
                updated[b.ref.key] = BuilderState(b)
            else:  # the same builder: its results stay, the fresh object (container state) is taken
                updated[b.ref.key] = replace(old, builder=b)
        for key, gone in current.items():
            if key not in updated:
                log.info("builder %s is gone", gone.builder.ref)
                self._forget(key)
        self.snapshot = replace(self.snapshot, builders=updated)

    def _forget(self, key: Key) -> None:
        for mk in [mk for mk in self._marks if mk[0] == key]:
            del self._marks[mk]
        self._blind.discard(key)

    # -- checks and measurements ----------------------------------------------------------------

    def fingerprint(self, builder: Builder) -> tuple[Any, ...] | None:
        """What says whether the builder changed, or None where this process cannot tell."""
        state_dir = builder.state_dir()
        dbs = databases_fingerprint(state_dir) if state_dir else None
        if not dbs:  # no databases seen (not visible, or not a state directory): cannot tell
            return None
        host = self.snapshot.hosts.get(builder.ref.host)
        return (host.up if host else True, builder.identity(), dbs)

    def look(self, builder: Builder) -> _Look:
        """The fingerprint, and the disk's used bytes (statvfs: a few microseconds)."""
        disk = None
        state_dir = builder.state_dir() if STATE_VOLUME in builder.measurements else None
        if state_dir:
            try:
                usage = statvfs_usage(state_dir)
                disk = usage.size_bytes - usage.free_bytes
            except OSError:
                disk = None
        return _Look(self.fingerprint(builder), disk)

    def _slack(self) -> float:
        """A check that comes a moment early is not skipped: checks are scheduled an interval apart,
        and each runs what is due a little before its time."""
        return max(0.1, 0.05 * self.intervals[RECORDS])

    def _is_due(self, key: Key, m: Measurement[Any], look: _Look, started: float, force: bool) -> bool:
        mark = self._marks.get((key, m.name))
        if force or mark is None:
            return True
        since = started - mark.ran + self._slack()
        if since >= self.intervals[REFRESH]:
            return True
        fp = look.fingerprint
        last = self._result(key, m.name)
        failures = last.failures if last is not None else 0
        # A measurement that keeps failing (a hung builder) backs off: 1, 2, 4 ... intervals, at most
        # the refresh interval; buildkit_cache_measurement_consecutive_failures says so. Once its
        # container was replaced, started or stopped, it is tried again at its own interval.
        backoff = min(self.intervals[m.name] * 2 ** min(max(failures - 1, 0), 10), self.intervals[REFRESH])
        other = mark.tried is not None and fp is not None and mark.tried[:2] != fp[:2]
        if since < (self.intervals[m.name] if other else backoff):
            return False
        # Unchanged since its last success: nothing to ask. The filesystem (statvfs where the state
        # is visible) costs nothing and sees what else fills the disk: it runs on its interval.
        if fp is None or fp != mark.seen or m.name == FILESYSTEM:
            return True
        if m.name == STATE_VOLUME and look.disk is not None and mark.disk is not None:
            walked = self._result(key, STATE_VOLUME)
            size = walked.value.bytes if walked is not None and walked.success else 0
            moved = look.disk - mark.disk
            if abs(moved) > max(DISK_MOVED_RATIO * size, DISK_MOVED_BYTES):
                log.debug("builder %s/%s: state_volume due: the disk under it moved by %+d MB since the last walk",
                          *key, moved // 1_000_000)
                return True
        return False

    async def _look(self, builder: Builder) -> _Look | None:
        """The look, or None where it could not be had: every measurement thread held by calls
        that did not return, or a stat that did not answer in time. The check then goes by the
        intervals alone, and each measurement due fails saying why, instead of the check ending
        with an exception nobody hears and the last figures standing as if measured."""
        try:
            return await self._in_thread(lambda: self.look(builder))
        except (Unavailable, TimeoutError) as exc:
            log.debug("builder %s: no look at its state: %s", builder.ref, exc or "no answer in time")
            return None

    async def check(self, builder: Builder, force: bool = False) -> None:
        """Measure what is due on one builder: everything when `force`, else what changed.

        Records first: when they shrank (a prune, GC), what depends on the cache's size is measured
        in the same check. Each measurement's baseline is what the check saw before it ran; for the
        records, what it sees after them, so the engine's own write while it answers (it marks cache
        mounts used) is not taken for a change."""
        key = builder.ref.key
        started = time.monotonic()
        seen = await self._look(builder)
        look = seen or _Look(None, None)
        if look.fingerprint is None and seen is not None and key not in self._blind and not force:
            self._blind.add(key)
            log.info("builder %s: its state directory is not visible here; measured on every interval", builder.ref)
        names = builder.measurements
        due = [n for n in names if self._is_due(key, BY_NAME[n], look, started, force)]
        if due and log.isEnabledFor(logging.DEBUG):
            mark = self._marks.get((key, RECORDS))
            log.debug("builder %s: due %s; changed since records: %s", builder.ref, due,
                      _difference(mark.seen if mark else None, look.fingerprint))
        if look.fingerprint is not None:  # what did not change is still right; where we cannot tell, it is only old
            self._confirm(key, [n for n in names if n not in due])
        if RECORDS in due:
            before = self._result(key, RECORDS)
            after = look
            if await self.measure(builder, BY_NAME[RECORDS]):
                after = await self._look(builder) or _Look(None, None)  # unseen: measured again next time
                value = self._result(key, RECORDS)
                if before is not None and before.success and value is not None and \
                        BY_NAME[RECORDS].shrank(before.value, value.value):
                    # A prune or GC: what depends on the cache's size is stale now, not at its interval.
                    due += [n for n in BY_NAME[RECORDS].invalidates if n in names and n not in due]
            self._ran(key, RECORDS, started, look, after)
        for name in [n for n in names if n in due and n != RECORDS]:
            await self.measure(builder, BY_NAME[name])
            self._ran(key, name, started, look, look)

    def _ran(self, key: Key, name: str, started: float, tried: _Look, baseline: _Look) -> None:
        """Remember a measurement's run: when, what it was tried on, and on success its baseline."""
        mark = self._marks.setdefault((key, name), _Mark())
        mark.ran = started
        mark.tried = tried.fingerprint
        result = self._result(key, name)
        if result is not None and result.success:
            mark.seen, mark.disk = baseline.fingerprint, baseline.disk
        else:
            mark.seen = None

    def _result(self, key: Key, measurement: str) -> Result | None:
        state = self.snapshot.builders.get(key)
        return state.results.get(measurement) if state else None

    async def measure(self, builder: Builder, m: Measurement[Any]) -> bool:
        """Run one measurement in a worker thread, store its result; True if it succeeded."""
        def work() -> tuple[Any, float]:
            # Walks of one host's disk take turns (Builder.heavy_io); the wait is not the duration.
            lock = self._walks.setdefault(builder.ref.host, threading.Lock()) if builder.heavy_io(m.name) else None
            if lock is not None and not lock.acquire(timeout=self.cfg.exporter.timeout):
                raise Unavailable(f"{builder.ref}: another walk of host {builder.ref.host}'s disk took the whole "
                                  f"{self.cfg.exporter.timeout:g}s")
            try:
                began = time.monotonic()
                with deadline.within(self.cfg.exporter.timeout):  # its calls end with it
                    return m.run(builder, self.cfg), time.monotonic() - began
            finally:
                if lock is not None:
                    lock.release()

        started = time.monotonic()
        try:
            value, took = await self._in_thread(work)
        except (TimeoutError, BuilderError, OSError) as exc:
            message = str(exc) or f"no answer within {self.cfg.exporter.timeout:g}s"
            last = self._result(builder.ref.key, m.name)
            if last is None or last.success:  # said once; its recovery is said too (below)
                log.warning("builder %s: %s failed: %s", builder.ref, m.name, message)
            else:
                log.debug("builder %s: %s failed again: %s", builder.ref, m.name, message)
            self._set_result(builder.ref.key, m.name, Result(False, time.monotonic() - started, error=message))
            return False
        except Exception:  # a bug in one measurement must not stop the others
            log.exception("builder %s: %s failed unexpectedly", builder.ref, m.name)
            self._set_result(builder.ref.key, m.name, Result(False, time.monotonic() - started, error="internal error"))
            return False
        log.debug("builder %s: %s measured in %.3fs", builder.ref, m.name, took)
        last = self._result(builder.ref.key, m.name)
        if last is not None and not last.success:
            log.info("builder %s: %s measured again, after %d failed run(s)", builder.ref, m.name, last.failures)
        self._set_result(builder.ref.key, m.name, Result(True, took, value=value, last_success_timestamp=self.clock()))
        return True

    # -- passes ---------------------------------------------------------------------------------

    async def collect_once(self) -> Snapshot:
        """Discover every host, then measure every builder fully: what `--once` prints."""
        await asyncio.gather(*(self.discover(h) for h in self.source.hosts))
        await asyncio.gather(*(self.check(s.builder, force=True) for s in list(self.snapshot.builders.values())))
        return self.snapshot

    def _jobs(self) -> dict[tuple[str, ...], tuple[float, Callable[[], Any]]]:
        jobs: dict[tuple[str, ...], tuple[float, Callable[[], Any]]] = {}
        for h in self.source.hosts:
            jobs[("discover", h)] = (self.intervals[DISCOVERY], functools.partial(self.discover, h))
        for key, state in self.snapshot.builders.items():
            jobs[("check", *key)] = (self.intervals[RECORDS], functools.partial(self.check, state.builder))
        return jobs

    async def run_forever(self) -> None:
        """Start each job when it is due and not running; sleep until the next is due. Never returns."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        try:
            while True:
                now = time.monotonic()
                jobs = self._jobs()
                for job, (interval, start) in jobs.items():
                    if job in self._running or self._due.get(job, 0.0) > now:
                        continue
                    self._due[job] = self._next_due(job, now, interval)
                    task = loop.create_task(start(), name="/".join(job))
                    self._running[job] = task
                    task.add_done_callback(functools.partial(self._done, job, wake))
                for job in [j for j in self._due if j not in jobs]:
                    del self._due[job]
                # A discovery that found a builder ends and wakes the loop, which checks it at once.
                pending = [d for j, d in self._due.items() if j not in self._running]
                delay = max(0.05, min(pending, default=now + 60) - time.monotonic())
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), delay)
                except TimeoutError:
                    pass
        finally:
            for task in list(self._running.values()):
                task.cancel()

    def _next_due(self, job: tuple[str, ...], now: float, interval: float) -> float:
        """When a job runs next: an interval after it was due, so its gaps stay an interval whatever
        the loop's delays. A builder's first check runs at once; the second comes an interval and a
        part of one later, that part fixed by the builder's name, so that the checks of many
        builders spread over the interval instead of coming all at once (as cAdvisor's housekeeping)."""
        due = self._due.get(job)
        if due is None:
            phase = zlib.crc32("/".join(job).encode()) / 2**32 if job[0] == "check" else 0.0
            return now + interval * (1 + phase)
        return due + interval if due + interval > now else now + interval

    def _done(self, job: tuple[str, ...], wake: asyncio.Event, task: asyncio.Task[None]) -> None:
        self._running.pop(job, None)
        wake.set()
        if not task.cancelled() and (exc := task.exception()) is not None:  # a defect: said, not lost
            log.error("%s ended unexpectedly: %s", "/".join(job), exc, exc_info=exc)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _difference(before: Any, after: Any) -> str:
    """What differs between two fingerprints, for the debug log."""
    if before is None or after is None:
        return "unknown"
    if before[:2] != after[:2]:
        return f"host or container {before[:2]} -> {after[:2]}"
    old, new = dict((e[0], e[1:]) for e in before[2]), dict((e[0], e[1:]) for e in after[2])
    return ", ".join(f"{n} {old.get(n)} -> {new.get(n)}" for n in sorted(set(old) | set(new))
                     if old.get(n) != new.get(n)) or "nothing"


async def collect_once(cfg: Config, source: BuilderSource) -> Snapshot:
    """Discover and measure everything once (`--once`, and the tests)."""
    collection = Collection(cfg, source)
    try:
        return await collection.collect_once()
    finally:
        collection.close()
