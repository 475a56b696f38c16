"""What an alert asks for and whether the config allows it. Pure functions, no I/O.

An alert names its action with the `buildkit_action` label and its builder with the `host` and
`builder` labels the exporter's series carry. Only names found in the config are ever used: no
label value becomes an argument of anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from buildkit_cache.config import ActionConfig, Config
from buildkit_cache.models import PruneRequest

from .payload import Alert

ACTION_LABEL = "buildkit_action"

# Decisions, as they appear in logs, the audit trail and the `decision` metric label.
ACCEPTED = "accepted"
RESOLVED = "resolved"
NO_ACTION = "no_action"
UNKNOWN_ACTION = "unknown_action"
MISSING_BUILDER = "missing_builder_labels"
NOT_ALLOWED = "not_allowed"
NO_BUDGET = "no_budget"
COOLDOWN = "cooldown"
BUSY = "duplicate_in_progress"
UNKNOWN_BUILDER = "unknown_builder"
DECISIONS = (ACCEPTED, RESOLVED, NO_ACTION, UNKNOWN_ACTION, MISSING_BUILDER, NOT_ALLOWED, NO_BUDGET,
             COOLDOWN, BUSY, UNKNOWN_BUILDER)


@dataclass(frozen=True)
class Decision:
    decision: str
    reason: str
    action: ActionConfig | None = None
    host: str = ""
    builder: str = ""
    request: PruneRequest | None = None
    fingerprint: str = ""

    @property
    def accepted(self) -> bool:
        return self.decision == ACCEPTED

    @property
    def action_name(self) -> str:
        """The action's configured name, or 'unknown': never an unvetted label value."""
        return self.action.name if self.action else "unknown"


def prune_request(action: ActionConfig, budget: int | None) -> PruneRequest:
    if action.kind == "prune-to-budget":
        assert budget is not None
        return PruneRequest(keep_storage=budget)
    if action.kind == "prune-idle":
        return PruneRequest(keep_duration_seconds=action.idle_for)
    return PruneRequest(all=True)


def decide(alert: Alert, cfg: Config) -> Decision:
    """The decision for one alert, before cooldowns and before looking the builder up."""
    fp = alert.fingerprint
    if not alert.firing:
        return Decision(RESOLVED, "the alert is resolved; nothing to prune", fingerprint=fp)
    name = alert.labels.get(ACTION_LABEL)
    if not name:
        return Decision(NO_ACTION, f"the alert has no {ACTION_LABEL} label", fingerprint=fp)
    action = cfg.actuator.actions.get(name)
    if action is None:
        return Decision(UNKNOWN_ACTION, f"unknown action {name[:64]!r}; configured actions: "
                        f"{', '.join(sorted(cfg.actuator.actions))}", fingerprint=fp)
    host, builder = alert.labels.get("host", ""), alert.labels.get("builder", "")
    if not host or not builder:
        return Decision(MISSING_BUILDER, "the alert needs host and builder labels", action, fingerprint=fp)
    bcfg = cfg.builders.get(builder)
    if bcfg is not None and bcfg.actions is not None and name not in bcfg.actions:
        return Decision(NOT_ALLOWED, f"builders.{builder}.actions does not allow {name}", action, host, builder,
                        fingerprint=fp)
    budget = bcfg.budget if bcfg else None
    if action.kind == "prune-to-budget" and budget is None:
        return Decision(NO_BUDGET, f"{name} needs builders.{builder}.budget", action, host, builder, fingerprint=fp)
    return Decision(ACCEPTED, "accepted", action, host, builder, prune_request(action, budget), fingerprint=fp)


def in_cooldown(last_started: float | None, now: float, cooldown: float) -> bool:
    """Whether a (builder, action) that last started at `last_started` must wait."""
    return last_started is not None and now - last_started < cooldown
