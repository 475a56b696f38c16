"""What the benchmarks share: stand-in engines with recorded-format records, the exporter and the
actuator run as processes the way users run them, percentiles, CPU and memory of a process."""

from __future__ import annotations

import gc
import http.client
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from lab.procs import ROOT, Process, Service, free_port, samples, wait_for

T = TypeVar("T")

RECORDED_DF = ROOT / "tests/fixtures/docker-engine-28.5/system-df-build-cache.json"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    """One line of the table: what was measured, its figure, its anchor from the same run, the limit."""

    area: str
    what: str
    figure: str
    anchor: str = ""
    note: str = ""
    values: dict[str, float] = field(default_factory=dict)


def df_body(records: int) -> bytes:
    """A `GET /system/df` answer of Docker 28.5 with `records` build cache records: the recorded
    ones, repeated with their own IDs and ages spread over two weeks."""
    recorded = json.loads(RECORDED_DF.read_text())
    base = recorded["BuildCache"]
    now = datetime.now(UTC)
    items = []
    for i in range(records):
        item = dict(base[i % len(base)], ID=f"{i:025x}")
        used = now - timedelta(seconds=(i * 7919) % (14 * 86400))
        item["LastUsedAt"] = used.isoformat().replace("+00:00", "Z")
        items.append(item)
    return json.dumps({**recorded, "BuildCache": items}).encode()


class StandinEngine(Process):
    """lab/standin_engine.py on a unix socket: the engine's API, answering with `records` records."""

    def __init__(self, work: Path, name: str, records: int, prune_seconds: float = 0.0, databases: bool = False):
        self.socket = work / f"{name}.sock"
        self.requests = work / f"{name}-requests.jsonl"
        df = work / f"{name}-df.json"
        df.write_bytes(df_body(records))
        root = work / f"{name}-root"
        (root / "overlay2").mkdir(parents=True, exist_ok=True)
        if databases:  # what the exporter stats to see changes: unchanged, it asks nothing
            (root / "buildkit").mkdir(exist_ok=True)
            (root / "buildkit" / "cache.db").write_bytes(b"\0" * 4096)
        super().__init__([sys.executable, "-m", "lab.standin_engine", "--socket", str(self.socket), "--df", str(df),
                          "--api", "1.47", "--root", str(root), "--prune-seconds", str(prune_seconds),
                          "--requests", str(self.requests)], work / f"{name}.log")
        wait_for(f"stand-in engine {name}", self.socket.exists, timeout=30, every=0.05)
        self.url = f"unix://{self.socket}"


def exporter(work: Path, name: str, config: str) -> tuple[Service, int]:
    """The exporter as a process, serving on a free port; returns once /metrics answers."""
    port = free_port()
    cfg = work / f"{name}.yml"
    cfg.write_text(config + f"\nexporter: {{listen: '127.0.0.1:{port}'}}\n" if "exporter:" not in config
                   else config.replace("exporter:", f"exporter:\n  listen: '127.0.0.1:{port}'", 1))
    svc = Service("buildkit_cache.exporter", ["--config", str(cfg), "--log-level", "warning"], work / f"{name}.log")
    wait_for("the exporter", lambda: Scraper(port).get()[0] == 200, timeout=60, every=0.1)
    return svc, port


class Scraper:
    """Scrapes like Prometheus: one kept-alive connection, gzip asked for."""

    def __init__(self, port: int):
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def get(self, gzip: bool = False) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            self.conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"} if gzip else {})
            r = self.conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return samples(self.get()[1].decode())


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and of its children that ended."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) / TICK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def settle(check: Callable[[], Any], timeout: float = 120.0) -> Any:
    return wait_for("the benchmark's condition", check, timeout=timeout, every=0.05)


def timed(fn: Callable[[], T], repeat: int) -> tuple[T, float, float]:
    """(value, median wall seconds, median CPU seconds of this process) of `repeat` calls."""
    if repeat < 1:
        raise ValueError("timed() needs at least one call")
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(repeat):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return value, median(walls), median(cpus)
