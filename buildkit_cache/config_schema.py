"""A small strict reader for YAML config: each error names the key and what is allowed."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .units import parse_duration, parse_size

T = TypeVar("T")
_MISSING = object()


class ConfigError(ValueError):
    """A config file that cannot be used; str() is one line naming the file and key."""


class Section:
    """One mapping of the config, read key by key; `finish()` rejects keys nobody asked for."""

    def __init__(self, data: Any, path: str, source: str):
        self.path = path
        self.source = source
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise self.error(f"expected a mapping of keys, got {_kind(data)}", key=None)
        self.data = data
        self.seen: set[str] = set()

    def where(self, key: str | int | None) -> str:
        if key is None:
            return self.path or "(top level)"
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else str(key)

    def error(self, message: str, key: str | int | None) -> ConfigError:
        return ConfigError(f"{self.source}: {self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        self.seen.add(key)  # an optional key is still an allowed one
        return key in self.data

    def get(self, key: str, convert: Callable[[Any], T], default: Any = _MISSING, what: str = "") -> T:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise self.error("is required" + (f": {what}" if what else ""), key)
            return default
        try:
            return convert(self.data[key])
        except (ValueError, TypeError) as exc:
            raise self.error(str(exc), key) from None

    def section(self, key: str) -> Section:
        self.seen.add(key)
        return Section(self.data.get(key), self.where(key), self.source)

    def items(self, key: str) -> list[tuple[str, Section]]:
        """A mapping of name -> mapping, such as `builders`."""
        self.seen.add(key)
        raw = self.data.get(key) or {}
        if not isinstance(raw, Mapping):
            raise self.error(f"expected a mapping of names to settings, got {_kind(raw)}", key)
        return [(str(name), Section(v, f"{self.where(key)}.{name}", self.source)) for name, v in raw.items()]

    def list(self, key: str) -> list[tuple[str, Any]]:
        """A list; each entry comes with its location for error messages."""
        self.seen.add(key)
        raw = self.data.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise self.error(f"expected a list, got {_kind(raw)}", key)
        return [(f"{self.where(key)}[{i}]", v) for i, v in enumerate(raw)]

    def finish(self) -> None:
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            key = str(unknown[0])
            allowed = sorted(self.seen)
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.error(f"unknown key{hint}; allowed here: {', '.join(allowed)}", key)


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def as_str(value: Any) -> str:
    if isinstance(value, (Mapping, list)) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {_kind(value)}")
    return str(value)


def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def as_size(value: Any) -> int:
    return parse_size(value)


def as_duration(value: Any) -> float:
    return parse_duration(value)


def as_positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


def as_positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a whole number above zero, got {value!r}")
    return value


def as_listen(value: Any) -> tuple[str, int]:
    """'host:port', ':port' or '[::1]:port'."""
    text = as_str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port such as 127.0.0.1:9862, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)
