"""Running `buildctl`: inside a builder container through `docker exec`, or locally with `--addr`.

Arguments are always argv lists built here from typed values; nothing passes through a shell.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from . import deadline, decode, parse
from .config import BuildkitdTLS
from .docker_api import DockerHost
from .errors import BuilderError, CommandFailed, Unavailable
from .models import CacheRecord, PruneRequest, PruneResult, WorkerInfo
from .procs import run_capped
from .prune_api import buildctl_prune_args, prune_result_from_records
from .usage import RecordLike

log = logging.getLogger(__name__)
T = TypeVar("T")


class Runner(Protocol):
    def __call__(self, args: Sequence[str], timeout: float | None = None, retry: bool = True,
                 on_stdout: Callable[[bytes], None] | None = None) -> str:
        """Run `buildctl <args>` and return its standard output; raise BuilderError on failure.
        `retry`: whether the command may run twice (not a prune); one that may not is stopped at its
        deadline and only then given up on, so that what it did is known. `on_stdout` hears the
        output as it comes."""


class ContainerBuildctl:
    """`docker exec <container> buildctl ...`, the way buildx itself reaches its builder.

    The command runs under the container's `timeout` (BuildKit's images have busybox), so a
    buildctl that hangs is killed in the container soon after this side stops waiting for it,
    instead of piling up there; images without `timeout` run buildctl as it is, and the host
    remembers that of the container (`DockerHost.without_timeout`), so it is not tried each time.

    A command that may not run twice (a prune) is killed at its deadline instead, and its output read
    until it has ended: a prune given up on while buildctl still ran went on deleting for the grace
    time, and what it deleted then was never heard (BuildKit stops after its pass once its client
    is gone)."""

    GRACE = 5  # seconds between giving up on the answer and killing the command

    def __init__(self, host: DockerHost, container: str, container_id: str = ""):
        self.host = host
        self.container = container
        self.container_id = container_id

    def __call__(self, args: Sequence[str], timeout: float | None = None, retry: bool = True,
                 on_stdout: Callable[[bytes], None] | None = None) -> str:
        known = (self.container, self.container_id)
        if known not in self.host.without_timeout:
            left = deadline.left(timeout or self.host.timeout)
            if retry:
                # Killed in the container soon after the exec stops waiting: the measurement's deadline.
                limit, read_for = math.ceil(left) + self.GRACE, timeout
            else:
                # Killed at the deadline, and read until its output ends with it.
                limit, read_for = math.ceil(left), math.ceil(left) + self.GRACE
            result = self.host.exec(self.container, ["timeout", "-s", "KILL", str(limit), "buildctl", *args],
                                    read_for, retry, on_stdout)
            missing = result.exit_code in (126, 127) and "timeout" in (result.stderr + result.stdout)
            if not missing:
                if result.exit_code != 0:
                    raise CommandFailed(["buildctl", *args], result.exit_code, result.stderr or result.stdout)
                return result.stdout
            self.host.without_timeout.add(known)
        return self.host.exec_checked(self.container, ["buildctl", *args], timeout, retry, on_stdout)


class LocalBuildctl:
    """A local `buildctl --addr tcp://...` for a remote buildkitd."""

    def __init__(self, address: str, binary: str = "buildctl", timeout: float = 60.0,
                 tls: BuildkitdTLS | None = None):
        self.address = address
        self.binary = binary
        self.timeout = timeout
        self.tls = tls

    def argv(self, args: Sequence[str]) -> list[str]:
        argv = [self.binary, "--addr", self.address]
        if self.tls:
            for flag, value in (("--tlscacert", self.tls.ca_file), ("--tlscert", self.tls.cert_file),
                                ("--tlskey", self.tls.key_file), ("--tlsservername", self.tls.server_name)):
                if value:
                    argv += [flag, value]
        return argv + list(args)

    def __call__(self, args: Sequence[str], timeout: float | None = None, retry: bool = True,
                 on_stdout: Callable[[bytes], None] | None = None) -> str:
        timeout = deadline.left(timeout or self.timeout)
        if shutil.which(self.binary) is None:
            raise Unavailable(f"buildctl not found (looked for {self.binary!r} on PATH); "
                              "install it to reach remote builders")
        argv = self.argv(args)
        code, stdout, stderr = run_capped(argv, timeout, f"buildctl at {self.address}", on_stdout=on_stdout)
        if code != 0:
            err = CommandFailed(argv, code, stderr)
            if "connection refused" in stderr or "no such host" in stderr:
                raise Unavailable(str(err)) from err
            raise err
        return stdout


def _unknown_flag(exc: CommandFailed) -> bool:
    text = exc.stderr.lower()
    return "flag provided but not defined" in text or "unknown flag" in text or "incorrect usage" in text


Progress = Callable[[int, int], None]
"""Hears a running prune's records and bytes deleted so far."""


