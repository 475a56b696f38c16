"""What the exporter costs a build host at rest, against a peer that asks BuildKit on every scrape:
CPU-seconds per hour of the processes involved (the exporter or the peer, and the engine's whole
process tree: dockerd, containerd, shims, the builder's init and buildkitd, and whatever they ran
and reaped, such as each `docker exec`), the same tree's idle cost subtracted. Counted per process
(/proc/<pid>/stat), not machine-wide: this machine's own idle noise (about 40 CPU-s/h, moving by
several between windows) is larger than what is measured, and made the first figures negative.
buildkitd is also counted alone, above its own idle: where a DiskUsage is answered, and the
sharper comparison, since dockerd's and containerd's idle noise stays in the tree's figure.

Real parts: the tests' private dockerd (the host's engine) with real build cache on its embedded
builder, and a real buildx docker-container builder (BuildKit v0.32.2, tests/support/buildkit.py)
holding `records` records made by bench/recordgen. What the exporter asks of that builder is read
from the engine's own event log (each `docker exec`).

- The exporter runs with its default config (checks every 30 s, refresh every hour) and is scraped
  every 15 s as Prometheus does. Between refreshes it is measured over a window; the refresh's own
  cost is what its first collection costs (everything asked once, the process's start included: an
  upper bound), and the average over the hour is the two together, since an hour holds one refresh.
- The peer: one long-lived process asking that buildkitd's DiskUsage over gRPC every 15 s, as an
  exporter that asks BuildKit on every scrape does (bkce-recordgen --du-every; no `docker exec`, the
  cheapest way there is to ask).
- Busy: a small real build every 30 s (eight records); its client's own CPU is not counted, the
  builder's work for it is, in "the rest"."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lab.engines import PrivateDockerd, write_build_context
from tests.support import buildkit

from .common import Row, Scraper, cpu_seconds, exporter, rss_mb

SCRAPE_EVERY = 15.0
HOUR = 3600.0


def _tree(root: int) -> list[int]:
    """`root` and every process under it."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            todo += [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                     for c in (task / "children").read_text().split()]
        except OSError:
            continue  # gone meanwhile
        found.append(pid)
    return found


def _cpu(root: int, *others: int) -> float:
    """CPU-seconds of the tree under `root` and of `others` (each with its reaped children's)."""
    total = 0.0
    for pid in [*_tree(root), *others]:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # ended between the listing and the reading: its parent counts it now
    return total


def _window(seconds: float, root: int, *others: int, during: Callable[[], object] | None = None) -> float:
    """CPU-seconds of those processes over `seconds` of wall time (with `during` run every 30 s)."""
    stop = threading.Event()
    thread = None
    if during is not None:
        def loop() -> None:
            while not stop.wait(30.0):
                during()
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
    c0 = _cpu(root, *others)
    time.sleep(seconds)
    spent = _cpu(root, *others) - c0
    stop.set()
    if thread is not None:
        thread.join()
    return spent


def _fill(builder: buildkit.Builder, records: int) -> str:
    """`records` records in the builder's buildkitd, made from the host through its socket; the
    socket's address, for the peer."""
    pid = builder.dockerd.cli("inspect", "-f", "{{.State.Pid}}", builder.container).stdout.decode().strip()
    address = f"unix:///proc/{pid}/root/run/buildkit/buildkitd.sock"
    subprocess.run([str(buildkit.SMALL_BIN / "bkce-recordgen"), "--addr", address, "--records", str(records),
                    "--chain", "8", "--parallel", "8"], check=True, stdout=subprocess.DEVNULL, timeout=3600)
    return address


