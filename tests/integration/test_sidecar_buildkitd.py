"""A standalone buildkitd with no Docker host at all, the exporter beside it as in its pod: the
builder given by its socket and its state directory (`builders.<name>: {address, state_dir}`,
`docker_hosts: []`) gets every figure a docker-container builder gets, equal to that buildkitd's own
`buildctl du` and to du's walk, its BuildKit databases counted apart, and a build is seen because
its databases change, while an idle buildkitd is not asked again."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from buildkit_cache import fs
from buildkit_cache.config import parse_config
from buildkit_cache.exporter.collect import Collection, collect_once
from buildkit_cache.exporter.metrics import registry_for
from buildkit_cache.inventory import Inventory
from tests.support import buildkit

pytestmark = pytest.mark.integration


@pytest.fixture
def bkd(tmp_path):
    b = buildkit.Buildkitd(tmp_path / "bkd")
    yield b
    b.stop()


def sidecar_config(bkd: buildkit.Buildkitd, intervals=None):
    return parse_config({"docker_hosts": [],
                         "builders": {"buildkitd": {"address": bkd.address, "state_dir": str(bkd.state),
                                                    "budget": "30MB"}},
                         "exporter": {"buildctl": bkd.buildctl_path,
                                      **({"intervals": intervals} if intervals else {})}})


async def test_a_sidecar_builder_gets_every_figure_with_no_docker_host(bkd, layer_contexts):
    bkd.build(layer_contexts[0])
    du = bkd.settle()
    cfg = sidecar_config(bkd)
    assert cfg.docker_hosts == ()
    snap = await collect_once(cfg, Inventory(cfg))
    reg = registry_for(snap, cfg)
    (key,) = snap.builders
    L = {"host": key[0], "builder": "buildkitd"}
    v = lambda name, **kw: reg.get_sample_value(name, {**L, **kw})  # noqa: E731
    for m in ("records", "gc_policy", "state_volume", "filesystem"):
        assert v("buildkit_cache_measurement_success", measurement=m) == 1, m
    assert len(du) > 3
    assert sum(v("buildkit_cache_size_bytes", record_type=t, state=s) or 0
               for t in ("regular", "source.local", "exec.cachemount", "frontend", "internal", "source.git.checkout")
               for s in ("in_use", "shared", "reclaimable")) == sum(r.get("size", 0) for r in du)
    assert v("buildkit_cache_gc_enabled") == 1
    tree = fs.tree_usage(str(bkd.state), 30)
    assert v("buildkit_cache_state_volume_size_bytes") == tree.bytes
    assert v("buildkit_cache_state_volume_files") == tree.files
    st = os.statvfs(bkd.state)
    assert v("buildkit_cache_filesystem_files_free") is not None
    assert v("buildkit_cache_filesystem_size_bytes") == st.f_blocks * st.f_frsize
    # BuildKit's own databases, which buildctl du leaves out (moby/buildkit#4218): their own series.
    dbs = [p for p in bkd.state.rglob("*.db")]
    assert {p.name for p in dbs} >= {"cache.db", "history.db", "metadata_v2.db", "containerdmeta.db"}
    assert v("buildkit_cache_state_databases_bytes") == fs.databases_bytes(str(bkd.state)) > 0
    assert v("buildkit_cache_builder_info", driver="remote", buildkit_version=buildkit.VERSION, container="",
             volume="", address=bkd.address) == 1


def quiet(bkd: buildkit.Buildkitd, seconds: float = 5.0, timeout: float = 30.0) -> None:
    """Wait until buildkitd has not written its databases for `seconds`. It writes them by itself a
    while after it starts (its containerd metadata, after about a second) and after a build (the
    build's history and containerd's collection of what it let go, about 3 s later): each such
    write is a change the exporter rightly asks about."""
    deadline = time.monotonic() + timeout
    last, since = fs.databases_fingerprint(str(bkd.state)), time.monotonic()
    while time.monotonic() - since < seconds:
        assert time.monotonic() < deadline, "buildkitd kept writing its databases"
        time.sleep(0.2)
        now = fs.databases_fingerprint(str(bkd.state))
        if now != last:
            last, since = now, time.monotonic()


async def test_a_sidecar_builder_is_asked_only_when_its_databases_change(bkd, layer_contexts, tmp_path):
    """At rest the databases stand still and buildkitd is not asked; a build writes them and the
    next collection asks `du` again and sees the new records, then it is left alone again."""
    seen = tmp_path / "asked"
    # buildctl itself, every call written down: the exporter's only way to this buildkitd.
    wrapper = tmp_path / "buildctl"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {seen}\nexec {bkd.buildctl_path} "$@"\n')
    wrapper.chmod(0o755)
    cfg = parse_config({"docker_hosts": [],
                        "builders": {"buildkitd": {"address": bkd.address, "state_dir": str(bkd.state)}},
                        "exporter": {"buildctl": str(wrapper),
                                     "intervals": {"records": "200ms", "gc_policy": "200ms", "state_volume": "200ms",
                                                   "filesystem": "200ms", "refresh": "1h"}}})
    asked = lambda: seen.read_text().count("du --format json") if seen.exists() else 0  # noqa: E731
    await asyncio.to_thread(quiet, bkd)
    c = Collection(cfg, Inventory(cfg))
    task = asyncio.create_task(c.run_forever())
    try:
        await asyncio.sleep(3.0)
        assert asked() == 1, "an idle buildkitd was asked again"
        await asyncio.to_thread(bkd.build, layer_contexts[1])
        du = await asyncio.to_thread(bkd.settle)
        await asyncio.to_thread(quiet, bkd)
        await asyncio.sleep(1.0)
        after_build = asked()
        assert after_build >= 2, "a build did not make the exporter ask again"
        summary = next(iter(c.snapshot.builders.values())).results["records"].value
        assert (summary.total_records, summary.total_bytes) == (len(du), sum(r.get("size", 0) for r in du))
        await asyncio.sleep(3.0)
        assert asked() == after_build, "an idle buildkitd was asked again after the build"
    finally:
        task.cancel()
        c.close()
