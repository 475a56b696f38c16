"""The exporter against a real private dockerd with real BuildKit build cache."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from buildkit_cache.config import parse_config
from buildkit_cache.docker_api import api_at_least
from buildkit_cache.errors import BuilderError
from buildkit_cache.exporter.collect import collect_once as collect_snapshot
from buildkit_cache.exporter.metrics import registry_for
from buildkit_cache.inventory import Inventory
from buildkit_cache.models import RECORD_TYPES, STATES
from tests.conftest import engine_get
from tests.support import builder_container, buildkit

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


@pytest.fixture
def kamal(make_builder, layer_contexts):
    """A real buildx builder `kamal` with real build cache: two builds, layers and a cache mount."""
    b = make_builder("kamal")
    for ctx in layer_contexts:
        b.build(ctx)
    b.settle()
    return b


def by_type_state(records: list[dict]) -> dict[tuple[str, str], tuple[int, int]]:
    """BuildKit's own `buildctl du` records, counted and summed by record type and state."""
    out: dict[tuple[str, str], list[int]] = {}
    for r in records:
        state = "in_use" if r["inUse"] else "shared" if r["shared"] else "reclaimable"
        cell = out.setdefault((r["recordType"] or "regular", state), [0, 0])
        cell[0] += 1
        cell[1] += r["size"]
    return {k: (v[0], v[1]) for k, v in out.items()}


def exported_by_type_state(reg, labels: dict) -> dict[tuple[str, str], tuple[int, int]]:
    out = {}
    for t in RECORD_TYPES:
        for st in STATES:
            L = {**labels, "record_type": t, "state": st}
            n = reg.get_sample_value("buildkit_cache_records", L)
            if n:
                out[(t, st)] = (int(n), int(reg.get_sample_value("buildkit_cache_size_bytes", L)))
    return out


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


def test_someones_docker_system_df_meanwhile_fails_no_records_measurement(build_cache, caplog):
    """Someone runs `docker system df` while the exporter measures. Docker 20.10 computes one disk
    usage at a time and refuses a second meanwhile (500 "a disk usage operation is already running"),
    which failed the exporter's records measurement; it waits for the other one now, on the same
    connection (over ssh:// a new one is a new session). 23.0 and later share the one running, so
    there both just answer."""
    caplog.set_level(logging.DEBUG, logger="buildkit_cache.docker_api")
    (engine,) = [b for b in Inventory(config_for(build_cache)).discover("test").builders if b.ref.name == "default"]
    one_at_a_time = not api_at_least(engine.host.api_version, "1.42")  # 20.10
    client = engine.host.client()
    stop = threading.Event()
    runs, refused = [], []  # the CLI's own runs, and its refusals

    def someone() -> None:
        while not stop.is_set():
            done = build_cache.cli("system", "df", check=False)
            runs.append(done.returncode)
            if b"a disk usage operation is already running" in done.stderr:
                refused.append(done.stderr)

    def waited() -> bool:  # the exporter met the CLI's disk usage running and asked again
        return any("asking again" in r.getMessage() for r in caplog.records)

    user = threading.Thread(target=someone)
    user.start()
    failures, measured = [], 0
    started = time.monotonic()
    try:
        while (time.monotonic() - started < 4 or len(runs) < 10
               or (one_at_a_time and not (waited() and refused) and time.monotonic() - started < 60)):
            try:
                engine.usage()
                measured += 1
            except BuilderError as exc:
                failures.append(str(exc))
    finally:
        stop.set()
        user.join()
    assert not failures, failures[:3]
    assert measured > 10
    if one_at_a_time:  # the two overlapped, each way
        assert waited() and refused, f"no overlap in {len(runs)} runs of docker system df: ask more often"
    assert engine.host.client() is client


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


async def test_buildx_builder_container_and_its_state_volume_are_found_and_walked(dockerd, kamal):
    store, reg = await collect_once(config_for(dockerd, builders={"kamal": {"budget": "1GB"}}))
    L = {"host": "test", "builder": "kamal"}
    assert reg.get_sample_value("buildkit_cache_builder_info", {
        **L, "driver": "docker-container", "buildkit_version": buildkit.VERSION, "container": kamal.container,
        "volume": kamal.volume, "address": ""}) == 1
    # Records: what the builder's own `buildctl du` says, by type and state.
    du = kamal.du()
    assert {r["recordType"] for r in du} >= {"regular", "source.local", "exec.cachemount"}
    assert exported_by_type_state(reg, L) == by_type_state(du)
    # The state volume, walked independently; its filesystem's statvfs.
    size, files = walk(kamal.mountpoint())
    assert files > 40
    assert reg.get_sample_value("buildkit_cache_state_volume_size_bytes", L) == size
    assert reg.get_sample_value("buildkit_cache_state_volume_files", L) == files
    st = os.statvfs(kamal.mountpoint())
    assert reg.get_sample_value("buildkit_cache_filesystem_files", L) == st.f_files
    assert reg.get_sample_value("buildkit_cache_budget_bytes", L) == 1e9
    # BuildKit v0.32 turns GC on by default: the rules its `debug workers` reports.
    import json
    (worker,) = json.loads(kamal.buildctl("debug", "workers", "--format", "json").stdout)
    policy = worker["gcPolicy"]
    assert reg.get_sample_value("buildkit_cache_gc_enabled", L) == 1
    for i, rule in enumerate(policy):
        assert reg.get_sample_value("buildkit_cache_gc_rule_max_used_bytes", {**L, "rule": str(i)}) == rule.get(
            "maxUsedSpace", 0), rule
    # Its execs leave nothing behind in the builder: busybox `timeout`'s watcher exits within a
    # second of its command, and the builder's init reaps it.
    await asyncio.sleep(2)
    assert kamal.zombies() == []


