"""What an alert asks for, whether it may run, and the claim that makes it once per incident.

The one place an alert's decision is settled: `decide()` is a pure function of the alert, the
config and the builders the Docker hosts have now; `Claims` adds the two rules that depend on what
ran before (a repeat while queued or running, a repeat within the cooldown) and claims what it
accepts. An alert names its action with the `buildkit_action` label and its builder with the `host`
and `builder` labels of the exporter's series. Only names found in the config or on the hosts are
ever used: no label value becomes an argument of anything.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from buildkit_cache.config import ActionConfig, Config
from buildkit_cache.models import BuilderRef, PruneRequest

from .payload import Alert
from .state import Entry, Key, MemoryState, StateError, StateFile

log = logging.getLogger("actuator")

ACTION_LABEL = "buildkit_action"
FUTURE_SLACK = 60.0  # a start later than now by more than this, on this clock: the clock went back

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
BUILDER_CHANGED = "builder_changed"  # the name means another builder than when the alert started
EXPIRED = "expired"  # the alert ended (endsAt in the past): an old notification
LOOKUP_FAILED = "builder_lookup_failed"  # the Docker host could not be asked: answered 503, retried
STATE_FAILED = "state_unwritable"  # the claim could not be recorded: answered 503, retried
AUDIT_FAILED = "audit_unwritable"  # the prune could not be put on record first: answered 503, retried
OTHER_POD = "other_pod"  # the alert is about another pod than this actuator's (Kubernetes)
RETRY_LATER = (LOOKUP_FAILED, STATE_FAILED, AUDIT_FAILED)
DECISIONS = (ACCEPTED, RESOLVED, NO_ACTION, UNKNOWN_ACTION, MISSING_BUILDER, NOT_ALLOWED, NO_BUDGET,
             COOLDOWN, BUSY, UNKNOWN_BUILDER, BUILDER_CHANGED, EXPIRED, LOOKUP_FAILED, STATE_FAILED, AUDIT_FAILED,
             OTHER_POD)


@dataclass(frozen=True)
class Action:
    """A configured action, by its name."""

    name: str
    kind: str
    idle_for: float | None = None

    @classmethod
    def of(cls, name: str, cfg: ActionConfig) -> Action:
        if cfg.kind is None:  # config.ActuatorConfig.check fills every kind in
            raise ValueError(f"action {name!r} has no kind")
        return cls(name, cfg.kind, cfg.idle_for)


@dataclass(frozen=True)
class Decision:
    decision: str
    reason: str
    action: Action | None = None
    host: str = ""
    builder: str = ""
    request: PruneRequest | None = None
    fingerprint: str = ""
    target: BuilderRef | None = None  # the builder an accepted decision acts on

    @property
    def accepted(self) -> bool:
        return self.decision == ACCEPTED

    @property
    def action_name(self) -> str:
        """The action's configured name, or 'unknown': never an unvetted label value."""
        return self.action.name if self.action else "unknown"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.host, self.builder, self.action_name)


def prune_request(action: Action, budget: int | None) -> PruneRequest:
    if action.kind == "prune-to-budget":
        if budget is None:  # decide() answers no_budget before it gets here
            raise ValueError("prune-to-budget needs a budget")
        return PruneRequest(keep_storage=budget)
    if action.kind == "prune-idle":
        return PruneRequest(keep_duration_seconds=action.idle_for or 0.0)
    return PruneRequest(all=True)


