"""Run every benchmark and print the table (docs/benchmarks.md). As root: the many-builders
benchmark starts the tests' private dockerd. Usage: bench/run [--small] [--only AREA ...]"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import actuator_bench, bigcache_bench, builders_bench, exporter_bench, rest_bench, walk_bench
from .common import Row


@dataclass(frozen=True)
class Sizes:
    sizes: list[int]  # records at the stand-in engine, for scrape latency and the collection cycle
    scrapes: int
    memory_records: int
    cycles: int
    cycle_records: int
    trees: list[int]  # inodes of the walked trees
    builders: int
    leak_files: int
    builder_scrapes: int
    builder_seconds: float
    posts: int
    rest_seconds: float
    rest_records: int  # records in the real builder the cost at rest is measured against
    bigcache_records: int  # records in a real BuildKit (standalone and Docker 29's)
    bigcache_dry_run_records: int  # records of the dry run's own benchmark (a stand-in engine)


FULL = Sizes(sizes=[1_000, 10_000, 100_000], scrapes=600, memory_records=2_000, cycles=1_000, cycle_records=10_000,
             trees=[100_000, 1_000_000], builders=200, leak_files=1_000_000, builder_scrapes=500,
             builder_seconds=35.0, posts=2_000, rest_seconds=300.0, rest_records=2_000, bigcache_records=300_000,
             bigcache_dry_run_records=20_000)
SMALL = Sizes(sizes=[100, 1_000], scrapes=50, memory_records=1_000, cycles=20, cycle_records=100, trees=[2_000],
              builders=3, leak_files=2_000, builder_scrapes=20, builder_seconds=2.0, posts=100, rest_seconds=5.0,
              rest_records=200,
              bigcache_records=3_000, bigcache_dry_run_records=500)
AREAS = ("cost", "scrape", "cycle", "memory", "walk", "builders", "actuator", "bigcache")


def table(rows: list[Row]) -> str:
    out = ["| area | measured | figure | beside it, same run | note |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {r.area} | {r.what} | {r.figure} | {r.anchor} | {r.note} |" for r in rows]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=" ".join(__doc__.split("Usage:")[0].split()))
    ap.add_argument("--small", action="store_true", help="tiny sizes: a smoke test of the benchmarks (CI)")
    ap.add_argument("--only", nargs="+", choices=AREAS, default=list(AREAS))
    ap.add_argument("--bigcache-without-prune", action="store_true",
                    help="bigcache: leave out the real prune of the standalone builder (BuildKit deletes about 5 "
                         "records a second to a budget at 200,000 records: the prune runs to its 30-minute timeout)")
    args = ap.parse_args()
    size = SMALL if args.small else FULL
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bkb-") as tmp:
        work = Path(tmp)
        steps: dict[str, Callable[[], list[Row]]] = {
            "cost": lambda: rest_bench.at_rest(work, size.rest_seconds, size.rest_records),
            "scrape": lambda: exporter_bench.scrape_latency(work, size.sizes, size.scrapes),
            "cycle": lambda: exporter_bench.collection_cycle(work, size.sizes),
            "memory": lambda: exporter_bench.memory(work, size.memory_records, size.cycles, size.cycle_records),
            "walk": lambda: walk_bench.walk(work, size.trees),
            "builders": lambda: builders_bench.many_builders(work, size.builders, size.leak_files,
                                                             size.builder_scrapes, size.builder_seconds),
            "actuator": lambda: actuator_bench.actuator_load(work, size.posts),
            "bigcache": lambda: bigcache_bench.big_caches(work, size.bigcache_records, size.bigcache_dry_run_records,
                                                          prune=not args.bigcache_without_prune),
        }
        for area in args.only:
            t0 = time.monotonic()
            got = steps[area]()
            rows += got
            for r in got:
                print(f"{r.area}: {r.what}: {r.figure} [{r.anchor}] {r.note}", file=sys.stderr, flush=True)
            print(f"-- {area} took {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"{datetime.date.today()}, Python {platform.python_version()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"{'--small' if args.small else 'full sizes'}, {time.monotonic() - started:.0f} s\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