async def test_without_host_access_the_volume_and_filesystem_are_measured_inside_the_container(dockerd, kamal):
    cfg = parse_config({"docker_hosts": [{"url": dockerd.url, "name": "test", "host_root": ""}]})
    _, reg = await collect_once(cfg)
    L = {"host": "test", "builder": "kamal"}
    size, files = walk(kamal.mountpoint())
    # busybox du -k rounds to KiB; find counts the same entries as the walk.
    assert abs(reg.get_sample_value("buildkit_cache_state_volume_size_bytes", L) - size) <= 1024 * 4
    assert reg.get_sample_value("buildkit_cache_state_volume_files", L) == files
    st = os.statvfs(kamal.mountpoint())
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


@pytest.fixture
def standin_builder(dockerd, standin_image):
    """The builder stand-in: what a real buildkitd cannot be made to do here (a buildctl older than
    --format, garbage, a 70 MB flood). Its buildctl prints recordings of a real one."""
    container, volume = builder_container.start_builder(dockerd, "kamal0")
    builder_container.fill_state(dockerd, container)
    yield container, volume
    dockerd.cli("rm", "-f", container, check=False)
    dockerd.cli("volume", "rm", volume, check=False)


async def test_older_buildctl_without_format_falls_back_to_verbose_output(dockerd, standin_builder):
    """Stand-in: only BuildKit v0.32 can be built here, and its buildctl has --format; releases
    before v0.11 had not (their `du -v` and `debug workers --verbose` output is recorded)."""
    container, _ = standin_builder
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
async def test_garbage_or_a_flood_from_buildctl_fails_records_only_and_recovers(dockerd, standin_builder, switch, said,
                                                                               caplog):
    """Stand-in: no real buildctl prints garbage or 70 MB (a damaged binary or terminal would)."""
    container, _ = standin_builder
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


async def test_stopped_builder_fails_records_but_still_measures_its_volume(dockerd, make_builder, layer_contexts):
    b = make_builder("stopped")
    b.build(layer_contexts[0])
    dockerd.cli("stop", "-t", "5", b.container)
    store, reg = await collect_once(config_for(dockerd))
    L = {"host": "test", "builder": "stopped"}
    assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "records"}) == 0
    assert "not running" in store.builders[("test", "stopped")].results["records"].error
    assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "state_volume"}) == 1
    assert reg.get_sample_value("buildkit_cache_state_volume_files", L) == walk(b.mountpoint())[1] > 10
    # Other builders are unaffected.
    assert reg.get_sample_value("buildkit_cache_measurement_success",
                                {"host": "test", "builder": "default", "measurement": "records"}) == 1


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


async def test_remote_buildkitd_is_measured_with_a_local_buildctl(dockerd, tmp_path, layer_contexts):
    """A standalone buildkitd on tcp://, as Kubernetes runs it, with real build cache; another
    address where nothing listens."""
    from lab.procs import free_port

    bkd = buildkit.Buildkitd(tmp_path / "bkd", address=f"tcp://127.0.0.1:{free_port()}")
    try:
        bkd.build(layer_contexts[0])
        bkd.settle()  # buildctl returns before BuildKit lets go of the build's records (seen in CI)
        cfg = parse_config({
            "docker_hosts": [{"url": dockerd.url, "name": "test"}],
            "exporter": {"buildctl": bkd.buildctl_path},
            "builders": {"ci": {"address": bkd.address, "budget": "40MB"},
                         "down": {"address": f"tcp://127.0.0.1:{free_port()}"}},
        })
        store, reg = await collect_once(cfg)
        du = bkd.du()
    finally:
        bkd.stop()
    L = {"host": "127.0.0.1", "builder": "ci"}
    assert exported_by_type_state(reg, L) == by_type_state(du) != {}
    assert reg.get_sample_value("buildkit_cache_gc_enabled", L) == 1
    assert reg.get_sample_value("buildkit_cache_budget_bytes", L) == 40e6
    assert reg.get_sample_value("buildkit_cache_builder_info", {
        **L, "driver": "remote", "buildkit_version": buildkit.VERSION, "container": "", "volume": "",
        "address": bkd.address}) == 1
    down = {"host": "127.0.0.1", "builder": "down", "measurement": "records"}
    assert reg.get_sample_value("buildkit_cache_measurement_success", down) == 0
    assert "connection refused" in store.builders[("127.0.0.1", "down")].results["records"].error


