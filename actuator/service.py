"""The actuator's work: each alert of a notification decided once, and each accepted prune run in
the background and recorded. The HTTP side (`app.py`) replies as soon as the decisions are made."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from buildkit_cache.builders import Builder
from buildkit_cache.config import Config
from buildkit_cache.errors import BuilderError
from buildkit_cache.inventory import BuilderSource

from . import decide as D
from .audit import AuditError, Recorder
from .executor import PruneExecutor
from .payload import Notification
from .state import MemoryState, StateError, StateFile

log = logging.getLogger("actuator")
T = TypeVar("T")

DISCOVERY_TIMEOUT = 10.0  # a notification's reply waits at most this for a Docker host's builder list
FRESH = 2.0  # a builder list younger than this is not asked for again, even for a name it lacks
FAILED_FOR = 10.0  # a host that could not be asked is not asked again for this long: its alerts get 503 at once
HEALTH_EVERY = 10.0  # seconds between /healthz's checks of the Docker hosts
CLAIM_MARGIN = 60.0  # seconds a dead process's running claim holds beyond prune_timeout
DRAIN_TIMEOUT = 30.0  # seconds SIGTERM waits for running prunes (compose: stop_grace_period 45s)


class Directory:
    """The builders each Docker host has now, asked for when an alert names one. A list is reused
    for FRESH seconds only, whatever names it holds: a prune acts on the host as it is, never on an
    old picture of it (a container created, replaced or renamed since)."""

    def __init__(self, inventory: BuilderSource, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.inventory = inventory
        self.clock = clock
        self.wall = wall
        self.cache: dict[str, tuple[float, dict[tuple[str, str], Builder]]] = {}
        # One lock per Docker host: a slow or hung host delays lookups on that host only.
        self.locks: dict[str, asyncio.Lock] = {}
        self.failed: dict[str, float] = {}  # host -> when asking it last failed (monotonic)
        # What each builder name meant when last seen (container, volume), and since when it means
        # another builder than before (wall clock), if it ever did.
        self.meaning: dict[tuple[str, str], tuple[tuple[str, str], float | None]] = {}

    def changed_since(self, host: str, builder: str) -> float | None:
        """When the name came to mean another builder than the one it named before, if it did."""
        seen = self.meaning.get((host, builder))
        return seen[1] if seen else None

    def _remember(self, builders: dict[tuple[str, str], Builder]) -> None:
        now = self.wall()
        for key, b in builders.items():
            new = (b.ref.container, b.ref.volume)
            old = self.meaning.get(key)
            if old is None:
                self.meaning[key] = (new, None)
                continue
            (container, volume), since = old
            # Another container under the name, or another volume, is another builder. A leaked
            # volume whose container came back (no container before, the same volume) is the same.
            other = bool(container and container != new[0]) or bool(volume and new[1] and volume != new[1])
            self.meaning[key] = (new, now if other else since)

    async def warm(self) -> None:
        """Ask every Docker host for its builders once, at start, so the first notification is
        answered from the cache instead of waiting on discovery. A host that fails is asked again
        when an alert names it."""
        await asyncio.gather(*(self.lookup(host, "") for host in self.inventory.hosts))

    async def lookup(self, host: str, builder: str) -> dict[tuple[str, str], Builder] | None:
        """The builders labelled with `host`; None if that Docker host cannot be asked right now."""
        remotes: dict[tuple[str, str], Builder] = {r.ref.key: r for r in self.inventory.remotes if r.ref.host == host}
        if host not in self.inventory.hosts:
            return remotes
        if host not in self.locks:
            self.locks[host] = asyncio.Lock()
        if self.clock() - self.failed.get(host, float("-inf")) < FAILED_FOR:
            return None  # a dead host costs its own alerts only, and only once every FAILED_FOR
        async with self.locks[host]:
            cached = self.cache.get(host)
            if cached and self.clock() - cached[0] < FRESH:
                return {**remotes, **cached[1]}
            if self.clock() - self.failed.get(host, float("-inf")) < FAILED_FOR:
                return None  # it failed while this lookup waited for the lock
            try:
                loop = asyncio.get_running_loop()
                found = await asyncio.wait_for(loop.run_in_executor(None, self.inventory.discover, host),
                                               DISCOVERY_TIMEOUT)
            except (BuilderError, TimeoutError) as exc:
                log.warning("cannot list the builders of Docker host %s: %s; asked again in %gs", host,
                            str(exc) or f"no answer within {DISCOVERY_TIMEOUT:g}s", FAILED_FOR)
                self.failed[host] = self.clock()
                return None
            self.failed.pop(host, None)
            for line in found.refused:
                log.error("docker host %s: %s", host, line)
            self.cache[host] = (self.clock(), {b.ref.key: b for b in found.builders})
            self._remember(self.cache[host][1])
            return {**remotes, **self.cache[host][1]}


class ActuatorService:
    def __init__(self, cfg: Config, inventory: BuilderSource, recorder: Recorder, *, dry_run: bool,
                 clock: Callable[[], float] = time.time, max_pending: int = 64,
                 state: MemoryState | StateFile | None = None, pod: tuple[str, str] | None = None):
        self.cfg = cfg
        self.pod = pod  # (namespace, name) when it runs beside its buildkitd in a pod
        self.recorder = recorder
        self.dry_run = dry_run
        self.max_pending = max_pending
        # A claim whose process is gone holds for as long as its prune may take, and a margin.
        hold = cfg.actuator.prune_timeout + cfg.actuator.settle_delay + CLAIM_MARGIN
        self.claims = D.Claims(cfg.actuator.cooldown, clock, state, hold)
        self.directory = Directory(inventory)
        self.executor = PruneExecutor(prune_timeout=cfg.actuator.prune_timeout, settle_delay=cfg.actuator.settle_delay)
        recorder.metrics.track_in_progress(lambda: self.executor.running)
        recorder.metrics.track_running(lambda: dict(self.executor.started), time.time)
        recorder.audit.on_failure = recorder.metrics.audit_write_failures.inc
        recorder.metrics.audit_writable.set_function(lambda: 0.0 if recorder.audit.failure else 1.0)
        self.tasks: set[asyncio.Task[None]] = set()
        self._state_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        self.accepting = True
        self.inventory = inventory
        self._docker_checked: tuple[float, str | None] = (-HEALTH_EVERY, None)

    async def docker_problem(self) -> str | None:
        """Why prunes cannot work right now (a Docker host that does not answer), or None; asked at
        most every HEALTH_EVERY seconds, so /healthz stays cheap."""
        checked_at, problem = self._docker_checked
        if time.monotonic() - checked_at < HEALTH_EVERY:
            return problem
        problem = None
        loop = asyncio.get_running_loop()
        for name, host in self.inventory.hosts.items():
            try:
                await asyncio.wait_for(loop.run_in_executor(None, host.version), 5.0)
            except (BuilderError, TimeoutError) as exc:
                problem = f"docker host {name}: {str(exc) or 'no answer within 5s'}"
                break
        self._docker_checked = (time.monotonic(), problem)
        return problem

    async def _state_call(self, fn: Callable[..., T], *args: Any) -> T:
        """State changes in a thread of their own, one at a time: never on the event loop, and never
        behind lookups of a Docker host that does not answer."""
        return await asyncio.get_running_loop().run_in_executor(self._state_pool, fn, *args)

    async def state_problem(self) -> str | None:
        """Why claims cannot be recorded right now (the state lock held elsewhere, a folder gone), or None."""
        def probe() -> None:
            with self.claims.state.locked():
                pass

        try:
            await self._state_call(probe)
        except (StateError, OSError) as exc:
            return f"state file: {exc}"
        return None

    async def refusal(self) -> str | None:
        """Why no new work is taken now (answered 503, which Alertmanager retries), or None."""
        if not self.accepting:
            return "shutting down"
        if len(self.tasks) >= self.max_pending:
            return "too many prunes queued"
        if not await self.recorder.audit.check_writable():
            # No prune without an audit record.
            return self.recorder.audit.failure
        return None

    async def handle(self, notification: Notification) -> list[D.Decision]:
        """Decide each alert, start what is accepted, record everything."""
        self.recorder.received(status=notification.status, receiver=notification.receiver,
                               group_key=notification.group_key, alerts=len(notification.alerts),
                               firing=len(notification.firing()))
        decisions = []
        for alert in notification.alerts:
            host, name = alert.labels.get("host", ""), alert.labels.get("builder", "")
            builders = await self.directory.lookup(host, name) if alert.firing and host and name else {}
            refs = None if builders is None else {k: b.ref for k, b in builders.items()}
            d = D.decide(alert, self.cfg, refs, self.directory.changed_since(host, name), pod=self.pod)
            # Off the event loop: the state file's lock may be held elsewhere (it waits a bounded time).
            d = await self._state_call(self.claims.settle, d, not self.dry_run)
            if d.accepted:
                try:  # no prune without its line on disk first
                    await self._state_call(self.recorder.accepted, d)
                except AuditError as exc:
                    if not self.dry_run:
                        await self._state_call(self.claims.release, d, False)
                    d = replace(d, decision=D.AUDIT_FAILED, reason=f"cannot put the prune on record, so no prune: {exc}")
            self.recorder.decision(d)
            if d.accepted and builders is not None:  # accepted only when the builders are known
                task = asyncio.get_running_loop().create_task(self._run(d, builders[(d.host, d.builder)]),
                                                              name=f"prune {d.host}/{d.builder}")
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            decisions.append(d)
        return decisions

    async def _run(self, d: D.Decision, builder: Builder) -> None:
        if d.request is None:  # every accepted decision carries its request
            raise ValueError(f"accepted decision without a request: {d}")
        ran = False
        try:
            outcome = await self.executor.run(
                builder, d.request, dry_run=self.dry_run,
                on_start=lambda cache, disk: self.recorder.started(d, cache, disk))
            self.recorder.outcome(d, outcome)
            ran = outcome.ran
        except asyncio.CancelledError:
            # Stopped while BuildKit may still be pruning: say so, and keep the claim, which holds
            # (in the state file) until the prune's time is up, so a restart does not start another.
            self.recorder.interrupted(d)
            raise
        except Exception:
            log.exception("prune of %s/%s failed unexpectedly", d.host, d.builder)
            if not self.dry_run:
                await self._state_call(self.claims.release, d, ran)
        else:
            if not self.dry_run:
                await self._state_call(self.claims.release, d, ran)

    async def drain(self, grace: float = DRAIN_TIMEOUT) -> None:
        """On SIGTERM, while the listener stays open: refuse new work (503, which Alertmanager
        retries, and /healthz says so) and give running prunes up to `grace` seconds to finish."""
        self.accepting = False
        if self.tasks:
            log.info("waiting up to %gs for %d prune(s) to finish", grace, len(self.tasks))
            await asyncio.wait(set(self.tasks), timeout=grace)

    async def close(self) -> None:
        """Stop: prunes still running are recorded as interrupted."""
        self.accepting = False
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self.executor.close()
        self._state_pool.shutdown(wait=False)
