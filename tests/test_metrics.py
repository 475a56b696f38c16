"""What a scrape shows of a collection, and how failures are isolated."""

import asyncio
import dataclasses
import gzip
import threading
import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from buildkit_cache import parse
from buildkit_cache.config import parse_config
from buildkit_cache.exporter.collect import Collection, HostState, Result, collect_once
from buildkit_cache.exporter.metrics import Exposition, registry_for
from tests.support.recorded import RecordedBuilder, StaticInventory

F = Path(__file__).parent / "fixtures" / "buildctl"
H1 = {"url": "unix:///nonexistent/docker.sock", "name": "h1"}  # the recorded builders' host


def scrape(snapshot, cfg):
    return registry_for(lambda: snapshot, cfg)


async def collect(builders, cfg=None):
    cfg = cfg or parse_config({"docker_hosts": [H1], "builders": {"kamal": {"budget": "30MB"}}})
    store = await collect_once(cfg, StaticInventory(builders))
    return store, scrape(store, cfg)


async def test_a_healthy_builder_exports_every_measurement():
    _, reg = await collect([RecordedBuilder("kamal")])
    L = {"host": "h1", "builder": "kamal"}
    v = lambda name, **kw: reg.get_sample_value(name, {**L, **kw})  # noqa: E731
    total = sum(r.size for r in parse.parse_buildctl_du_json((F / "du.json").read_text()))
    assert sum(v("buildkit_cache_size_bytes", record_type=t, state="reclaimable")
               for t in ("regular", "source.local", "exec.cachemount")) == total
    assert v("buildkit_cache_records", record_type="exec.cachemount", state="reclaimable") == 4
    assert v("buildkit_cache_records", record_type="internal", state="in_use") == 0
    assert v("buildkit_cache_records", record_type="source.git.checkout", state="shared") == 0
    assert v("buildkit_cache_state_volume_size_bytes") == 45272 * 1024
    assert v("buildkit_cache_state_volume_files") == 1234
    assert v("buildkit_cache_filesystem_size_bytes") == 264212084 * 1024
    assert v("buildkit_cache_filesystem_files_free") == 16336060
    assert v("buildkit_cache_gc_enabled") == 1
    assert v("buildkit_cache_gc_rule_max_used_bytes", rule="0") == 512e6
    assert v("buildkit_cache_gc_rule_keep_duration_seconds", rule="0") == 172800
    assert v("buildkit_cache_gc_rule_min_free_bytes", rule="3") == 51e9
    assert v("buildkit_cache_gc_rule_info", rule="3", all="true", filters="") == 1
    assert v("buildkit_cache_budget_bytes") == 30e6
    assert v("buildkit_cache_builder_info", driver="docker-container", buildkit_version="v0.0.0+unknown",
             container="buildx_buildkit_kamal0", volume="buildx_buildkit_kamal0_state", address="") == 1
    for m in ("records", "gc_policy", "state_volume", "filesystem"):
        assert v("buildkit_cache_measurement_success", measurement=m) == 1
        assert v("buildkit_cache_measurement_last_success_timestamp_seconds", measurement=m) > 1.7e9


async def test_one_failing_measurement_shows_success_0_and_hides_nothing_else():
    store, reg = await collect([RecordedBuilder("kamal", broken={"records"}), RecordedBuilder("ci")])
    assert reg.get_sample_value("buildkit_cache_measurement_success",
                                {"host": "h1", "builder": "kamal", "measurement": "records"}) == 0
    # No stale or made-up values for the failed measurement...
    assert reg.get_sample_value("buildkit_cache_size_bytes", {"host": "h1", "builder": "kamal",
                                                              "record_type": "regular", "state": "reclaimable"}) is None
    # ...but the same builder's other measurements and the other builder are all there.
    assert reg.get_sample_value("buildkit_cache_state_volume_files", {"host": "h1", "builder": "kamal"}) == 1234
    assert reg.get_sample_value("buildkit_cache_size_bytes", {"host": "h1", "builder": "ci",
                                                              "record_type": "regular", "state": "reclaimable"}) > 0
    assert "container is not running" in store.builders[("h1", "kamal")].results["records"].error
    # The exposition stays valid.
    text = generate_latest(reg).decode()
    assert list(text_string_to_metric_families(text))