def at_rest(work: Path, seconds: float, records: int = 2_000) -> list[Row]:
    rows = []
    d = PrivateDockerd(work / "r")  # short: containerd's socket paths must stay under 104 bytes
    d.start()
    try:
        for i in range(2):
            ctx = work / f"ctx{i}"
            write_build_context(ctx, f"rest{i}", 2, 1)
            d.build(ctx, f"rest{i}:latest")
        builder = buildkit.create(d, "rest")
        address = _fill(builder, records)
        builder.settle()
        counted = len(builder.du())
        window = f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"

        assert d.proc is not None
        engine = d.proc.pid  # the engine's namespace: everything the builder and dockerd run is under it
        bk = builder.pid()  # buildkitd itself: where a DiskUsage is answered, apart from the tree's noise
        baseline = min(seconds, 300.0)  # a rate: five minutes of it are enough
        bk0 = cpu_seconds(bk)
        idle = _window(baseline, engine) / baseline * HOUR
        bk_idle = (cpu_seconds(bk) - bk0) / baseline * HOUR

        def buildkitd_since(c0: float, seconds: float) -> float:
            """buildkitd's CPU-s/h above its own idle since `c0`."""
            return (cpu_seconds(bk) - c0) / seconds * HOUR - bk_idle

        # The peer, alone on the machine.
        peer = subprocess.Popen([str(buildkit.SMALL_BIN / "bkce-recordgen"), "--addr", address,
                                 "--du-every", f"{SCRAPE_EVERY:g}s"], stdout=subprocess.DEVNULL)
        try:
            time.sleep(2)
            own, bk0 = cpu_seconds(peer.pid), cpu_seconds(bk)
            peer_total = _window(seconds, engine, peer.pid) / seconds * HOUR - idle
            peer_own = (cpu_seconds(peer.pid) - own) / seconds * HOUR
            peer_bk = buildkitd_since(bk0, seconds)
            peer_rss = rss_mb(peer.pid)
        finally:
            peer.kill()
            peer.wait()
        rows.append(Row("cost", f"a peer asking buildkitd's DiskUsage every 15 s (gRPC, one process), {counted:,} "
                        f"records, {window} window",
                        f"{peer_total:.1f} CPU-s/h above idle (the peer {peer_own:.1f}, buildkitd {peer_bk:.1f}, "
                        f"the rest {peer_total - peer_own - peer_bk:.1f})", "no docker exec",
                        f"idle: the engine's tree {idle:.1f} CPU-s/h, buildkitd alone {bk_idle:.1f}; "
                        f"RSS {peer_rss:.0f} MB",
                        {"above_idle": peer_total, "own": peer_own, "buildkitd": peer_bk}))

        # The exporter: its first collection (what a refresh asks), then between refreshes.
        started = time.time()
        c0, bk0 = _cpu(engine), cpu_seconds(bk)
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
            first = 35.0  # the first collection, and one check interval after it
            time.sleep(first)
            refresh = (_cpu(engine, svc.proc.pid) - c0) - idle / HOUR * first  # the exporter's from its start
            refresh_direct = cpu_seconds(svc.proc.pid) + (cpu_seconds(bk) - bk0) - bk_idle / HOUR * first
            first_execs = len(buildkit.exec_starts(d, started, container=builder.container))
            time.sleep(max(0.0, 60.0 - first) if seconds >= 60 else 0.0)  # BuildKit done writing after the first asks
            between = between_direct = None
            for name, during in (("at rest, between refreshes", None),
                                 ("busy: a small build every 30 s", _writer(builder, address))):
                since, own, bk0 = time.time(), cpu_seconds(svc.proc.pid), cpu_seconds(bk)
                total = _window(seconds, engine, svc.proc.pid, during=during) / seconds * HOUR - idle
                own = (cpu_seconds(svc.proc.pid) - own) / seconds * HOUR
                by_bk = buildkitd_since(bk0, seconds)
                execs = buildkit.exec_starts(d, since, container=builder.container)
                rows.append(Row("cost", f"exporter {name}, {window} window, default intervals, 15 s scrapes",
                                f"{total:.1f} CPU-s/h above idle (exporter {own:.1f}, buildkitd {by_bk:.1f}, "
                                f"the rest {total - own - by_bk:.1f})",
                                f"docker execs into the builder: {len(execs)}",
                                f"RSS {rss_mb(svc.proc.pid):.0f} MB",
                                {"above_idle": total, "exporter": own, "buildkitd": by_bk, "execs": len(execs)}))
                if between is None:
                    between, between_direct = total, own + by_bk
            stop.set()
        finally:
            svc.stop()
        assert between is not None and between_direct is not None
        average = between + refresh  # an hour holds one refresh
        # The sharper comparison: what the asker and buildkitd spend, without the engine tree's
        # noise (dockerd and containerd idle at tens of CPU-s/h, moving by several between windows).
        direct, peer_direct = between_direct + refresh_direct, peer_own + peer_bk
        rows.append(Row("cost", "the asker and buildkitd alone, over 1 h: the exporter (between refreshes plus one "
                        "refresh) against the peer",
                        f"exporter {direct:.1f} CPU-s/h, peer {peer_direct:.1f} CPU-s/h"
                        + (f": {direct / peer_direct:.2f}x" if peer_direct > 0 else ""),
                        f"one refresh, exporter and buildkitd: {refresh_direct:.2f} CPU-s",
                        "target: at most 1/3 of the peer",
                        {"exporter": direct, "peer": peer_direct,
                         "ratio": direct / peer_direct if peer_direct > 0 else 0.0}))
        rows.append(Row("cost", "exporter at rest over a whole refresh period (1 h): between refreshes plus one refresh",
                        f"{average:.1f} CPU-s/h above idle, {average / peer_total:.2f}x the peer" if peer_total > 0
                        else f"{average:.1f} CPU-s/h above idle",
                        f"one refresh: {refresh:.2f} CPU-s (its first collection, start included: "
                        f"{first_execs} docker execs)", "target: at most 1/3 of the peer",
                        {"average": average, "refresh": refresh, "ratio": average / peer_total if peer_total else 0.0}))
    finally:
        d.close()
    return rows


def _writer(builder: buildkit.Builder, address: str) -> Callable[[], object]:
    """A small real build every 30 s: eight new records (bench/recordgen), a build's worth of change
    for the exporter. Its own CPU is in "the rest"."""
    runs = iter(range(1_000_000))

    def build() -> None:
        subprocess.run([str(buildkit.SMALL_BIN / "bkce-recordgen"), "--addr", address, "--records", "8",
                        "--seed", f"busy-{next(runs)}"], check=True, stdout=subprocess.DEVNULL, timeout=120)
    return build
