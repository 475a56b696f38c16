"""The hosts and builders a config names: what both the exporter and the actuator work on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .buildctl import LocalBuildctl
from .builders import Builder, RemoteBuilder, discover, remote_builder
from .config import Config
from .docker_api import DockerHost


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
            assert b.address
            ctl = LocalBuildctl(b.address, binary=cfg.exporter.buildctl, timeout=cfg.exporter.timeout, tls=b.tls)
            self.remotes.append(remote_builder(host, name, ctl))

    def discover(self, host: str, info: Mapping[str, Any] | None = None) -> list[Builder]:
        """Builders on one Docker host right now. Raises Unavailable when it cannot be reached."""
        return discover(self.hosts[host], self.cfg.container_names(host), info)

    def find(self, host: str, builder: str) -> Builder | None:
        """The builder with these `host` and `builder` labels, or None if there is none."""
        for r in self.remotes:
            if r.ref.key == (host, builder):
                return r
        if host not in self.hosts:
            return None
        return next((b for b in self.discover(host) if b.ref.name == builder), None)
