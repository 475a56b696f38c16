"""Plain, frozen values that the core hands to the exporter and the actuator."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# Names of the measurements, as they appear in the `measurement` label.
RECORDS = "records"
GC_POLICY = "gc_policy"
STATE_VOLUME = "state_volume"
FILESYSTEM = "filesystem"

# Record types BuildKit reports. Exported as zeros when absent, so dashboards and alerts see a series.
RECORD_TYPES = (
    "regular",
    "source.local",
    "exec.cachemount",
    "frontend",
    "internal",
    "source.git.checkout",
)
# Types only a prune with `all` touches (BuildKit skips them otherwise).
INTERNAL_TYPES = frozenset({"internal", "frontend"})

STATES = ("in_use", "shared", "reclaimable")

DRIVER_DOCKER = "docker"
DRIVER_CONTAINER = "docker-container"
DRIVER_REMOTE = "remote"


@dataclass(frozen=True)
class CacheRecord:
    """One BuildKit cache record, as `/system/df` or `buildctl du` reports it."""

    id: str
    record_type: str
    size: int
    in_use: bool
    shared: bool
    mutable: bool | None = None
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    usage_count: int = 0
    parents: tuple[str, ...] = ()
    description: str = ""

    @property
    def state(self) -> str:
        return state_of(self.in_use, self.shared)


def state_of(in_use: bool, shared: bool) -> str:
    """`in_use`, else `shared`, else `reclaimable`: the three partition every record."""
    return "in_use" if in_use else "shared" if shared else "reclaimable"


@dataclass(frozen=True)
class GCRule:
    """One rule of a BuildKit worker's garbage-collection policy (sizes in bytes, 0 = unset)."""

    all: bool = False
    filters: tuple[str, ...] = ()
    keep_duration_seconds: float = 0.0
    reserved_bytes: int = 0
    max_used_bytes: int = 0
    min_free_bytes: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    """What `buildctl debug workers` reveals: the GC policy (no rules = GC off) and the version."""

    gc_rules: tuple[GCRule, ...] = ()
    buildkit_version: str = ""

    @property
    def gc_enabled(self) -> bool:
        return bool(self.gc_rules)


@dataclass(frozen=True)
class TreeUsage:
    """On-disk size of a directory tree, counted like `du` (allocated blocks, hard links once), and of
    BuildKit's own metadata databases in it (None where they could not be seen).

    `unreadable` directories could not be read by this process (a rootless buildkitd's snapshots hold
    directories of other users with mode 0700): each counts itself, not what it holds. `unreadable_example`
    names one of them."""

    bytes: int
    files: int
    databases_bytes: int | None = None
    unreadable: int = 0
    unreadable_example: str = ""


@dataclass(frozen=True)
class FilesystemUsage:
    """The filesystem holding a path, with node_exporter's meanings: `free_bytes` counts the blocks
    reserved for root (ext4 keeps 5% by default), `avail_bytes` does not."""

    size_bytes: int
    avail_bytes: int
    files: int
    files_free: int
    free_bytes: int = 0

    @property
    def used_ratio(self) -> float:
        """Used as `df` says it: used / (used + available), used = size - free. Blocks reserved for
        root are neither used nor available to others: 1 - avail/size would count them as used."""
        used = self.size_bytes - self.free_bytes
        return used / (used + self.avail_bytes) if used + self.avail_bytes > 0 else 0.0


@dataclass(frozen=True)
class BuilderRef:
    """Identifies one builder: the `host` and `builder` labels of every series, plus how to reach it."""

    host: str
    name: str
    driver: str
    container: str = ""
    volume: str = ""
    address: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.host, self.name)

    def __str__(self) -> str:
        return f"{self.host}/{self.name}"


@dataclass(frozen=True)
class PruneRequest:
    """What to prune. Sizes in bytes, durations in seconds; zero means 'not set'."""

    keep_storage: int = 0
    keep_duration_seconds: float = 0.0
    all: bool = False


@dataclass(frozen=True)
class PruneResult:
    records_deleted: int
    bytes_reclaimed: int
    deleted_ids: tuple[str, ...] = ()
