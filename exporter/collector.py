"""Collection in a process of its own, so that serving /metrics never competes with it.

The scheduler's worker threads spend their time in the Docker SDK, in Python: in one process they
hold the interpreter's lock a large part of the time, and a scrape's rendering is sliced between
them (measured at 200 builders: p99 over 200 ms). So the server (this process) keeps a replica of
the store and renders it; a collector process (`spawn`ed: a clean interpreter) runs the scheduler
on a store that forwards each change (a host's builders, a host's state, a result) through a pipe.
Changes are applied in the order they were made, so the replica is the collector's store.

The collector exits when the server goes (its next write finds the pipe closed); when the
collector dies, the server says so and starts another, the store keeping the last results.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from typing import Any

from buildkit_cache.config import Config
from buildkit_cache.models import BuilderLike, BuilderRef, BuilderView

from .store import HostState, Result, Store

log = logging.getLogger("exporter")

NICENESS = 5
_CHANGES = ("set_host_builders", "add_builder", "set_result", "set_host")
_context = multiprocessing.get_context("spawn")


def _view(b: BuilderLike) -> BuilderView:
    # What the server renders, without the connection (and without the Docker SDK to unpickle it).
    return BuilderView(b.ref, tuple(b.measurements))


class ForwardingStore(Store):
    """A store that sends each change to the server's replica."""

    def __init__(self, conn: multiprocessing.connection.Connection):
        super().__init__()
        self.conn = conn

    def _send(self, *change: Any) -> None:
        try:
            self.conn.send(change)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise SystemExit(0) from None  # the server is gone: so is its collector

    def set_host_builders(self, host: str, builders: list[BuilderLike]) -> tuple[list[BuilderLike], list[BuilderRef]]:
        changed = super().set_host_builders(host, builders)
        self._send("set_host_builders", host, [_view(b) for b in builders])
        return changed

    def add_builder(self, builder: BuilderLike) -> None:
        super().add_builder(builder)
        self._send("add_builder", _view(builder))

    def set_result(self, key: tuple[str, str], measurement: str, result: Result[Any]) -> None:
        super().set_result(key, measurement, result)
        self._send("set_result", key, measurement, result)

    def set_host(self, host: str, state: HostState) -> None:
        super().set_host(host, state)
        self._send("set_host", host, state)


def _collect(cfg: Config, conn: multiprocessing.connection.Connection, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    os.nice(NICENESS)  # on a busy host, a scrape comes before a measurement
    # Only here, in the collector: the Docker SDK and everything that talks to Docker.
    from buildkit_cache.inventory import Inventory

    from .scheduler import Scheduler

    scheduler = Scheduler(cfg, Inventory(cfg), ForwardingStore(conn))
    try:
        asyncio.run(scheduler.run_forever())
    finally:
        scheduler.close()


class Collector:
    """The collector process, started by `run()` (the server's background task) and restarted
    if it dies; `store` is the replica the server renders."""

    RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)

    def __init__(self, cfg: Config, store: Store, log_level: str = "info"):
        self.cfg = cfg
        self.store = store
        self.log_level = log_level
        self.process: Any = None
        self._at_exit = False

    def _start(self) -> multiprocessing.connection.Connection:
        receive, send = _context.Pipe(duplex=False)
        # Not a daemon: it starts processes of its own (exporter/child.py). `close()` ends it, at
        # the server's clean-up or, failing that, at exit; a killed server ends it by closing the pipe.
        self.process = _context.Process(target=_collect, args=(self.cfg, send, self.log_level),
                                        name="buildkit-cache-exporter collector")
        self.process.start()
        if not self._at_exit:
            atexit.register(self.close)
            self._at_exit = True
        send.close()
        return receive

    def _apply(self, change: tuple[Any, ...]) -> None:
        name, *args = change
        if name in _CHANGES:
            getattr(self.store, name)(*args)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            receive = self._start()
            done = asyncio.Event()

            def read(conn: multiprocessing.connection.Connection = receive, done: asyncio.Event = done) -> None:
                try:
                    while True:
                        loop.call_soon_threadsafe(self._apply, conn.recv())
                except (EOFError, OSError):
                    pass
                except RuntimeError:
                    return  # the server's loop is closed: it is shutting down
                finally:
                    conn.close()
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(done.set)

            threading.Thread(target=read, name="collector changes", daemon=True).start()
            await done.wait()
            await loop.run_in_executor(None, self.process.join, 5)
            code = self.process.exitcode
            delay = self.RESTART_DELAYS[min(failures, len(self.RESTART_DELAYS) - 1)]
            failures += 1
            log.error("the collector process ended (exit code %s); its last results stay served; "
                      "starting another in %gs", code, delay)
            await asyncio.sleep(delay)

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
