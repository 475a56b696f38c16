"""What a measurement is: a name, a default interval, a blocking run, and its metric families."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from buildkit_cache.config import Config

if TYPE_CHECKING:  # the Docker SDK is imported once the config said whether ssh:// is needed
    from buildkit_cache.builders import Builder

P = "buildkit_cache_"
B = ["host", "builder"]
T = TypeVar("T")

# Gauge and info families by a short key; their add_metric() signatures differ, hence Any.
Families = dict[str, Any]


def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, labels=[*B, *labels])


def info(name: str, doc: str, *labels: str) -> InfoMetricFamily:
    return InfoMetricFamily(P + name, doc, labels=[*B, *labels])


class Measurement(ABC, Generic[T]):
    """One thing measured on a builder, in the background: when the builder changed, no sooner than
    its interval, and at every safety refresh (exporter/collect.py)."""

    name: str  # the `measurement` label, and its key under exporter.intervals
    interval: float  # the least time between runs unless the config says otherwise
    invalidates: tuple[str, ...] = ()  # measurements to run again at once when this one shrank

    def shrank(self, before: T, after: T) -> bool:
        """Whether the thing measured got smaller between two successful runs."""
        return False

    def applies(self, builder: Builder) -> bool:
        return self.name in builder.measurements

    @abstractmethod
    def run(self, builder: Builder, cfg: Config) -> T:
        """Measure; blocking, in a worker thread. Raises BuilderError (or OSError) on failure."""

    @abstractmethod
    def families(self) -> Families:
        """Fresh, empty metric families for one scrape."""

    @abstractmethod
    def render(self, families: Families, labels: list[str], value: T, as_of: float, cfg: Config) -> None:
        """Add one builder's value (a successful run's, still right `as_of` that Unix time) to the families."""
