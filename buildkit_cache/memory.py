"""Memory freed after a big answer, given back to the system.

Decoding 200,000 records takes some 150 MB in a measuring thread. Freed, most of it stays in the
C library's arena of that thread, and the process's RSS stayed at 115 MB after such a measurement
against 54 MB before it (docs/benchmarks.md, "Big caches"), until glibc's `malloc_trim` gives the
free pages back. Where there is no `malloc_trim` (musl, macOS), nothing is done."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

# Records in one answer from which what it leaves behind is worth giving back (below, a few MB).
BIG_ANSWER = 20_000


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def give_back() -> bool:
    """Return the free memory of every arena to the system; False where the C library cannot.

    The answer is freed first: the HTTP client's response that held it sits in a reference cycle,
    which only the cycle collector frees (without it, an exporter that measured 200,000 records of
    a stand-in engine kept 156 MB; with it, 86 MB)."""
    if _TRIM is None:
        return False
    gc.collect()
    _TRIM(0)
    return True
