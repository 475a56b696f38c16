"""Many builders on one real engine: the private dockerd of the tests with `builders` buildx-like
builder containers (tests/support/builder_container.py: real containers, volumes and docker exec,
a buildctl answering with recorded outputs) and a leaked state volume of `leak_files` files."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from lab.engines import PrivateDockerd
from lab.procs import ROOT, samples
from tests.support import builder_container

from .common import Row, Scraper, exporter, median, percentile, timed
from .walk_bench import du, make_tree


def _system_cpu() -> float:
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    busy = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def many_builders(work: Path, builders: int, leak_files: int, scrapes: int, seconds: float = 35.0) -> list[Row]:
    rows = []
    d = PrivateDockerd(work / "d")  # short: containerd's socket paths must stay under 104 bytes
    d.start()
    try:
        builder_container.build_image(d)
        d.cli("volume", "create", "buildx_buildkit_leak0_state")
        mountpoint = Path(d.cli("volume", "inspect", "-f", "{{.Mountpoint}}", "buildx_buildkit_leak0_state").stdout.decode().strip())
        make_tree(mountpoint, leak_files)
        cfg = work / "builders.yml"
        cfg.write_text(f"docker_hosts: ['{d.url}']\n")
        rows += _walk_check(cfg, mountpoint, leak_files)

        for first in range(0, builders, 25):
            procs = [subprocess.Popen(d.cli_argv("run", "-d", "--name", f"buildx_buildkit_b{i}0", "--network", "none",
                                                 "-v", f"buildx_buildkit_b{i}0_state:/var/lib/buildkit",
                                                 builder_container.IMAGE, "/bin/sleep", "2147483647"),
                                      stdout=subprocess.DEVNULL, env=d.env())
                     for i in range(first, min(builders, first + 25))]
            for p in procs:
                if p.wait() != 0:
                    raise RuntimeError("docker run of a builder container failed")
        walls, cpus, engine = [], [], []
        for _ in range(3):
            s0, c0, t0 = _system_cpu(), _children_cpu(), time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--config", str(cfg), "--once", "--format", "prometheus",
                                   "--log-level", "warning"], capture_output=True, text=True, cwd=ROOT)
            walls.append(time.perf_counter() - t0)
            cpus.append(_children_cpu() - c0)
            engine.append(_system_cpu() - s0 - cpus[-1])
            if done.returncode != 0:
                raise RuntimeError(f"--once failed: {done.stderr[-2000:]}")
        i = walls.index(sorted(walls)[1])
        series = sum(1 for line in done.stdout.splitlines() if line and not line.startswith("#"))
        rows.append(Row("builders", f"{builders} builders + 1 leaked volume of {leak_files:,} files: --once (median of 3)",
                        f"{walls[i]:.1f} s wall", f"exporter CPU {cpus[i]:.1f} s (du included); engine and "
                        f"the rest of the system {engine[i]:.1f} s CPU for {2 * builders} docker execs",
                        f"{series:,} series, {len(done.stdout) / 1e6:.2f} MB",
                        {"once_s": walls[i], "exporter_cpu_s": cpus[i], "engine_cpu_s": engine[i]}))

        # Default intervals, scraped from the start: the first collection (every measurement of every
        # builder at once) is the heaviest there is; then the next records round at 30 s.
        svc, port = exporter(work, "exporter-builders", f"docker_hosts: ['{d.url}']\n")
        try:
            scraper = Scraper(port)
            latencies: list[float] = []
            progress: list[int] = []
            size, began = 0, time.monotonic()
            while len(latencies) < scrapes or time.monotonic() - began < seconds:
                t0 = time.perf_counter()
                status, body = scraper.get(gzip=True)
                latencies.append(time.perf_counter() - t0)
                size = len(body)
                if len(latencies) % 100 == 0:
                    progress.append(sum(1 for (n, _), v in scraper.metrics().items()
                                        if n == "buildkit_cache_measurement_success" and v == 1))
                time.sleep(0.03)
            plain = len(scraper.get()[1])
            p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
            rows.append(Row("builders", f"{builders} builders: scrape p50 / p99 / max of {len(latencies)} over "
                            f"{time.monotonic() - began:.0f} s from start",
                            f"{p50 * 1e3:.1f} / {p99 * 1e3:.1f} / {max(latencies) * 1e3:.1f} ms",
                            "default intervals; measurements succeeded, every 100 scrapes: "
                            + ", ".join(str(x) for x in progress),
                            f"{plain / 1e6:.2f} MB a scrape, {size / 1e3:.0f} kB gzipped",
                            {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "bytes": plain}))
        finally:
            svc.stop()
    finally:
        d.close()
    return rows


def _walk_check(cfg: Path, mountpoint: Path, files: int) -> list[Row]:
    """What the issue's walk check does: the exporter's own duration for a leaked volume's
    measurement against `du -s` of its mountpoint, each the median of 3 with a warm cache."""
    du(str(mountpoint))
    durations, sizes = [], []
    for _ in range(3):
        done = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--config", str(cfg), "--once", "--format", "prometheus",
                               "--log-level", "warning"], capture_output=True, text=True, cwd=ROOT)
        got = samples(done.stdout)
        L = {"host": "local", "builder": "leak"}
        durations.append(got[("buildkit_cache_measurement_duration_seconds",
                              frozenset({**L, "measurement": "state_volume"}.items()))])
        sizes.append(got[("buildkit_cache_state_volume_size_bytes", frozenset(L.items()))])
    du_bytes, du_s, _ = timed(lambda: du("-B1", str(mountpoint)), 3)
    measured = median(durations)
    return [Row("walk", f"leaked volume of {files:,} files through the exporter (--once, median of 3): "
                "measurement_duration_seconds{measurement=\"state_volume\"}",
                f"{measured:.2f} s ({measured / du_s:.2f}x du -s)",
                f"du -s -B1 of the mountpoint {du_s:.2f} s (median of 3, warm)",
                f"state_volume_size_bytes {sizes[-1]:,.0f}, du {du_bytes:,}: "
                f"{abs(sizes[-1] - du_bytes) / du_bytes * 100:.2f}% apart",
                {"ratio": measured / du_s, "size_error": abs(sizes[-1] - du_bytes) / du_bytes})]