async def test_a_hanging_measurement_times_out_as_success_0():
    release = threading.Event()
    cfg = parse_config({"exporter": {"timeout": "300ms"}})
    try:
        store, reg = await collect([RecordedBuilder("kamal", broken={"state_volume"}, hang=release)], cfg)
    finally:
        release.set()
    r = store.builders[("h1", "kamal")].results["state_volume"]
    assert not r.success and "no answer within 0.3s" in r.error
    assert reg.get_sample_value("buildkit_cache_measurement_success",
                                {"host": "h1", "builder": "kamal", "measurement": "records"}) == 1


async def test_last_success_timestamp_survives_a_failure():
    b = RecordedBuilder("kamal")
    cfg = parse_config({})
    s = Collection(cfg, StaticInventory([b]), clock=lambda: 1000.0)
    try:
        await s.collect_once()
        b.broken.add("records")
        s.clock = lambda: 2000.0
        snap = await s.collect_once()
    finally:
        s.close()
    reg = scrape(snap, cfg)
    labels = {"host": "h1", "builder": "kamal", "measurement": "records"}
    assert reg.get_sample_value("buildkit_cache_measurement_success", labels) == 0
    assert reg.get_sample_value("buildkit_cache_measurement_last_success_timestamp_seconds", labels) == 1000.0
    assert reg.get_sample_value("buildkit_cache_measurement_last_success_timestamp_seconds",
                                {**labels, "measurement": "filesystem"}) == 2000.0


async def test_no_budget_no_budget_series_and_idle_windows_are_labelled_like_durations():
    cfg = parse_config({"exporter": {"idle_windows": ["90m", "7d"]}})
    _, reg = await collect([RecordedBuilder("kamal")], cfg)
    assert reg.get_sample_value("buildkit_cache_budget_bytes", {"host": "h1", "builder": "kamal"}) is None
    for w in ("90m", "7d"):
        assert reg.get_sample_value("buildkit_cache_idle_bytes", {"host": "h1", "builder": "kamal", "idle_for": w}) is not None


async def test_when_the_cache_shrinks_its_volume_and_filesystem_are_measured_again_at_once():
    import asyncio

    b = RecordedBuilder("kamal")
    slow = {k: "1h" for k in ("discovery", "gc_policy", "state_volume", "filesystem")}
    cfg = parse_config({"docker_hosts": [H1], "exporter": {"intervals": {**slow, "records": "100ms"}}})
    s = Collection(cfg, StaticInventory([b]))
    task = asyncio.create_task(s.run_forever())
    try:
        for _ in range(100):
            if b.calls.get("records", 0) >= 3:
                break
            await asyncio.sleep(0.05)
        assert b.calls["state_volume"] == 1 and b.calls["filesystem"] == 1
        b.current = b.current[:-3]  # a prune
        for _ in range(100):
            if b.calls["state_volume"] == 2 and b.calls["filesystem"] == 2:
                break
            await asyncio.sleep(0.05)
        assert b.calls["state_volume"] == 2 and b.calls["filesystem"] == 2
        assert b.calls.get("gc_policy") == 1  # not about the cache's size
    finally:
        task.cancel()
        s.close()


async def collected(cfg, builders) -> Collection:
    """A collection that has measured `builders` once, its Docker host h1 up."""
    c = Collection(cfg, StaticInventory(builders))
    try:
        await c.collect_once()
    finally:
        c.close()
    c.snapshot = dataclasses.replace(c.snapshot, hosts={"h1": HostState(True, version="28.5.2", api_version="1.51")})
    return c


