"""The actuator's own metrics, in a private registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .decide import DECISIONS
from .payload import LIMITS

P = "buildkit_cache_actuator_"


class ActuatorMetrics:
    def __init__(self, action_names: list[str]):
        # A `_created` series beside every counter and histogram child says when this process made it:
        # nothing a dashboard or rule uses, and ~60 series of noise.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.notifications = Counter(P + "notifications", "Webhook requests by HTTP status code.", ["code"], registry=r)
        self.alerts = Counter(P + "alerts", "Alerts received, by action and decision.", ["action", "decision"], registry=r)
        self.prunes = Counter(P + "prunes", "Prunes run, by builder, action and result.",
                              ["host", "builder", "action", "result"], registry=r)
        self.reclaimed = Counter(P + "reclaimed_bytes", "Bytes of the records prunes deleted, as BuildKit reported "
                                 "them (records shared with images free no disk).", ["host", "builder", "action"],
                                 registry=r)
        self.disk_freed = Counter(P + "disk_freed_bytes", "Bytes that became available on the filesystem holding "
                                  "the builder's cache across its prunes (statvfs before and after; what df shows).",
                                  ["host", "builder", "action"], registry=r)
        self.duration = Histogram(P + "prune_duration_seconds", "How long prunes took.", ["action"], registry=r,
                                  buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.in_progress = Gauge(P + "prunes_in_progress", "Prunes running now.", registry=r)
        self.audit_write_failures = Counter(P + "audit_write_failures", "Times the audit file could not be written "
                                            "(no new prunes until it can).", registry=r)
        self.audit_writable = Gauge(P + "audit_writable", "1 if the audit file can be written, else 0 (prunes refused).",
                                    registry=r)
        self.audit_dropped = Counter(P + "audit_lines_dropped", "Audit lines not written, by event: rejected "
                                     "requests past a few a second are only counted.", ["event"], registry=r)
        self.limit_hits = Counter(P + "limit_hits", "Requests refused for breaking a limit of one notification "
                                  "(body size, alerts, distinct builders, labels, label length, string length).",
                                  ["limit"], registry=r)
        self.last_prune = Gauge(P + "last_prune_timestamp_seconds", "When the last successful prune ended.",
                                ["host", "builder", "action"], registry=r)
        # Known series start at zero, so rate() and alerts see them from the first scrape.
        for code in ("200", "400", "401", "413", "503"):
            self.notifications.labels(code)
        self.audit_dropped.labels("rejected")
        for limit in LIMITS:
            self.limit_hits.labels(limit)
        for a in [*action_names, "unknown"]:
            for d in DECISIONS:
                self.alerts.labels(a, d)

    def track_in_progress(self, running: Callable[[], int]) -> None:
        self.in_progress.set_function(lambda: float(running()))

    def track_running(self, started: Callable[[], dict[tuple[str, str], float]],
                      clock: Callable[[], float]) -> None:
        """`running_prune_seconds`: how long each running prune has run (a prune of a big cache
        takes minutes; an alert on it says when one runs past what is usual)."""
        self.registry.register(_RunningPrunes(started, clock))


class _RunningPrunes(Collector):
    def __init__(self, started: Callable[[], dict[tuple[str, str], float]], clock: Callable[[], float]):
        self.started = started
        self.clock = clock

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily(P + "running_prune_seconds", "How long each prune running now has run.",
                                   labels=["host", "builder"])
        now = self.clock()
        for (host, builder), since in sorted(self.started().items()):
            family.add_metric([host, builder], max(now - since, 0.0))
        yield family
