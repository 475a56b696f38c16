"""Alertmanager's webhook payload (version 4) as a small local type. Unknown fields are ignored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STATUSES = ("firing", "resolved")


class PayloadError(ValueError):
    """A body that is not an Alertmanager webhook notification; answered 400."""


@dataclass(frozen=True)
class Alert:
    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    fingerprint: str = ""
    starts_at: str = ""

    @property
    def firing(self) -> bool:
        return self.status == "firing"


@dataclass(frozen=True)
class Notification:
    status: str
    receiver: str
    group_key: str
    alerts: tuple[Alert, ...]
    truncated_alerts: int = 0

    def firing(self) -> list[Alert]:
        return [a for a in self.alerts if a.firing]


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PayloadError(f"{where}: expected an object")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise PayloadError(f"{where}: expected string keys and values")
        out[k] = v
    return out


def _str(value: Any, where: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise PayloadError(f"{where}: expected a string")
    return value


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
            annotations=_str_map(a.get("annotations"), f"{where}.annotations"),
            fingerprint=_str(a.get("fingerprint"), f"{where}.fingerprint"),
            starts_at=_str(a.get("startsAt"), f"{where}.startsAt"),
        ))
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
