"""A buildkitd with no Docker host at all, the exporter beside it as in its pod: the builder given by
its socket and its state directory (`builders.<name>: {address, state_dir}`, `docker_hosts: []`)
gets every figure a docker-container builder gets, its changes are seen, and BuildKit's own
databases are counted. buildkitd cannot run here: its buildctl answers with recorded outputs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from buildkit_cache import fs, parse
from buildkit_cache.config import parse_config
from buildkit_cache.exporter.collect import Collection, collect_once
from buildkit_cache.exporter.metrics import registry_for
from buildkit_cache.inventory import Inventory

F = Path(__file__).resolve().parent / "fixtures" / "buildctl"


def sidecar(tmp_path, intervals=None):
    state = tmp_path / "state"
    (state / "runc-overlayfs" / "snapshots" / "1").mkdir(parents=True)
    for name in ("cache.db", "history.db", "runc-overlayfs/metadata_v2.db", "runc-overlayfs/containerdmeta.db"):
        (state / name).write_bytes(b"\0" * 32768)
    (state / "runc-overlayfs" / "snapshots" / "1" / "layer").write_bytes(os.urandom(200_000))
    calls = tmp_path / "calls"
    ctl = tmp_path / "buildctl"
    ctl.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
case "$*" in
  *"du --format json") cat {F}/du.json ;;
  *"debug workers --format json") cat {F}/debug-workers-gc.json ;;
  *) echo "unsupported: $*" >&2; exit 2 ;;
esac
""")
    ctl.chmod(0o755)
    cfg = parse_config({"docker_hosts": [],
                        "builders": {"buildkitd": {"address": "unix:///run/buildkit/buildkitd.sock",
                                                   "state_dir": str(state), "budget": "30MB"}},
                        "exporter": {"buildctl": str(ctl), **({"intervals": intervals} if intervals else {})}})
    return cfg, state, calls


async def test_a_sidecar_builder_gets_every_figure_with_no_docker_host(tmp_path):
    cfg, state, _ = sidecar(tmp_path)
    assert cfg.docker_hosts == ()
    snap = await collect_once(cfg, Inventory(cfg))
    reg = registry_for(snap, cfg)
    (key,) = snap.builders
    L = {"host": key[0], "builder": "buildkitd"}
    v = lambda name, **kw: reg.get_sample_value(name, {**L, **kw})  # noqa: E731
    for m in ("records", "gc_policy", "state_volume", "filesystem"):
        assert v("buildkit_cache_measurement_success", measurement=m) == 1, m
    records = parse.parse_buildctl_du_json((F / "du.json").read_text())
    assert sum(v("buildkit_cache_size_bytes", record_type=t, state="reclaimable")
               for t in ("regular", "source.local", "exec.cachemount")) == sum(r.size for r in records)
    assert v("buildkit_cache_gc_enabled") == 1
    tree = fs.tree_usage(str(state), 30)
    assert v("buildkit_cache_state_volume_size_bytes") == tree.bytes
    assert v("buildkit_cache_state_volume_files") == tree.files
    st = os.statvfs(state)
    assert v("buildkit_cache_filesystem_avail_bytes") == st.f_bavail * st.f_frsize
    assert v("buildkit_cache_filesystem_files_free") is not None
    # BuildKit's own databases, which buildctl du leaves out (moby/buildkit#4218): their own series.
    assert v("buildkit_cache_state_databases_bytes") == 4 * 32768
    assert v("buildkit_cache_builder_info", driver="remote", buildkit_version="v0.0.0+unknown", container="",
             volume="", address="unix:///run/buildkit/buildkitd.sock") == 1


def write(db: Path) -> None:
    """What BuildKit does to a database when a build adds records: a page rewritten."""
    with open(db, "r+b") as f:
        f.write(b"\1" * 16)
    os.utime(db, ns=(time.time_ns(), time.time_ns()))


async def test_a_sidecar_builder_is_asked_only_when_its_databases_change(tmp_path):
    import asyncio

    cfg, state, calls = sidecar(tmp_path, {"records": "100ms", "gc_policy": "100ms", "state_volume": "100ms",
                                           "filesystem": "100ms", "refresh": "1h"})
    c = Collection(cfg, Inventory(cfg))
    task = asyncio.create_task(c.run_forever())
    try:
        await asyncio.sleep(1.0)
        assert calls.read_text().count("du --format json") == 1
        write(state / "cache.db")
        await asyncio.sleep(0.6)
        assert calls.read_text().count("du --format json") == 2
    finally:
        task.cancel()
        c.close()
