"""Claims that outlive the process: when each (host, builder, action) last started, and which prunes
may still be running, in one small JSON file.

Each change reads the file, applies itself and writes a new file atomically (a temporary file in
the same folder, fsync, rename), all under an exclusive lock (flock on `<path>.lock`). So a
restarted actuator keeps its cooldowns and claims, and two replicas sharing the path (one host, or
a filesystem with working flock) agree on one prune per incident.

A prune that was running when its process died cannot be asked whether BuildKit still works on it:
its claim holds until the time the prune may take (`prune_timeout`) plus a margin has passed since
it started, and its cooldown holds as if it had run.

Each entry records who wrote it (process, host) and the writer's clock: its boot and how far its
wall clock stood from that boot's kernel clock. Times in the file are the writer's; another process
ages an entry by them only when its clock is the writer's (the same boot, the same offset within a
few seconds). Otherwise (another host, or a clock set apart) it ages the entry by its own monotonic
clock from when it first saw it: a clock ahead or behind never ends a cooldown or a claim early, and
never drops an entry (decide.Claims).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("actuator")

VERSION = 1
MAX_BYTES = 4 * 1024 * 1024  # entries exist only for configured builders and actions: a few kB
LOCK_TIMEOUT = 0.5  # seconds to wait for the state lock: another process holding it longer is a fault
SAME_CLOCK = 5.0  # two processes of one boot whose wall clocks stand this close to its kernel's share a clock


class StateError(Exception):
    """The state file cannot be read or written."""


@dataclass
class Entry:
    started: float  # when the last prune of this key started (the writer's wall clock)
    running: bool  # queued or running, as far as the file knows
    busy_until: float  # a running claim whose owner vanished holds until then (at most started + hold)
    owner: str  # the process that claimed it
    host: str = ""  # the host it ran on
    pid: int = 0
    boot: str = ""  # the writer's clock: its boot id, and its wall clock less that boot's kernel clock
    offset: float = 0.0


def kernel_clock() -> tuple[str, float]:
    """This boot's id and its kernel's wall clock (boot time + uptime), which no faked or jumped
    process clock changes; ("", nan) where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, StopIteration, ValueError, IndexError):
        return "", float("nan")
    return boot, btime + uptime


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
        self._lock = threading.Lock()  # claims are settled in worker threads, off the event loop

    def stamp(self, now: float) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "boot": "", "offset": 0.0}

    def same_clock(self, e: Entry) -> bool:
        return True  # only this process writes it

    @contextlib.contextmanager
    def locked(self) -> Iterator[Shared]:
        with self._lock:
            yield self._shared


class StateFile:
    def __init__(self, path: str, clock: Callable[[], float],
                 kernel: Callable[[], tuple[str, float]] = kernel_clock):
        self.path = path
        self.clock = clock
        self.kernel = kernel  # this boot's id and its kernel's clock (tests move it with their clock)
        self.owner = uuid.uuid4().hex
        self._lock_path = path + ".lock"

    def stamp(self, now: float) -> dict[str, Any]:
        """Who writes an entry now, and on which clock: Entry's fields past its times."""
        boot, kernel = self.kernel()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "boot": boot,
                "offset": round(now - kernel, 3) if boot else 0.0}

    def same_clock(self, e: Entry) -> bool:
        """Whether the entry's times are on this process's clock: its own, or one of the same boot
        whose wall clock stood as far from the kernel's as this one's does now."""
        if e.owner == self.owner:
            return True
        boot, kernel = self.kernel()
        return bool(boot) and e.boot == boot and abs((self.clock() - kernel) - e.offset) <= SAME_CLOCK

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
            self._lock_within(fd, LOCK_TIMEOUT)
            shared = Shared(self._read())
            yield shared
            if shared.changed:
                self._write(shared.entries)
        finally:
            os.close(fd)  # closing releases the lock

    def _lock_within(self, fd: int, seconds: float) -> None:
        """flock, waiting at most `seconds`: a lock another process keeps is an error, never a hang."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StateError(f"{self._lock_path} is held by another process for over {seconds:g}s "
                                     "(`fuser` names it)") from None
                time.sleep(0.02)

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
            entries = {_decode(k): Entry(float(v["started"]), bool(v["running"]), float(v["busy_until"]),
                                         str(v["owner"]), str(v.get("host", "")), int(v.get("pid", 0)),
                                         str(v.get("boot", "")), float(v.get("offset", 0.0)))
                       for k, v in data["claims"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # A damaged file must not stop prunes for good, nor be silently trusted: say so, keep it
            # aside for a look, start over.
            aside = f"{self.path}.damaged-{int(time.time())}"
            try:
                os.replace(os.path.realpath(self.path), aside)
            except OSError:
                aside = "(could not be moved aside)"
            log.error("state file %s is unreadable (%s); moved to %s, starting from no claims", self.path, exc, aside)
            return {}
        # Times that cannot be right (NaN, infinite, absurd) are kept as they are: decide.Claims
        # does not obey them (a claim holds its whole time from when it was first seen), and what
        # another process wrote is not this process's to drop.
        return entries

    def _write(self, entries: dict[Key, Entry]) -> None:
        data = {"version": VERSION, "claims": {_encode(k): asdict(e) for k, e in sorted(entries.items())}}
        target = os.path.realpath(self.path)  # a symlinked state file: its target is rewritten, not the link
        folder = os.path.dirname(target)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(data, f, separators=(",", ":"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from exc
