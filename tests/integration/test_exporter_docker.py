"""The exporter against a real private dockerd with real BuildKit build cache."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from buildkit_cache.config import parse_config
from buildkit_cache.exporter.collect import collect_once as collect_snapshot
from buildkit_cache.exporter.metrics import registry_for
from buildkit_cache.inventory import Inventory
from buildkit_cache.models import RECORD_TYPES, STATES
from tests.conftest import engine_get
from tests.support import builder_container

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def config_for(dockerd, **extra):
    data = {"docker_hosts": [{"url": dockerd.url, "name": "test"}], **extra}
    return parse_config(data, "test")


async def collect_once(cfg):
    store = await collect_snapshot(cfg, Inventory(cfg))
    return store, registry_for(store, cfg)


def walk(root: str) -> tuple[int, int]:
    """An independent `du -sx` and inode count: allocated bytes and entries, hard links once."""
    dev = os.lstat(root).st_dev
    seen, total, count = set(), 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        st = os.lstat(dirpath)
        if st.st_dev != dev:
            dirnames[:] = []
            continue
        total += st.st_blocks * 512
        count += 1
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino in seen:
                continue
            if st.st_nlink > 1:
                seen.add(st.st_ino)
            total += st.st_blocks * 512
            count += 1
    return total, count


@pytest.fixture(scope="module")
def kamal_builder(dockerd, builder_image):
    container, volume = builder_container.start_builder(dockerd, "kamal0")
    builder_container.fill_state(dockerd, container)
    yield container, volume
    dockerd.cli("rm", "-f", container, check=False)
    dockerd.cli("volume", "rm", volume, check=False)


async def test_engine_builder_bytes_and_counts_per_type_equal_system_df(build_cache):
    cfg = config_for(build_cache)
    store, reg = await collect_once(cfg)
    df = engine_get(build_cache, "/system/df")
    raw = df["BuildCache"]
    types = {r["Type"] for r in raw}
    assert {"regular", "source.local", "exec.cachemount"} <= types, types
    L = {"host": "test", "builder": "default"}
    for t in set(RECORD_TYPES) | types:
        for state in STATES:
            want = [r for r in raw if r["Type"] == t and
                    state == ("in_use" if r["InUse"] else "shared" if r["Shared"] else "reclaimable")]
            labels = {**L, "record_type": t, "state": state}
            assert reg.get_sample_value("buildkit_cache_records", labels) == len(want), labels
            assert reg.get_sample_value("buildkit_cache_size_bytes", labels) == sum(r["Size"] for r in want), labels
    total = sum(reg.get_sample_value("buildkit_cache_size_bytes", {**L, "record_type": t, "state": s})
                for t in RECORD_TYPES for s in STATES)
    assert total == sum(r["Size"] for r in raw) > 5_000_000
    assert reg.get_sample_value("buildkit_cache_docker_host_up", {"host": "test"}) == 1
    version = engine_get(build_cache, "/version")
    assert reg.get_sample_value("buildkit_cache_docker_host_info",
                                {"host": "test", "version": version["Version"],
                                 "api_version": version["ApiVersion"]}) == 1


def test_engine_records_keep_their_parent_links(build_cache):
    raw = engine_get(build_cache, "/system/df")["BuildCache"]
    # API 1.41 says `Parent`; 26.1 and 28.5 say " Parents" (leading space); "Parents" as documented.
    want = {r["ID"]: tuple(r.get(" Parents") or r.get("Parents") or ([r["Parent"]] if r.get("Parent") else []))
            for r in raw}
    assert any(want.values()), "the builds made records with parents"
    (engine,) = [b for b in Inventory(config_for(build_cache)).discover("test").builders if b.ref.name == "default"]
    assert {r.id: r.parents for r in engine.records()} == want


def snapshot_dir(dockerd) -> str:
    """Where this test engine keeps its build cache's bytes, known from how it was started."""
    if dockerd.engine.containerd_store:
        return str(dockerd.containerd_root / "io.containerd.snapshotter.v1.overlayfs")
    return str(dockerd.data_root / "overlay2")


async def test_engine_builder_filesystem_is_the_one_holding_the_snapshots(build_cache):
    _, reg = await collect_once(config_for(build_cache))
    path = snapshot_dir(build_cache)
    if build_cache.engine.containerd_store:
        # The test engine's containerd root is a tmpfs: another filesystem than the data root.
        assert os.stat(path).st_dev != os.stat(build_cache.data_root / "buildkit").st_dev
    st = os.statvfs(path)
    L = {"host": "test", "builder": "default"}
    assert reg.get_sample_value("buildkit_cache_filesystem_size_bytes", L) == st.f_blocks * st.f_frsize
    assert reg.get_sample_value("buildkit_cache_filesystem_files", L) == st.f_files
    # These two move as the machine writes; they must agree to within a little churn.
    assert abs(reg.get_sample_value("buildkit_cache_filesystem_avail_bytes", L) - st.f_bavail * st.f_frsize) < 256e6
    assert abs(reg.get_sample_value("buildkit_cache_filesystem_files_free", L) - st.f_ffree) < 10_000


