"""Change-driven collection (exporter/collect.py): a builder is asked nothing while its BuildKit's
databases are unchanged, is measured again when they change (not when its own measurement wrote
them), is refreshed anyway at the safety interval, and falls back to plain intervals where its state
directory cannot be seen."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

from buildkit_cache.config import parse_config
from buildkit_cache.exporter.collect import Collection
from buildkit_cache.exporter.metrics import registry_for
from tests.support.recorded import RecordedBuilder, StaticInventory

FAST = {"records": "100ms", "gc_policy": "100ms", "state_volume": "100ms", "filesystem": "100ms"}


@pytest.fixture(autouse=True)
def still_disk(monkeypatch):
    """The disk under the state stands still (this machine's own moves with whatever else runs, and
    a disk that moved is a reason to walk the state volume: tested below with its own stand-in)."""
    from buildkit_cache.exporter import collect
    from buildkit_cache.models import FilesystemUsage

    monkeypatch.setattr(collect, "statvfs_usage", lambda path: FilesystemUsage(
        size_bytes=100 * 2**30, avail_bytes=50 * 2**30, files=1000, files_free=500, free_bytes=50 * 2**30))


def config(**intervals):
    return parse_config({"exporter": {"intervals": {**FAST, "refresh": "1h", **intervals}}})


def state_dir(tmp_path):
    """A buildx builder's state directory as BuildKit lays it out: bolt databases at two levels."""
    (tmp_path / "runc-overlayfs" / "snapshots").mkdir(parents=True)
    for name in ("cache.db", "history.db", "runc-overlayfs/metadata_v2.db", "runc-overlayfs/containerdmeta.db"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
    return tmp_path


def write(path):
    """What BuildKit does to a database when a build adds or uses records: a page rewritten."""
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(os.urandom(16))
    os.utime(path, ns=(time.time_ns(), time.time_ns()))


async def run_for(collection, seconds):
    task = asyncio.create_task(collection.run_forever())
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


async def wait_until(check, within=5.0):
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_an_unchanged_builder_is_asked_nothing_after_its_first_measurement(tmp_path):
    b = RecordedBuilder("kamal", state_dir=state_dir(tmp_path))
    c = Collection(config(), StaticInventory([b]))
    try:
        await run_for(c, 1.5)  # some 14 check intervals
    finally:
        c.close()
    assert b.calls["records"] == 1 and b.calls["gc_policy"] == 1 and b.calls["state_volume"] == 1
    assert b.calls["filesystem"] >= 8  # statvfs: free, and it sees what else fills the disk
    # The figures are current, not old: their last success moved with the checks.
    last = c.snapshot.builders[b.ref.key].results["records"].last_success_timestamp
    assert time.time() - last < 0.5


async def test_a_write_to_its_databases_is_measured_within_one_interval(tmp_path):
    b = RecordedBuilder("kamal", state_dir=state_dir(tmp_path))
    c = Collection(config(), StaticInventory([b]))
    task = asyncio.create_task(c.run_forever())
    try:
        await wait_until(lambda: b.calls.get("records") == 1)
        await asyncio.sleep(0.5)
        assert b.calls["records"] == 1
        b.current = b.current[:5]  # a prune...
        write(tmp_path / "runc-overlayfs" / "metadata_v2.db")  # ...and what it did to the database
        await wait_until(lambda: b.calls["records"] == 2, within=1.0)
        await wait_until(lambda: c.snapshot.builders[b.ref.key].results["records"].value.total_records == 5)
        await asyncio.sleep(0.5)
        assert b.calls["records"] == 2  # once per change
    finally:
        task.cancel()
        c.close()


class SelfWriting(RecordedBuilder):
    """Like dockerd's embedded builder, which marks cache mounts used whenever it computes disk usage:
    its databases change because it was measured."""

    def records(self):
        out = super().records()
        write(self.dir / "cache.db")
        return out


async def test_a_write_made_by_its_own_measurement_is_not_a_change(tmp_path):
    b = SelfWriting("default", state_dir=state_dir(tmp_path))
    c = Collection(config(), StaticInventory([b]))
    try:
        await run_for(c, 1.5)
    finally:
        c.close()
    assert b.calls["records"] == 1


async def test_the_safety_refresh_measures_an_unchanged_builder_again(tmp_path):
    b = RecordedBuilder("kamal", state_dir=state_dir(tmp_path))
    c = Collection(config(refresh="400ms"), StaticInventory([b]))
    try:
        await run_for(c, 1.5)
    finally:
        c.close()
    assert 3 <= b.calls["records"] <= 5 and 3 <= b.calls["gc_policy"] <= 5


async def test_a_stopped_container_is_measured_at_once(tmp_path):
    b = RecordedBuilder("kamal", state_dir=state_dir(tmp_path))
    c = Collection(config(), StaticInventory([b]))
    task = asyncio.create_task(c.run_forever())
    try:
        await wait_until(lambda: b.calls.get("records") == 1)
        b.container_state = "exited"
        b.broken.add("records")
        await wait_until(lambda: not c.snapshot.builders[b.ref.key].results["records"].success, within=1.0)
    finally:
        task.cancel()
        c.close()


async def test_without_a_visible_state_directory_each_measurement_runs_on_its_interval(caplog):
    b = RecordedBuilder("remote")  # no state_dir: an ssh host without host_root, a remote buildkitd
    c = Collection(config(), StaticInventory([b]))
    with caplog.at_level(logging.INFO, logger="exporter"):
        try:
            await run_for(c, 1.0)
        finally:
            c.close()
    assert b.calls["records"] >= 5 and b.calls["gc_policy"] >= 5
    said = [r.getMessage() for r in caplog.records if "not visible here" in r.getMessage()]
    assert said == ["builder h1/remote: its state directory is not visible here; measured on every interval"]


async def test_idle_bytes_age_between_measurements_without_asking_the_builder(tmp_path):
    """The recorded cache was last used at 15:38 on 2026-11-22: idle for an hour from 16:39 on."""
    b = RecordedBuilder("kamal", state_dir=state_dir(tmp_path))
    now = [1795363200.0]  # 2026-11-22 16:00 UTC
    cfg = parse_config({"exporter": {"intervals": {**FAST, "refresh": "1h"}, "idle_windows": ["1h"]}})
    c = Collection(cfg, StaticInventory([b]), clock=lambda: now[0])
    reg = registry_for(lambda: c.snapshot, cfg)
    L = {"host": "h1", "builder": "kamal", "idle_for": "1h"}
    task = asyncio.create_task(c.run_forever())
    try:
        await wait_until(lambda: b.calls.get("records") == 1)
        assert reg.get_sample_value("buildkit_cache_idle_bytes", L) == 0
        now[0] += 3600
        await wait_until(lambda: (reg.get_sample_value("buildkit_cache_idle_bytes", L) or 0) > 0, within=1.0)
        total = sum(r.size for r in b.current)
        assert reg.get_sample_value("buildkit_cache_idle_bytes", L) == total
        assert b.calls["records"] == 1
    finally:
        task.cancel()
        c.close()


@pytest.mark.slow  # starts a Python
def test_without_an_ssh_host_the_docker_sdk_leaves_paramiko_and_cryptography_unloaded(tmp_path):
    """16 of the exporter's ~50 MB; the SDK needs paramiko only for ssh:// hosts."""
    import subprocess
    import sys

    code = ("import sys; from buildkit_cache.cli_support import load_config; "
            "load_config('x', sys.argv[1], None, 'exporter'); import buildkit_cache.inventory; "
            "print(sorted(m for m in ('docker', 'paramiko', 'cryptography') if sys.modules.get(m)))")
    loaded = {}
    for kind, url in (("unix", "unix:///run/docker.sock"), ("ssh", "ssh://build@example.invalid")):
        cfg = tmp_path / f"{kind}.yml"
        cfg.write_text(f"docker_hosts: ['{url}']\n")
        done = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, check=True)
        loaded[kind] = done.stdout.strip()
    assert loaded == {"unix": "['docker']", "ssh": "['cryptography', 'docker', 'paramiko']"}


