"""`gc_policy`: the builder's garbage-collection rules (and its BuildKit version), from
`buildctl debug workers`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from buildkit_cache.config import Config
from buildkit_cache.models import GC_POLICY, WorkerInfo

from .base import Families, Measurement, gauge, info

if TYPE_CHECKING:  # the Docker SDK is imported once the config said whether ssh:// is needed
    from buildkit_cache.builders import Builder


class GCPolicy(Measurement[WorkerInfo]):
    name = GC_POLICY
    interval = 300.0

    def run(self, builder: Builder, cfg: Config) -> WorkerInfo:
        return builder.gc_policy()

    def families(self) -> Families:
        return {
            "enabled": gauge("gc_enabled", "1 if the builder's garbage collection has any policy rule, else 0."),
            "keep": gauge("gc_rule_keep_duration_seconds",
                          "GC rule: records unused for longer than this are pruned (0: unset).", "rule"),
            "reserved": gauge("gc_rule_reserved_bytes", "GC rule: the cache is never pruned below this size (0: unset).",
                              "rule"),
            "max": gauge("gc_rule_max_used_bytes", "GC rule: the cache is pruned down to this size (0: unset).", "rule"),
            "free": gauge("gc_rule_min_free_bytes",
                          "GC rule: the cache is pruned to keep this much of the disk free (0: unset).", "rule"),
            "info": info("gc_rule", "A GC rule's filters and whether it prunes shared and internal records too (all).",
                         "rule", "all", "filters"),
        }

    def render(self, families: Families, labels: list[str], value: WorkerInfo, as_of: float, cfg: Config) -> None:
        families["enabled"].add_metric(labels, 1.0 if value.gc_enabled else 0.0)
        for i, rule in enumerate(value.gc_rules):
            rl = [*labels, str(i)]
            families["keep"].add_metric(rl, rule.keep_duration_seconds)
            families["reserved"].add_metric(rl, rule.reserved_bytes)
            families["max"].add_metric(rl, rule.max_used_bytes)
            families["free"].add_metric(rl, rule.min_free_bytes)
            families["info"].add_metric([*rl, "true" if rule.all else "false", ",".join(rule.filters)], {})


MEASUREMENT = GCPolicy()
