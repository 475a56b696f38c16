"""`records`: bytes and counts by record type and state, and idle bytes by age."""

from __future__ import annotations

from typing import TYPE_CHECKING

from buildkit_cache.config import Config
from buildkit_cache.memory import BIG_ANSWER, give_back
from buildkit_cache.models import FILESYSTEM, RECORDS, STATE_VOLUME
from buildkit_cache.units import format_duration
from buildkit_cache.usage import UsageSummary

from .base import Families, Measurement, gauge

if TYPE_CHECKING:  # the Docker SDK is imported once the config said whether ssh:// is needed
    from buildkit_cache.builders import Builder


class Records(Measurement[UsageSummary]):
    name = RECORDS
    interval = 30.0
    invalidates = (STATE_VOLUME, FILESYSTEM)

    def shrank(self, before: UsageSummary, after: UsageSummary) -> bool:
        return after.total_bytes < before.total_bytes

    def run(self, builder: Builder, cfg: Config) -> UsageSummary:
        # Keep the summary, not the records: a busy builder has tens of thousands.
        summary = builder.usage()
        if summary.total_records >= BIG_ANSWER:
            give_back()  # the decoded records are gone: their memory goes back too
        return summary

    def families(self) -> Families:
        return {
            "records": gauge("records", "Cache records by record type and state (in_use, shared, reclaimable).",
                             "record_type", "state"),
            "size": gauge("size_bytes", "Cache bytes by record type and state (in_use, shared, reclaimable).",
                          "record_type", "state"),
            "idle": gauge("idle_bytes", "Bytes of reclaimable records (not in use, not shared, not internal or "
                          "frontend) unused for at least idle_for: what a prune with until=idle_for frees.", "idle_for"),
            "never_reused": gauge("never_reused_bytes", "Bytes of records not in use that were used once at most "
                                  "(usage count 0 or 1): built and never a cache hit since, what a budget pays for "
                                  "and gets nothing back from. `buildkit-cache-exporter --once --top N` names the "
                                  "largest records."),
        }

    def render(self, families: Families, labels: list[str], value: UsageSummary, as_of: float, cfg: Config) -> None:
        for (rtype, state), (count, size) in sorted(value.by_type_state.items()):
            families["records"].add_metric([*labels, rtype, state], count)
            families["size"].add_metric([*labels, rtype, state], size)
        # Idle bytes age with the clock: from what the last answer left, as of the last check.
        for window, size in sorted(value.idle_bytes(as_of, cfg.exporter.idle_windows).items()):
            families["idle"].add_metric([*labels, format_duration(window)], size)
        families["never_reused"].add_metric(labels, value.never_reused_bytes)


MEASUREMENT = Records()
