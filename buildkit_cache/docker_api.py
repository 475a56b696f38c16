"""One Docker host reached through the docker SDK: every Docker Engine API call of the project."""

from __future__ import annotations

import io
import json
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import docker
import docker.errors
import docker.tls
import requests.exceptions

from . import deadline
from .config import DockerTLS
from .errors import BuilderError, CommandFailed, TimedOut, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Connection-level failures: the daemon is down, unreachable or too slow. Reported as Unavailable.
_CONNECTION_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    ConnectionError,
    TimeoutError,
    FileNotFoundError,
    docker.errors.DockerException,
)


# Docker 20.10's answer to a second /system/df while one runs (daemon/disk_usage.go), and how long
# to wait before asking again after such an answer.
_DF_BUSY = "a disk usage operation is already running"
_BUSY_PAUSE = 0.25


class _APIClient(docker.APIClient):
    """The Docker SDK's client, whose TLS CA the environment cannot override: requests lets
    REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE replace a session's `verify` on every request, so a
    configured `tls.ca_file` lost to whatever the environment named."""

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if isinstance(self.verify, str) and verify in (None, True):  # the config's CA file
            merged["verify"] = self.verify
        return merged


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


def api_at_least(version: str, minimum: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".") if p.isdigit())

    return parts(version) >= parts(minimum)