async def test_the_served_text_is_rendered_again_only_for_another_snapshot():
    cfg = parse_config({"docker_hosts": [H1], "builders": {"kamal": {"budget": "30MB"}}})
    builders = [RecordedBuilder(n) for n in ("kamal", "ci", "ci1", "zeta")] + [RecordedBuilder("x", broken={"records"})]
    s = await collected(cfg, builders)
    expo = Exposition(lambda: s.snapshot, cfg)
    first = expo.render()
    assert first == generate_latest(registry_for(lambda: s.snapshot, cfg))
    assert expo.render() is first  # nothing changed: the same bytes
    s._set_result(("h1", "ci"), "state_volume", Result(False, 0.5, error="gone"))
    second = expo.render()
    assert second == generate_latest(registry_for(lambda: s.snapshot, cfg)) != first
    fams = {f.name: f for f in text_string_to_metric_families(second.decode())}
    assert {"buildkit_cache_state_volume_size_bytes", "buildkit_cache_docker_host_info"} <= set(fams)
    import gzip
    assert gzip.decompress(expo.render(gzipped=True)) == second


class _Walker(RecordedBuilder):
    """A builder whose state volume walk takes 0.5 s and notes when it ran."""

    measurements = ("state_volume",)
    spans: dict = {}

    def heavy_io(self, measurement):
        return measurement == "state_volume"

    def state_usage(self, timeout=300.0):
        began = time.monotonic()
        time.sleep(0.5)
        self.spans[self.ref.name] = (began, time.monotonic())
        return super().state_usage(timeout)


async def test_walks_of_one_host_take_turns_and_their_duration_is_the_walk_alone():
    cfg = parse_config({"docker_hosts": [H1]})
    _Walker.spans = {}
    store = await collect_once(cfg, StaticInventory([_Walker("a"), _Walker("b"), _Walker("c", host="h2")]))
    a, b, c = (_Walker.spans[n] for n in "abc")
    assert a[1] <= b[0] or b[1] <= a[0], (a, b)  # h1's two walks took turns
    assert c[0] < max(a[0], b[0]) < c[1] or c[0] < min(a[1], b[1]), (a, b, c)  # h2's ran beside them
    durations = [r.results["state_volume"].duration_seconds for r in store.builders.values()]
    assert all(0.45 < d < 0.8 for d in durations), durations  # never the wait for the turn


def test_gzip_only_where_the_scraper_accepts_it():
    from buildkit_cache.exporter.cli import accepts_gzip

    assert accepts_gzip("gzip") and accepts_gzip("deflate, gzip;q=0.5") and accepts_gzip("*")
    assert not accepts_gzip("") and not accepts_gzip("gzip;q=0") and not accepts_gzip("identity")
    assert not accepts_gzip("*, gzip;q=0") and not accepts_gzip("gzip; q=0.0")


def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)


async def test_a_scrape_never_waits_for_a_render_in_the_server(monkeypatch):
    """Once started (the server), the text is rendered by a thread of its own when the snapshot
    changes: a scrape during a render gets the last whole text at once, the next one the new text."""
    from buildkit_cache.exporter import metrics

    cfg = parse_config({"docker_hosts": [{"url": "unix:///nonexistent.sock", "name": "h1"}]})
    c = await collected(cfg, [RecordedBuilder("kamal")])
    e = Exposition(lambda: c.snapshot, cfg)
    c.on_change = e.changed
    e.start()
    try:
        up = b'buildkit_cache_docker_host_up{host="h1"} 1.0'
        await asyncio.to_thread(_until, lambda: up in e.render())
        before = e.render()
        assert up in before

        entered, gate = threading.Event(), threading.Event()
        real = metrics.generate_latest

        def held(registry):
            entered.set()
            gate.wait(10)
            return real(registry)

        monkeypatch.setattr(metrics, "generate_latest", held)
        c.snapshot = dataclasses.replace(c.snapshot, hosts={"h1": HostState(False, error="down")})
        assert entered.wait(10), "the change was rendered in the background"
        assert e.render() == before  # not waiting for the render in progress
        assert gzip.decompress(e.render(gzipped=True)) == before  # the same text, gzipped
        gate.set()
        down = b'buildkit_cache_docker_host_up{host="h1"} 0.0'
        await asyncio.to_thread(_until, lambda: down in e.render())
        assert down in e.render()
    finally:
        gate.set()
        e.stop()