@pytest.mark.slow  # waits out its backoff
async def test_a_measurement_that_keeps_failing_backs_off_and_says_so(tmp_path):
    """A hung or broken builder is asked after 1, 2, 4 ... intervals, not at every one."""
    b = RecordedBuilder("kamal", broken={"records"})  # no state dir: it would be asked every interval
    c = Collection(config(refresh="10s"), StaticInventory([b]))
    try:
        await run_for(c, 1.6)  # 16 intervals of 100 ms: runs at about 0, 0.1, 0.3, 0.7, 1.5
    finally:
        c.close()
    assert 4 <= b.calls["records"] <= 6, b.calls
    assert b.calls["gc_policy"] >= 12  # the builder's other measurements keep their pace
    reg = registry_for(lambda: c.snapshot, config())
    failures = reg.get_sample_value("buildkit_cache_measurement_consecutive_failures",
                                    {"host": "h1", "builder": "kamal", "measurement": "records"})
    assert failures == b.calls["records"]


class Clock:
    """time.monotonic as the collection sees it, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    from buildkit_cache.exporter import collect

    c = Clock()
    monkeypatch.setattr(collect.time, "monotonic", c)
    return c


async def test_a_check_that_comes_a_moment_early_still_runs_what_is_due(tmp_path, clock):
    """Checks are scheduled an interval apart; one that comes a few milliseconds before its
    measurement's interval is over runs it all the same (it was skipped, and ran a whole interval
    late: 60 s instead of 30 s, 40% of the time)."""
    b = RecordedBuilder("kamal", state_dir=state_dir(tmp_path))
    c = Collection(config(records="30s", filesystem="30s"), StaticInventory([b]))
    try:
        await c.check(b)
        clock.now += 30.0 - 0.004
        write(tmp_path / "cache.db")
        await c.check(b)
    finally:
        c.close()
    assert b.calls["records"] == 2 and b.calls["filesystem"] == 2


class WritesDuringRecords(RecordedBuilder):
    """A build that writes the databases while `buildctl du` runs: a change of the cache, not the
    measurement's own write."""

    def records(self):
        out = super().records()
        if self.calls["records"] == 2:
            write(self.dir / "history.db")
        return out


