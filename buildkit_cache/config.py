"""The one YAML config file the exporter and the actuator share, read into frozen values."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import yaml

from .buildctl import RemoteTLS
from .config_schema import (
    ConfigError,
    Section,
    as_bool,
    as_duration,
    as_listen,
    as_positive_duration,
    as_size,
    as_str,
)
from .docker_api import TLSSettings, default_docker_url, host_label
from .units import format_duration

ACTION_KINDS = ("prune-to-budget", "prune-idle", "prune-all")
DEFAULT_EXPORTER_LISTEN = ("0.0.0.0", 9862)
DEFAULT_ACTUATOR_LISTEN = ("127.0.0.1", 9863)


@dataclass(frozen=True)
class DockerHostConfig:
    url: str
    name: str
    host_root: str | None
    timeout: float = 30.0
    tls: TLSSettings | None = None
    containerd_root: str | None = None  # None: from the engine's /info (see builders.engine_storage)


@dataclass(frozen=True)
class BuilderConfig:
    name: str
    budget: int | None = None
    container: str | None = None
    address: str | None = None  # set for a remote buildkitd
    host: str | None = None  # host label of a remote builder
    tls: RemoteTLS | None = None
    actions: tuple[str, ...] | None = None  # None: every configured action is allowed


@dataclass(frozen=True)
class Intervals:
    discovery: float = 30.0
    records: float = 30.0
    gc_policy: float = 300.0
    filesystem: float = 30.0
    state_volume: float = 300.0


@dataclass(frozen=True)
class ExporterConfig:
    listen: tuple[str, int] = DEFAULT_EXPORTER_LISTEN
    timeout: float = 60.0
    buildctl: str = "buildctl"
    intervals: Intervals = Intervals()
    idle_windows: tuple[float, ...] = (3600.0, 86400.0, 7 * 86400.0, 30 * 86400.0)


@dataclass(frozen=True)
class ActionConfig:
    name: str
    kind: str
    idle_for: float = 0.0


@dataclass(frozen=True)
class AuthConfig:
    bearer_token_file: str | None = None
    basic_username: str | None = None
    basic_password_file: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.bearer_token_file or self.basic_username)


@dataclass(frozen=True)
class ServerTLSConfig:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None


def _default_actions() -> dict[str, ActionConfig]:
    return {
        "prune-to-budget": ActionConfig("prune-to-budget", "prune-to-budget"),
        "prune-idle": ActionConfig("prune-idle", "prune-idle", idle_for=7 * 86400.0),
        "prune-all": ActionConfig("prune-all", "prune-all"),
    }


@dataclass(frozen=True)
class ActuatorConfig:
    listen: tuple[str, int] = DEFAULT_ACTUATOR_LISTEN
    auth: AuthConfig = AuthConfig()
    tls: ServerTLSConfig | None = None
    cooldown: float = 3600.0
    dry_run: bool = False
    prune_timeout: float = 600.0
    settle_delay: float = 2.0
    max_body_bytes: int = 1024 * 1024
    audit_log: str | None = None
    actions: dict[str, ActionConfig] = field(default_factory=_default_actions)


@dataclass(frozen=True)
class Config:
    docker_hosts: tuple[DockerHostConfig, ...]
    builders: dict[str, BuilderConfig] = field(default_factory=dict)
    exporter: ExporterConfig = ExporterConfig()
    actuator: ActuatorConfig = ActuatorConfig()
    source: str = "(defaults)"

    def budget_for(self, builder: str) -> int | None:
        b = self.builders.get(builder)
        return b.budget if b else None

    def container_names(self) -> dict[str, str]:
        return {b.container: b.name for b in self.builders.values() if b.container}

    def remote_builders(self) -> list[BuilderConfig]:
        return [b for b in self.builders.values() if b.address]


def default_host(url: str | None = None) -> DockerHostConfig:
    url = url or default_docker_url()
    return DockerHostConfig(url=url, name=host_label(url), host_root="/" if _is_local(url) else None)


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("unix", "")


def load(path: str | None, docker_hosts: list[str] | None = None) -> Config:
    """Read the config file (None: defaults). `docker_hosts` from the command line replace the file's."""
    if path is None:
        data: Any = {}
        source = "(defaults)"
    else:
        source = path
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_config(data, source, docker_hosts)


