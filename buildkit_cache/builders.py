"""The three kinds of builder and how each is measured, and discovery of builders on a Docker host."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import decode, fs, parse
from .buildctl import BuildctlClient, ContainerBuildctl, LocalBuildctl, Progress
from .docker_api import DockerHost, api_at_least
from .errors import BuilderError, Unavailable
from .models import (
    DRIVER_CONTAINER,
    DRIVER_DOCKER,
    DRIVER_REMOTE,
    FILESYSTEM,
    GC_POLICY,
    RECORDS,
    STATE_VOLUME,
    BuilderRef,
    CacheRecord,
    FilesystemUsage,
    PruneRequest,
    PruneResult,
    TreeUsage,
    WorkerInfo,
)
from .prune_api import engine_prune_params, parse_engine_prune_result
from .usage import UsageSummary, summarize

log = logging.getLogger(__name__)

CONTAINER_PREFIX = "buildx_buildkit_"
STATE_SUFFIX = "_state"
STATE_DIR = "/var/lib/buildkit"  # where buildx mounts the state volume in the builder container


# A fixed script, never built from input: the path arrives as "$1".
_STATE_SCRIPT = 'du -skx "$1" && find "$1" -xdev | wc -l'
_DF_SCRIPT = 'df -k "$1" && echo --- && df -i "$1"'


class Builder:
    """A builder and the measurements it supports. Subclasses do the I/O; all of it is blocking."""

    measurements: tuple[str, ...] = ()

    def __init__(self, ref: BuilderRef):
        self.ref = ref

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ref})"

    def describe(self) -> str:
        """How the builder is reached, for logs."""
        r = self.ref
        if r.container:
            return f"driver {r.driver}, container {r.container}"
        if r.volume:
            return f"driver {r.driver}, volume {r.volume} without a container"
        if r.address:
            return f"driver {r.driver}, address {r.address}"
        return f"driver {r.driver}"

    def records(self) -> list[CacheRecord]:
        raise BuilderError(f"{self.ref}: records are not available for this builder")

    def usage(self) -> UsageSummary:
        """The summary the exporter exports: `usage.summarize` of the records, decoded by a quicker
        path where the builder has one (decode.py)."""
        return summarize(self.records(), self.fresh_cache_mounts())

    def state_dir(self) -> str | None:
        """Where BuildKit's state directory (its bolt databases) is visible to this process, if it
        is: the exporter stats them to tell whether the cache changed (exporter/collect.py)."""
        return None

    def identity(self) -> tuple[str, ...]:
        """What, besides the state directory, says the builder is no longer the one last measured
        (a container replaced, stopped or started)."""
        return ()

    def gc_policy(self) -> WorkerInfo:
        raise BuilderError(f"{self.ref}: this builder does not reveal its GC policy")

    def state_usage(self, timeout: float = 300.0) -> TreeUsage:
        raise BuilderError(f"{self.ref}: this builder has no state volume")

    def filesystem(self) -> FilesystemUsage:
        raise BuilderError(f"{self.ref}: the filesystem under this builder's state is not visible")

    def prune(self, req: PruneRequest, timeout: float, progress: Progress | None = None) -> PruneResult:
        """Run the prune on the builder itself; blocks until BuildKit answers or `timeout`.
        `progress` hears the records and bytes deleted so far, where BuildKit says them as it goes."""
        raise BuilderError(f"{self.ref}: this builder cannot be pruned")

    def heavy_io(self, measurement: str) -> bool:
        """Whether this measurement walks the Docker host's disk: such measurements of one host take
        turns, so two walks never compete for its disk and CPU, nor a walk with the engine's."""
        return False

    def fresh_cache_mounts(self) -> bool:
        """Whether the builder marks its cache mounts used whenever it measures them, so that a
        prune sees them as just used (see prune_plan)."""
        return False


