"""Reads plain data (parsed YAML) into frozen dataclasses, and writes them back.

Keys, types and defaults come from the dataclasses themselves, so each is written once, in the
model (`config.py`). Scalars that need more than a type (sizes, durations, addresses) name a `Kind`
in their field's metadata, which reads them and writes them back in the same form. Every error is
one line naming the file and the key, with what is allowed there and a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; str() is one line naming the file and key."""


class Invalid(ValueError):
    """Raised by a Kind or a dataclass's `check()`: what is wrong, and where below the current key."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Kind:
    """How a scalar setting is read from the file and written back (e.g. '30s' <-> 30.0)."""

    read: Callable[[Any], Any]
    write: Callable[[Any], Any] = lambda v: v
    whole: bool = False  # a tuple value that is one setting (host, port), not a list of them


def setting(default: Any = MISSING, *, kind: Kind | None = None, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with how it is read; `factory` for mutable defaults."""
    meta = {"kind": kind} if kind else {}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def internal(default: Any) -> Any:
    """A field the program sets, never the file (such as where the config came from)."""
    return field(default=default, compare=False, metadata={"internal": True})


def describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _plain(key: str) -> bool:
    return key.isprintable() and len(key) <= 200


def join(where: str, key: str | int | None) -> str:
    if key is None or key == "":
        return where
    if isinstance(key, int):
        return f"{where}[{key}]"
    if key.startswith("[") and key.endswith("]") and _plain(key[1:-1]):
        return f"{where}{key}"
    if not _plain(key):  # a key that would break the line or hide in it: quoted (and cut)
        key = repr(key if len(key) <= 60 else key[:60] + "...")
    return f"{where}.{key}" if where else key


class Reader:
    """Reads one source (a file's parsed content) into dataclasses."""

    def __init__(self, source: str):
        self.source = source

    def error(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where or '(top level)'}: {message}")

    def read(self, cls: type[T], data: Any, where: str = "") -> T:
        shorthand = getattr(cls, "shorthand", None)
        if shorthand and isinstance(data, str):
            data = {shorthand: data}
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise self.error(where, f"expected a mapping of keys, got {describe(data)}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}
        for key in data:
            if key not in fields:
                allowed = sorted(fields)
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(join(where, str(key)), f"unknown key{hint}; allowed here: {', '.join(allowed)}")
        values: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in data or data[name] is None:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise self.error(join(where, name), "is required")
                continue
            values[name] = self.value(hints[name], data[name], join(where, name), f.metadata.get("kind"))
        try:
            obj = cls(**values)
            check = getattr(obj, "check", None)
            if check is not None:
                obj = check() or obj
        except Invalid as exc:
            raise self.error(join(where, exc.key), str(exc)) from None
        return obj

    def value(self, tp: Any, value: Any, where: str, kind: Kind | None = None) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
            return self.value(inner, value, where, kind)
        if origin is tuple and typing.get_args(tp)[-1] is Ellipsis:
            if not isinstance(value, list):
                raise self.error(where, f"expected a list, got {describe(value)}")
            item = typing.get_args(tp)[0]
            return tuple(self.value(item, v, join(where, i), kind) for i, v in enumerate(value))
        if origin is dict:
            if not isinstance(value, Mapping):
                raise self.error(where, f"expected a mapping of names to settings, got {describe(value)}")
            item = typing.get_args(tp)[1]
            return {str(k): self.value(item, v, join(where, str(k)), kind) for k, v in value.items()}
        if dataclasses.is_dataclass(tp):
            return self.read(tp, value, where)  # type: ignore[arg-type]
        try:
            if kind is not None:
                return kind.read(value)
            return _PLAIN[tp](value)
        except Invalid as exc:
            raise self.error(join(where, exc.key), str(exc)) from None
        except (ValueError, TypeError) as exc:
            raise self.error(where, str(exc)) from None


def as_str(value: Any) -> str:
    if isinstance(value, (Mapping, list, bool)):
        raise ValueError(f"expected a string, got {describe(value)}")
    return str(value)


def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    return value


def as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


_PLAIN: dict[Any, Callable[[Any], Any]] = {str: as_str, bool: as_bool, int: as_int, float: as_float}


def write(obj: Any, kind: Kind | None = None) -> Any:
    """Plain data that reads back into `obj` (for `--check-config`)."""
    if obj is not None and kind is not None and kind.whole:
        return kind.write(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if not f.init or f.metadata.get("internal"):
                continue
            out[f.name] = write(getattr(obj, f.name), f.metadata.get("kind"))
        return out
    if isinstance(obj, dict):
        return {k: write(v, kind) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [write(v, kind) for v in obj]
    if obj is not None and kind is not None:
        return kind.write(obj)
    return obj