def parse_config(data: Any, source: str = "config", docker_hosts: list[str] | None = None) -> Config:
    top = Section(data, "", source)
    hosts = tuple(_docker_hosts(top))
    if docker_hosts:
        hosts = tuple(default_host(u) for u in docker_hosts)
    if not hosts:
        hosts = (default_host(),)
    names = [h.name for h in hosts]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{source}: docker_hosts: two hosts are named {dup!r}; give each a distinct name")
    exporter = _exporter(top.section("exporter"))
    actuator = _actuator(top.section("actuator"))
    builders = {name: _builder(name, s, actuator) for name, s in top.items("builders")}
    top.finish()
    return Config(docker_hosts=hosts, builders=builders, exporter=exporter, actuator=actuator, source=source)


def _docker_hosts(top: Section) -> list[DockerHostConfig]:
    hosts = []
    for where, raw in top.list("docker_hosts"):
        if isinstance(raw, str):
            raw = {"url": raw}
        s = Section(raw, where, top.source)
        url = s.get("url", _docker_url, what="the Docker URL, e.g. unix:///var/run/docker.sock")
        tls = None
        if s.has("tls"):
            t = s.section("tls")
            tls = TLSSettings(
                ca_file=t.get("ca_file", _existing_file, None),
                cert_file=t.get("cert_file", _existing_file, None),
                key_file=t.get("key_file", _existing_file, None),
                verify=t.get("verify", as_bool, True),
            )
            t.finish()
            if bool(tls.cert_file) != bool(tls.key_file):
                raise t.error("cert_file and key_file go together", None)
        hosts.append(
            DockerHostConfig(
                url=url,
                name=s.get("name", as_str, host_label(url)),
                # "" says "not visible here": measure inside builder containers instead.
                host_root=s.get("host_root", as_str, "/" if _is_local(url) else None) or None,
                timeout=s.get("timeout", as_positive_duration, 30.0),
                tls=tls,
                containerd_root=s.get("containerd_root", _absolute_path, None),
            )
        )
        s.finish()
    return hosts


def _docker_url(value: Any) -> str:
    url = as_str(value)
    if urlparse(url).scheme not in ("unix", "tcp", "ssh", "http", "https"):
        raise ValueError(f"expected a unix://, tcp:// or ssh:// URL, got {url!r}")
    return url


def _absolute_path(value: Any) -> str:
    path = as_str(value)
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path on the Docker host, got {path!r}")
    return path


def _existing_file(value: Any) -> str:
    path = as_str(value)
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    return path


def _exporter(s: Section) -> ExporterConfig:
    d = ExporterConfig()
    iv = s.section("intervals")
    intervals = Intervals(
        **{f.name: iv.get(f.name, as_positive_duration, getattr(d.intervals, f.name))
           for f in dataclasses.fields(Intervals)}
    )
    iv.finish()
    windows = tuple(sorted({_window(where, v, s) for where, v in s.list("idle_windows")})) or d.idle_windows
    out = ExporterConfig(
        listen=s.get("listen", as_listen, d.listen),
        timeout=s.get("timeout", as_positive_duration, d.timeout),
        buildctl=s.get("buildctl", as_str, d.buildctl),
        intervals=intervals,
        idle_windows=windows,
    )
    s.finish()
    return out


def _window(where: str, value: Any, s: Section) -> float:
    try:
        return as_positive_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{s.source}: {where}: {exc}") from None


def _builder(name: str, s: Section, actuator: ActuatorConfig) -> BuilderConfig:
    address = s.get("address", _buildkit_address, None)
    tls = None
    if s.has("tls"):
        t = s.section("tls")
        tls = RemoteTLS(
            ca_file=t.get("ca_file", _existing_file, None),
            cert_file=t.get("cert_file", _existing_file, None),
            key_file=t.get("key_file", _existing_file, None),
            server_name=t.get("server_name", as_str, None),
        )
        t.finish()
    actions = None
    if s.has("actions"):
        actions = []
        for where, v in s.list("actions"):
            if v not in actuator.actions:
                raise ConfigError(f"{s.source}: {where}: unknown action {v!r}; "
                                  f"actions are: {', '.join(sorted(actuator.actions))}")
            actions.append(v)
        actions = tuple(actions)
    out = BuilderConfig(
        name=name,
        budget=s.get("budget", as_size, None),
        container=s.get("container", as_str, None),
        address=address,
        host=s.get("host", as_str, None),
        tls=tls,
        actions=actions,
    )
    if out.container and not out.container.startswith("buildx_buildkit_"):
        raise s.error(f"expected a buildx builder container name (buildx_buildkit_...), got {out.container!r}",
                      "container")
    if out.address and out.container:
        raise s.error("a builder has either an address (remote buildkitd) or a container, not both", None)
    if out.host and not out.address:
        raise s.error("host names a remote builder's host label; it needs address", "host")
    if out.tls and not out.address:
        raise s.error("tls applies to a remote builder; it needs address", "tls")
    s.finish()
    if out.address and not out.host:
        out = dataclasses.replace(out, host=urlparse(out.address).hostname or "remote")
    return out