async def test_a_change_during_the_records_measurement_is_still_measured_by_the_others(tmp_path, clock):
    b = WritesDuringRecords("kamal", state_dir=state_dir(tmp_path))
    c = Collection(config(), StaticInventory([b]))
    try:
        await c.check(b)
        clock.now += 1
        write(tmp_path / "cache.db")
        await c.check(b)  # records: the second measurement, during which a build writes
        walks = b.calls["state_volume"]
        clock.now += 1
        await c.check(b)
    finally:
        c.close()
    # The write during the records was a change: the state volume is walked again for it.
    assert b.calls["state_volume"] == walks + 1


async def test_the_state_volume_is_walked_again_when_the_disk_under_it_moves(tmp_path, clock, monkeypatch):
    """A long build writing into a cache mount changes no database until it ends; the disk moves.
    (The disk here is a stand-in statvfs: this machine's own disk moves with whatever else runs.)"""
    from buildkit_cache.exporter import collect
    from buildkit_cache.models import FilesystemUsage

    used = [10 * 2**30]
    monkeypatch.setattr(collect, "statvfs_usage", lambda path: FilesystemUsage(
        size_bytes=100 * 2**30, avail_bytes=100 * 2**30 - used[0], files=1000, files_free=500,
        free_bytes=100 * 2**30 - used[0]))
    b = RecordedBuilder("kamal", state_dir=state_dir(tmp_path))
    c = Collection(config(state_volume="1s"), StaticInventory([b]))
    try:
        await c.check(b)
        clock.now += 2
        used[0] += 32 * 2**20
        await c.check(b)
        assert b.calls["state_volume"] == 1  # at rest, or a small move: no walk
        used[0] += 64 * 2**20
        clock.now += 2
        await c.check(b)
        assert b.calls["state_volume"] == 2 and b.calls["records"] == 1
        clock.now += 0.5
        used[0] += 200 * 2**20
        await c.check(b)
        assert b.calls["state_volume"] == 2  # no sooner than its interval
        clock.now += 2
        await c.check(b)
        assert b.calls["state_volume"] == 3
    finally:
        c.close()


