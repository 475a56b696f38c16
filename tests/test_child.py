"""Large builders' records are measured in a child process (exporter/child.py): the same summary,
none of the work in the exporter's own process, and a child that hangs or dies is a failed
measurement, never a stuck worker."""

from __future__ import annotations

import os
import time
from dataclasses import replace

from buildkit_cache.builders import Builder
from buildkit_cache.config import parse_config
from buildkit_cache.errors import BuilderError
from buildkit_cache.exporter import child
from buildkit_cache.exporter.scheduler import Scheduler
from buildkit_cache.exporter.store import Store
from buildkit_cache.models import DRIVER_CONTAINER, BuilderRef
from tests.support.recorded import RecordedBuilder, StaticInventory

H1 = {"url": "unix:///nonexistent/docker.sock", "name": "h1"}


class BigBuilder(Builder):
    measurements = ("records",)

    def __init__(self, name):
        super().__init__(BuilderRef("h1", name, DRIVER_CONTAINER, container=f"buildx_buildkit_{name}0"))
        one = RecordedBuilder(name).current
        self.current = [replace(one[i % len(one)], id=f"r{i}") for i in range(child.CHILD_RECORDS + 10)]
        self.pids: list[int] = []

    def records(self):
        self.pids.append(os.getpid())  # in a child, this list is the child's copy
        return list(self.current)


class Misbehaving(Builder):
    measurements = ("records",)

    def __init__(self, how):
        super().__init__(BuilderRef("h1", how, DRIVER_CONTAINER, container=f"buildx_buildkit_{how}0"))
        self.how = how

    def records(self):
        if self.how == "hang":
            time.sleep(3600)
        os._exit(3)


async def test_a_large_builder_is_measured_in_a_child_with_the_same_summary():
    cfg = parse_config({"docker_hosts": [H1]})
    big = BigBuilder("big")
    store = Store()
    sched = Scheduler(cfg, StaticInventory([big]), store)
    try:
        await sched.measure(big, "records")  # size unknown: here
        first = store.builders[big.ref.key].results["records"]
        assert first.success and first.value.total_records == child.CHILD_RECORDS + 10
        assert big.pids == [os.getpid()]
        await sched.measure(big, "records")  # known to be large: in a child
        second = store.builders[big.ref.key].results["records"]
        assert second.success and second.value == first.value
        assert big.pids == [os.getpid()]  # the call ran elsewhere
    finally:
        sched.close()


def test_a_hung_child_is_killed_at_the_deadline_and_a_dead_one_is_an_error():
    cfg = parse_config({"docker_hosts": [H1]})
    started = time.monotonic()
    try:
        child.run("records", Misbehaving("hang"), cfg, 2)
        raise AssertionError("no error")
    except BuilderError as exc:
        assert "did not finish within 2s" in str(exc)
    assert time.monotonic() - started < 10
    try:
        child.run("records", Misbehaving("die"), cfg, 30)
        raise AssertionError("no error")
    except BuilderError as exc:
        assert "ended without an answer (exit code 3)" in str(exc)
    assert [p for p in __import__("multiprocessing").active_children() if p.name.startswith("measure")] == []
