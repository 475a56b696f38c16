"""What the exporter costs a build host at rest and busy: CPU-seconds per hour of every process on the
machine (the exporter, dockerd, containerd, shims, the builder container), the idle host subtracted.

The tests' private dockerd with real build cache on its embedded builder and one buildx-like builder
container (tests/support/builder_container.py; its `buildctl` logs each call). The exporter runs with
its default config, scraped every 15 s like Prometheus does. At rest nothing is built; busy, BuildKit
writes the builder's databases every 30 s (a build's worth of change for the exporter)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from lab.engines import PrivateDockerd, write_build_context
from tests.support import builder_container

from .builders_bench import _system_cpu
from .common import Row, Scraper, cpu_seconds, exporter, rss_mb

SCRAPE_EVERY = 15.0


def _window(seconds: float, during: Callable[[], object] | None = None) -> float:
    """Machine-wide CPU-seconds spent over `seconds` of wall time (with `during` run every 30 s)."""
    stop = threading.Event()
    thread = None
    if during is not None:
        def loop() -> None:
            while not stop.wait(30.0):
                during()
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
    c0 = _system_cpu()
    time.sleep(seconds)
    spent = _system_cpu() - c0
    stop.set()
    if thread is not None:
        thread.join()
    return spent


def _calls(d: PrivateDockerd, container: str) -> int:
    out = d.cli("exec", container, "cat", "/var/log/buildctl-calls", check=False).stdout.decode()
    return sum(1 for line in out.splitlines() if line.strip())


def at_rest(work: Path, seconds: float) -> list[Row]:
    rows = []
    d = PrivateDockerd(work / "r")  # short: containerd's socket paths must stay under 104 bytes
    d.start()
    try:
        for i in range(2):
            ctx = work / f"ctx{i}"
            write_build_context(ctx, f"rest{i}", 2, 1)
            d.build(ctx, f"rest{i}:latest")
        builder_container.build_image(d)
        container, volume = builder_container.start_builder(d, "rest0")
        builder_container.fill_state(d, container)
        mountpoint = d.cli("volume", "inspect", "-f", "{{.Mountpoint}}", volume).stdout.decode().strip()

        def busy() -> None:
            with open(f"{mountpoint}/cache.db", "a") as f:
                f.write("a record\n")

        baseline = min(seconds, 300.0)  # a rate: five minutes of it are enough
        idle = _window(baseline) / baseline * 3600
        svc, port = exporter(work, "exporter-rest", f"docker_hosts: [{{url: '{d.url}', name: rest}}]\n")
        try:
            scraper = Scraper(port)
            stop = threading.Event()

            def scrape() -> None:
                while not stop.wait(SCRAPE_EVERY):
                    try:
                        scraper.get(gzip=True)
                    except OSError:  # the server closed the idle connection: Prometheus asks again
                        scraper.get(gzip=True)

            threading.Thread(target=scrape, daemon=True).start()
            time.sleep(35)  # the first collection, and one check interval after it
            for name, during in (("at rest", None), ("busy: the builder's databases written every 30 s", busy)):
                calls, own = _calls(d, container), cpu_seconds(svc.proc.pid)
                total = _window(seconds, during) / seconds * 3600
                own = (cpu_seconds(svc.proc.pid) - own) / seconds * 3600
                execs = _calls(d, container) - calls
                window = f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
                rows.append(Row("cost", f"{name}, {window} window, default intervals, 15 s scrapes",
                                f"{total - idle:.1f} CPU-s/h above idle (exporter {own:.1f}, the rest "
                                f"{total - idle - own:.1f})",
                                f"buildctl calls in the builder container: {execs}",
                                f"idle host {idle:.1f} CPU-s/h; RSS {rss_mb(svc.proc.pid):.0f} MB",
                                {"above_idle": total - idle, "exporter": own, "execs": execs}))
            stop.set()
        finally:
            svc.stop()
    finally:
        d.stop()
    return rows
