"""The deadline of the measurement a thread works for, so that the calls it makes (a `docker exec`,
a `buildctl` run in a builder container under `timeout`) end with it, not later: a hung builder then
has at most one command of a kind running in it (docker_api.DockerHost.exec)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

_local = threading.local()


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Calls made in this thread meanwhile end within `seconds` from now."""
    earlier = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = earlier


def left(default: float) -> float:
    """Seconds a call may take: `default`, or less if this thread's deadline comes first."""
    deadline: float | None = getattr(_local, "deadline", None)
    if deadline is None:
        return default
    return max(0.1, min(default, deadline - time.monotonic()))
