"""Renders a collection snapshot into Prometheus metric families. No I/O here.

Each measurement renders its own families (`measurements/`); this adds what every builder and host
has: whether and when each measurement last succeeded, the builder's identity and budget, and the
Docker hosts' state.
"""

from __future__ import annotations

import gzip
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from buildkit_cache import __version__
from buildkit_cache.config import Config
from buildkit_cache.models import WorkerInfo

from .collect import BuilderState, HostState, Snapshot
from .measurements import MEASUREMENTS, gc_policy
from .measurements.base import B, P, gauge, info


class CacheCollector(Collector):
    """prometheus_client's custom collector over whatever snapshot `snapshot()` returns."""

    def __init__(self, snapshot: Callable[[], Snapshot], cfg: Config):
        self.snapshot = snapshot
        self.cfg = cfg

    def describe(self) -> list[Metric]:
        # Descriptions would need a collection; returning none keeps registration cheap.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()  # one consistent picture for the whole scrape
        yield from self.families(snap.builders, snap.hosts)
        threads = GaugeMetricFamily(P + "exporter_threads", "The exporter's measurement threads.")
        threads.add_metric([], snap.threads)
        stuck = GaugeMetricFamily(P + "exporter_threads_stuck",
                                  "Measurement threads held by a call given up on after exporter.timeout that has "
                                  "not returned yet; when all are, measurements fail until one returns.")
        stuck.add_metric([], snap.threads_stuck)
        yield from (threads, stuck)

    def families(self, builders: Mapping[tuple[str, str], BuilderState], hosts: Mapping[str, HostState]
                 ) -> Iterator[Metric]:
        """Every family, with the samples of these builders and hosts (and the build info)."""
        own = [(m, m.families()) for m in MEASUREMENTS]
        success = gauge("measurement_success", "1 if the last run of the measurement succeeded, else 0.", "measurement")
        duration = gauge("measurement_duration_seconds", "How long the last run of the measurement took.", "measurement")
        last_ok = gauge("measurement_last_success_timestamp_seconds",
                        "When the measurement's figures were last known right: its last success, or a later check "
                        "that found the builder unchanged (Unix time).", "measurement")
        failures = gauge("measurement_consecutive_failures",
                         "Failed runs of the measurement in a row; while it fails it is retried less and less often.",
                         "measurement")
        budget = gauge("budget_bytes", "The byte budget configured for the builder (builders.<name>.budget).")
        builder_info = info("builder", "The builder's driver, BuildKit version, container, volume and address.",
                            "driver", "buildkit_version", "container", "volume", "address")
        host_up = GaugeMetricFamily(P + "docker_host_up", "1 if the last discovery on the Docker host succeeded, else 0.",
                                    labels=["host"])
        host_info = InfoMetricFamily(P + "docker_host", "Docker Engine version of the host.",
                                     labels=["host", "version", "api_version"])
        conflicts = GaugeMetricFamily(P + "builder_name_conflicts",
                                      "Builder containers or volumes on the host neither measured nor pruned because "
                                      "their builder name is not theirs alone (see the exporter's log).", labels=["host"])

        for (host, name), state in sorted(builders.items()):
            labels = [host, name]
            results = state.results
            for m, families in own:
                r = results.get(m.name)
                if r is None or not m.applies(state.builder):
                    continue  # not run yet, or not a measurement of this builder
                success.add_metric([*labels, m.name], 1.0 if r.success else 0.0)
                duration.add_metric([*labels, m.name], r.duration_seconds)
                failures.add_metric([*labels, m.name], r.failures)
                if r.last_success_timestamp is not None:
                    last_ok.add_metric([*labels, m.name], r.last_success_timestamp)
                if r.success and r.value is not None:
                    m.render(families, labels, r.value, r.last_success_timestamp or 0.0, self.cfg)
            workers = results.get(gc_policy.MEASUREMENT.name)
            version = workers.value.buildkit_version if workers and isinstance(workers.value, WorkerInfo) else ""
            ref = state.ref
            builder_info.add_metric([*labels, ref.driver, version, ref.container, ref.volume, ref.address], {})
            b = self.cfg.budget_for(host, name)
            if b is not None:
                budget.add_metric(labels, b)

        for host, hs in sorted(hosts.items()):
            host_up.add_metric([host], 1.0 if hs.up else 0.0)
            if hs.up:
                host_info.add_metric([host, hs.version, hs.api_version], {})
                conflicts.add_metric([host], len(hs.refused))

        build_info = InfoMetricFamily(P + "exporter_build", "The exporter's version and Python version.",
                                      labels=["version", "python_version"])
        build_info.add_metric([__version__, platform.python_version()], {})

        for _m, families in own:
            yield from families.values()
        yield from (success, duration, last_ok, failures, budget, host_up, builder_info, host_info, conflicts,
                    build_info)