def decide(alert: Alert, cfg: Config, builders: Mapping[tuple[str, str], BuilderRef] | None,
           changed_since: float | None = None, now: float | None = None,
           pod: tuple[str, str] | None = None) -> Decision:
    """The decision for one alert, before claims. `builders`: the builders the hosts have now, by
    their (host, builder) labels; None when the alert's host could not be asked (not decided here).
    `changed_since`: when the alert's builder name came to mean another builder, if it did.
    `pod`: (namespace, name) of the pod this actuator runs in, as a sidecar of its buildkitd: every
    such pod's builder has the same host and builder labels, so an alert must name the pod too."""
    fp = alert.fingerprint
    name = alert.labels.get(ACTION_LABEL)
    actions = cfg.actuator.enabled_actions
    action = Action.of(name, actions[name]) if name in actions else None
    host, builder = alert.labels.get("host", ""), alert.labels.get("builder", "")
    if not alert.firing:  # audited with its action and builder, so the incident's end is on record
        return Decision(RESOLVED, "the alert is resolved; nothing to prune", action, host, builder, fingerprint=fp)
    now = time.time() if now is None else now
    ends, starts = alert.ends, alert.starts
    if ends is not None and ends < now:
        return Decision(EXPIRED, f"the alert ended at {alert.ends_at[:40]}: an old notification, nothing to prune",
                        action, host, builder, fingerprint=fp)
    if not name:
        return Decision(NO_ACTION, f"the alert has no {ACTION_LABEL} label", fingerprint=fp)
    if pod is not None and (alert.labels.get("namespace"), alert.labels.get("pod")) != pod:
        said = f"pod {alert.labels.get('pod', '')[:64]!r} in namespace {alert.labels.get('namespace', '')[:64]!r}"
        return Decision(OTHER_POD, f"the alert is about {said}; this actuator prunes pod {pod[1]} in namespace "
                        f"{pod[0]} only (a route that sends it here is wrong: see docs/actuator.md, Kubernetes)",
                        action, host, builder, fingerprint=fp)
    if action is None:
        return Decision(UNKNOWN_ACTION, f"unknown action {name[:64]!r}; configured actions: "
                        f"{', '.join(sorted(actions))}", fingerprint=fp)
    if not host or not builder:
        return Decision(MISSING_BUILDER, "the alert needs host and builder labels", action, fingerprint=fp)
    settings = cfg.settings_for(host, builder)
    if settings is not None and settings.actions is not None and name not in settings.actions:
        return Decision(NOT_ALLOWED, f"builders.{builder}.actions does not allow {name}", action, host, builder,
                        fingerprint=fp)
    budget = settings.budget if settings else None
    if builders is None:
        if action.kind == "prune-to-budget" and budget is None:  # retrying cannot help
            return Decision(NO_BUDGET, f"{name} needs a budget for {builder}", action, host, builder, fingerprint=fp)
        return Decision(LOOKUP_FAILED, f"cannot list the builders of host {host[:64]!r} right now", action, host,
                        builder, fingerprint=fp)
    target = builders.get((host, builder))
    if target is None:  # a typo in a rule or a config key, or a builder gone: say what there is
        known = sorted(f"{h}/{b}" for h, b in builders)
        listed = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        return Decision(UNKNOWN_BUILDER, f"no builder {builder[:64]!r} on host {host[:64]!r}; builders known here: "
                        f"{listed or 'none'}", action, host, builder, fingerprint=fp)
    if action.kind == "prune-to-budget" and budget is None:
        return Decision(NO_BUDGET, f"{name} needs a budget for {builder}", action, host, builder, fingerprint=fp)
    if changed_since is not None and (starts is None or starts < changed_since):
        return Decision(BUILDER_CHANGED, f"{host[:64]}/{builder[:64]} names another builder ({target.container or target.volume}) "
                        "since after the alert started; nothing pruned: the alert is re-evaluated on the new figures",
                        action, host, builder, fingerprint=fp)
    return Decision(ACCEPTED, "accepted", action, host, builder, prune_request(action, budget), fp, target)


def in_cooldown(last_started: float | None, now: float, cooldown: float) -> bool:
    """Whether a (builder, action) that last started at `last_started` must wait."""
    return last_started is not None and now - last_started < cooldown