@dataclass(frozen=True)
class EngineStorage:
    """Where dockerd's embedded BuildKit keeps its cache's bytes, as paths on the Docker host.

    With the classic image store they are the graph driver's layers (`<DockerRootDir>/overlay2`).
    With the containerd image store (Docker 29's default) they live in containerd's snapshotter
    (`<containerd root>/io.containerd.snapshotter.v1.overlayfs`), while `<DockerRootDir>/buildkit`
    holds only metadata: containerd's root may be on another disk than the data root.
    """

    image_store: str  # "containerd", or the graph driver's name ("overlay2")
    path: str  # the directory holding the snapshots
    fallback: str  # measured when `path` is not there: the same filesystem in a normal install
    buildkit_dir: str = "/var/lib/docker/buildkit"  # BuildKit's databases: `<DockerRootDir>/buildkit`

    def describe(self) -> str:
        if self.image_store == "containerd":
            return f"containerd image store, snapshots in {self.path}"
        return f"{self.image_store} storage in {self.path}"


def engine_storage(info: Mapping[str, Any], containerd_root: str | None = None) -> EngineStorage:
    """Where the engine that answered `GET /info` keeps its build cache's bytes.

    The containerd image store shows as `DriverStatus` `driver-type: io.containerd.snapshotter.v1`.
    containerd's root is not in /info: dockerd that starts its own containerd (its socket under
    dockerd's exec root) keeps it in `<DockerRootDir>/containerd/daemon`; a system containerd
    (socket /run/containerd/containerd.sock, as Docker CE installs it) in /var/lib/containerd.
    `containerd_root` (the config's `docker_hosts[].containerd_root`) overrides that guess.
    """
    root = str(info.get("DockerRootDir") or "/var/lib/docker").rstrip("/") or "/"
    driver = str(info.get("Driver") or "")
    status = {str(p[0]): str(p[1]) for p in info.get("DriverStatus") or ()
              if isinstance(p, (list, tuple)) and len(p) == 2}
    if status.get("driver-type") == "io.containerd.snapshotter.v1":
        if not containerd_root:
            containerd = info.get("Containerd") or {}
            address = str(containerd.get("Address") or "") if isinstance(containerd, Mapping) else ""
            system = address.rstrip("/") in ("/run/containerd/containerd.sock", "/var/run/containerd/containerd.sock")
            containerd_root = "/var/lib/containerd" if system else f"{root}/containerd/daemon"
        containerd_root = containerd_root.rstrip("/") or "/"
        snapshotter = f"io.containerd.snapshotter.v1.{driver or 'overlayfs'}"
        return EngineStorage("containerd", f"{containerd_root}/{snapshotter}", containerd_root, f"{root}/buildkit")
    return EngineStorage(driver or "unknown", f"{root}/{driver}" if driver else root, root, f"{root}/buildkit")


class EngineBuilder(Builder):
    """BuildKit embedded in dockerd (the docker driver): the Engine API's `/system/df`."""

    def __init__(self, ref: BuilderRef, host: DockerHost, storage: EngineStorage):
        super().__init__(ref)
        self.host = host
        self.storage = storage
        self.measurements = (RECORDS, FILESYSTEM) if host.host_root is not None else (RECORDS,)

    def describe(self) -> str:
        return f"driver {self.ref.driver}, {self.storage.describe()}"

    def records(self) -> list[CacheRecord]:
        return parse.parse_engine_build_cache(self.host.system_df_build_cache())

    def usage(self) -> UsageSummary:
        return summarize(decode.engine_rows(self.host.system_df_build_cache_bytes()), self.fresh_cache_mounts())

    def state_dir(self) -> str | None:
        return self.host.visible_path(self.storage.buildkit_dir)

    def filesystem(self) -> FilesystemUsage:
        """The filesystem holding the snapshots: what fills up as the cache grows."""
        path = self.host.visible_path(self.storage.path) or self.host.visible_path(self.storage.fallback)
        if path is None:
            hint = ("; set docker_hosts[].containerd_root if containerd keeps its data elsewhere"
                    if self.storage.image_store == "containerd" else "")
            raise Unavailable(f"{self.ref}: {self.storage.path} is not visible to this process "
                              f"(host_root={self.host.host_root!r}){hint}")
        return fs.statvfs_usage(path)

    def prune(self, req: PruneRequest, timeout: float, progress: Progress | None = None) -> PruneResult:
        # The engine answers once the prune is done: no progress on the way.
        params = engine_prune_params(req, self.host.api_version)
        return parse_engine_prune_result(self.host.build_prune(params, timeout))

    def fresh_cache_mounts(self) -> bool:
        # Measured on 20.10, 26.1 and 28.5 (both image stores): every /system/df marks them used.
        return True

    def heavy_io(self, measurement: str) -> bool:
        # Below API 1.42 (Docker 23) /system/df has no `type`: the engine also sizes every volume,
        # a walk of them all, at each records measurement.
        if measurement != RECORDS:
            return False
        try:
            return not api_at_least(self.host.api_version, "1.42")
        except BuilderError:
            return False


