"""The audit trail: every decision as one JSON line, in the log and, if configured, in a file."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger("actuator.audit")

_MAX_TEXT = 200  # values that came from an alert are cut: the log is not a place for payloads


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    return value


class AuditLog:
    def __init__(self, path: str | None = None, clock=time.time):
        self.path = path
        self.clock = clock
        self._lock = threading.Lock()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # Fail at start, not at the first prune, if the file cannot be written.
            with open(path, "a", encoding="utf-8"):
                pass

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"ts": round(self.clock(), 3), "event": event,
                 **{k: _clean(v) for k, v in fields.items() if v is not None}}
        line = json.dumps(entry, sort_keys=False, separators=(",", ":"))
        log.info(line)
        if self.path:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        return entry
