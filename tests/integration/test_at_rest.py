"""At rest the exporter asks nothing; a build shows within one records interval (exporter/collect.py).

On every engine of the matrix: the embedded builder with real builds (cache mounts included, which
the engine marks used whenever it computes disk usage: its own write must not read as a change) and
a real buildx builder (BuildKit v0.32.2). What the exporter asks of the builder is read from the
engine's own event log (each `docker exec`). After the first collection, idle intervals bring no
`docker exec` into the builder and no `/system/df`; then a real build in either is measured within
one interval, and the figures equal the engine's and BuildKit's own."""

from __future__ import annotations

import time

import pytest

from buildkit_cache.exporter.metrics import Exposition
from lab.engines import write_build_context
from lab.procs import Service, free_port, http_get, samples, value, wait_for
from tests.conftest import engine_get
from tests.support import buildkit

pytestmark = pytest.mark.integration

INTERVAL = 1.0
GC_AFTER_BUILD = 63.0  # BuildKit's last garbage collection after a build: within 61 s (see below)


def measured(svc: Service, builder: str, measurement: str) -> int:
    return svc.output().count(f"builder test/{builder}: {measurement} measured in")


def walks_for_no_reason(svc: Service, builder: str) -> int:
    """Walks of the state volume, less those for the disk under it having moved: the other tests
    running beside this one write to the same disk, and a disk that moves is rightly walked."""
    out = svc.output()
    return measured(svc, builder, "state_volume") - out.count(f"builder test/{builder}: state_volume due: the disk under it moved")


def engine_total(dockerd) -> int:
    return sum(r["Size"] for r in engine_get(dockerd, "/system/df").get("BuildCache") or [])


def test_at_rest_nothing_is_asked_and_a_build_shows_within_one_interval(dockerd, build_cache, make_builder,
                                                                         layer_contexts, tmp_path):
    rest = make_builder("rest")
    rest.build(layer_contexts[0])
    rest.settle()
    built = time.monotonic()  # the last build on either builder (build_cache's came before)
    started = time.time()

    def execs() -> list[str]:
        return buildkit.exec_starts(dockerd, started, container=rest.container)

    port = free_port()
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"""
docker_hosts: [{{url: '{dockerd.url}', name: test, timeout: 5s}}]
exporter:
  listen: 127.0.0.1:{port}
  intervals: {{discovery: 1s, records: 1s, gc_policy: 1s, filesystem: 1s, state_volume: 1s, refresh: 1h}}
""")
    svc = Service("buildkit_cache.exporter", ["--config", str(cfg), "--log-level", "debug"], tmp_path / "exporter.log")
    url = f"http://127.0.0.1:{port}/metrics"
    L = {"host": "test"}
    try:
        def total(builder: str) -> float:
            s = samples(http_get(url)[1])
            return sum(v for (name, labels), v in s.items()
                       if name == "buildkit_cache_size_bytes" and ("builder", builder) in labels)

        wait_for("both builders measured", lambda: http_get(url)[0] == 200 and all(
            value(http_get(url)[1], "buildkit_cache_measurement_success", builder=b, measurement="records", **L) == 1
            for b in ("default", "rest")), timeout=60)
        # BuildKit goes on writing after a build: the build's trace into its history 3 s later (26.1
        # and later), and its garbage collection, run a second after a build and again a minute later
        # if another build came in between (control.go: throttle.After(time.Minute, c.gc)). Seen on
        # 28.5: containerdmeta.db, metadata_v2.db and snapshots.db written 60 s after build_cache's two
        # builds. Those are changes, rightly measured: at rest is after them, once three check
        # intervals in a row measured nothing.
        time.sleep(max(0.0, built + GC_AFTER_BUILD - time.monotonic()))
        def settled() -> bool:
            before = measured(svc, "default", "records"), measured(svc, "rest", "records"), len(execs())
            time.sleep(3 * INTERVAL)
            return (measured(svc, "default", "records"), measured(svc, "rest", "records"), len(execs())) == before

        wait_for("the cache at rest", settled, timeout=60, every=0)
        calls, df = execs(), measured(svc, "default", "records")
        walks = walks_for_no_reason(svc, "rest")
        time.sleep(6 * INTERVAL)
        assert execs() == calls, "a docker exec into an unchanged builder"
        assert measured(svc, "default", "records") == df, \
            ("a /system/df although nothing changed", [ln for ln in svc.output().splitlines() if "test/default: due" in ln][-3:])
        assert walks_for_no_reason(svc, "rest") == walks, "a walk of an unchanged volume"
        assert total("default") == engine_total(dockerd)
        assert total("rest") == rest.total()

        # A real build on the embedded builder: in the figures within one interval (and a moment: the
        # text is rendered at most once a RENDER_GAP after the snapshot changes).
        ctx = tmp_path / "ctx"
        write_build_context(ctx, "rest", 1, 1)
        dockerd.build(ctx, "rest:latest")
        built = time.monotonic()
        wait_for("the build in the figures", lambda: total("default") == engine_total(dockerd), timeout=10)
        assert time.monotonic() - built < INTERVAL + Exposition.RENDER_GAP + 2.0

        # A real build in the buildx builder: measured again (buildctl du through docker exec), and
        # its figures are BuildKit's own.
        rest.build(layer_contexts[1])
        built = time.monotonic()
        wait_for("the build in the builder's figures", lambda: total("rest") == rest.total(), timeout=10)
        assert time.monotonic() - built < INTERVAL + Exposition.RENDER_GAP + 2.0
        new = execs()[len(calls):]
        assert any(c.endswith("buildctl du --format json") for c in new), new
        wait_for("the builder at rest again", settled, timeout=60, every=0)
        assert total("rest") == rest.total()
    finally:
        svc.stop()
