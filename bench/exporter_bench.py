"""The exporter against a stand-in engine serving recorded-format records: scrape latency at rest,
one collection cycle beside the engine call itself, and memory."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from buildkit_cache import decode, parse
from buildkit_cache.config import parse_config
from buildkit_cache.docker_api import DockerHost
from buildkit_cache.exporter.collect import Collection
from buildkit_cache.inventory import Inventory
from buildkit_cache.usage import UsageSummary, summarize

from .common import Row, Scraper, StandinEngine, exporter, percentile, rss_mb, settle, timed

WINDOWS = (3600.0, 86400.0, 604800.0)


def _records_total(m: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
    return float(sum(v for (name, _), v in m.items() if name == "buildkit_cache_records"))


def scrape_latency(work: Path, sizes: list[int], scrapes: int) -> list[Row]:
    """p50/p99 of scrapes at rest (checks every second find the engine's databases unchanged), at each size."""
    rows, p99s = [], {}
    for n in sizes:
        engine = StandinEngine(work, f"engine-{n}", n, databases=True)
        svc, port = exporter(work, f"exporter-{n}", f"docker_hosts: [{{url: '{engine.url}', name: standin}}]\n"
                             "exporter:\n  intervals: {records: 1s}\n")
        try:
            scraper = Scraper(port)
            settle(partial(_has_records, scraper, n))
            time.sleep(2.5)  # two more checks: at rest from now on
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
            p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
            p99s[n] = p99
            rows.append(Row("scrape", f"{n:,} records at rest: p50 / p99 / max of {scrapes} scrapes",
                            f"{p50 * 1e3:.2f} / {p99 * 1e3:.2f} / {max(latencies) * 1e3:.1f} ms",
                            f"checked every 1 s, /system/df asked {runs} time(s) in all, the first {dur:.3f} s",
                            f"RSS {rss:.0f} MB", {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
                                                  "rss_mb": rss, "records_s": dur, "runs": runs}))
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


def _has_records(scraper: Scraper, n: int) -> bool:
    return _records_total(scraper.metrics()) == n


def _decode_and_summarise(raw: bytes) -> UsageSummary:
    return summarize(decode.engine_rows(raw), True)


def _parse_and_summarise(raw: bytes) -> UsageSummary:
    return summarize(parse.parse_engine_build_cache(json.loads(raw)), True)


def collection_cycle(work: Path, sizes: list[int], repeat: int = 5) -> list[Row]:
    """One records measurement split in its parts: the engine call (the same request read to its
    last byte by http.client), then decoding and summarising (decode.py); the full parsers beside."""
    rows = []
    for n in sizes:
        engine = StandinEngine(work, f"cycle-{n}", n)
        try:
            host = DockerHost("standin", engine.url, timeout=120)
            raw, call_wall, call_cpu = timed(partial(_engine_call, engine.socket), repeat)
            assert isinstance(raw, bytes)
            now = datetime.now(UTC)
            summary, parse_wall, parse_cpu = timed(partial(_decode_and_summarise, raw), repeat)
            _, sdk_wall, _ = timed(host.system_df_build_cache_bytes, repeat)
            full, full_wall, _ = timed(partial(_parse_and_summarise, raw), max(1, repeat // 2))
            assert summary == full and summary.idle_bytes(now, WINDOWS) == full.idle_bytes(now, WINDOWS)
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
    """RSS of an exporter process after collecting `records` records and after more runs; and RSS
    over `cycles` collection cycles."""
    rows = []
    engine = StandinEngine(work, f"memory-{records}", records)
    svc, port = exporter(work, "exporter-memory", f"docker_hosts: [{{url: '{engine.url}', name: standin}}]\n"
                         "exporter:\n  intervals: {records: 1s}\n")
    try:
        scraper = Scraper(port)
        settle(lambda: _records_total(scraper.metrics()) == records)
        first = rss_mb(svc.proc.pid)
        time.sleep(5)
        later = rss_mb(svc.proc.pid)
        rows.append(Row("memory", f"RSS after collecting {records:,} records (one process)",
                        f"{first:.0f} MB after the first run, {later:.0f} MB after 5 more",
                        "target: half of the 120 MB of two processes before", "",
                        {"first_mb": first, "later_mb": later}))
    finally:
        svc.stop()
        engine.stop()

    engine = StandinEngine(work, f"memory-cycles-{cycle_records}", cycle_records)
    try:
        cfg = parse_config({"docker_hosts": [{"url": engine.url, "name": "standin"}]})
        sched = Collection(cfg, Inventory(cfg))
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