def _buildkit_address(value: Any) -> str:
    addr = as_str(value)
    if urlparse(addr).scheme not in ("tcp", "unix", "docker-container", "kube-pod", "ssh"):
        raise ValueError(f"expected a buildkitd address such as tcp://host:1234, got {addr!r}")
    return addr


def _actuator(s: Section) -> ActuatorConfig:
    d = ActuatorConfig()
    auth_s = s.section("auth")
    basic = auth_s.section("basic_auth") if auth_s.has("basic_auth") else None
    auth = AuthConfig(
        # Secret files are read (and checked) by the actuator when it starts: the exporter shares
        # this file and need not have them.
        bearer_token_file=auth_s.get("bearer_token_file", as_str, None),
        basic_username=basic.get("username", as_str) if basic else None,
        basic_password_file=basic.get("password_file", as_str) if basic else None,
    )
    if basic:
        basic.finish()
    auth_s.finish()
    tls = None
    if s.has("tls"):
        t = s.section("tls")
        tls = ServerTLSConfig(
            cert_file=t.get("cert_file", as_str),
            key_file=t.get("key_file", as_str),
            client_ca_file=t.get("client_ca_file", as_str, None),
        )
        t.finish()
    actions = _default_actions()
    for name, a in s.items("actions"):
        default = actions.get(name)
        kind = a.get("kind", as_str, default.kind if default else _MISSING_KIND)
        if kind is _MISSING_KIND:
            raise a.error(f"is required for a new action: one of {', '.join(ACTION_KINDS)}", "kind")
        if kind not in ACTION_KINDS:
            raise a.error(f"expected one of {', '.join(ACTION_KINDS)}, got {kind!r}", "kind")
        idle_default = default.idle_for if default and default.kind == kind else (7 * 86400.0)
        idle_for = a.get("idle_for", as_positive_duration, idle_default)
        if a.has("idle_for") and kind != "prune-idle":
            raise a.error(f"applies to prune-idle actions only, this one is {kind}", "idle_for")
        enabled = a.get("enabled", as_bool, True)
        a.finish()
        if enabled:
            actions[name] = ActionConfig(name, kind, idle_for if kind == "prune-idle" else 0.0)
        else:
            actions.pop(name, None)
    out = ActuatorConfig(
        listen=s.get("listen", as_listen, d.listen),
        auth=auth,
        tls=tls,
        cooldown=s.get("cooldown", as_duration, d.cooldown),
        dry_run=s.get("dry_run", as_bool, d.dry_run),
        prune_timeout=s.get("prune_timeout", as_positive_duration, d.prune_timeout),
        settle_delay=s.get("settle_delay", as_duration, d.settle_delay),
        max_body_bytes=s.get("max_body", _body_size, d.max_body_bytes),
        audit_log=s.get("audit_log", as_str, None),
        actions=actions,
    )
    s.finish()
    return out


_MISSING_KIND: Any = object()


def _body_size(value: Any) -> int:
    n = as_size(value)
    if n < 1024:
        raise ValueError(f"expected at least 1KiB, got {value!r}")
    return n


def as_dict(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data, for `--check-config` (durations and sizes readable)."""

    def conv(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: conv(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, dict):
            return {k: conv(v) for k, v in obj.items()}
        if isinstance(obj, tuple):
            return [conv(v) for v in obj]
        return obj

    out = conv(cfg)
    out["exporter"]["listen"] = "{}:{}".format(*cfg.exporter.listen)
    out["actuator"]["listen"] = "{}:{}".format(*cfg.actuator.listen)
    out["exporter"]["idle_windows"] = [format_duration(w) for w in cfg.exporter.idle_windows]
    out["exporter"]["intervals"] = {k: format_duration(v) for k, v in out["exporter"]["intervals"].items()}
    out["exporter"]["timeout"] = format_duration(cfg.exporter.timeout)
    out["actuator"]["cooldown"] = format_duration(cfg.actuator.cooldown) if cfg.actuator.cooldown else "0s"
    out["actuator"]["prune_timeout"] = format_duration(cfg.actuator.prune_timeout)
    out["actuator"]["settle_delay"] = format_duration(cfg.actuator.settle_delay) if cfg.actuator.settle_delay else "0s"
    for a in out["actuator"]["actions"].values():
        a["idle_for"] = format_duration(a["idle_for"]) if a["idle_for"] else None
    for h in out["docker_hosts"]:
        h["timeout"] = format_duration(h["timeout"])
    return out


__all__ = ["Config", "ConfigError", "load", "parse_config", "as_dict", "default_host"]