class ContainerBuilder(Builder):
    """A buildx docker-container builder: container `buildx_buildkit_<node>` and its state volume.

    `container` is empty for a state volume whose container is gone (a leaked volume): its disk use
    can still be measured when the volume is visible.
    """

    def __init__(self, ref: BuilderRef, host: DockerHost, mountpoint: str, state_dir: str = STATE_DIR,
                 container_id: str = "", container_state: str = ""):
        super().__init__(ref)
        self.host = host
        self.mountpoint = mountpoint
        self.container_state_dir = state_dir
        self.container_id = container_id
        self.container_state = container_state
        self.buildctl = (BuildctlClient(ContainerBuildctl(host, ref.container, container_id),
                                        host.learned.setdefault((ref.container, container_id), {}))
                         if ref.container else None)
        if ref.container:
            self.measurements = (RECORDS, GC_POLICY, STATE_VOLUME, FILESYSTEM)
        else:
            self.measurements = (STATE_VOLUME, FILESYSTEM)

    def _client(self) -> BuildctlClient:
        if self.buildctl is None:
            raise Unavailable(f"{self.ref}: the builder container is gone; only its volume remains")
        return self.buildctl

    def records(self) -> list[CacheRecord]:
        return self._client().du()

    def usage(self) -> UsageSummary:
        return summarize(self._client().du_rows(), self.fresh_cache_mounts())

    def state_dir(self) -> str | None:
        return self.host.visible_path(self.mountpoint)

    def identity(self) -> tuple[str, ...]:
        return (self.container_id, self.container_state)

    def gc_policy(self) -> WorkerInfo:
        return self._client().debug_workers()

    def prune(self, req: PruneRequest, timeout: float, progress: Progress | None = None) -> PruneResult:
        return self._client().prune(req, timeout, progress)

    def heavy_io(self, measurement: str) -> bool:
        return measurement == STATE_VOLUME

    def state_usage(self, timeout: float = 300.0) -> TreeUsage:
        local = self.host.visible_path(self.mountpoint)
        if local is not None:
            return fs.state_usage(local, timeout)
        if not self.ref.container:
            raise Unavailable(f"{self.ref}: volume {self.ref.volume} is not visible and has no container")
        out = self.host.exec_checked(self.ref.container, ["sh", "-c", _STATE_SCRIPT, "sh", self.container_state_dir])
        lines = out.strip().splitlines()
        try:
            return TreeUsage(bytes=parse.parse_du_sk(lines[0]), files=int(lines[-1].strip()))
        except (IndexError, ValueError) as exc:
            raise BuilderError(f"{self.ref}: unexpected du/find output {out[:200]!r}") from exc

    def filesystem(self) -> FilesystemUsage:
        local = self.host.visible_path(self.mountpoint)
        if local is not None:
            return fs.statvfs_usage(local)
        if not self.ref.container:
            raise Unavailable(f"{self.ref}: volume {self.ref.volume} is not visible and has no container")
        out = self.host.exec_checked(self.ref.container, ["sh", "-c", _DF_SCRIPT, "sh", self.container_state_dir])
        df_k, sep, df_i = out.partition("---")
        if not sep:
            raise BuilderError(f"{self.ref}: unexpected df output {out[:200]!r}")
        return parse.parse_df(df_k, df_i)