class DockerHost:
    """A Docker Engine, reached lazily, with timeouts on every call and a reconnect after failures.

    `host_root` is where this host's filesystem is visible to this process ('/' when the exporter
    runs on the host itself, '/host' when it runs in a container with the host's / mounted there,
    None when it cannot see it at all, as for a remote host). `containerd_root` is containerd's root
    on that host when the config names it (containerd image store; see builders.engine_storage).
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float = 30.0,
        tls: DockerTLS | None = None,
        host_root: str | None = None,
        containerd_root: str | None = None,
    ):
        self.name = name
        self.containerd_root = containerd_root
        self.url = url
        self.timeout = timeout
        self.tls = tls
        self.host_root = host_root
        self._client: docker.APIClient | None = None
        self._lock = threading.Lock()
        # Commands given up on while still running in their container, by (container, argv): their
        # exec id, so that no second one is started beside a hung first one.
        self._given_up: dict[tuple[str, tuple[str, ...]], str] = {}
        # Builder containers (name, id) whose image has no `timeout` (buildctl.ContainerBuildctl), and
        # what was learned of each container's buildctl (buildctl.BuildctlClient.memory).
        self.without_timeout: set[tuple[str, str]] = set()
        self.learned: dict[tuple[str, str], dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"DockerHost({self.name!r}, {self.url!r})"

    # -- connection -----------------------------------------------------------------------------

    def client(self) -> docker.APIClient:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> docker.APIClient:
        kwargs: dict[str, Any] = {"base_url": self.url, "version": "auto", "timeout": self.timeout}
        if self.url.startswith("ssh://"):
            # The system ssh client honours ~/.ssh/config; paramiko would be one more dependency.
            kwargs["use_ssh_client"] = True
        if self.tls is not None:
            cert = (self.tls.cert_file, self.tls.key_file) if self.tls.cert_file and self.tls.key_file else None
            kwargs["tls"] = docker.tls.TLSConfig(
                client_cert=cert,
                ca_cert=self.tls.ca_file,
                verify=self.tls.ca_file if (self.tls.verify and self.tls.ca_file) else self.tls.verify,
            )
        try:
            return _APIClient(**kwargs)
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(self._socket_said(exc) or f"Docker at {self.url} is unreachable: {_short(exc)}") from exc

    def _reset(self) -> None:
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception as exc:
                    log.debug("closing the client of %s: %s", self.name, exc)
            self._client = None

    def _call(self, what: str, fn: Callable[[docker.APIClient], T], client_error: type[BuilderError] = BuilderError,
              retry: bool = True, busy: str = "") -> T:
        """Run one SDK call. A refusal (4xx) raises `client_error`; a daemon that is down, failing
        or too slow raises Unavailable and drops the client so the next call reconnects.

        Over ssh:// a pooled connection whose `docker system dial-stdio` has ended fails the next
        call with a broken pipe: a call that may run twice (`retry`, every read) is tried once more
        on a fresh connection. An answer containing `busy` ("one is running, come back") is asked
        again every _BUSY_PAUSE on the same connection, within the call's time."""
        attempts = 2 if retry and self.url.startswith("ssh://") else 1
        until = time.monotonic() + deadline.left(self.timeout)
        attempt = 1
        while True:
            client = self.client()
            try:
                return fn(client)
            except docker.errors.APIError as exc:
                said = _short(exc)
                if exc.status_code is not None and exc.status_code < 500:
                    raise client_error(f"{what} on {self.name}: {said}") from exc
                if not busy or busy not in said:
                    self._reset()
                elif time.monotonic() + _BUSY_PAUSE < until:  # an answer: the connection is fine
                    log.debug("%s on %s: %s; asking again in %gs", what, self.name, said, _BUSY_PAUSE)
                    time.sleep(_BUSY_PAUSE)
                    continue
                raise Unavailable(f"{what} on {self.name}: {said}") from exc
            except _CONNECTION_ERRORS as exc:
                self._reset()
                if attempt < attempts:
                    attempt += 1
                    log.debug("%s on %s: %s; once more on a new connection", what, self.name, _short(exc))
                    continue
                raise Unavailable(f"{what} on {self.name}: {self._socket_said(exc) or f'Docker at {self.url} is unreachable: {_short(exc)}'}") from exc

    def _socket_said(self, exc: BaseException) -> str | None:
        """For a unix socket this process may not use, or that is not there: who owns it and what to
        do, as the actuator says it at start; None for any other failure."""
        from .checks import socket_problem

        cause = _root_cause(exc)
        if not self.url.startswith("unix://") or not isinstance(cause, (PermissionError, FileNotFoundError)):
            return None
        path = self.url.removeprefix("unix://") or "/var/run/docker.sock"
        if isinstance(cause, FileNotFoundError):
            return (f"the Docker socket {path} does not exist: is Docker running? (docker_hosts[].url, "
                    "--docker-host or $DOCKER_HOST name another)")
        return socket_problem(self.url) or f"cannot use the Docker socket {path}: permission denied"

    @property
    def api_version(self) -> str:
        return self.client().api_version

    # -- engine -----------------------------------------------------------------------------------

    def version(self) -> Mapping[str, Any]:
        return self._call("GET /version", lambda c: _mapping(c.version()))

    def info(self) -> Mapping[str, Any]:
        return self._call("GET /info", lambda c: _mapping(c.info()))

    def system_df_build_cache(self) -> Mapping[str, Any]:
        """`GET /system/df`, asking for the build cache only where the API (1.42+) honours it, and
        for the record list (`verbose`) where the API (1.52+) lists records only when asked.

        Docker 20.10 computes one disk usage at a time and refuses a second meanwhile (23.0 and
        later share the one running): someone's `docker system df` must not fail the measurement,
        so it waits for that one."""
        return self._call("GET /system/df", lambda c: _mapping(c._result(self._system_df(c), True)),  # type: ignore[attr-defined]
                          busy=_DF_BUSY)

    def system_df_build_cache_bytes(self) -> bytes:
        """The same answer, undecoded: the exporter decodes only the fields it needs (decode.py)."""
        return self._call("GET /system/df", lambda c: bytes(c._result(self._system_df(c), binary=True)),  # type: ignore[attr-defined]
                          busy=_DF_BUSY)

    @staticmethod
    def _system_df(c: docker.APIClient) -> Any:
        params: dict[str, str] = {}
        if api_at_least(c.api_version, "1.42"):
            params["type"] = "build-cache"
        if api_at_least(c.api_version, "1.52"):
            params["verbose"] = "1"
        # docker-py 7's df() takes no parameters: the SDK's own request helpers take them. They are
        # private, hence the pin on docker's major version (pyproject.toml).
        return c._get(c._url("/system/df"), params=params or None)  # type: ignore[attr-defined]

    def build_prune(self, params: Mapping[str, str], timeout: float) -> Mapping[str, Any]:
        """`POST /build/prune` with query parameters already in the engine's API shape.

        The engine answers only when the prune is done, so it gets its own, longer timeout.
        """

        def call(c: docker.APIClient) -> Mapping[str, Any]:
            # prune_builds() sends only keep-storage; the newer parameters need the SDK's own request.
            res = c._post(c._url("/build/prune"), params=dict(params), timeout=timeout)  # type: ignore[attr-defined]
            return _mapping(c._result(res, True))  # type: ignore[attr-defined]

        return self._call("POST /build/prune", call, retry=False)

    # -- containers and volumes -----------------------------------------------------------------

    def containers(self, name_prefix: str) -> list[Mapping[str, Any]]:
        """All containers (running or not) whose name starts with `name_prefix`."""
        found: list[Mapping[str, Any]] = self._call(
            "GET /containers/json", lambda c: list(c.containers(all=True, filters={"name": name_prefix}))
        )
        return [
            c for c in found if any(n.lstrip("/").startswith(name_prefix) for n in c.get("Names") or ())
        ]

    def volumes(self, name_prefix: str) -> list[Mapping[str, Any]]:
        found = self._call("GET /volumes", lambda c: _mapping(c.volumes(filters={"name": name_prefix})))
        return [v for v in (found.get("Volumes") or ()) if v.get("Name", "").startswith(name_prefix)]

    def exec(self, container: str, argv: Sequence[str], timeout: float | None = None, retry: bool = True,
             on_stdout: Callable[[bytes], None] | None = None) -> ExecResult:
        """Run `argv` (no shell) in a running container and collect its output and exit code.

        `timeout` bounds each wait for output (default: the host's timeout); a prune that works
        for minutes before printing needs a longer one than an API call. `on_stdout` hears the
        standard output as it comes (a prune's progress).
        """

        key = (container, tuple(argv))

        def call(c: docker.APIClient) -> ExecResult:
            limit = deadline.left(timeout or self.timeout)
            earlier = self._given_up.get(key)
            if earlier is not None:
                try:
                    running = bool(c.exec_inspect(earlier).get("Running"))
                except docker.errors.NotFound:
                    running = False  # the container was restarted: its execs are gone
                if running:
                    raise Unavailable(f"`{' '.join(argv[:6])}` started earlier in {container} is still running "
                                      "there (a hung builder?); not starting another beside it")
                self._given_up.pop(key, None)
            ends = time.monotonic() + limit
            created = c.exec_create(container, list(argv), stdout=True, stderr=True)
            sock = c.exec_start(created["Id"], socket=True)
            what = f"`{' '.join(argv[:3])}` in {container}"
            try:
                raw = getattr(sock, "_sock", sock)
                pipe = getattr(getattr(raw, "proc", None), "stdout", None)
                try:
                    # ssh:// first: the SDK's SSHSocket is a socket.socket too, but its bytes come
                    # through the ssh client's pipe, and a read of its socket side waits for ever.
                    if isinstance(pipe, io.BufferedReader):  # ssh://: the pipe from `docker system dial-stdio`
                        out, err = _read_exec_stream(_pipe_reader(pipe), ends, limit, what, on_stdout)
                    elif isinstance(raw, socket.socket):  # unix://, tcp:// and tcp:// with TLS: one reader
                        first = _read_past_headers(sock, raw)
                        out, err = _read_exec_stream(_socket_reader(raw, first), ends, limit, what, on_stdout)
                    else:
                        raise BuilderError(f"exec in {container}: the Docker SDK gave a {type(raw).__name__}, "
                                           "not a socket or ssh pipe this exporter reads (docker 7 and "
                                           "urllib3 1.26-2 give those; pyproject.toml pins them)")
                except (Unavailable, OSError):
                    self._given_up[key] = created["Id"]  # it may still run there: the next one waits for it
                    raise
            finally:
                _close_quietly(sock)
            code = c.exec_inspect(created["Id"]).get("ExitCode")
            return ExecResult(
                exit_code=-1 if code is None else int(code),
                stdout=(out or b"").decode("utf-8", "replace"),
                stderr=(err or b"").decode("utf-8", "replace"),
            )

        # 404: the container is gone; 409: it is stopped or paused. Both: the builder is unavailable.
        return self._call(f"exec in {container}", call, client_error=Unavailable, retry=retry)

    def exec_checked(self, container: str, argv: Sequence[str], timeout: float | None = None,
                     retry: bool = True, on_stdout: Callable[[bytes], None] | None = None) -> str:
        result = self.exec(container, argv, timeout, retry, on_stdout)
        if result.exit_code != 0:
            raise CommandFailed(list(argv), result.exit_code, result.stderr or result.stdout)
        return result.stdout

    # -- paths ----------------------------------------------------------------------------------

    def visible_path(self, path: str) -> str | None:
        """Where a path of this host's filesystem is visible to this process, if it is."""
        if self.host_root is None or not path:
            return None
        local = os.path.join(self.host_root, path.lstrip("/"))
        return local if os.path.exists(local) else None


