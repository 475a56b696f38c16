"""The pool of daemon threads that the exporter's measurements and the actuator's prunes run on."""

from __future__ import annotations

import threading
import time

import pytest

from buildkit_cache.threads import DaemonPool


def test_calls_submitted_together_run_side_by_side_up_to_the_pools_size():
    """Three calls submitted at once on a pool of four run at once (a barrier of three is passed),
    a fifth and sixth call on a pool of four wait for a thread: never more threads than the size."""
    pool = DaemonPool(4, "t")
    together = threading.Barrier(3, timeout=5)
    for f in [pool.submit(together.wait) for _ in range(3)]:
        f.result(10)  # BrokenBarrierError unless all three ran at once
    release = threading.Event()
    running = threading.Semaphore(0)

    def hold() -> None:
        running.release()
        release.wait(10)

    held = [pool.submit(hold) for _ in range(6)]
    for _ in range(4):
        assert running.acquire(timeout=5)
    assert not running.acquire(timeout=0.3), "more calls ran at once than the pool has threads"
    assert pool.busy == 4 and len(pool._threads) == 4
    release.set()
    for f in held:
        f.result(10)
    assert pool.busy == 0
    pool.shutdown()


def test_a_call_that_never_returns_holds_its_thread_and_not_the_process():
    pool = DaemonPool(2, "t")
    never = threading.Event()
    stuck = pool.submit(never.wait)
    assert pool.submit(lambda: 42).result(5) == 42  # the other thread still works
    # The stuck call's thread may not have been scheduled yet on a loaded machine (seen in CI).
    deadline = time.monotonic() + 5
    while pool.busy != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.busy == 1 and not stuck.done()
    assert all(t.daemon for t in pool._threads)  # the interpreter exits without waiting for it
    pool.shutdown(wait=True)  # returns: it does not wait for the stuck call
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: 1)
    never.set()


def test_an_exception_is_the_callers():
    pool = DaemonPool(1, "t")
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(5)
    assert pool.submit(lambda: "still works").result(5) == "still works"
    pool.shutdown()
