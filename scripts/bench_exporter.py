#!/usr/bin/env python3
"""Benchmarks of the exporter's costly paths; figures go into docs/benchmarks.md.

1. The state-volume walk (buildkit_cache.fs.walk_tree) against `du -sx` + `find -xdev | wc -l` on a
   tree shaped like a BuildKit state dir full of node_modules: many small files in deep directories.
2. A scrape (/metrics rendering) with many builders in the snapshot: it must not depend on Docker.
3. Summarising a large `buildctl du` answer (records -> per type/state and idle windows).

Usage: scripts/bench_exporter.py [--files 200000] [--builders 50] [--records 50000]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from buildkit_cache.builders import Builder  # noqa: E402
from buildkit_cache.config import parse_config  # noqa: E402
from buildkit_cache.exporter.metrics import CacheCollector  # noqa: E402
from buildkit_cache.exporter.store import Result, Store  # noqa: E402
from buildkit_cache.fs import walk_tree  # noqa: E402
from buildkit_cache.models import DRIVER_CONTAINER, BuilderRef, CacheRecord, FilesystemUsage, TreeUsage  # noqa: E402
from buildkit_cache.usage import summarize  # noqa: E402


def make_tree(root: Path, files: int) -> None:
    per_dir = 50
    for i in range(files):
        d = root / f"snapshots/{i // 5000}/fs/node_modules/pkg{i // per_dir}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i % per_dir}.js").write_bytes(b"x" * (i % 700))


def timed(fn, repeat: int = 3):
    best = float("inf")
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_walk(files: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="bkce-bench-"))
    try:
        make_tree(root, files)
        subprocess.run(["sync"], check=False)
        t_walk, usage = timed(lambda: walk_tree(str(root)))
        tracemalloc.start()
        walk_tree(str(root))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

        def du_find():
            du = subprocess.run(["du", "-skx", str(root)], capture_output=True, text=True, check=True).stdout
            n = subprocess.run(["find", str(root), "-xdev"], capture_output=True, text=True, check=True).stdout
            return int(du.split()[0]) * 1024, n.count("\n")

        t_du, (du_bytes, find_files) = timed(du_find)
        print(f"walk: {usage.files} inodes, {usage.bytes / 1e6:.1f} MB allocated")
        print(f"  walk_tree          {t_walk:.2f} s  ({usage.files / t_walk:,.0f} inodes/s), peak Python memory {peak / 1e3:.0f} kB")
        print(f"  du -skx + find|wc  {t_du:.2f} s  (du {du_bytes / 1e6:.1f} MB, find {find_files} entries)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Quiet(Builder):
    measurements = ("records", "gc_policy", "state_volume", "filesystem")


def bench_scrape(builders: int) -> None:
    now = datetime.now(UTC)
    recs = [CacheRecord(id=str(i), record_type=("regular", "source.local", "exec.cachemount")[i % 3], size=i * 1000,
                        in_use=i % 17 == 0, shared=i % 5 == 0, last_used_at=now - timedelta(hours=i % 500))
            for i in range(1000)]
    summary = summarize(recs, now, [3600, 86400, 7 * 86400, 30 * 86400])
    store = Store()
    for b in range(builders):
        q = Quiet(BuilderRef("h", f"b{b}", DRIVER_CONTAINER, container=f"buildx_buildkit_b{b}0"))
        store.add_builder(q)
        for m, v in (("records", summary), ("state_volume", TreeUsage(1, 1)), ("filesystem", FilesystemUsage(1, 1, 1, 1))):
            store.set_result(q.ref.key, m, Result(True, 0.1, value=v, last_success_timestamp=time.time()))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CacheCollector(store, parse_config({})))
    t, text = timed(lambda: generate_latest(reg), repeat=5)
    lines = sum(1 for ln in text.decode().splitlines() if not ln.startswith("#"))
    print(f"scrape: {builders} builders, {lines} series, {len(text) / 1e3:.0f} kB: {t * 1000:.1f} ms per scrape")


def bench_summary(records: int) -> None:
    now = datetime.now(UTC)
    recs = [CacheRecord(id=f"{i:025d}", record_type=("regular", "source.local", "exec.cachemount")[i % 3], size=i,
                        in_use=False, shared=i % 4 == 0, last_used_at=now - timedelta(minutes=i))
            for i in range(records)]
    t, _ = timed(lambda: summarize(recs, now, [3600, 86400, 7 * 86400, 30 * 86400]))
    print(f"summary: {records} records summarised in {t * 1000:.0f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=200_000)
    p.add_argument("--builders", type=int, default=50)
    p.add_argument("--records", type=int, default=50_000)
    a = p.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    bench_walk(a.files)
    bench_scrape(a.builders)
    bench_summary(a.records)
    print(f"max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