def registry_for(snapshot: Snapshot | Callable[[], Snapshot], cfg: Config) -> CollectorRegistry:
    """A private registry serving a snapshot, or whatever snapshot the callable returns at each
    scrape (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CacheCollector(snapshot if callable(snapshot) else (lambda: snapshot), cfg))
    return registry


class Exposition:
    """The text a scrape gets, rendered again only when the snapshot is another one: at rest that is
    once a check interval, whatever the scrape rate (gzip kept beside it).

    Rendered where it is asked for (`--once`, tests), or, once `start`ed (the server), by a thread of
    its own when the collection says the snapshot changed, at most once a RENDER_GAP: a scrape then
    never renders, it gets the last whole text (at most RENDER_GAP and one render behind). Rendering
    200 builders takes ~150 ms; done in the scrape, the first collection of 200 builders made scrape
    p99 620 ms (docs/benchmarks.md)."""

    RENDER_GAP = 1.0  # seconds between the starts of two background renders

    def __init__(self, snapshot: Callable[[], Snapshot], cfg: Config):
        self.snapshot = snapshot
        self.registry = registry_for(snapshot, cfg)
        self._text: tuple[Snapshot, bytes, bytes | None] | None = None
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _render(self, gzipped: bool = False) -> tuple[Snapshot, bytes, bytes | None]:
        # The snapshot is read before the text: a newer one published meanwhile is rendered next time.
        # Never a mixed picture: collect() reads one snapshot.
        snap = self.snapshot()
        text = generate_latest(self.registry)
        return snap, text, gzip.compress(text, compresslevel=1) if gzipped else None

    def render(self, gzipped: bool = False) -> bytes:
        with self._lock:
            current = self._text
        if current is None or (self._thread is None and current[0] is not self.snapshot()):
            current = self._render()
            with self._lock:
                self._text = current
        snap, text, packed = current
        if not gzipped:
            return text
        if packed is None:
            packed = gzip.compress(text, compresslevel=1)
            with self._lock:
                if self._text is not None and self._text[0] is snap:
                    self._text = (snap, text, packed)
        return packed

    def changed(self) -> None:
        """The snapshot changed (any thread)."""
        self._changed.set()

    def start(self) -> None:
        """Render in the background from now on (the server)."""
        self._thread = threading.Thread(target=self._run, name="render", daemon=True)
        self._thread.start()
        self._changed.set()

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()

    def _run(self) -> None:
        last = float("-inf")
        while True:
            self._changed.wait()
            if self._stopping:
                return
            time.sleep(max(0.0, last + self.RENDER_GAP - time.monotonic()))
            self._changed.clear()
            last = time.monotonic()
            with self._lock:
                current = self._text
            if current is not None and current[0] is self.snapshot():
                continue
            rendered = self._render(gzipped=True)  # Prometheus asks for gzip: packed here, not in a scrape
            with self._lock:
                self._text = rendered


__all__ = ["CacheCollector", "Exposition", "registry_for", "B"]