class RemoteBuilder(Builder):
    """A buildkitd reached by address (tcp://, unix://) with a local buildctl. With `state_dir`, its
    state directory as this process sees it (a sidecar in the buildkitd pod, sharing the volume):
    then it has every measurement a container builder has, and its changes are seen."""

    def __init__(self, ref: BuilderRef, buildctl: LocalBuildctl, state_dir: str | None = None):
        super().__init__(ref)
        self.client = BuildctlClient(buildctl)
        self.local_state = state_dir
        self.measurements = (RECORDS, GC_POLICY, STATE_VOLUME, FILESYSTEM) if state_dir else (RECORDS, GC_POLICY)

    def state_dir(self) -> str | None:
        return self.local_state if self.local_state and os.path.isdir(self.local_state) else None

    def _visible(self) -> str:
        path = self.state_dir()
        if path is None:
            raise Unavailable(f"{self.ref}: its state directory {self.local_state} is not visible here")
        return path

    def state_usage(self, timeout: float = 300.0) -> TreeUsage:
        return fs.state_usage(self._visible(), timeout)

    def filesystem(self) -> FilesystemUsage:
        return fs.statvfs_usage(self._visible())

    def heavy_io(self, measurement: str) -> bool:
        return measurement == STATE_VOLUME

    def records(self) -> list[CacheRecord]:
        return self.client.du()

    def usage(self) -> UsageSummary:
        return summarize(self.client.du_rows(), self.fresh_cache_mounts())

    def gc_policy(self) -> WorkerInfo:
        return self.client.debug_workers()

    def prune(self, req: PruneRequest, timeout: float, progress: Progress | None = None) -> PruneResult:
        return self.client.prune(req, timeout, progress)


def builder_name_for_node(node: str) -> str:
    """buildx names its container `buildx_buildkit_<builder><index>`; index 0 is the usual node.

    'kamal0' -> 'kamal'; 'ci1' stays 'ci1' so a second node never collides with the first.
    """
    if len(node) > 1 and node.endswith("0"):
        return node[:-1]
    return node


@dataclass(frozen=True)
class Discovered:
    """The builders found on a Docker host, and what was said about their names."""

    builders: list[Builder]
    renamed: tuple[str, ...] = ()  # names told apart (each is one log line)
    refused: tuple[str, ...] = ()  # containers or volumes left out: their name is not theirs alone


def resolve_names(nodes: Sequence[tuple[str, str, bool]], taken: Iterable[str] = ()) -> tuple[
        dict[str, str], list[str], list[str]]:
    """Builder names for buildx nodes, never shared: `nodes` are (node, proposed name, named by the
    config). Containers `buildx_buildkit_ci1` (builder ci, node 1) and `buildx_buildkit_ci10` (builder
    ci1, node 0) would both be `ci1`: such nodes are named by their node names instead (`ci1`, `ci10`),
    unless the config named them. A name still shared, or `taken` (the engine's `default`, a remote
    builder's), is refused: neither measured nor pruned, and said so. Pure."""
    taken = set(taken)
    proposed = Counter(p for _, p, _ in nodes) + Counter(taken)
    names: dict[str, str] = {}
    renamed: list[str] = []
    for node, name, configured in nodes:
        if proposed[name] > 1 and not configured:
            renamed.append(f"{CONTAINER_PREFIX}{node} would be builder {name!r}, as would another; "
                           f"named {node!r} after its node")
            name = node
        names[node] = name
    final = Counter(names.values()) + Counter(taken)
    refused = []
    for node, name in list(names.items()):
        if final[name] > 1:
            refused.append(f"{CONTAINER_PREFIX}{node}: builder name {name!r} is not its alone "
                           f"(another builder or the config has it); neither measured nor pruned")
            del names[node]
    return names, renamed, refused


