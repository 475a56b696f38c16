"""Background collection: discovery per Docker host and each measurement per builder, on its own
interval, in worker threads with a deadline, one run of a job at a time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from buildkit_cache.builders import Builder
from buildkit_cache.checks import unmatched_builder_settings
from buildkit_cache.config import Config
from buildkit_cache.errors import BuilderError, Unavailable
from buildkit_cache.inventory import Inventory
from buildkit_cache.models import RECORDS, BuilderLike
from buildkit_cache.usage import UsageSummary

from . import child
from .measurements import BY_NAME, DISCOVERY, intervals
from .store import HostState, Result, Store

log = logging.getLogger("exporter")

JobKey = tuple[str, ...]  # ("discover", host) or ("measure", host, builder, measurement)


def _builder(b: BuilderLike) -> Builder:
    """The scheduler's store holds the builders it was given: `Builder`s (see store.BuilderState)."""
    return cast(Builder, b)


class Scheduler:
    def __init__(self, cfg: Config, inventory: Inventory, store: Store, *,
                 clock: Callable[[], float] = time.time, max_workers: int = 8, children: bool = True):
        self.cfg = cfg
        self.intervals = intervals(cfg)
        self.inventory = inventory
        self.store = store
        self.children = children  # large builders' records in a child process (exporter/child.py)
        self._heavy_locks: dict[str, threading.Lock] = {}
        self.clock = clock
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers,
                                                              thread_name_prefix="collect")
        self.next_due: dict[JobKey, float] = {}
        self.running: dict[JobKey, asyncio.Task[None]] = {}
        for remote in inventory.remotes:
            store.add_builder(remote)

    # -- one pass -------------------------------------------------------------------------------

    async def collect_once(self) -> None:
        """Discover every host, then run every measurement of every builder once."""
        await asyncio.gather(*(self.discover(h) for h in self.inventory.hosts))
        await asyncio.gather(*(
            self.measure(_builder(state.builder), m)
            for state in list(self.store.builders.values())
            for m in state.builder.measurements
        ))

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self.executor, fn), self.cfg.exporter.timeout)

    async def discover(self, host: str) -> None:
        def work() -> tuple[list[Builder], HostState]:
            docker = self.inventory.hosts[host]
            info = docker.info()
            found = self.inventory.discover(host, info)
            unmatched = unmatched_builder_settings(self.cfg, {host: [b.ref.name for b in found.builders]})
            return found.builders, HostState(True, version=str(info.get("ServerVersion", "")),
                                             api_version=docker.api_version, renamed=found.renamed,
                                             refused=found.refused, unmatched=tuple(unmatched))

        try:
            builders, state = await self._in_thread(work)
        except (TimeoutError, BuilderError) as exc:
            message = str(exc) or f"no answer within {self.cfg.exporter.timeout:g}s"
            previous = self.store.hosts.get(host)
            if previous is None or previous.up:
                log.warning("docker host %s: discovery failed: %s", host, message)
            # Keep the builders we knew: their measurements fail and show success 0 until it is back.
            self.store.set_host(host, HostState(False, error=message))
            return
        previous = self.store.hosts.get(host)
        if previous is not None and not previous.up:
            log.info("docker host %s: reachable again", host)
        said = set(previous.renamed + previous.refused + previous.unmatched) if previous else set()
        for line in state.unmatched:
            if line not in said:
                log.warning("%s: %s", self.cfg.source, line)
        for line in state.renamed:
            if line not in said:
                log.warning("docker host %s: %s", host, line)
        for line in state.refused:
            if line not in said:
                log.error("docker host %s: %s", host, line)
        self.store.set_host(host, state)
        added, gone = self.store.set_host_builders(host, list(builders))
        for b in map(_builder, added):
            log.info("found builder %s (%s)", b.ref, b.describe())
            for m in b.measurements:
                self.next_due[("measure", *b.ref.key, m)] = 0.0
        for ref in gone:
            log.info("builder %s is gone", ref)
            for key in [k for k in self.next_due if k[0] == "measure" and tuple(k[1:3]) == ref.key]:
                del self.next_due[key]

    async def measure(self, builder: Builder, measurement: str) -> None:
        m = BY_NAME[measurement]

        def work() -> tuple[Any, float]:
            # Walks of one host's disk take turns (see Builder.heavy_io); the time waiting for the
            # turn is not the measurement's duration.
            lock = self._heavy_locks.setdefault(builder.ref.host, threading.Lock()) \
                if builder.heavy_io(measurement) else None
            if lock is not None and not lock.acquire(timeout=self.cfg.exporter.timeout):
                raise Unavailable(f"{builder.ref}: another walk of host {builder.ref.host}'s disk took the whole "
                                  f"{self.cfg.exporter.timeout:g}s")
            try:
                began = time.monotonic()
                if self.children and self._large(builder, measurement):
                    return child.run(measurement, builder, self.cfg, self.cfg.exporter.timeout), time.monotonic() - began
                return m.run(builder, self.cfg), time.monotonic() - began
            finally:
                if lock is not None:
                    lock.release()

        started = time.monotonic()
        try:
            value, took = await self._in_thread(work)
        except (TimeoutError, BuilderError, OSError) as exc:
            message = str(exc) or f"no answer within {self.cfg.exporter.timeout:g}s"
            previous = self.store.builders.get(builder.ref.key)
            last = previous.results.get(measurement) if previous else None
            if last is None or last.success or last.error != message:
                log.warning("builder %s: %s failed: %s", builder.ref, measurement, message)
            self.store.set_result(builder.ref.key, measurement,
                                  Result(False, time.monotonic() - started, error=message))
            return
        except Exception:  # noqa: BLE001 - a bug in one measurement must not stop the others
            log.exception("builder %s: %s failed unexpectedly", builder.ref, measurement)
            self.store.set_result(builder.ref.key, measurement,
                                  Result(False, time.monotonic() - started, error="internal error"))
            return
        state = self.store.builders.get(builder.ref.key)
        before = state.results.get(measurement) if state else None
        self.store.set_result(builder.ref.key, measurement,
                              Result(True, took, value=value,
                                     last_success_timestamp=self.clock()))
        if before is not None and before.success and m.shrank(before.value, value):
            # The cache shrank (a prune, BuildKit's GC): what depends on its size is stale now,
            # not at its next interval (a state volume walk can be 10 minutes away).
            for other in m.invalidates:
                key = ("measure", *builder.ref.key, other)
                if key in self.next_due:
                    self.next_due[key] = 0.0

    def _large(self, builder: Builder, measurement: str) -> bool:
        if measurement != RECORDS:
            return False
        state = self.store.builders.get(builder.ref.key)
        last = state.results.get(RECORDS) if state else None
        value = last.value if last is not None else None
        return isinstance(value, UsageSummary) and value.total_records >= child.CHILD_RECORDS

    # -- forever --------------------------------------------------------------------------------

    def _interval(self, key: JobKey) -> float:
        return self.intervals[DISCOVERY if key[0] == "discover" else key[3]]

    def _jobs(self) -> list[JobKey]:
        jobs: list[JobKey] = [("discover", h) for h in self.inventory.hosts]
        for state in self.store.builders.values():
            jobs += [("measure", *state.ref.key, m) for m in state.builder.measurements]
        return jobs

    def _start(self, key: JobKey) -> None:
        if key[0] == "discover":
            coro = self.discover(key[1])
        else:
            state = self.store.builders.get((key[1], key[2]))
            if state is None:
                return
            coro = self.measure(_builder(state.builder), key[3])
        task = asyncio.get_running_loop().create_task(coro, name="/".join(key))
        self.running[key] = task

        def done(_task: asyncio.Task[None]) -> None:
            self.running.pop(key, None)

        task.add_done_callback(done)

    async def run_forever(self, tick: float = 0.5) -> None:
        """Start each job when it is due and not already running; never returns."""
        try:
            while True:
                now = time.monotonic()
                for key in self._jobs():
                    if key in self.running:
                        continue
                    if self.next_due.get(key, 0.0) <= now:
                        self.next_due[key] = now + self._interval(key)
                        self._start(key)
                await asyncio.sleep(tick)
        finally:
            for task in list(self.running.values()):
                task.cancel()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


async def collect_once(cfg: Config, inventory: Inventory) -> Store:
    """Discover and measure everything once; the store holds what a scrape would show."""
    store = Store()
    scheduler = Scheduler(cfg, inventory, store, children=False)  # no scrape to keep quick
    try:
        await scheduler.collect_once()
    finally:
        scheduler.close()
    return store