class Claims:
    """Once per incident: what is queued or running, and when each (builder, action) last started,
    in the state file (`state.py`) when there is one, so that a restart or a second replica keeps them.

    `settle` checks and claims in one call, which the service runs on its single state thread
    (never on the event loop), and each change to the state file is made under that file's lock, so
    the check and the claim that follows it cannot interleave, in this process or between replicas:
    of 50 copies of a notification arriving together, one is accepted.

    Time: an entry is aged by its writer's times where the writer's clock is this process's (itself,
    or a process of the same boot whose clock agrees), else by this process's monotonic clock from
    when it first saw the entry. So a replica whose clock is ahead, behind, or on another host never
    takes a cooldown or a running claim for over early, and clean-up drops only what is provably over
    on this process's clock. A running claim holds at most `hold` (the longest a prune may take) from
    its start; times that cannot be right (NaN, infinite, a `busy_until` before the start) are not
    obeyed: the claim holds its whole `hold` from when this process first saw it.
    """

    def __init__(self, cooldown: float, clock: Callable[[], float], state: MemoryState | StateFile | None = None,
                 hold: float = 3600.0, monotonic: Callable[[], float] = time.monotonic):
        self.cooldown = cooldown
        self.clock = clock
        self.monotonic = monotonic
        self.state = state if state is not None else MemoryState()
        self.hold = hold  # how long a running claim holds when its process is gone (prune_timeout + margin)
        self._first_seen: dict[tuple[Key, str, str], float] = {}

    def _age(self, key: Key, e: Entry, now: float) -> tuple[float, float]:
        """How long ago the entry started, on a clock this process can trust, and how long its claim
        holds from its start."""
        sane = (math.isfinite(e.started) and math.isfinite(e.busy_until)
                and e.started <= e.busy_until <= e.started + 366 * 86400)
        if sane and self.state.same_clock(e) and e.started <= now + FUTURE_SLACK:
            return now - e.started, min(e.busy_until - e.started, self.hold)
        # Not this process's clock, or times it cannot obey: aged from when this process first saw it.
        seen = (key, e.owner, repr(e.started))
        if seen not in self._first_seen:
            self._first_seen[seen] = self.monotonic()
            if not sane or self.state.same_clock(e):
                log.warning("state file: %s of %s/%s has times this clock cannot obey (started %r, busy until %r): "
                            "it holds as if started now", key[2], key[0], key[1], e.started, e.busy_until)
        first = self._first_seen[seen]
        return self.monotonic() - first, min(e.busy_until - e.started, self.hold) if sane else self.hold

    def holds(self, key: Key, e: Entry, now: float) -> tuple[bool, float]:
        """Whether the entry's claim still holds, and how long its cooldown has run."""
        age, hold = self._age(key, e, now)
        return e.running and age < hold, age

    def settle(self, d: Decision, claim: bool = True) -> Decision:
        """An accepted decision claimed, or turned into a busy or cooldown skip. Without `claim` (a
        dry run) the same checks are made and nothing is recorded: a dry run takes no cooldown and
        never blocks the real prune that follows it."""
        if not d.accepted:
            return d
        now = self.clock()
        try:
            with self.state.locked() as shared:
                e = shared.get(d.key)
                if e is not None:
                    busy, age = self.holds(d.key, e, now)
                    # A claim holds whoever made it: one this process could not release (the state
                    # disk was read-only for a moment) expires like a dead process's.
                    if busy:
                        return replace(d, decision=BUSY, reason="the same prune is already queued or running")
                    if age < self.cooldown:
                        return replace(d, decision=COOLDOWN,
                                       reason=f"{d.action_name} ran on {d.host}/{d.builder} {age:.0f}s ago; "
                                              f"cooldown ends in {self.cooldown - age:.0f}s")
                if not claim:
                    return d
                for key, old in list(shared.entries.items()):  # what is provably over on this clock
                    busy, age = self.holds(key, old, now)
                    if not busy and age >= self.cooldown and self.state.same_clock(old):
                        shared.pop(key)
                shared.put(d.key, Entry(now, True, now + self.hold, **self.state.stamp(now)))
        except StateError as exc:
            return replace(d, decision=STATE_FAILED, reason=f"cannot record the claim, so no prune: {exc}")
        return d

    def release(self, d: Decision, ran: bool) -> None:
        """The claim's run is over. One that pruned nothing leaves no cooldown: retry at once."""
        try:
            with self.state.locked() as shared:
                e = shared.get(d.key)
                if e is None or e.owner != self.state.owner or not e.running:
                    return
                if ran:
                    shared.put(d.key, replace(e, running=False))
                else:
                    shared.pop(d.key)
        except StateError as exc:
            # The claim stays 'running' in the file until its hold ends: the safe side.
            log.error("releasing the claim on %s/%s %s: %s", d.host, d.builder, d.action_name, exc)