def test_once_exits_1_and_says_why_when_docker_is_down(tmp_path):
    """No socket (Docker not installed or not started), and a socket left behind by a dockerd that
    died (nothing listens): each says so, in the table and the log, and --once exits 1."""
    import socket

    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))  # bound, never listening: what a killed dockerd leaves
    try:
        for sock, says in ((tmp_path / "no.sock", "does not exist: is Docker running?"),
                           (stale, "refused")):
            done = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--once", "--docker-host",
                                   f"unix://{sock}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert done.returncode == 1
            lines = done.stdout.splitlines()
            assert lines[0] == "host local (unreachable)"  # a table for people, not the exposition
            assert lines[-1].startswith("failed: 1: local: ") and says in lines[-1], lines[-1]
            assert str(sock) in lines[-1] and says in done.stderr
    finally:
        s.close()


def test_once_exits_0_on_a_healthy_host(build_cache):
    done = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--once", "--format", "prometheus", "--docker-host", build_cache.url],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert 'buildkit_cache_measurement_success{builder="default",host="local",measurement="records"} 1.0' in done.stdout


def test_an_empty_cache_is_zero_records_and_success_fresh_and_after_prune_all(engine, tmp_path):
    """A fresh engine (Docker 29 answers `{"BuildCacheUsage":{}}` then), and the same engine after
    `docker builder prune -af`: 0 records, every measurement a success, `--once` exits 0."""
    from lab.engines import PrivateDockerd, write_build_context
    from tests.conftest import work_dir

    fresh = PrivateDockerd(work_dir(f"bkce-fresh-{engine.id}-"), engine)

    def once() -> tuple[int, dict]:
        done = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--once", "--format", "prometheus",
                               "--docker-host", fresh.url], capture_output=True, text=True, timeout=120, cwd=ROOT)
        from lab.procs import samples

        got = samples(done.stdout)
        assert done.returncode == 0, done.stderr
        L = {"host": "local", "builder": "default"}
        assert got[("buildkit_cache_measurement_success", frozenset({**L, "measurement": "records"}.items()))] == 1
        assert "records failed" not in done.stderr, done.stderr
        return sum(v for (n, _), v in got.items() if n == "buildkit_cache_records"), got

    try:
        fresh.start()
        assert once()[0] == 0
        write_build_context(tmp_path / "ctx", "fresh", 1, 1)
        fresh.build(tmp_path / "ctx", "fresh:latest")
        assert once()[0] == len(fresh.api("/system/df")["BuildCache"]) > 0
        fresh.cli("builder", "prune", "-af")
        assert once()[0] == 0
    finally:
        fresh.close()


def test_once_top_names_each_builders_largest_records(dockerd, kamal):
    """`--once --top N`: what fills each cache, from the builder's own records, largest first."""
    done = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--once", "--top", "3", "--docker-host",
                           dockerd.url], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("builder local/kamal ("))
    du = sorted(kamal.du(), key=lambda r: r["size"], reverse=True)
    assert f"({len(du):,} records" in lines[start] and lines[start].endswith("the 3 largest")
    assert lines[start + 1].split() == ["TYPE", "STATE", "SIZE", "LAST", "USED", "USES", "DESCRIPTION"]
    from buildkit_cache.exporter.table import size

    for line, record in zip(lines[start + 2:start + 5], du[:3], strict=True):
        assert line.split()[:3] == [record["recordType"], "in_use" if record["inUse"] else
                                    "shared" if record["shared"] else "reclaimable", size(record["size"])], line
        assert len(line) <= 100
    assert any(lines[start + 2 + i].rstrip().endswith("…") or du[i]["description"][:20] in lines[start + 2 + i]
               for i in range(3))


def test_once_in_prometheus_format_is_what_metrics_serves(build_cache, tmp_path):
    """The same engine, asked by `--once --format prometheus` and by the server: the same families,
    label sets and values, but for when and how long each measurement ran."""
    import re

    from lab.procs import Service, free_port, http_get, samples, wait_for

    port = free_port()
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"docker_hosts: [{{url: '{build_cache.url}', name: test}}]\n"
                   f"builders: {{default: {{budget: 1GB}}}}\nexporter: {{listen: '127.0.0.1:{port}'}}\n")
    once = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--config", str(cfg), "--once",
                           "--format", "prometheus"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    svc = Service("buildkit_cache.exporter", ["--config", str(cfg)], tmp_path / "exporter.log")
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for("records", lambda: "buildkit_cache_size_bytes{" in http_get(url)[1], timeout=30)
        served = http_get(url)[1]
    finally:
        svc.stop()

    def comparable(text):
        # When and how long, and the free space of a live filesystem (this test writes its logs
        # there), differ between two runs; the rest is the same collection rendered the same way.
        moving = re.compile(r"measurement_(duration_seconds|last_success_timestamp_seconds)$|"
                            r"_(avail_bytes|free_bytes|files_free)$")
        return {k: (None if moving.search(k[0]) else v) for k, v in samples(text).items()}

    assert comparable(once.stdout) == comparable(served)
    assert re.findall(r"^# (?:HELP|TYPE) .*$", once.stdout, re.M) == re.findall(r"^# (?:HELP|TYPE) .*$", served, re.M)