class _PruneProgress:
    """`buildctl prune --format json` prints each record as BuildKit deletes it: counted here."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.partial = b""
        self.records = 0
        self.bytes = 0

    def __call__(self, chunk: bytes) -> None:
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            m = _SIZE.search(line)
            if m:
                self.records += 1
                self.bytes += int(m.group(1))
        if lines:
            self.progress(self.records, self.bytes)


_SIZE = re.compile(rb'"size":\s*(\d+)')


# BuildKit's record ids: 25 characters of [0-9a-z] (identity.NewID).
ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _too_big(exc: CommandFailed) -> bool:
    """BuildKit refused an answer past its gRPC message limit (16 MiB, about 140,000 records:
    moby/buildkit#3381), on the server's side or on buildctl's."""
    return "ResourceExhausted" in exc.stderr or "message larger than max" in exc.stderr


@dataclass(frozen=True)
class IdRange:
    """The records whose id starts with `prefix` and then one of `chars`; no chars: every id not
    starting with a character of the alphabet (none of BuildKit's, but nothing is left out)."""

    prefix: str = ""
    chars: str = ID_ALPHABET

    def filter(self) -> str:
        """A DiskUsage filter (containerd's syntax; each --filter of buildctl du is OR'ed)."""
        return f"id~=^{self.prefix}[{self.chars}]" if self.chars else f"id~=^{self.prefix}[^{ID_ALPHABET}]"

    def split(self) -> list[IdRange]:
        if not self.chars:
            raise BuilderError(f"records whose ids are outside [0-9a-z] exceed BuildKit's message limit ({self})")
        if len(self.chars) > 1:
            half = len(self.chars) // 2
            return [IdRange(self.prefix, self.chars[:half]), IdRange(self.prefix, self.chars[half:])]
        return [IdRange(self.prefix + self.chars)]

    def __str__(self) -> str:
        return self.filter()


WHOLE: tuple[IdRange, ...] = ()  # no filter: the answer whole


class BuildctlClient:
    """The few buildctl commands the project uses, with fallbacks for releases without `--format`.

    `buildctl du` fails past BuildKit's gRPC message limit (ResourceExhausted, ~140,000 records): the
    records are then asked for in parts by id (DiskUsage's `id~=` filter, computed over the whole
    cache, so every figure is the whole's), split in two until each part fits, and the split is
    remembered for this builder: `parts`."""

    def __init__(self, run: Runner, memory: dict[str, Any] | None = None):
        self.run = run
        self._json_du = True
        self._json_workers = True
        self._json_prune = True
        # What was learned of this builder, kept where it outlives this client (a Docker host keeps
        # it per container, across the discoveries that make new clients).
        self.memory = memory if memory is not None else {}

    @property
    def parts(self) -> tuple[IdRange, ...]:
        """The parts `du` is asked in (WHOLE: the answer whole)."""
        parts: tuple[IdRange, ...] = self.memory.get("parts", WHOLE)
        return parts

    @parts.setter
    def parts(self, value: tuple[IdRange, ...]) -> None:
        self.memory["parts"] = value

    def _in_parts(self, decode_part: Callable[[str], list[T]]) -> Iterator[T]:
        """Every record, part by part (each decoded when the one before is used up)."""
        pending: list[tuple[IdRange, ...]] = [self.parts] if not self.parts else [(p,) for p in self.parts]
        done: list[IdRange] = []
        while pending:
            part = pending.pop(0)
            filters = [a for p in part for a in ("--filter", p.filter())]
            try:
                text = self.run(["du", *filters, "--format", "json"])
            except CommandFailed as exc:
                if not _too_big(exc):
                    raise
                smaller = [IdRange(), IdRange(chars="")] if not part else part[0].split()
                log.info("buildctl du%s: past BuildKit's gRPC message limit; asking in %d parts",
                         f" {part[0]}" if part else "", len(smaller))
                pending[:0] = [(p,) for p in smaller]
                continue
            done.extend(part)
            yield from decode_part(text)
        self.parts = tuple(done)

    def du(self) -> list[CacheRecord]:
        if self._json_du:
            try:
                return list(self._in_parts(parse.parse_buildctl_du_json))
            except CommandFailed as exc:
                if not _unknown_flag(exc):
                    raise
                self._json_du = False
        return parse.parse_buildctl_du_verbose(self.run(["du", "-v"]))

    def du_rows(self) -> Sequence[RecordLike]:
        """What `du` says, as rows for usage.summarize: decoded without a CacheRecord each."""
        if self._json_du:
            try:
                return list(self._in_parts(lambda text: decode.buildctl_rows(text.encode())))
            except CommandFailed as exc:
                if not _unknown_flag(exc):
                    raise
                self._json_du = False
        return self.du()

    def debug_workers(self) -> WorkerInfo:
        if self._json_workers:
            try:
                return parse.parse_debug_workers_json(self.run(["debug", "workers", "--format", "json"]))
            except CommandFailed as exc:
                if not _unknown_flag(exc):
                    raise
                self._json_workers = False
        return parse.parse_debug_workers_verbose(self.run(["debug", "workers", "--verbose"]))

    def prune(self, req: PruneRequest, timeout: float, progress: Progress | None = None) -> PruneResult:
        args = buildctl_prune_args(req)
        if self._json_prune:
            try:
                out = self.run([*args, "--format", "json"], timeout, retry=False,
                               on_stdout=_PruneProgress(progress) if progress else None)
                return prune_result_from_records(parse.parse_buildctl_prune_json(out))
            except CommandFailed as exc:
                if not _unknown_flag(exc):
                    raise
                self._json_prune = False
        ids, total = parse.parse_buildctl_prune_table(self.run(args, timeout, retry=False))
        return PruneResult(records_deleted=len(ids), bytes_reclaimed=total, deleted_ids=tuple(ids))
