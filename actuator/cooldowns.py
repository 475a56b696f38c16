"""`buildkit-cache-actuator --cooldowns` and `--clear-cooldown`: see and clear what the state file
holds, safely while the actuator runs (the same lock as its own changes), with the clearing in the
audit trail."""

from __future__ import annotations

import os
import sys
import time

from buildkit_cache.config import Config

from .audit import AuditLog
from .state import Key, StateError, StateFile


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def _matches(key: Key, target: str) -> bool:
    """`target` is `host/builder` (every action) or `host/builder/action`."""
    parts = target.split("/")
    return tuple(parts) == key[: len(parts)] and len(parts) in (2, 3)


def _missing(cfg: Config, prog: str) -> bool:
    """Said when the state file's folder is not there: the actuator never ran with this config."""
    folder = os.path.dirname(os.path.abspath(cfg.actuator.state_file))
    if os.path.isdir(folder):
        return False
    print(f"{prog}: {cfg.source}: actuator.state_file {cfg.actuator.state_file}: {folder} does not exist: has the "
          "actuator run with this config? Pass --config FILE, the file it runs with", file=sys.stderr)
    return True


def show(cfg: Config, prog: str) -> int:
    if not cfg.actuator.state_file:
        print(f"{prog}: actuator.state_file is empty: cooldowns live in the running process only", file=sys.stderr)
        return 2
    if _missing(cfg, prog):
        return 2
    now = time.time()
    try:
        with StateFile(cfg.actuator.state_file, time.time).locked() as shared:
            entries = sorted(shared.entries.items())
    except StateError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    print(f"{'HOST/BUILDER':<32} {'ACTION':<18} {'LAST STARTED':<21} {'STATE'}")
    for (host, builder, action), e in entries:
        left = cfg.actuator.cooldown - (now - e.started)
        state = ("running or queued" if e.running and now < e.busy_until else
                 f"cooldown, {left:.0f}s left" if left > 0 else "free")
        print(f"{host + '/' + builder:<32} {action:<18} {_when(e.started):<21} {state}")
    if not entries:
        print("(no prune has run: nothing holds a cooldown)")
    return 0


def clear(cfg: Config, prog: str, target: str) -> int:
    """Remove the cooldowns of `target`; a prune still running keeps its claim."""
    if not cfg.actuator.state_file:
        print(f"{prog}: actuator.state_file is empty: restart the actuator to clear its cooldowns", file=sys.stderr)
        return 2
    if target.count("/") not in (1, 2) or "" in target.split("/"):
        print(f"{prog}: --clear-cooldown: expected HOST/BUILDER or HOST/BUILDER/ACTION, got {target!r}",
              file=sys.stderr)
        return 2
    if _missing(cfg, prog):
        return 2
    now = time.time()
    cleared: list[Key] = []
    running: list[Key] = []
    try:
        audit = AuditLog(cfg.actuator.audit_log)
        with StateFile(cfg.actuator.state_file, time.time).locked() as shared:
            for key, e in list(shared.entries.items()):
                if not _matches(key, target):
                    continue
                if e.running and now < e.busy_until:
                    running.append(key)
                    continue
                shared.pop(key)
                cleared.append(key)
    except (StateError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    for host, builder, action in cleared:
        audit.record("cooldown_cleared", host=host, builder=builder, action=action, by="--clear-cooldown")
        print(f"cleared: {host}/{builder} {action}")
    audit.close()
    for host, builder, action in running:
        print(f"{prog}: {host}/{builder} {action} is still running; its claim stays", file=sys.stderr)
    if not cleared and not running:
        print(f"nothing to clear for {target} (see --cooldowns)")
    return 1 if running else 0
