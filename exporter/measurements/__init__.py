"""One module per measurement: what it runs on a builder, how often, and the metric families it
renders. Adding a measurement is adding a module here and listing it in `MEASUREMENTS`; a builder
kind says which measurement names it supports (`Builder.measurements`)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from buildkit_cache.config import Config, ConfigError

from . import filesystem, gc_policy, records, state_volume
from .base import Families, Measurement

MEASUREMENTS: tuple[Measurement[Any], ...] = (records.MEASUREMENT, gc_policy.MEASUREMENT, filesystem.MEASUREMENT,
                                         state_volume.MEASUREMENT)
BY_NAME: Mapping[str, Measurement[Any]] = {m.name: m for m in MEASUREMENTS}

DISCOVERY = "discovery"
DISCOVERY_INTERVAL = 30.0
REFRESH = "refresh"  # everything is measured again at least this often, changed or not
REFRESH_INTERVAL = 600.0


def intervals(cfg: Config) -> dict[str, float]:
    """How often discovery runs, the least time between runs of each measurement, and the safety
    refresh: the config's `exporter.intervals` over the defaults. An unknown name is a config error
    naming the key."""
    defaults = {DISCOVERY: DISCOVERY_INTERVAL, REFRESH: REFRESH_INTERVAL, **{m.name: m.interval for m in MEASUREMENTS}}
    for name in cfg.exporter.intervals:
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{cfg.source}: exporter.intervals.{name}: unknown key{hint}; allowed here: "
                              f"{', '.join(sorted(defaults))}")
    return {**defaults, **cfg.exporter.intervals}


__all__ = ["MEASUREMENTS", "BY_NAME", "DISCOVERY", "REFRESH", "Families", "Measurement", "intervals"]
