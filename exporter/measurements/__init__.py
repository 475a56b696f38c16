"""One module per measurement: what it runs on a builder, how often, and the metric families it
renders. Adding a measurement is adding a module here and listing it in `MEASUREMENTS`; a builder
kind says which measurement names it supports (`Builder.measurements`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from buildkit_cache.config import INTERVAL_NAMES, Config

from . import filesystem, gc_policy, records, state_volume
from .base import Families, Measurement

MEASUREMENTS: tuple[Measurement[Any], ...] = (records.MEASUREMENT, gc_policy.MEASUREMENT, filesystem.MEASUREMENT,
                                         state_volume.MEASUREMENT)
BY_NAME: Mapping[str, Measurement[Any]] = {m.name: m for m in MEASUREMENTS}

DISCOVERY = "discovery"
DISCOVERY_INTERVAL = 30.0
REFRESH = "refresh"  # everything is measured again at least this often, changed or not
# Change detection sees what a refresh would (the databases, the container, the disk): the refresh is a
# safety net, rare (its `du`, `debug workers` and walk were most of the cost at rest).
REFRESH_INTERVAL = 3600.0


def intervals(cfg: Config) -> dict[str, float]:
    """How often discovery runs, the least time between runs of each measurement, and the safety
    refresh: the config's `exporter.intervals` over the defaults. An unknown name is a config error
    naming the key."""
    # The config refused any other name (config.INTERVAL_NAMES, held equal to these by a test).
    defaults = {DISCOVERY: DISCOVERY_INTERVAL, REFRESH: REFRESH_INTERVAL, **{m.name: m.interval for m in MEASUREMENTS}}
    return {**defaults, **{k: v for k, v in cfg.exporter.intervals.items() if k in defaults}}


__all__ = ["INTERVAL_NAMES", "MEASUREMENTS", "BY_NAME", "DISCOVERY", "REFRESH", "Families", "Measurement", "intervals"]
