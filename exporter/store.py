"""The latest result of every measurement: what `/metrics` serves, never waiting on Docker.

Only the event loop writes it, and every write swaps in new frozen values, so a scrape always sees
a consistent picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

# Builders as a Protocol: the collector's store holds `Builder`s, the server's replica `BuilderView`s
# (no Docker SDK in the server process).
from buildkit_cache.models import BuilderLike, BuilderRef

T = TypeVar("T")


@dataclass(frozen=True)
class Result(Generic[T]):
    """One measurement's last run: its value if it succeeded, how long it took, the last success."""

    success: bool
    duration_seconds: float
    value: T | None = None
    error: str = ""
    last_success_timestamp: float | None = None


@dataclass(frozen=True)
class BuilderState:
    builder: BuilderLike
    results: dict[str, Result[Any]] = field(default_factory=dict)

    @property
    def ref(self) -> BuilderRef:
        return self.builder.ref


@dataclass(frozen=True)
class HostState:
    up: bool
    error: str = ""
    version: str = ""
    api_version: str = ""
    renamed: tuple[str, ...] = ()  # builders named after their nodes to tell them apart
    refused: tuple[str, ...] = ()  # containers or volumes left out: their builder name is not theirs alone
    unmatched: tuple[str, ...] = ()  # builder settings of the config that match no builder here


class Store:
    def __init__(self) -> None:
        self.builders: dict[tuple[str, str], BuilderState] = {}
        self.hosts: dict[str, HostState] = {}

    def set_host_builders(self, host: str, builders: list[BuilderLike]) -> tuple[list[BuilderLike], list[BuilderRef]]:
        """Replace the builders found on a host; keep results of those still there.

        Returns the builders that are new (or changed how they are reached) and the refs that left.
        """
        current = {k: v for k, v in self.builders.items() if k[0] == host and v.ref.driver != "remote"}
        found = {b.ref.key: b for b in builders}
        added: list[BuilderLike] = []
        updated = dict(self.builders)
        for key, b in found.items():
            old = current.get(key)
            if old is None or old.ref != b.ref:
                updated[key] = BuilderState(b)
                added.append(b)
            else:
                # Same builder: keep its results, take the fresh object (running state, mountpoint).
                updated[key] = replace(old, builder=b)
        gone = [v.ref for k, v in current.items() if k not in found]
        for ref in gone:
            del updated[ref.key]
        self.builders = updated
        return added, gone

    def add_builder(self, builder: BuilderLike) -> None:
        self.builders = {**self.builders, builder.ref.key: BuilderState(builder)}

    def set_result(self, key: tuple[str, str], measurement: str, result: Result[Any]) -> None:
        state = self.builders.get(key)
        if state is None:
            return  # the builder left while it was being measured
        previous = state.results.get(measurement)
        if not result.success and previous is not None:
            result = replace(result, last_success_timestamp=previous.last_success_timestamp)
        self.builders = {**self.builders, key: replace(state, results={**state.results, measurement: result})}

    def set_host(self, host: str, state: HostState) -> None:
        self.hosts = {**self.hosts, host: state}
