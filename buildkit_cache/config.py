"""The one YAML config file the exporter and the actuator share: its model, with every key's type
and default written once here, read and written back by `config_reader`."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import yaml

from .config_reader import ConfigError, Invalid, Kind, Reader, as_str, internal, setting, write
from .units import format_duration, parse_duration, parse_size

ACTION_KINDS = ("prune-to-budget", "prune-idle", "prune-all")
CONTAINER_PREFIX = "buildx_buildkit_"

# -- kinds of scalar ---------------------------------------------------------------------------


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


def _listen(value: Any) -> tuple[str, int]:
    """'host:port', ':port' or '[::1]:port'."""
    text = as_str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port such as 127.0.0.1:9862, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - ':port' asks for every interface


def _write_listen(v: tuple[str, int]) -> str:
    return f"[{v[0]}]:{v[1]}" if ":" in v[0] else f"{v[0]}:{v[1]}"


def _docker_url(value: Any) -> str:
    url = as_str(value)
    if urlparse(url).scheme not in ("unix", "tcp", "ssh", "http", "https"):
        raise ValueError(f"expected a unix://, tcp:// or ssh:// URL, got {url!r}")
    return url


def _buildkit_address(value: Any) -> str:
    addr = as_str(value)
    if urlparse(addr).scheme not in ("tcp", "unix", "docker-container", "kube-pod", "ssh"):
        raise ValueError(f"expected a buildkitd address such as tcp://host:1234, got {addr!r}")
    return addr


def _existing_file(value: Any) -> str:
    path = as_str(value)
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    return path


def _absolute_path(value: Any) -> str:
    path = as_str(value)
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path on the Docker host, got {path!r}")
    return path


def _container(value: Any) -> str:
    name = as_str(value)
    if not name.startswith(CONTAINER_PREFIX):
        raise ValueError(f"expected a buildx builder container name ({CONTAINER_PREFIX}...), got {name!r}")
    return name


def _body_size(value: Any) -> int:
    n = parse_size(value)
    if n < 1024:
        raise ValueError(f"expected at least 1KiB, got {value!r}")
    return n


def _write_duration(seconds: float) -> str:
    return format_duration(seconds) if seconds else "0s"


def _basic_username(value: Any) -> str:
    name = as_str(value)
    if ":" in name or not name:
        raise ValueError("a basic auth username cannot be empty or contain ':' (it could never log in)")
    return name


def _idle_for(value: Any) -> float:
    seconds = _positive_duration(value)
    if seconds < 1:
        # The engine's `until` filter takes whole seconds: 500ms would become 0s, every record.
        raise ValueError(f"expected at least 1s, got {value!r}")
    return seconds


DURATION = Kind(parse_duration, _write_duration)
POSITIVE_DURATION = Kind(_positive_duration, _write_duration)
SIZE = Kind(parse_size)
BODY_SIZE = Kind(_body_size)
LISTEN = Kind(_listen, _write_listen, whole=True)
DOCKER_URL = Kind(_docker_url)
BUILDKIT_ADDRESS = Kind(_buildkit_address)
EXISTING_FILE = Kind(_existing_file)
ABSOLUTE_PATH = Kind(_absolute_path)
CONTAINER = Kind(_container)

# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """Client certificate files; the CA that signed the server's."""

    ca_file: str | None = setting(None, kind=EXISTING_FILE)
    cert_file: str | None = setting(None, kind=EXISTING_FILE)
    key_file: str | None = setting(None, kind=EXISTING_FILE)

    def check(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise Invalid("cert_file and key_file go together")


@dataclass(frozen=True)
class DockerTLS(TLSFiles):
    """TLS to a tcp:// Docker host."""

    verify: bool = True


@dataclass(frozen=True)
class BuildkitdTLS(TLSFiles):
    """TLS to a remote buildkitd."""

    server_name: str | None = None


@dataclass(frozen=True)
class DockerHostConfig:
    shorthand = "url"  # an entry may be just the URL

    url: str = setting(kind=DOCKER_URL)
    name: str = ""  # the `host` label; default: 'local' for a socket, else the URL's host name
    # Where the host's files are visible to this process; "" when they are not. Default: "/" for a
    # local socket, "" otherwise.
    host_root: str | None = None
    timeout: float = setting(30.0, kind=POSITIVE_DURATION)
    tls: DockerTLS | None = None
    containerd_root: str | None = setting(None, kind=ABSOLUTE_PATH)  # None: from the engine's /info

    def check(self) -> DockerHostConfig:
        return dataclasses.replace(
            self,
            name=self.name or host_label(self.url),
            host_root=self.host_root if self.host_root is not None else ("/" if _is_local(self.url) else ""),
        )

    @property
    def visible_root(self) -> str | None:
        return self.host_root or None


@dataclass(frozen=True)
class BuilderConfig:
    """Settings of one builder, keyed `<builder>` or `<host>/<builder>` under `builders`."""

    budget: int | None = setting(None, kind=SIZE)
    container: str | None = setting(None, kind=CONTAINER)
    address: str | None = setting(None, kind=BUILDKIT_ADDRESS)  # makes it a remote buildkitd
    # A remote buildkitd whose state directory this process sees (a sidecar in its pod, the same host):
    # its volume, filesystem and databases are measured, and its changes seen, like a container's.
    state_dir: str | None = None
    tls: BuildkitdTLS | None = None
    actions: tuple[str, ...] | None = None  # None: every enabled action

    def check(self) -> None:
        if self.address and self.container:
            raise Invalid("a builder has either an address (remote buildkitd) or a container, not both")
        if self.tls and not self.address:
            raise Invalid("applies to a remote builder; it needs address", "tls")
        if self.state_dir is not None and not self.address:
            raise Invalid("applies to a remote builder; it needs address", "state_dir")
        if self.state_dir is not None and not self.state_dir.startswith("/"):
            raise Invalid(f"expected an absolute path, got {self.state_dir!r}", "state_dir")


# The keys of exporter.intervals: discovery, the safety refresh, and each measurement's interval
# (buildkit_cache.exporter.measurements holds their defaults; a test holds the two lists equal). Checked
# here, so that both programs refuse the same typo.
INTERVAL_NAMES = ("discovery", "refresh", "records", "gc_policy", "filesystem", "state_volume")


@dataclass(frozen=True)
class ExporterConfig:
    # Loopback unless told otherwise: builder names can carry an ssh user and an address.
    listen: tuple[str, int] = setting(("127.0.0.1", 9862), kind=LISTEN)
    timeout: float = setting(60.0, kind=POSITIVE_DURATION)
    buildctl: str = "buildctl"
    # How often discovery and each measurement run, over their own defaults: each measurement owns its
    # interval (buildkit_cache.exporter.measurements), which checks these names.
    intervals: dict[str, float] = setting(kind=POSITIVE_DURATION, factory=dict)
    idle_windows: tuple[float, ...] = setting((3600.0, 86400.0, 7 * 86400.0, 30 * 86400.0), kind=POSITIVE_DURATION)

    def check(self) -> ExporterConfig:
        for name in self.intervals:
            if name not in INTERVAL_NAMES:
                close = difflib.get_close_matches(name, INTERVAL_NAMES, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise Invalid(f"unknown key{hint}; allowed here: {', '.join(sorted(INTERVAL_NAMES))}",
                              f"intervals.{name}")
        windows = tuple(sorted(set(self.idle_windows)))
        return dataclasses.replace(self, idle_windows=windows or ExporterConfig().idle_windows)


@dataclass(frozen=True)
class ActionConfig:
    """An action alerts may ask for. `kind` and `idle_for` default to the built-in of that name."""

    kind: str | None = None
    idle_for: float | None = setting(None, kind=Kind(_idle_for, _write_duration))  # prune-idle only
    enabled: bool = True

    def check(self) -> None:
        if self.kind is not None and self.kind not in ACTION_KINDS:
            raise Invalid(f"expected one of {', '.join(ACTION_KINDS)}, got {self.kind!r}", "kind")


BUILTIN_ACTIONS = {
    "prune-to-budget": ActionConfig("prune-to-budget"),
    "prune-idle": ActionConfig("prune-idle", idle_for=7 * 86400.0),
    "prune-all": ActionConfig("prune-all"),
}


@dataclass(frozen=True)
class BasicAuth:
    username: str = setting(kind=Kind(_basic_username))
    password_file: str = setting()


@dataclass(frozen=True)
class AuthConfig:
    # Secret files are read (and checked) by the actuator when it starts: the exporter shares this
    # file and need not have them.
    bearer_token_file: str | None = None
    basic_auth: BasicAuth | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.bearer_token_file or self.basic_auth)


@dataclass(frozen=True)
class ServerTLS:
    """TLS the actuator serves with; with `client_ca_file`, client certificates are required."""

    cert_file: str = setting()
    key_file: str = setting()
    client_ca_file: str | None = None


@dataclass(frozen=True)
class ActuatorConfig:
    listen: tuple[str, int] = setting(("127.0.0.1", 9863), kind=LISTEN)
    auth: AuthConfig = setting(factory=AuthConfig)
    tls: ServerTLS | None = None
    cooldown: float = setting(3600.0, kind=DURATION)
    dry_run: bool = False
    prune_timeout: float = setting(600.0, kind=POSITIVE_DURATION)
    settle_delay: float = setting(2.0, kind=DURATION)
    max_body: int = setting(1024 * 1024, kind=BODY_SIZE)
    audit_log: str | None = None
    # Cooldowns and running prunes, kept across restarts (and shared by replicas on one path); "":
    # in memory only.
    state_file: str = "/var/lib/buildkit-cache-actuator/state.json"
    actions: dict[str, ActionConfig] = setting(factory=lambda: dict(BUILTIN_ACTIONS))

    def check(self) -> ActuatorConfig:
        """The built-in actions, with the file's entries over them; every entry complete."""
        merged = dict(BUILTIN_ACTIONS)
        for name, a in self.actions.items():
            builtin = BUILTIN_ACTIONS.get(name)
            kind = a.kind or (builtin.kind if builtin else None)
            if kind is None:
                raise Invalid(f"is required for a new action: one of {', '.join(ACTION_KINDS)}", f"actions.{name}.kind")
            if a.idle_for is not None and kind != "prune-idle":
                raise Invalid(f"applies to prune-idle actions only, this one is {kind}", f"actions.{name}.idle_for")
            idle_for = a.idle_for
            if kind == "prune-idle" and idle_for is None:
                idle_for = builtin.idle_for if builtin and builtin.kind == kind else BUILTIN_ACTIONS["prune-idle"].idle_for
            merged[name] = ActionConfig(kind, idle_for, a.enabled)
        return dataclasses.replace(self, actions=merged)

    @property
    def enabled_actions(self) -> dict[str, ActionConfig]:
        return {n: a for n, a in self.actions.items() if a.enabled}


@dataclass(frozen=True)
class Config:
    # Absent from the file: $DOCKER_HOST or the local socket (parse_config fills it in). An explicit
    # [] is no Docker host at all, as for an exporter beside a buildkitd in its pod (a sidecar).
    docker_hosts: tuple[DockerHostConfig, ...] = ()
    builders: dict[str, BuilderConfig] = setting(factory=dict)
    exporter: ExporterConfig = setting(factory=ExporterConfig)
    actuator: ActuatorConfig = setting(factory=ActuatorConfig)
    source: str = internal("(defaults)")  # the file it came from, for error messages

    def check(self) -> Config:
        hosts = self.docker_hosts
        names = [h.name for h in hosts]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise Invalid(f"two hosts are named {dup!r}; give each a distinct name", "docker_hosts")
        for key, b in self.builders.items():
            host, sep, name = key.rpartition("/")
            where = f"builders.{key}"
            if not name:
                raise Invalid("expected <builder> or <host>/<builder>", where)
            if not names and not b.address:
                raise Invalid("docker_hosts is empty: only remote builders (with an address) can be set", where)
            if b.address and sep and host in names and name == "default":
                raise Invalid(f"{host}/default is the engine's own builder on Docker host {host!r}; "
                              "give the remote builder another name", where)
            if sep and not b.address and host not in names:
                raise Invalid(f"no Docker host is named {host!r}; hosts are: {', '.join(names)}", where)
            if not sep and not b.address and len(names) > 1:
                raise Invalid(f"{len(names)} Docker hosts are configured ({', '.join(names)}): key it as "
                              f"<host>/{name} to say on which this builder's settings apply", where)
            for i, action in enumerate(b.actions or ()):
                if action not in self.actuator.enabled_actions:
                    raise Invalid(f"unknown action {action!r}; actions are: "
                                  f"{', '.join(sorted(self.actuator.enabled_actions))}", f"{where}.actions[{i}]")
        return dataclasses.replace(self, docker_hosts=hosts)

    # -- lookups -----------------------------------------------------------------------------

    def builder_settings(self) -> dict[tuple[str, str], BuilderConfig]:
        """Each builder's settings by its (host, builder) labels. An entry keyed by name alone
        applies on the one Docker host (several hosts need the host in the key: see check())."""
        return dict(self._settings_index)

    @functools.cached_property
    def _settings_index(self) -> dict[tuple[str, str], BuilderConfig]:
        # Looked up for every builder at every scrape and for every alert: built once per config.
        out: dict[tuple[str, str], BuilderConfig] = {}
        for key, b in self.builders.items():
            host, _, name = key.rpartition("/")
            if not host:
                host = remote_host_label(b.address) if b.address else self.docker_hosts[0].name
            out[(host, name)] = b
        return out

    def settings_for(self, host: str, builder: str) -> BuilderConfig | None:
        return self._settings_index.get((host, builder))

    def budget_for(self, host: str, builder: str) -> int | None:
        b = self.settings_for(host, builder)
        return b.budget if b else None

    def container_names(self, host: str) -> dict[str, str]:
        """Container name -> builder name, for containers the config names on this host."""
        return {b.container: name for (h, name), b in self.builder_settings().items() if b.container and h == host}

    def remote_builders(self) -> list[tuple[str, str, BuilderConfig]]:
        """(host label, builder name, settings) of each remote buildkitd."""
        return [(h, n, b) for (h, n), b in self.builder_settings().items() if b.address]


def default_docker_url() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def host_label(url: str) -> str:
    """A short `host` label for a Docker URL: 'local' for a unix socket, else the host name."""
    parsed = urlparse(url)
    if parsed.scheme in ("unix", "npipe", ""):
        return "local"
    return parsed.hostname or url


def remote_host_label(address: str) -> str:
    return urlparse(address).hostname or "remote"


def default_host(url: str | None = None) -> DockerHostConfig:
    return DockerHostConfig(url=url or default_docker_url()).check()


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("unix", "")


MAX_CONFIG_BYTES = 1024 * 1024  # a config is a few kB; far larger is a mistake or an attack
MAX_CONFIG_VALUES = 100_000  # values once YAML aliases are expanded (an alias bomb is small on disk)


def _count_values(data: Any, source: str) -> None:
    seen, stack = 0, [data]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(f"{source}: more than {MAX_CONFIG_VALUES} values (YAML aliases expanded): "
                              "not a config this program reads")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load(path: str | None, docker_hosts: list[str] | None = None) -> Config:
    """Read the config file (None: defaults). `docker_hosts` from the command line replace the file's."""
    if path is None:
        return parse_config({}, "(defaults)", docker_hosts)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config this program reads")
        data = yaml.safe_load(text)
        _count_values(data, path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_config(data, path, docker_hosts)


def parse_config(data: Any, source: str = "config", docker_hosts: list[str] | None = None) -> Config:
    if docker_hosts and isinstance(data, dict):
        data = {**data, "docker_hosts": list(docker_hosts)}
    elif docker_hosts and data is None:
        data = {"docker_hosts": list(docker_hosts)}
    if data is None:
        data = {}
    if isinstance(data, dict) and "docker_hosts" not in data:
        data = {**data, "docker_hosts": [default_docker_url()]}
    return dataclasses.replace(Reader(source).read(Config, data), source=source)


def as_dict(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data that loads back to the same config (`--check-config`)."""
    out: dict[str, Any] = write(cfg)
    return out


__all__ = ["Config", "ConfigError", "load", "parse_config", "as_dict", "default_host"]
