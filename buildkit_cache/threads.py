"""A bounded pool of daemon threads for blocking calls to Docker and BuildKit.

concurrent.futures.ThreadPoolExecutor joins its threads when the interpreter exits, so one call
that never returns (a hung buildkitd, a prune of 200,000 records) held a stopped exporter or
actuator open until it did. Here the threads are daemons: a stopping process records what was
running and exits within its drain time, whatever a thread is doing. The pool never grows past its
size, and says how many of its threads are busy (a call given up on still holds its thread until
the call returns: `busy` shows it)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Work = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonPool(concurrent.futures.Executor):
    def __init__(self, workers: int, name: str):
        if workers < 1:
            raise ValueError("a pool needs at least one thread")
        self.size = workers
        self.name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._busy = 0
        self._queued = 0  # calls submitted and not yet taken by a thread
        self._closed = False

    @property
    def busy(self) -> int:
        """Threads running a call now (a call given up on by its caller included)."""
        return self._busy

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self.name} pool is shut down")
            self._queue.put((future, fn, args, kwargs))
            self._queued += 1
            # A thread for each call waiting beyond the idle ones (an idle thread not yet at the
            # queue takes only one of several calls submitted meanwhile), up to the pool's size.
            if self._queued > self._idle and len(self._threads) < self.size:
                t = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                self._idle += 1
                t.start()
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            with self._lock:
                self._queued -= 1
                self._idle -= 1
                self._busy += 1
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        result = fn(*args, **kwargs)
                    except BaseException as exc:  # handed to the caller, as ThreadPoolExecutor does
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work. Queued calls are cancelled with `cancel_futures`; `wait` waits only for
        threads that are not stuck: it never waits longer than a second per thread."""
        with self._lock:
            self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                t.join(1.0)
