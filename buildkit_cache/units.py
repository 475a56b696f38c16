"""Sizes and durations as people write them in config files and as BuildKit prints them."""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "p": 1000**5,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)")

# Go's time.Duration.String(): "48h0m0s", "1.5s", "300ms", "2m3.5s".
_GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_GO_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")


def parse_size(text: str | int | float) -> int:
    """Parse `5GB`, `512MiB`, `1.5G` or a plain number of bytes into bytes.

    Decimal units (kB, MB, GB) are powers of 1000, binary units (KiB, MiB, GiB) powers of 1024,
    as in Docker and BuildKit.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a size like 5GB or 512MiB, got {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"a size cannot be negative, got {text!r}")
        return int(text)
    match = _SIZE_RE.match(str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 5GB or 512MiB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(text: str | int | float) -> float:
    """Parse `10m`, `1h30m`, `7d`, `500ms` or a plain number of seconds into seconds."""
    if isinstance(text, bool):
        raise ValueError(f"expected a duration like 30s, 10m or 7d, got {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"a duration cannot be negative, got {text!r}")
        return float(text)
    s = str(text).strip()
    if not s or _DURATION_RE.sub("", s) != "":
        raise ValueError(f"expected a duration like 30s, 10m or 7d, got {text!r}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_RE.findall(s))


def format_duration(seconds: float) -> str:
    """Shortest exact form of a whole number of seconds: 3600 -> '1h', 604800 -> '7d'."""
    whole = int(seconds)
    if whole != seconds or whole <= 0:
        return f"{seconds:g}s"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole % factor == 0:
            return f"{whole // factor}{unit}"
    return f"{whole}s"


def parse_go_duration(text: str) -> float:
    """Parse Go's time.Duration.String() output ('48h0m0s', '1.5s', '0s') into seconds."""
    s = text.strip()
    if s in ("0", "0s"):
        return 0.0
    if not s or _GO_DURATION_RE.sub("", s) != "":
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _GO_DURATION_UNITS[u] for n, u in _GO_DURATION_RE.findall(s))


_HUMAN_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|kB|KB|MB|GB|TB|PB|EB)\s*$")
_HUMAN_UNITS = {"B": 1, "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
                "PB": 1000**5, "EB": 1000**6}


def parse_human_size(text: str) -> int:
    """Parse the sizes buildctl prints ('4.10kB', '708.61kB', '9.44MB'): two decimals of a decimal unit."""
    match = _HUMAN_RE.match(text)
    if not match:
        raise ValueError(f"not a BuildKit size: {text!r}")
    return round(float(match.group(1)) * _HUMAN_UNITS[match.group(2)])


def format_bytes(n: float) -> str:
    """Human-readable decimal size for logs: 1234567 -> '1.23MB'."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.3g}{unit}" if unit != "B" else f"{int(value)}B"
        value /= 1000
    return f"{value:.3g}TB"