async def test_a_failing_builder_backs_off_until_its_container_changes(tmp_path, clock, caplog):
    b = RecordedBuilder("kamal", state_dir=state_dir(tmp_path), broken={"records"})
    c = Collection(config(records="1s", gc_policy="1s", state_volume="1s", filesystem="1s", refresh="1h"),
                   StaticInventory([b]))
    try:
        for _ in range(4):  # 1, 2, 4 ... seconds apart
            await c.check(b, force=b.calls.get("records", 0) == 0)
            clock.now += 1.0
        tried = b.calls["records"]
        assert tried < 4
        b.broken.clear()
        b.container_state = "restarted"  # its container was started again: tried at once
        with caplog.at_level(logging.INFO, logger="exporter"):
            await c.check(b)
        assert b.calls["records"] == tried + 1
        assert c.snapshot.builders[b.ref.key].results["records"].success
        assert any("records measured again, after" in m for m in caplog.messages)
        assert sum("records failed" in m for m in caplog.messages) == 1  # the failure was said once
    finally:
        c.close()


def test_the_checks_of_many_builders_spread_over_the_interval_and_keep_their_gaps():
    c = Collection(config(records="30s"), StaticInventory([]))
    try:
        jobs = [("check", "h1", f"builder-{i}") for i in range(50)]
        second = [c._next_due(job, 0.0, 30.0) for job in jobs]
        for job, due in zip(jobs, second, strict=True):
            c._due[job] = due
        # Spread over the interval after the first, not all at once...
        assert min(second) >= 30.0 and max(second) < 60.0
        assert len({round(d) for d in second}) > 20
        # ...and an interval apart from then on, whenever the loop gets to them.
        assert [c._next_due(job, due + 0.3, 30.0) for job, due in zip(jobs, second, strict=True)] == \
            [d + 30.0 for d in second]
    finally:
        c.close()


async def test_calls_that_never_return_are_counted_and_the_rest_say_why_they_wait(tmp_path):
    """A stand-in, because no real part can be made to hang on cue: two builders whose `du` never
    returns hold both measurement threads past exporter.timeout. They are counted
    (buildkit_cache_exporter_threads_stuck), a third builder's measurements fail saying no thread was
    free, not "no answer", and once the calls return the threads measure again."""
    import threading

    hang = threading.Event()
    stuck = [RecordedBuilder(f"hung{i}", broken=("records",), hang=hang) for i in range(2)]
    healthy = RecordedBuilder("kamal")
    cfg = parse_config({"exporter": {"timeout": "300ms", "intervals": {**FAST, "refresh": "1h"}}})
    c = Collection(cfg, StaticInventory([*stuck, healthy]), workers=2)
    reg = registry_for(lambda: c.snapshot, cfg)
    task = asyncio.create_task(c.run_forever())
    try:
        await wait_until(lambda: c.snapshot.threads_stuck == 2)
        assert reg.get_sample_value("buildkit_cache_exporter_threads_stuck") == 2
        assert reg.get_sample_value("buildkit_cache_exporter_threads") == 2

        def says_why() -> bool:
            r = c.snapshot.builders[("h1", "kamal")].results.get("records")
            return r is not None and not r.success and "no measurement thread was free" in r.error

        await wait_until(says_why, within=10)
        # A check that cannot even look at the builder (stat its databases: no thread for that
        # either) fails what is due, saying why, instead of ending with an exception nobody hears.
        before = c.snapshot.builders[("h1", "kamal")].results["records"]
        await c.check(healthy, force=True)
        after = c.snapshot.builders[("h1", "kamal")].results["records"]
        assert after is not before and "no measurement thread was free" in after.error
        hang.set()  # the calls return (failing, as a hung builder's do in the end)
        await wait_until(lambda: c.snapshot.threads_stuck == 0)
        await wait_until(lambda: c.snapshot.builders[("h1", "kamal")].results["records"].success, within=10)
    finally:
        hang.set()
        task.cancel()
        c.close()
