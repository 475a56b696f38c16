"""The hosts and builders a config names: what both the exporter and the actuator work on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .buildctl import LocalBuildctl
from .builders import Builder, Discovered, RemoteBuilder, discover, remote_builder
from .config import Config
from .docker_api import DockerHost


class BuilderSource(Protocol):
    """Where the programs find builders: Docker hosts to discover on, and fixed remote builders."""

    @property
    def hosts(self) -> Mapping[str, DockerHost]: ...

    @property
    def remotes(self) -> Sequence[Builder]: ...

    def discover(self, host: str, info: Mapping[str, Any] | None = None) -> Discovered: ...


class Inventory:
    """Docker hosts (reached lazily) and remote buildkitd builders from one config."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.hosts: dict[str, DockerHost] = {
            h.name: DockerHost(h.name, h.url, timeout=h.timeout, tls=h.tls, host_root=h.visible_root,
                               containerd_root=h.containerd_root)
            for h in cfg.docker_hosts
        }
        self.remotes: list[RemoteBuilder] = []
        for host, name, b in cfg.remote_builders():
            if not b.address:  # remote_builders() lists those with an address only
                continue
            ctl = LocalBuildctl(b.address, binary=cfg.exporter.buildctl, timeout=cfg.exporter.timeout, tls=b.tls)
            self.remotes.append(remote_builder(host, name, ctl, b.state_dir))

    def discover(self, host: str, info: Mapping[str, Any] | None = None) -> Discovered:
        """Builders on one Docker host right now. Raises Unavailable when it cannot be reached.

        The exporter and the actuator both name builders here, so a label names the same builder
        for both; names remote builders have on this host are not given to its containers."""
        taken = {r.ref.name for r in self.remotes if r.ref.host == host}
        return discover(self.hosts[host], self.cfg.container_names(host), info, taken)
