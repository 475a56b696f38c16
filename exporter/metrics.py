"""Renders the store into Prometheus metric families on each scrape. No I/O here.

Each measurement renders its own families (`measurements/`); this adds what every builder and host
has: whether and when each measurement last succeeded, the builder's identity and budget, and the
Docker hosts' state.
"""

from __future__ import annotations

import gzip
import platform
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from buildkit_cache import __version__
from buildkit_cache.config import Config
from buildkit_cache.models import WorkerInfo

from .measurements import MEASUREMENTS, gc_policy
from .measurements.base import B, P, gauge, info
from .store import BuilderState, HostState, Store


class CacheCollector(Collector):
    def __init__(self, store: Store, cfg: Config):
        self.store = store
        self.cfg = cfg

    def describe(self) -> list[Metric]:
        # Descriptions would need a collection; returning none keeps registration cheap.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self.families(self.store.builders, self.store.hosts)  # one consistent snapshot

    def families(self, builders: Mapping[tuple[str, str], BuilderState], hosts: Mapping[str, HostState],
                 build: bool = True) -> Iterator[Metric]:
        """Every family, with the samples of these builders and hosts (and the build info)."""
        own = [(m, m.families()) for m in MEASUREMENTS]
        success = gauge("measurement_success", "1 if the last run of the measurement succeeded, else 0.", "measurement")
        duration = gauge("measurement_duration_seconds", "How long the last run of the measurement took.", "measurement")
        last_ok = gauge("measurement_last_success_timestamp_seconds", "When the measurement last succeeded (Unix time).",
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
                if r.last_success_timestamp is not None:
                    last_ok.add_metric([*labels, m.name], r.last_success_timestamp)
                if r.success and r.value is not None:
                    m.render(families, labels, r.value)
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
        if build:
            build_info.add_metric([__version__, platform.python_version()], {})

        for _m, families in own:
            yield from families.values()
        yield from (success, duration, last_ok, budget, host_up, builder_info, host_info, conflicts, build_info)


class _Subset(Collector):
    def __init__(self, families: Callable[[], Iterator[Metric]]):
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return self._families()


def _split(text: bytes) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The text format split by family: [(name, HELP and TYPE lines)] in order, {name: sample lines}."""
    headers: list[tuple[str, str]] = []
    samples: dict[str, list[str]] = {}
    name = ""
    for line in text.decode().splitlines(keepends=True):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            headers.append((name, line))
            samples[name] = []
        elif line.startswith("# TYPE "):
            headers[-1] = (name, headers[-1][1] + line)
        else:
            samples[name].append(line)
    return headers, {k: "".join(v) for k, v in samples.items()}


class Exposition:
    """The text a scrape gets, kept between scrapes: each builder's lines are rendered again only
    when its state changed (the store swaps in a new state object on every result), so a scrape of
    200 builders costs a join, not 12,000 samples rendered while collection competes for the CPU."""

    def __init__(self, store: Store, cfg: Config):
        self.store = store
        self.collector = CacheCollector(store, cfg)
        self.headers, _ = _split(self._text({}, {}, False))
        self._fragments: dict[tuple[str, str], tuple[BuilderState, dict[str, str]]] = {}
        self._last: tuple[object, object, bytes] | None = None
        self._gzip: tuple[bytes, bytes] | None = None

    def _text(self, builders: Mapping[tuple[str, str], BuilderState], hosts: Mapping[str, HostState],
              build: bool) -> bytes:
        return generate_latest(_Subset(lambda: self.collector.families(builders, hosts, build)))

    def render(self) -> bytes:
        builders, hosts = self.store.builders, self.store.hosts
        if self._last is not None and self._last[0] is builders and self._last[1] is hosts:
            return self._last[2]
        fragments = {}
        for key, state in sorted(builders.items()):
            cached = self._fragments.get(key)
            if cached is None or cached[0] is not state:
                cached = (state, _split(self._text({key: state}, {}, False))[1])
            fragments[key] = cached
        self._fragments = fragments
        rest = _split(self._text({}, hosts, True))[1]
        parts = []
        for name, header in self.headers:
            parts.append(header)
            parts.extend(f[1].get(name, "") for f in fragments.values())
            parts.append(rest.get(name, ""))
        body = "".join(parts).encode()
        self._last = (builders, hosts, body)
        return body

    def gzipped(self, body: bytes) -> bytes:
        if self._gzip is None or self._gzip[0] is not body:
            self._gzip = (body, gzip.compress(body, compresslevel=1))
        return self._gzip[1]


def registry_for(store: Store, cfg: Config) -> CollectorRegistry:
    """A private registry serving the store (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CacheCollector(store, cfg))
    return registry


__all__ = ["CacheCollector", "Exposition", "registry_for", "B"]
