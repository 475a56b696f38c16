"""Alertmanager's webhook payload (version 4) as a small local type. Unknown fields are ignored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from buildkit_cache.parse import parse_timestamp

STATUSES = ("firing", "resolved")

# Limits of one notification, far above what Alertmanager sends for this project's rules (one alert
# per builder and action, a dozen labels). Past them the notification is refused (400: Alertmanager
# does not retry it) and the limit is counted (buildkit_cache_actuator_limit_hits_total).
MAX_ALERTS = 500  # alerts in one notification
MAX_BUILDERS = 50  # distinct (host, builder) among its firing alerts
MAX_LABELS = 64  # labels (or annotations) of one alert
MAX_LABEL_LENGTH = 1024  # characters of a label's name or value
MAX_STRING = 4096  # characters of any other string field (annotations, receiver, groupKey, ...)
LIMITS = ("body", "alerts", "builders", "labels", "label_length", "string_length")


class PayloadError(ValueError):
    """A body that is not an Alertmanager webhook notification; answered 400. `limit` names the
    limit it broke, if that is why."""

    def __init__(self, message: str, limit: str = ""):
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class Alert:
    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    fingerprint: str = ""
    starts_at: str = ""
    ends_at: str = ""

    @property
    def firing(self) -> bool:
        return self.status == "firing"

    @property
    def starts(self) -> float | None:
        return _time(self.starts_at)

    @property
    def ends(self) -> float | None:
        """When the alert ended, or None while it has no end (Go's zero time, or absent)."""
        return _time(self.ends_at)


def _time(text: str) -> float | None:
    try:
        t = parse_timestamp(text) if text else None
    except ValueError:
        return None
    return t.timestamp() if t is not None else None


@dataclass(frozen=True)
class Notification:
    status: str
    receiver: str
    group_key: str
    alerts: tuple[Alert, ...]
    truncated_alerts: int = 0

    def firing(self) -> list[Alert]:
        return [a for a in self.alerts if a.firing]


def _text(value: str, where: str, most: int, limit: str) -> str:
    if len(value) > most:
        raise PayloadError(f"{where}: over {most} characters", limit)
    # JSON may carry lone surrogates ("\\ud800"): no name in the config has them, nor may any output.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError(f"{where}: not valid Unicode (a lone surrogate)") from None
    return value


def _str_map(value: Any, where: str, labels: bool = True) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PayloadError(f"{where}: expected an object")
    if len(value) > MAX_LABELS:
        raise PayloadError(f"{where}: over {MAX_LABELS} entries", "labels")
    most, limit = (MAX_LABEL_LENGTH, "label_length") if labels else (MAX_STRING, "string_length")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise PayloadError(f"{where}: expected string keys and values")
        out[_text(k, f"{where} (a name)", MAX_LABEL_LENGTH, "label_length")] = _text(v, f"{where}.{k[:64]}", most, limit)
    return out


def _str(value: Any, where: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise PayloadError(f"{where}: expected a string")
    return _text(value, where, MAX_STRING, "string_length")


def parse_notification(data: Any) -> Notification:
    """Validate a decoded JSON body; raise PayloadError naming what is wrong."""
    if not isinstance(data, Mapping):
        raise PayloadError("body: expected a JSON object")
    version = data.get("version")
    if version is not None and version != "4":
        raise PayloadError(f"version: expected \"4\", got {version!r}")
    status = _str(data.get("status"), "status")
    if status not in STATUSES:
        raise PayloadError(f"status: expected firing or resolved, got {status!r}")
    raw_alerts = data.get("alerts")
    if not isinstance(raw_alerts, list):
        raise PayloadError("alerts: expected a list")
    if len(raw_alerts) > MAX_ALERTS:
        raise PayloadError(f"alerts: over {MAX_ALERTS} in one notification", "alerts")
    alerts = []
    for i, a in enumerate(raw_alerts):
        where = f"alerts[{i}]"
        if not isinstance(a, Mapping):
            raise PayloadError(f"{where}: expected an object")
        a_status = _str(a.get("status"), f"{where}.status")
        if a_status not in STATUSES:
            raise PayloadError(f"{where}.status: expected firing or resolved, got {a_status!r}")
        alerts.append(Alert(
            status=a_status,
            labels=_str_map(a.get("labels"), f"{where}.labels"),
            annotations=_str_map(a.get("annotations"), f"{where}.annotations", labels=False),
            fingerprint=_str(a.get("fingerprint"), f"{where}.fingerprint"),
            starts_at=_str(a.get("startsAt"), f"{where}.startsAt"),
            ends_at=_str(a.get("endsAt"), f"{where}.endsAt"),
        ))
    builders = {(a.labels.get("host", ""), a.labels.get("builder", "")) for a in alerts if a.firing}
    if len(builders) > MAX_BUILDERS:
        raise PayloadError(f"alerts: over {MAX_BUILDERS} distinct builders in one notification", "builders")
    truncated = data.get("truncatedAlerts", 0)
    if isinstance(truncated, bool) or not isinstance(truncated, int):
        raise PayloadError("truncatedAlerts: expected a number")
    return Notification(
        status=status,
        receiver=_str(data.get("receiver"), "receiver"),
        group_key=_str(data.get("groupKey"), "groupKey"),
        alerts=tuple(alerts),
        truncated_alerts=truncated,
    )
