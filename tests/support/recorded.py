"""A builder whose BuildKit answers with outputs recorded from a real one.

For unit tests of the exporter's and actuator's own logic (scheduling, failure isolation, HTTP,
cooldowns). Everything BuildKit itself decides is tested against the real dockerd elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from buildkit_cache import parse
from buildkit_cache.buildctl import Progress
from buildkit_cache.builders import Builder, Discovered
from buildkit_cache.docker_api import DockerHost
from buildkit_cache.errors import Unavailable
from buildkit_cache.models import (
    DRIVER_CONTAINER,
    BuilderRef,
    CacheRecord,
    FilesystemUsage,
    PruneRequest,
    PruneResult,
    TreeUsage,
    WorkerInfo,
)
from buildkit_cache.prune_api import prune_result_from_records

F = Path(__file__).resolve().parent.parent / "fixtures" / "buildctl"


class RecordedBuilder(Builder):
    measurements = ("records", "gc_policy", "state_volume", "filesystem")

    def __init__(self, name: str, host: str = "h1", broken: Iterable[str] = (), hang: threading.Event | None = None,
                 prune_seconds: float = 0.0, short_prunes: bool = False, state_dir: str | Path | None = None):
        super().__init__(BuilderRef(host, name, DRIVER_CONTAINER, container=f"buildx_buildkit_{name}0",
                                    volume=f"buildx_buildkit_{name}0_state"))
        self.broken = set(broken)
        self.hang = hang
        self.prune_seconds = prune_seconds
        self.prunes: list[PruneRequest] = []
        # The cache as it is now: the recording, less what prunes removed.
        self.current = parse.parse_buildctl_du_json((F / "du.json").read_text())
        # Like BuildKit cut short (see actuator/executor.py, PruneExecutor._more_to_do): two records per prune call.
        self.short_prunes = short_prunes
        self.running = 0
        self.max_running = 0
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        # Where its BuildKit's databases are, if the exporter is to see its changes (a tmp folder).
        self.dir = state_dir
        self.container_state = "running"

    def state_dir(self) -> str | None:
        return str(self.dir) if self.dir is not None else None

    def identity(self) -> tuple[str, ...]:
        return (self.ref.container, self.container_state)

    def _check(self, m: str) -> None:
        self.calls[m] = self.calls.get(m, 0) + 1
        if self.hang is not None and m in self.broken:
            self.hang.wait(60)  # until the test lets go (60 s only so that a failed test ends)
        if m in self.broken:
            raise Unavailable(f"{self.ref}: container is not running")

    def records(self) -> list[CacheRecord]:
        self._check("records")
        return list(self.current)

    def gc_policy(self) -> WorkerInfo:
        self._check("gc_policy")
        return parse.parse_debug_workers_json((F / "debug-workers-gc.json").read_text())

    def state_usage(self, timeout: float = 300.0) -> TreeUsage:
        self._check("state_volume")
        return TreeUsage(bytes=parse.parse_du_sk((F / "du-sk.txt").read_text()), files=1234)

    def filesystem(self) -> FilesystemUsage:
        self._check("filesystem")
        return parse.parse_df((F / "df-k.txt").read_text(), (F / "df-i.txt").read_text())

    def prune(self, req: PruneRequest, timeout: float, progress: Progress | None = None) -> PruneResult:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            time.sleep(self.prune_seconds)
            self._check("prune")
            self.prunes.append(req)
            if self.short_prunes:
                by_size = sorted(self.current, key=lambda r: r.size)
                gone, self.current = by_size[-2:], by_size[:-2]
                return prune_result_from_records(gone)
            self.current = []
            return prune_result_from_records(
                parse.parse_buildctl_prune_json((F / "prune-keep-storage-20MB.json").read_text()))
        finally:
            with self._lock:
                self.running -= 1


class StaticInventory:
    """An inventory of fixed builders (the real one discovers them on Docker hosts)."""

    def __init__(self, builders: Iterable[Builder]):
        self.hosts: dict[str, DockerHost] = {}
        self.remotes: list[Builder] = list(builders)

    def discover(self, host: str, info: Mapping[str, Any] | None = None) -> Discovered:
        raise AssertionError("a static inventory has no Docker hosts")


