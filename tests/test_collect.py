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
