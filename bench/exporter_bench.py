"""The exporter against a stand-in engine serving recorded-format records: scrape latency while
collection runs, one collection cycle beside the engine call itself, and memory."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from buildkit_cache import decode, parse
from buildkit_cache.config import parse_config
from buildkit_cache.docker_api import DockerHost
from buildkit_cache.exporter import child
from buildkit_cache.exporter.scheduler import Scheduler
from buildkit_cache.exporter.store import Store
from buildkit_cache.inventory import Inventory
from buildkit_cache.usage import summarize

from .common import Row, Scraper, StandinEngine, collector, exporter, percentile, rss_mb, settle, timed

WINDOWS = (3600.0, 86400.0, 604800.0)


def _records_total(m: dict) -> float:
    return sum(v for (name, _), v in m.items() if name == "buildkit_cache_records")


def scrape_latency(work: Path, sizes: list[int], scrapes: int) -> list[Row]:
    """p50/p99 of scrapes while the records measurement runs every second, at each size."""
    rows, p99s = [], {}
    for n in sizes:
        engine = StandinEngine(work, f"engine-{n}", n)
        svc, port = exporter(work, f"exporter-{n}", f"docker_hosts: [{{url: '{engine.url}', name: standin}}]\n"
                             "exporter:\n  intervals: {records: 1s}\n")
        try:
            scraper = Scraper(port)
            settle(lambda s=scraper, n=n: _records_total(s.metrics()) == n)
            time.sleep(2.5)  # two more runs: from now on the size is known (a child above 5,000 records)
            latencies = []
            for _ in range(scrapes):
                t0 = time.perf_counter()
                status, body = scraper.get(gzip=True)
                latencies.append(time.perf_counter() - t0)
                assert status == 200
                time.sleep(0.01)
            m = scraper.metrics()
            ok = m.get(("buildkit_cache_measurement_success",
                        frozenset({"host": "standin", "builder": "default", "measurement": "records"}.items())))
            if ok != 1 or _records_total(m) != n:
                raise RuntimeError(f"the records measurement failed at {n} records: see {svc.log}")
            runs = sum(1 for line in (work / f"engine-{n}-requests.jsonl").read_text().splitlines()
                       if "/system/df" in line)
            dur = m[("buildkit_cache_measurement_duration_seconds",
                     frozenset({"host": "standin", "builder": "default", "measurement": "records"}.items()))]
            rss = rss_mb(svc.proc.pid)
            pid = collector(svc.proc.pid)
            crss = rss_mb(pid) if pid else 0.0
            p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
            p99s[n] = p99
            rows.append(Row("scrape", f"{n:,} records: p50 / p99 / max of {scrapes} scrapes",
                            f"{p50 * 1e3:.2f} / {p99 * 1e3:.2f} / {max(latencies) * 1e3:.1f} ms",
                            f"records measured every 1 s ({runs} /system/df so far), last one {dur:.3f} s"
                            + (", in a child of the collector" if n >= child.CHILD_RECORDS else ", in the collector"),
                            f"RSS: server {rss:.0f} MB, collector {crss:.0f} MB", {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
                                                           "rss_mb": rss, "records_s": dur}))
        finally:
            svc.stop()
            engine.stop()
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        rows.append(Row("scrape", f"p99 ratio {hi:,} / {lo:,} records", f"{p99s[hi] / p99s[lo]:.2f}",
                        "target at most 1.2", "", {"ratio": p99s[hi] / p99s[lo]}))
    return rows


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=120)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def _engine_call(sock: Path) -> bytes:
    conn = _Unix(str(sock))
    try:
        conn.request("GET", "/v1.47/system/df?type=build-cache")
        return conn.getresponse().read()
    finally:
        conn.close()


def collection_cycle(work: Path, sizes: list[int], repeat: int = 5) -> list[Row]:
    """One records measurement split in its parts: the engine call (the same request read to its
    last byte by http.client), then decoding and summarising (decode.py); the full parsers beside."""
    rows = []
    for n in sizes:
        engine = StandinEngine(work, f"cycle-{n}", n)
        try:
            host = DockerHost("standin", engine.url, timeout=120)
            raw, call_wall, call_cpu = timed(lambda e=engine: _engine_call(e.socket), repeat)
            assert isinstance(raw, bytes)
            now = datetime.now(UTC)
            summary, parse_wall, parse_cpu = timed(
                lambda r=raw, t=now: bulk.summarize_rows(decode.engine_rows(r), t, WINDOWS, True), repeat)
            _, sdk_wall, _ = timed(host.system_df_build_cache_bytes, repeat)
            full, full_wall, _ = timed(lambda r=raw, t=now: summarize(parse.parse_engine_build_cache(
                json.loads(r)), t, WINDOWS, True), max(1, repeat // 2))
            assert summary == full
            rows.append(Row("cycle", f"{n:,} records ({len(raw) / 1e6:.1f} MB): decode + summarise",
                            f"{parse_wall * 1e3:.1f} ms wall, {parse_cpu * 1e3:.1f} ms CPU",
                            f"engine call {call_wall * 1e3:.1f} ms wall (through the Docker SDK "
                            f"{sdk_wall * 1e3:.1f} ms): +{parse_wall / call_wall * 100:.0f}%",
                            f"json + full parse: {full_wall * 1e3:.0f} ms",
                            {"parse_ms": parse_wall * 1e3, "call_ms": call_wall * 1e3, "sdk_ms": sdk_wall * 1e3,
                             "share": parse_wall / call_wall, "full_ms": full_wall * 1e3}))
        finally:
            engine.stop()
    return rows


def memory(work: Path, records: int, cycles: int, cycle_records: int) -> list[Row]:
    """RSS of an exporter process after collecting `records` records in the exporter itself (the
    first run, size unknown) and then in children; and RSS over `cycles` collection cycles."""
    rows = []
    engine = StandinEngine(work, f"memory-{records}", records)
    svc, port = exporter(work, "exporter-memory", f"docker_hosts: [{{url: '{engine.url}', name: standin}}]\n"
                         "exporter:\n  intervals: {records: 1s}\n")
    try:
        scraper = Scraper(port)
        settle(lambda: _records_total(scraper.metrics()) == records)
        pid = collector(svc.proc.pid)
        first = (rss_mb(svc.proc.pid), rss_mb(pid) if pid else 0.0)
        time.sleep(5)
        later = (rss_mb(svc.proc.pid), rss_mb(pid) if pid else 0.0)
        rows.append(Row("memory", f"RSS after collecting {records:,} records",
                        f"server {later[0]:.0f} MB; collector {first[1]:.0f} MB after the first run (in itself), "
                        f"{later[1]:.0f} MB after 5 more"
                        + (" (each in a child process)" if records >= child.CHILD_RECORDS else ""),
                        "target under 100 MB", "",
                        {"server_mb": later[0], "collector_first_mb": first[1], "collector_later_mb": later[1]}))
    finally:
        svc.stop()
        engine.stop()

    engine = StandinEngine(work, f"memory-cycles-{cycle_records}", cycle_records)
    try:
        cfg = parse_config({"docker_hosts": [{"url": engine.url, "name": "standin"}]})
        store = Store()
        sched = Scheduler(cfg, Inventory(cfg), store, children=False)
        marks = {}

        async def run() -> None:
            for i in range(1, cycles + 1):
                await sched.collect_once()
                if i in (10, cycles // 10, cycles // 2, cycles):
                    marks[i] = rss_mb(os.getpid())

        try:
            asyncio.run(run())
        finally:
            sched.close()
        first_mark = min(k for k in marks if k >= cycles // 10)
        growth = marks[cycles] - marks[first_mark]
        rows.append(Row("memory", f"RSS over {cycles:,} collection cycles of {cycle_records:,} records, in-process",
                        " -> ".join(f"{v:.0f} MB (cycle {k})" for k, v in sorted(marks.items())),
                        f"growth after cycle {first_mark}: {growth:+.1f} MB", "",
                        {"growth_mb": growth}))
    finally:
        engine.stop()
    return rows