def discover(host: DockerHost, container_names: Mapping[str, str] | None = None,
             info: Mapping[str, Any] | None = None, taken: Iterable[str] = ()) -> Discovered:
    """Every builder on a Docker host: the engine's own, buildx containers, and leaked state volumes.

    `container_names` maps a container name to the builder name the config gives it; `taken` are
    names on this host that belong to others (remote builders the config labels with it).
    `info` is the host's `GET /info`, if the caller has it. Raises Unavailable when the daemon
    cannot be reached.
    """
    container_names = container_names or {}
    info = info if info is not None else host.info()
    engine = EngineBuilder(BuilderRef(host.name, "default", DRIVER_DOCKER), host,
                           engine_storage(info, host.containerd_root))
    volumes = {v["Name"]: v for v in host.volumes(CONTAINER_PREFIX) if v.get("Name", "").endswith(STATE_SUFFIX)}
    claimed: set[str] = set()
    # node -> (proposed name, configured, how to make the builder once it has a name)
    found: dict[str, tuple[str, bool, Callable[[str], Builder]]] = {}
    for c in host.containers(CONTAINER_PREFIX):
        name = next(n.lstrip("/") for n in c["Names"] if n.lstrip("/").startswith(CONTAINER_PREFIX))
        mount = _state_mount(c)
        volume = mount.get("Name", "") if mount else ""
        mountpoint = mount.get("Source", "") if mount else ""
        if volume in volumes:
            mountpoint = volumes[volume].get("Mountpoint") or mountpoint
        claimed.add(volume)
        state_dir = mount.get("Destination", STATE_DIR) if mount else STATE_DIR

        def make(b: str, name: str = name, volume: str = volume, mountpoint: str = mountpoint,
                 state_dir: str = state_dir, cid: str = str(c.get("Id", "")), state: str = str(c.get("State", ""))
                 ) -> Builder:
            return ContainerBuilder(BuilderRef(host.name, b, DRIVER_CONTAINER, container=name, volume=volume),
                                    host, mountpoint, state_dir, cid, state)

        node = name[len(CONTAINER_PREFIX):]
        found[node] = (container_names.get(name) or builder_name_for_node(node), name in container_names, make)
    for name, v in sorted(volumes.items()):
        if name in claimed:
            continue
        container = name[: -len(STATE_SUFFIX)]

        def make_leaked(b: str, name: str = name, mountpoint: str = str(v.get("Mountpoint", ""))) -> Builder:
            return ContainerBuilder(BuilderRef(host.name, b, DRIVER_CONTAINER, container="", volume=name), host,
                                    mountpoint)

        node = container[len(CONTAINER_PREFIX):]
        found.setdefault(node, (container_names.get(container) or builder_name_for_node(node),
                                container in container_names, make_leaked))
    names, renamed, refused = resolve_names([(n, p, c) for n, (p, c, _) in found.items()], {"default", *taken})
    builders: list[Builder] = [engine] + [found[node][2](name) for node, name in names.items()]
    return Discovered(builders, tuple(renamed), tuple(refused))


def _state_mount(container: Mapping[str, Any]) -> Mapping[str, Any] | None:
    mounts: list[Mapping[str, Any]] = [m for m in container.get("Mounts") or () if isinstance(m, Mapping)]
    for m in mounts:
        if m.get("Destination") == STATE_DIR:
            return m
    for m in mounts:
        if m.get("Type") == "volume" and str(m.get("Name", "")).endswith(STATE_SUFFIX):
            return m
    return None


def remote_builder(host_label: str, name: str, buildctl: LocalBuildctl, state_dir: str | None = None) -> RemoteBuilder:
    return RemoteBuilder(BuilderRef(host_label, name, DRIVER_REMOTE, address=buildctl.address), buildctl, state_dir)
