"""Renders the store into Prometheus metric families on each scrape. No I/O here."""

from __future__ import annotations

import platform
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from buildkit_cache import __version__
from buildkit_cache.builders import FILESYSTEM, RECORDS, STATE_VOLUME, WORKERS
from buildkit_cache.config import Config
from buildkit_cache.models import FilesystemUsage, TreeUsage, WorkerInfo
from buildkit_cache.units import format_duration
from buildkit_cache.usage import UsageSummary

from .store import Store

P = "buildkit_cache_"
B = ["host", "builder"]


class CacheCollector(Collector):
    def __init__(self, store: Store, cfg: Config):
        self.store = store
        self.cfg = cfg

    def describe(self) -> list:
        # Descriptions would need a collection; returning none keeps registration cheap.
        return []

    def collect(self) -> Iterator:
        builders = self.store.builders  # one consistent snapshot
        hosts = self.store.hosts

        g = {
            "records": GaugeMetricFamily(P + "records", "Cache records by record type and state (in_use, shared, reclaimable).", labels=B + ["record_type", "state"]),
            "size": GaugeMetricFamily(P + "size_bytes", "Cache bytes by record type and state (in_use, shared, reclaimable).", labels=B + ["record_type", "state"]),
            "idle": GaugeMetricFamily(P + "idle_bytes", "Bytes of reclaimable records (not in use, not shared, not internal or frontend) unused for at least idle_for: what a prune with until=idle_for frees.", labels=B + ["idle_for"]),
            "vol_size": GaugeMetricFamily(P + "state_volume_size_bytes", "On-disk size of the builder's state volume (allocated blocks, like du).", labels=B),
            "vol_files": GaugeMetricFamily(P + "state_volume_files", "Files, directories and links in the builder's state volume (inodes it uses).", labels=B),
            "fs_size": GaugeMetricFamily(P + "filesystem_size_bytes", "Size of the filesystem holding the builder's state.", labels=B),
            "fs_avail": GaugeMetricFamily(P + "filesystem_avail_bytes", "Bytes available to unprivileged users on the filesystem holding the builder's state.", labels=B),
            "fs_files": GaugeMetricFamily(P + "filesystem_files", "Inodes of the filesystem holding the builder's state.", labels=B),
            "fs_files_free": GaugeMetricFamily(P + "filesystem_files_free", "Free inodes of the filesystem holding the builder's state.", labels=B),
            "gc_enabled": GaugeMetricFamily(P + "gc_enabled", "1 if the builder's garbage collection has any policy rule, else 0.", labels=B),
            "gc_keep": GaugeMetricFamily(P + "gc_rule_keep_duration_seconds", "GC rule: records unused for longer than this are pruned (0: unset).", labels=B + ["rule"]),
            "gc_reserved": GaugeMetricFamily(P + "gc_rule_reserved_bytes", "GC rule: the cache is never pruned below this size (0: unset).", labels=B + ["rule"]),
            "gc_max": GaugeMetricFamily(P + "gc_rule_max_used_bytes", "GC rule: the cache is pruned down to this size (0: unset).", labels=B + ["rule"]),
            "gc_free": GaugeMetricFamily(P + "gc_rule_min_free_bytes", "GC rule: the cache is pruned to keep this much of the disk free (0: unset).", labels=B + ["rule"]),
            "budget": GaugeMetricFamily(P + "budget_bytes", "The byte budget configured for the builder (builders.<name>.budget).", labels=B),
            "success": GaugeMetricFamily(P + "measurement_success", "1 if the last run of the measurement succeeded, else 0.", labels=B + ["measurement"]),
            "duration": GaugeMetricFamily(P + "measurement_duration_seconds", "How long the last run of the measurement took.", labels=B + ["measurement"]),
            "last_ok": GaugeMetricFamily(P + "measurement_last_success_timestamp_seconds", "When the measurement last succeeded (Unix time).", labels=B + ["measurement"]),
            "host_up": GaugeMetricFamily(P + "docker_host_up", "1 if the last discovery on the Docker host succeeded, else 0.", labels=["host"]),
        }
        builder_info = InfoMetricFamily(P + "builder", "The builder's driver, BuildKit version, container, volume and address.",
                                        labels=B + ["driver", "buildkit_version", "container", "volume", "address"])
        gc_info = InfoMetricFamily(P + "gc_rule", "A GC rule's filters and whether it prunes shared and internal records too (all).",
                                   labels=B + ["rule", "all", "filters"])
        host_info = InfoMetricFamily(P + "docker_host", "Docker Engine version of the host.", labels=["host", "version", "api_version"])

        for (host, name), state in sorted(builders.items()):
            labels = [host, name]
            results = state.results
            workers = _value(results.get(WORKERS), WorkerInfo)
            ref = state.ref
            builder_info.add_metric(labels + [ref.driver, workers.buildkit_version if workers else "",
                                              ref.container, ref.volume, ref.address], {})
            for measurement in state.builder.measurements:
                r = results.get(measurement)
                if r is None:
                    continue  # not run yet
                g["success"].add_metric(labels + [measurement], 1.0 if r.success else 0.0)
                g["duration"].add_metric(labels + [measurement], r.duration_seconds)
                if r.last_success_timestamp is not None:
                    g["last_ok"].add_metric(labels + [measurement], r.last_success_timestamp)

            usage = _value(results.get(RECORDS), UsageSummary)
            if usage:
                for (rtype, st), (count, size) in sorted(usage.by_type_state.items()):
                    g["records"].add_metric(labels + [rtype, st], count)
                    g["size"].add_metric(labels + [rtype, st], size)
                for window, size in sorted(usage.idle_bytes.items()):
                    g["idle"].add_metric(labels + [format_duration(window)], size)

            tree = _value(results.get(STATE_VOLUME), TreeUsage)
            if tree:
                g["vol_size"].add_metric(labels, tree.bytes)
                g["vol_files"].add_metric(labels, tree.files)

            fsu = _value(results.get(FILESYSTEM), FilesystemUsage)
            if fsu:
                g["fs_size"].add_metric(labels, fsu.size_bytes)
                g["fs_avail"].add_metric(labels, fsu.avail_bytes)
                g["fs_files"].add_metric(labels, fsu.files)
                g["fs_files_free"].add_metric(labels, fsu.files_free)

            if workers:
                g["gc_enabled"].add_metric(labels, 1.0 if workers.gc_enabled else 0.0)
                for i, rule in enumerate(workers.gc_rules):
                    rl = labels + [str(i)]
                    g["gc_keep"].add_metric(rl, rule.keep_duration_seconds)
                    g["gc_reserved"].add_metric(rl, rule.reserved_bytes)
                    g["gc_max"].add_metric(rl, rule.max_used_bytes)
                    g["gc_free"].add_metric(rl, rule.min_free_bytes)
                    gc_info.add_metric(rl + ["true" if rule.all else "false", ",".join(rule.filters)], {})

            budget = self.cfg.budget_for(name)
            if budget is not None:
                g["budget"].add_metric(labels, budget)

        for host, hs in sorted(hosts.items()):
            g["host_up"].add_metric([host], 1.0 if hs.up else 0.0)
            if hs.up:
                host_info.add_metric([host, hs.version, hs.api_version], {})

        build = InfoMetricFamily(P + "exporter_build", "The exporter's version and Python version.",
                                 labels=["version", "python_version"])
        build.add_metric([__version__, platform.python_version()], {})

        yield from g.values()
        yield builder_info
        yield gc_info
        yield host_info
        yield build


def registry_for(store: Store, cfg: Config) -> CollectorRegistry:
    """A private registry serving the store (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CacheCollector(store, cfg))
    return registry


def _value(result, kind):
    if result is None or not result.success or not isinstance(result.value, kind):
        return None
    return result.value