MAX_EXEC_OUTPUT = 64 * 1024 * 1024  # a buildctl du of 100k records is ~50 MB; more is not an answer


Reader = Callable[[float], "bytes | None"]
"""Waits up to the given seconds for output: a chunk, b"" at the end, None if nothing came yet."""


def _read_past_headers(sock: Any, raw: socket.socket) -> bytes:
    """What the SDK's HTTP client read past the upgrade's headers into its buffer: the start of the
    stream, when the engine sent it with the headers (a quick command: its whole output). Reading
    the socket around that buffer lost it, an empty answer with exit code 0 (docker/docker-py#2042;
    here 3 of 400 execs of the 200-builder bench).

    The buffer is where docker 7 and urllib3 1.26-2 keep it (`sock._response.raw._fp.fp`, private):
    where it is not (a newer SDK), the exec fails loudly rather than read around it."""
    fp = getattr(getattr(getattr(getattr(sock, "_response", None), "raw", None), "_fp", None), "fp", None)
    if not isinstance(fp, io.BufferedReader):
        raise BuilderError("the Docker SDK's exec stream is not laid out as docker 7 with urllib3 1.26-2 lay it "
                           "out (no buffer at sock._response.raw._fp.fp): not reading around it, which loses "
                           "quick answers (docker-py#2042); install the versions pyproject.toml pins")
    raw.setblocking(False)
    try:
        return fp.read1(1 << 16) or b""  # the buffer, or what the socket has now: never waits
    except OSError:  # nothing there yet (ssl.SSLWantReadError is one)
        return b""
    finally:
        raw.setblocking(True)


