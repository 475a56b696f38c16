"""Claims that outlive the process: when each (host, builder, action) last started, and which prunes
may still be running, in one small JSON file.

Each change reads the file, applies itself and writes a new file atomically (a temporary file in
the same folder, fsync, rename), all under an exclusive lock (flock on `<path>.lock`). So a
restarted actuator keeps its cooldowns and claims, and two replicas sharing the path (one host, or
a filesystem with working flock) agree on one prune per incident.

A prune that was running when its process died cannot be asked whether BuildKit still works on it:
its claim holds until the time the prune may take (`prune_timeout`) plus a margin has passed since
it started, and its cooldown holds as if it had run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

log = logging.getLogger("actuator")

VERSION = 1
MAX_BYTES = 4 * 1024 * 1024  # entries exist only for configured builders and actions: a few kB


class StateError(Exception):
    """The state file cannot be read or written."""


@dataclass
class Entry:
    started: float  # when the last prune of this key started (wall clock)
    running: bool  # queued or running, as far as the file knows
    busy_until: float  # a running claim whose owner vanished holds until then
    owner: str  # the process that claimed it


Key = tuple[str, str, str]


def _encode(key: Key) -> str:
    return json.dumps(list(key), ensure_ascii=False)


def _decode(text: str) -> Key:
    host, builder, action = json.loads(text)
    return (str(host), str(builder), str(action))


class Shared:
    """The claims as one process sees them while it holds the lock."""

    def __init__(self, entries: dict[Key, Entry]):
        self.entries = entries
        self.changed = False

    def get(self, key: Key) -> Entry | None:
        return self.entries.get(key)

    def put(self, key: Key, entry: Entry) -> None:
        self.entries[key] = entry
        self.changed = True

    def pop(self, key: Key) -> None:
        if self.entries.pop(key, None) is not None:
            self.changed = True


class MemoryState:
    """Claims kept in this process only (no state file): a restart forgets them."""

    path: str | None = None

    def __init__(self) -> None:
        self.owner = uuid.uuid4().hex
        self._shared = Shared({})

    @contextlib.contextmanager
    def locked(self) -> Iterator[Shared]:
        yield self._shared


class StateFile:
    def __init__(self, path: str, clock: Callable[[], float]):
        self.path = path
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self._lock_path = path + ".lock"

    def check(self) -> list[tuple[Key, Entry]]:
        """At start: the folder exists (made if it can be) and the file can be read and written.
        Returns the claims a previous process left running."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with self.locked() as shared:
            shared.changed = True  # write it once now: fail at start, not at the first prune
            return [(k, e) for k, e in shared.entries.items() if e.running]

    @contextlib.contextmanager
    def locked(self) -> Iterator[Shared]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {self._lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            shared = Shared(self._read())
            yield shared
            if shared.changed:
                self._write(shared.entries)
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> dict[Key, Entry]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            if len(raw) > MAX_BYTES:
                raise ValueError(f"over {MAX_BYTES} bytes")
            data = json.loads(raw)
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, this actuator writes {VERSION}")
            return {_decode(k): Entry(float(v["started"]), bool(v["running"]), float(v["busy_until"]), str(v["owner"]))
                    for k, v in data["claims"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # A damaged file must not stop prunes for good, nor be silently trusted: say so, start over.
            log.error("state file %s is unreadable (%s); starting from no claims", self.path, exc)
            return {}

    def _write(self, entries: dict[Key, Entry]) -> None:
        data = {"version": VERSION, "claims": {_encode(k): asdict(e) for k, e in sorted(entries.items())}}
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, separators=(",", ":"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from exc
