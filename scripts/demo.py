#!/usr/bin/env python3
"""The demo behind scripts/demo: see the README's "Demo" section."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from buildkit_cache.units import format_bytes
from lab.engines import PrivateDockerd, write_build_context
from lab.procs import http_get, value
from lab.stack import Stack

BUDGET = 12_000_000


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description="Watch an over-budget BuildKit cache get pruned, end to end.")
    ap.add_argument("--stay", action="store_true", help="keep everything running after the prune, until Ctrl-C")
    ap.add_argument("--keep-logs", action="store_true", help="keep the demo's folder (logs, data) instead of removing it")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bkce-demo-", dir="/tmp"))
    started: list = []

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        dockerd = PrivateDockerd(work / "docker")
        say(f"starting a private dockerd {dockerd.engine.version} in its own network namespace "
            f"(socket {dockerd.socket}; your Docker and its docker0 bridge are not touched)")
        dockerd.start()
        started.append(dockerd)
        for i, data_mb in enumerate((6, 5, 4, 3)):
            ctx = work / f"app{i}"
            write_build_context(ctx, f"app{i}", data_mb, 1)
            say(f"docker build app{i} (BuildKit, {data_mb} MB of context and a cache mount)")
            dockerd.build(ctx, f"app{i}:latest")

        stack = Stack(dockerd, work, host="demo", budget=BUDGET, interval="2s", for_="5s")
        started.append(stack)
        metrics_url, prom, am = stack.metrics_url, stack.prom, stack.am
        say(f"exporter   {metrics_url}")
        say(f"actuator   {stack.actuator_url}/metrics")
        say(f"prometheus {prom.url}/alerts (shipped rules, for: shortened to 5s)")
        say(f"alertmanager {am.url} (shipped route to the actuator)")
        say(f"budget of builder 'default': {format_bytes(BUDGET)}; watching...")

        def unshared() -> float | None:
            text = http_get(metrics_url)[1]
            sizes = [value(text, "buildkit_cache_size_bytes", host="demo", builder="default", record_type=t, state=s)
                     for t in ("regular", "source.local", "exec.cachemount", "frontend", "internal",
                               "source.git.checkout") for s in ("in_use", "reclaimable")]
            return sum(x for x in sizes if x is not None) if any(x is not None for x in sizes) else None

        phase, deadline = "waiting for the alert", time.monotonic() + 180
        while time.monotonic() < deadline:
            size = unshared()
            firing = bool(prom.firing("BuildKitCacheOverBudget"))
            pruned = [e for e in stack.audit() if e["event"] == "pruned"]
            say(f"cache (counted against the budget): {format_bytes(size) if size is not None else '?':>8}   "
                f"BuildKitCacheOverBudget: {'FIRING' if firing else 'inactive'}   prunes: {len(pruned)}")
            if pruned and not firing and size is not None and size <= BUDGET:
                p = pruned[0]
                say(f"the actuator pruned {p['records']} records, {format_bytes(p['reclaimed_bytes'])}, in "
                    f"{p['passes']} pass(es); the alert resolved. Audit line:")
                print(json.dumps(p))
                phase = "done"
                break
            time.sleep(2)
        if phase != "done":
            say("the prune did not happen within 3 minutes; run scripts/demo --keep-logs to keep the logs")
            return 1
        if args.stay:
            say("everything keeps running; Ctrl-C stops it all")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        say("stopping everything the demo started")
        for thing in reversed(started):
            thing.close() if isinstance(thing, PrivateDockerd) else thing.stop()
        if args.keep_logs:
            say(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            say(f"removed {work}")


if __name__ == "__main__":
    sys.exit(main())
