"""Big caches, for real: a standalone BuildKit v0.32.2 holding hundreds of thousands of records, and
Docker 29.7.2's embedded builder holding as many, filled by bench/recordgen (a Go program on
BuildKit's own client API: layered chains of FileOps, one record each; tests/support/buildkit.py).

Measured: making the records; `buildctl du` whole (refused past BuildKit's 16 MiB gRPC limit);
the exporter's first records measurement (asked in parts past the limit), its time, the scrape
latency while it runs, its RSS at peak and after; reading the records and planning a prune the way
the actuator's dry run does; a real prune to a budget through the actuator, with its progress; and
Docker 29's `/system/df` at that size, and the exporter on it.

State directories live on a tmpfs: the figures are the programs', not this disk's fsyncs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lab.engines import PrivateDockerd, UnixHTTPConnection, engine
from lab.procs import Service, free_port, http_get, samples, wait_for
from tests.support import buildkit

from .common import Row, percentile

# The real prune's own timeout. To a budget, BuildKit v0.32.2 deletes one record per pass over all
# of them (about 5 a second at 200,000 records on this machine): a prune to half takes hours, and
# the figure is how far it got in this time, as the actuator logs it.
PRUNE_TIMEOUT_S = 1800
PRUNE_TIMEOUT = f"{PRUNE_TIMEOUT_S}s"


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "bkce-bench", str(path)], check=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _generate(argv: list[str], records: int) -> float:
    started = time.monotonic()
    subprocess.run([str(buildkit.SMALL_BIN / "bkce-recordgen"), *argv, "--records", str(records), "--chain", "8",
                    "--parallel", "16"], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def _exporter_first_measurement(work: Path, name: str, config: dict[str, Any], builder: str
                                ) -> tuple[float, list[float], dict[str, int], str]:
    """Start the exporter, scrape it every 50 ms until `builder`'s records are measured: seconds
    to the first records, the scrape latencies meanwhile, its RSS (peak and after), the scrape."""
    port = free_port()
    cfg = work / f"{name}.json"  # YAML's superset
    exporter = {**config.get("exporter", {}), "listen": f"127.0.0.1:{port}", "timeout": "20m"}
    cfg.write_text(json.dumps({**config, "exporter": exporter}))
    svc = Service("buildkit_cache.exporter", ["--config", str(cfg)], work / f"{name}.log")
    url = f"http://127.0.0.1:{port}/metrics"
    started = time.monotonic()
    latencies: list[float] = []
    try:
        wait_for("the exporter", lambda: http_get(url)[0] == 200, timeout=60)
        while True:
            t0 = time.monotonic()
            _, text = http_get(url, timeout=30)
            latencies.append(time.monotonic() - t0)
            if any(v == 1 for (n, ls), v in samples(text).items() if n == "buildkit_cache_measurement_success"
                   and ("measurement", "records") in ls and ("builder", builder) in ls):
                break
            if svc.proc.poll() is not None or time.monotonic() - started > 3600:
                raise RuntimeError(f"the exporter did not measure the records: {svc.output()[-2000:]}")
            time.sleep(0.05)
        took = time.monotonic() - started
        time.sleep(5)  # the renderer and the allocator settle
        mem = _status(svc.proc.pid)
        return took, latencies, mem, http_get(url)[1]
    finally:
        svc.stop()


def _p(values: list[float], p: float) -> str:
    return f"{percentile(values, p) * 1e3:.0f}"


def _said(rows: list[Row]) -> list[Row]:
    """Rows printed the moment they are measured: a run at full size takes an hour or more, and
    what it measured before an interruption is still worth having."""
    for r in rows:
        print(f"big caches (as measured): {r.what}: {r.figure} [{r.anchor}] {r.note}", file=sys.stderr, flush=True)
    return rows


def big_cache(work: Path, records: int, prune: bool = True) -> list[Row]:
    rows: list[Row] = []
    root = work / "bigcache"
    state = root / "state"
    _tmpfs(state, "16g")
    bkd = None
    try:
        bkd = buildkit.Buildkitd(state / "bk")
        took = _generate(["--addr", bkd.address], records)
        rows += _said([Row("big caches", "records made in a standalone buildkitd (bench/recordgen)",
                        f"{records:,} in {took:.0f} s", f"{records / took:.0f} records/s",
                        "chains of 8 FileOps, state on a tmpfs")])
        t0 = time.monotonic()
        whole = bkd.buildctl("du", "--format", "json", check=False, timeout=3600)
        if whole.returncode:
            said = whole.stderr.decode().strip().splitlines()[-1][:120]
            rows += _said([Row("big caches", "`buildctl du` whole", "refused", f"after {time.monotonic() - t0:.1f} s",
                            said)])
        else:
            rows += _said([Row("big caches", "`buildctl du` whole", f"{time.monotonic() - t0:.1f} s",
                            f"{len(whole.stdout) / 1e6:.0f} MB of JSON", "under the 16 MiB gRPC limit")])
        config = {"docker_hosts": [], "builders": {"big": {"address": bkd.address, "budget": "1GB"}},
                  "exporter": {"buildctl": bkd.buildctl_path}}
        took, lat, mem, text = _exporter_first_measurement(root, "big", config, "big")
        counted = sum(v for (n, ls), v in samples(text).items() if n == "buildkit_cache_records")
        rows += _said([Row("big caches", "exporter: first records measurement (in parts past the limit)",
                        f"{took:.1f} s for {counted:,.0f} records", f"scrape p50/p99 {_p(lat, 50)}/{_p(lat, 99)} ms "
                        f"meanwhile ({len(lat)} scrapes)",
                        f"RSS after {mem['VmRSS'] / 1e6:.0f} MB, peak {mem['VmHWM'] / 1e6:.0f} MB (target: under 100 MB after)",
                        {"records": counted, "rss_after": mem["VmRSS"], "rss_peak": mem["VmHWM"]})])
        rows += _said(_plan(bkd, records))
        if prune:
            rows += _said(_prune(root, bkd))
    finally:
        if bkd is not None:
            bkd.stop()
        _umount(state)
    rows += _said(_docker29(work, records))
    return rows


def _plan(bkd: buildkit.Buildkitd, records: int) -> list[Row]:
    """What the actuator's dry run does: read every record (in parts), then plan a prune to half."""
    from buildkit_cache.buildctl import BuildctlClient, LocalBuildctl
    from buildkit_cache.models import PruneRequest
    from buildkit_cache.prune_plan import plan_prune

    client = BuildctlClient(LocalBuildctl(bkd.address, bkd.buildctl_path, timeout=3600))
    t0 = time.monotonic()
    recs = client.du()
    read = time.monotonic() - t0
    total = sum(r.size for r in recs if not r.shared)
    c0 = time.process_time()
    plan = plan_prune(recs, PruneRequest(keep_storage=total // 2), datetime.now(UTC))
    cpu = time.process_time() - c0
    return [Row("big caches", "dry run: reading the records", f"{read:.1f} s for {len(recs):,}",
                f"{len(client.parts) or 1} part(s)", ""),
            Row("big caches", "dry run: planning a prune to half the cache", f"{cpu:.2f} s of CPU",
                f"{len(plan):,} records, {plan.bytes / 1e6:.0f} MB", "target: 1 s at 100,000 records")]


def _prune(root: Path, bkd: buildkit.Buildkitd) -> list[Row]:
    """A real prune to half the cache, through the actuator as Alertmanager would ask."""
    from buildkit_cache.buildctl import BuildctlClient, LocalBuildctl

    port = free_port()
    token = root / "token"
    token.write_text("bench-token\n")
    token.chmod(0o600)
    total = sum(r.size for r in BuildctlClient(LocalBuildctl(bkd.address, bkd.buildctl_path, 3600)).du()
                if not r.shared)
    cfg = root / "actuator.json"
    audit = root / "audit.jsonl"
    cfg.write_text(json.dumps({
        "docker_hosts": [], "builders": {"big": {"address": bkd.address, "budget": total // 2}},
        "exporter": {"buildctl": bkd.buildctl_path},
        "actuator": {"listen": f"127.0.0.1:{port}", "auth": {"bearer_token_file": str(token)},
                     "prune_timeout": PRUNE_TIMEOUT,
                     "audit_log": str(audit), "state_file": str(root / "state.json")}}))
    svc = Service("buildkit_cache.actuator", ["--config", str(cfg)], root / "actuator.log")
    try:
        wait_for("the actuator", lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=60)
        body = json.dumps({"version": "4", "status": "firing", "receiver": "a", "groupKey": "{}", "alerts": [{
            "status": "firing", "labels": {"alertname": "BuildKitCacheOverBudget", "host": "remote", "builder": "big",
                                           "buildkit_action": "prune-to-budget"},
            "startsAt": "2026-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z", "fingerprint": "bench"}]})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=body.encode(),
                                     headers={"Authorization": "Bearer bench-token"})
        urllib.request.urlopen(req, timeout=60).read()
        started = time.monotonic()
        done = wait_for("the prune", lambda: [json.loads(x) for x in audit.read_text().splitlines()
                                              if '"pruned"' in x or '"failed"' in x], timeout=PRUNE_TIMEOUT_S + 300, every=5)[0]
        took = time.monotonic() - started
        progress = [line for line in svc.output().splitlines() if "deleted so far" in line]
    finally:
        svc.stop()
    figure = f"{took:.0f} s, {done.get('records', 0):,} records" if done["event"] == "pruned" else done.get("reason", "?")
    return [Row("big caches", "a real prune to half the cache, through the actuator", figure,
                f"{len(progress)} progress lines", progress[-1].split(": ", 2)[-1][:100] if progress else "")]


def _docker29(work: Path, records: int) -> list[Row]:
    """Docker 29.7.2 (containerd store) with as many records in its embedded builder."""
    root = work / "d29"
    _tmpfs(root, "24g")
    d = PrivateDockerd(root / "engine", engine("docker29", True))
    rows = []
    try:
        d.start()
        took = _generate(["--docker", d.url], records)
        rows.append(Row("big caches", "records made in Docker 29.7.2's embedded builder", f"{records:,} in {took:.0f} s",
                        f"{records / took:.0f} records/s", "containerd image store, on a tmpfs"))
        t0 = time.monotonic()
        answer = http_get_unix(d.socket, "/v1.55/system/df?type=build-cache&verbose=1")
        rows.append(Row("big caches", "Docker 29 `GET /system/df?type=build-cache&verbose=1`",
                        f"{time.monotonic() - t0:.1f} s", f"{len(answer) / 1e6:.0f} MB of JSON",
                        "no gRPC limit on the embedded builder"))
        took, lat, mem, _ = _exporter_first_measurement(root, "d29", {"docker_hosts": [{"url": d.url, "name": "d29"}]},
                                                        "default")
        rows.append(Row("big caches", "exporter on Docker 29: first records measurement", f"{took:.1f} s",
                        f"scrape p99 {_p(lat, 99)} ms meanwhile",
                        f"RSS after {mem['VmRSS'] / 1e6:.0f} MB, peak {mem['VmHWM'] / 1e6:.0f} MB"))
    finally:
        d.close()
        _umount(root)
    return rows


def big_caches(work: Path, records: int, dry_run_records: int, prune: bool = True) -> list[Row]:
    """`bench/run --only bigcache`: the real BuildKit and Docker 29 rows, then the dry run's own row."""
    return big_cache(work, records, prune) + dry_run_standin(work, dry_run_records)


def dry_run_standin(work: Path, records: int) -> list[Row]:
    """A dry run of `records` records as Alertmanager asks for it: the actuator (`--dry-run`) against
    the stand-in engine (recorded Docker 28.5 records, repeated to the size), from the notification to
    its `dry_run` line in the audit trail."""
    from .common import StandinEngine

    root = work / "dry-run"
    root.mkdir(parents=True, exist_ok=True)
    engine_ = StandinEngine(root, "standin", records)
    port = free_port()
    token = root / "token"
    token.write_text("bench-token\n")
    token.chmod(0o600)
    audit = root / "audit.jsonl"
    cfg = root / "actuator.json"
    cfg.write_text(json.dumps({
        "docker_hosts": [{"url": engine_.url, "name": "standin"}], "builders": {"default": {"budget": "1MB"}},
        "actuator": {"listen": f"127.0.0.1:{port}", "auth": {"bearer_token_file": str(token)},
                     "audit_log": str(audit), "state_file": str(root / "state.json")}}))
    svc = Service("buildkit_cache.actuator", ["--config", str(cfg), "--dry-run"], root / "actuator.log")
    try:
        wait_for("the actuator", lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=60)
        body = json.dumps({"version": "4", "status": "firing", "receiver": "a", "groupKey": "{}", "alerts": [{
            "status": "firing", "labels": {"alertname": "BuildKitCacheOverBudget", "host": "standin",
                                           "builder": "default", "buildkit_action": "prune-to-budget"},
            "startsAt": "2026-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z", "fingerprint": "bench"}]})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=body.encode(),
                                     headers={"Authorization": "Bearer bench-token"})
        started = time.monotonic()
        urllib.request.urlopen(req, timeout=60).read()
        line = wait_for("the dry run", lambda: [json.loads(x) for x in audit.read_text().splitlines()
                                                if '"event":"dry_run"' in x or '"event":"failed"' in x],
                        timeout=600, every=0.05)[0]
        took = time.monotonic() - started
    finally:
        svc.stop()
        engine_.stop()
    figure = (f"{took:.1f} s: would prune {line['records']:,} records, {line['bytes'] / 1e6:.0f} MB"
              if line["event"] == "dry_run" else f"failed: {line.get('reason', '?')}")
    return [Row("big caches", f"dry run of {records:,} records (stand-in engine), notification to its audit line",
                figure, "prune-to-budget, 1 MB budget", "target: on record within 10 s at 20,000 records",
                {"seconds": took, "records": records})]


def http_get_unix(socket: Path, path: str) -> bytes:
    conn = UnixHTTPConnection(str(socket), timeout=3600)
    conn.request("GET", path)
    return conn.getresponse().read()


if __name__ == "__main__":  # python -m bench.bigcache_bench RECORDS
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bkb-big-") as tmp:
        for r in big_cache(Path(tmp), int(sys.argv[1]) if len(sys.argv) > 1 else 2_000):
            print(f"{r.what}: {r.figure} [{r.anchor}] {r.note}", flush=True)