def _socket_reader(raw: socket.socket, first: bytes = b"") -> Reader:
    raw.setblocking(True)
    poller = select.poll()
    poller.register(raw, select.POLLIN | select.POLLPRI | select.POLLHUP)
    pending = [first] if first else []
    # A TLS socket may hold decrypted bytes that poll() does not see.
    buffered = getattr(raw, "pending", lambda: 0)

    def read(wait: float) -> bytes | None:
        if pending:
            return pending.pop()
        return raw.recv(1 << 16) if buffered() or poller.poll(wait * 1000) else None

    return read


def _pipe_reader(pipe: io.BufferedReader) -> Reader:
    """The ssh client's stdout. The HTTP response's headers were read through this buffered pipe, so
    the first frames may already sit in its buffer: read through it, never around it."""
    os.set_blocking(pipe.fileno(), False)
    poller = select.poll()
    poller.register(pipe.fileno(), select.POLLIN | select.POLLPRI | select.POLLHUP)

    def read(wait: float) -> bytes | None:
        chunk = pipe.read(1 << 16)  # non-blocking: None when nothing is there yet, b"" at the end
        if chunk is None:
            poller.poll(wait * 1000)
        return chunk

    return read


def _close_quietly(sock: Any) -> None:
    """Close an exec's socket. Over ssh:// the SDK's close writes to the ssh client, which has often
    exited once the command ended: the output is complete by then, so a broken pipe is no failure."""
    try:
        sock.close()
    except OSError as exc:
        log.debug("closing an exec stream: %s", exc)


def _read_exec_stream(read: Reader, deadline: float, limit: float, what: str,
                      on_stdout: Callable[[bytes], None] | None = None) -> tuple[bytes, bytes]:
    """stdout and stderr of an exec, from Docker's multiplexed stream (8-byte frame headers: stream,
    three zeros, big-endian size), until it ends. The SDK's own reader waits without a timeout, so a
    command that never ends held its thread forever: this one stops at `deadline`, and at
    MAX_EXEC_OUTPUT bytes."""
    streams: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
    buf = bytearray()
    total = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimedOut(f"{what} did not finish within {limit:g}s")
        chunk = read(min(left, 5.0))
        if chunk is None:
            continue
        if not chunk:
            break
        total += len(chunk)
        if total > MAX_EXEC_OUTPUT:
            raise BuilderError(f"{what} printed more than {MAX_EXEC_OUTPUT // (1024 * 1024)} MiB; not read further")
        buf += chunk
        while len(buf) >= 8:
            size = int.from_bytes(buf[4:8], "big")
            if len(buf) < 8 + size:
                break
            streams.get(buf[0], streams[1]).extend(buf[8:8 + size])
            if on_stdout is not None and buf[0] == 1:
                on_stdout(bytes(buf[8:8 + size]))
            del buf[:8 + size]
    return bytes(streams[1]), bytes(streams[2])


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BuilderError(f"the engine answered {type(value).__name__}, not a JSON object")
    return value


def _root_cause(exc: BaseException) -> BaseException:
    """The OSError under requests' and urllib3's wrappers (`('Connection aborted.', PermissionError(13, ...))`)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (PermissionError, FileNotFoundError)):
            return e
        todo += [a for a in e.args if isinstance(a, BaseException)]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
    return exc


def _short(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        text = str(exc.explanation)
    try:
        text = json.loads(text).get("message", text)
    except (ValueError, AttributeError):
        pass
    return text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
