"""A PruneRequest in the shape each API takes, and each API's reply as a PruneResult. Pure functions:
typed values in, fixed strings out.

Nothing here takes free-form text: sizes and durations are numbers, filters are fixed keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .docker_api import api_at_least
from .errors import BuilderError
from .models import CacheRecord, PruneRequest, PruneResult


def _go_duration(seconds: float) -> str:
    return f"{int(seconds)}s"


def engine_prune_params(req: PruneRequest, api_version: str) -> dict[str, str]:
    """Query parameters of `POST /build/prune` for an engine speaking `api_version`.

    keep-storage (API 1.39+) caps the cache in older engines. From API 1.48 the engine maps it to
    reserved-space, which BuildKit reads as a floor, not a cap, so the cap goes in max-used-space.
    Shared records (layers of images) are excluded with the bare `private` filter unless `all`.
    """
    if not api_at_least(api_version, "1.39"):
        raise BuilderError(f"the engine's API {api_version} is too old for build prune options (1.39+)")
    params: dict[str, str] = {}
    if req.keep_storage:
        key = "max-used-space" if api_at_least(api_version, "1.48") else "keep-storage"
        params[key] = str(int(req.keep_storage))
    if req.all:
        params["all"] = "true"
    filters: dict[str, dict[str, bool]] = {}
    if req.keep_duration_seconds:
        filters["until"] = {_go_duration(req.keep_duration_seconds): True}
    if not req.all:
        filters["private"] = {}  # a bare key: a value such as "true" would match nothing
    if filters:
        params["filters"] = json.dumps(filters, separators=(",", ":"))
    return params


def parse_engine_prune_result(data: Mapping[str, Any]) -> PruneResult:
    deleted = tuple(str(i) for i in (data.get("CachesDeleted") or ()))
    return PruneResult(records_deleted=len(deleted), bytes_reclaimed=int(data.get("SpaceReclaimed") or 0),
                       deleted_ids=deleted)


def buildctl_prune_args(req: PruneRequest) -> list[str]:
    """`buildctl prune` arguments. --keep-storage is in MB of 10^6 bytes, a decimal number
    (buildctl multiplies it by 1e6): the budget to the byte."""
    args = ["prune"]
    if req.keep_storage:
        if req.keep_storage < 1:
            # 0 would mean "no limit" to buildctl: prune everything. Refuse instead.
            raise BuilderError(f"keep-storage of {req.keep_storage} bytes is not a budget")
        mb = f"{req.keep_storage / 1_000_000:.6f}".rstrip("0").rstrip(".")
        args += ["--keep-storage", mb]
    if req.keep_duration_seconds:
        args += ["--keep-duration", _go_duration(req.keep_duration_seconds)]
    if req.all:
        args.append("--all")
    return args


def prune_result_from_records(deleted: list[CacheRecord]) -> PruneResult:
    return PruneResult(records_deleted=len(deleted), bytes_reclaimed=sum(r.size for r in deleted),
                       deleted_ids=tuple(r.id for r in deleted))