async def test_buildx_builder_container_and_its_state_volume_are_found_and_walked(dockerd, kamal_builder):
    container, volume = kamal_builder
    store, reg = await collect_once(config_for(dockerd, builders={"kamal": {"budget": "1GB"}}))
    L = {"host": "test", "builder": "kamal"}
    assert reg.get_sample_value("buildkit_cache_builder_info", {
        **L, "driver": "docker-container", "buildkit_version": "v0.0.0+unknown", "container": container,
        "volume": volume, "address": ""}) == 1
    mountpoint = engine_get(dockerd, f"/volumes/{volume}")["Mountpoint"]
    size, files = walk(mountpoint)
    assert files > 40
    assert reg.get_sample_value("buildkit_cache_state_volume_size_bytes", L) == size
    assert reg.get_sample_value("buildkit_cache_state_volume_files", L) == files
    st = os.statvfs(mountpoint)
    assert reg.get_sample_value("buildkit_cache_filesystem_files", L) == st.f_files
    assert reg.get_sample_value("buildkit_cache_budget_bytes", L) == 1e9
    # Records come from `buildctl du` run in the container through docker exec.
    fixture = (ROOT / "tests/fixtures/buildctl/du.json").read_text()
    import json
    want = sum(r["size"] for r in json.loads(fixture))
    got = sum(reg.get_sample_value("buildkit_cache_size_bytes", {**L, "record_type": t, "state": s})
              for t in RECORD_TYPES for s in STATES)
    assert got == want
    assert reg.get_sample_value("buildkit_cache_gc_enabled", L) == 0


async def test_without_host_access_the_volume_and_filesystem_are_measured_inside_the_container(dockerd, kamal_builder):
    container, volume = kamal_builder
    cfg = parse_config({"docker_hosts": [{"url": dockerd.url, "name": "test", "host_root": ""}]})
    _, reg = await collect_once(cfg)
    L = {"host": "test", "builder": "kamal"}
    mountpoint = engine_get(dockerd, f"/volumes/{volume}")["Mountpoint"]
    size, files = walk(mountpoint)
    # busybox du -k rounds to KiB; find counts the same entries as the walk.
    assert abs(reg.get_sample_value("buildkit_cache_state_volume_size_bytes", L) - size) <= 1024 * 4
    assert reg.get_sample_value("buildkit_cache_state_volume_files", L) == files
    st = os.statvfs(mountpoint)
    assert reg.get_sample_value("buildkit_cache_filesystem_size_bytes", L) == st.f_blocks * st.f_frsize
    assert reg.get_sample_value("buildkit_cache_filesystem_files", L) == st.f_files
    # The engine's own filesystem needs host access: that measurement is simply not offered then.
    assert reg.get_sample_value("buildkit_cache_measurement_success",
                                {"host": "test", "builder": "default", "measurement": "filesystem"}) is None


async def test_a_wrong_host_root_fails_the_filesystem_measurement_and_says_why(dockerd):
    cfg = parse_config({"docker_hosts": [{"url": dockerd.url, "name": "test", "host_root": "/nonexistent"}]})
    store, reg = await collect_once(cfg)
    L = {"host": "test", "builder": "default"}
    assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "filesystem"}) == 0
    assert "not visible to this process (host_root='/nonexistent')" in store.builders[("test", "default")].results[
        "filesystem"].error
    assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "records"}) == 1


async def test_older_buildctl_without_format_falls_back_to_verbose_output(dockerd, kamal_builder):
    container, _ = kamal_builder
    dockerd.cli("exec", container, "touch", "/fixtures/old", "/fixtures/gc")
    try:
        _, reg = await collect_once(config_for(dockerd))
    finally:
        dockerd.cli("exec", container, "rm", "-f", "/fixtures/old", "/fixtures/gc")
    L = {"host": "test", "builder": "kamal"}
    got = sum(reg.get_sample_value("buildkit_cache_size_bytes", {**L, "record_type": t, "state": s})
              for t in RECORD_TYPES for s in STATES)
    assert abs(got - 44_960_000) < 19 * 5_000  # 19 records, each to two decimals of its unit
    assert reg.get_sample_value("buildkit_cache_gc_enabled", L) == 1
    assert reg.get_sample_value("buildkit_cache_gc_rule_reserved_bytes", {**L, "rule": "1"}) == 10e9
    calls = dockerd.cli("exec", container, "cat", "/var/log/buildctl-calls").stdout.decode()
    assert "du -v" in calls and "debug workers --verbose" in calls


@pytest.mark.parametrize(("switch", "said"), [("garbage", "JSON"), ("huge", "printed more than 64 MiB")])
async def test_garbage_or_a_flood_from_buildctl_fails_records_only_and_recovers(dockerd, kamal_builder, switch, said,
                                                                               caplog):
    container, _ = kamal_builder
    L = {"host": "test", "builder": "kamal"}
    dockerd.cli("exec", container, "touch", f"/fixtures/{switch}")
    try:
        _, reg = await collect_once(config_for(dockerd))
    finally:
        dockerd.cli("exec", container, "rm", "-f", f"/fixtures/{switch}")
    assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "records"}) == 0
    assert said in caplog.text, caplog.text[-2000:]
    for other in ("gc_policy", "state_volume", "filesystem"):
        assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": other}) == 1, other
    _, reg = await collect_once(config_for(dockerd))
    assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "records"}) == 1


async def test_stopped_builder_fails_records_but_still_measures_its_volume(dockerd, builder_image):
    container, volume = builder_container.start_builder(dockerd, "stopped0")
    try:
        dockerd.cli("stop", "-t", "0", container)
        store, reg = await collect_once(config_for(dockerd))
        L = {"host": "test", "builder": "stopped"}
        assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "records"}) == 0
        assert "not running" in store.builders[("test", "stopped")].results["records"].error
        assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "state_volume"}) == 1
        assert reg.get_sample_value("buildkit_cache_state_volume_files", L) >= 1
        # Other builders are unaffected.
        assert reg.get_sample_value("buildkit_cache_measurement_success",
                                    {"host": "test", "builder": "default", "measurement": "records"}) == 1
    finally:
        dockerd.cli("rm", "-f", container, check=False)
        dockerd.cli("volume", "rm", volume, check=False)


async def test_a_leaked_state_volume_without_container_is_reported(dockerd):
    dockerd.cli("volume", "create", "buildx_buildkit_gone0_state")
    try:
        _, reg = await collect_once(config_for(dockerd))
        L = {"host": "test", "builder": "gone"}
        assert reg.get_sample_value("buildkit_cache_builder_info", {
            **L, "driver": "docker-container", "buildkit_version": "", "container": "",
            "volume": "buildx_buildkit_gone0_state", "address": ""}) == 1
        assert reg.get_sample_value("buildkit_cache_state_volume_files", L) == 1
        assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "records"}) is None
    finally:
        dockerd.cli("volume", "rm", "buildx_buildkit_gone0_state", check=False)


def fake_buildctl(tmp_path: Path) -> Path:
    """A local buildctl for a remote buildkitd, which cannot run here: it answers with recordings."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "buildctl"
    fixtures = ROOT / "tests/fixtures/buildctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/calls\n'
        'case "$*" in\n'
        f'  "--addr tcp://buildkitd.test:1234 du --format json") cat {fixtures}/du.json ;;\n'
        f'  "--addr tcp://buildkitd.test:1234 debug workers --format json") cat {fixtures}/debug-workers-gc.json ;;\n'
        '  *) echo "error: dial tcp: connection refused" >&2; exit 1 ;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


async def test_remote_buildkitd_is_measured_with_a_local_buildctl(dockerd, tmp_path):
    script = fake_buildctl(tmp_path)
    cfg = parse_config({
        "docker_hosts": [{"url": dockerd.url, "name": "test"}],
        "exporter": {"buildctl": str(script)},
        "builders": {"ci": {"address": "tcp://buildkitd.test:1234", "budget": "40MB"},
                     "down": {"address": "tcp://down.test:1234"}},
    })
    store, reg = await collect_once(cfg)
    L = {"host": "buildkitd.test", "builder": "ci"}
    got = sum(reg.get_sample_value("buildkit_cache_size_bytes", {**L, "record_type": t, "state": s})
              for t in RECORD_TYPES for s in STATES)
    assert round(got / 1e6, 2) == 44.96
    assert reg.get_sample_value("buildkit_cache_gc_enabled", L) == 1
    assert reg.get_sample_value("buildkit_cache_budget_bytes", L) == 40e6
    assert reg.get_sample_value("buildkit_cache_builder_info", {
        **L, "driver": "remote", "buildkit_version": "v0.0.0+unknown", "container": "", "volume": "",
        "address": "tcp://buildkitd.test:1234"}) == 1
    down = {"host": "down.test", "builder": "down", "measurement": "records"}
    assert reg.get_sample_value("buildkit_cache_measurement_success", down) == 0
    assert "connection refused" in store.builders[("down.test", "down")].results["records"].error


def test_once_exits_1_and_says_why_when_docker_is_down(tmp_path):
    done = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--once", "--docker-host", f"unix://{tmp_path}/no.sock"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == "host local (unreachable)"  # a table for people, not the exposition
    assert lines[-1].startswith("failed: 1: local: ") and "unreachable" in lines[-1]
    assert "unreachable" in done.stderr


def test_once_exits_0_on_a_healthy_host(build_cache):
    done = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--once", "--format", "prometheus", "--docker-host", build_cache.url],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert 'buildkit_cache_measurement_success{builder="default",host="local",measurement="records"} 1.0' in done.stdout
