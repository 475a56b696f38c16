"""The actuator as a process, as users run it, with stand-in engines behind it: the same
notification 2,000 times from 50 clients at once, then 2,000 distinct ones."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from lab.procs import Service, free_port, samples, wait_for

from .common import Row, StandinEngine, percentile, rss_mb

TOKEN = "bench-token"
CLIENTS = 50


def _notification(fp: str, host: str, action: str = "prune-idle") -> bytes:
    return json.dumps({"version": "4", "status": "firing", "receiver": "actuator", "groupKey": f"g-{fp}",
                       "truncatedAlerts": 0,
                       "alerts": [{"status": "firing", "fingerprint": fp, "startsAt": "2026-11-28T10:00:00Z",
                                   "labels": {"alertname": "BuildKitCacheIdle", "host": host, "builder": "default",
                                              "buildkit_action": action}}]}).encode()


async def _post_all(port: int, bodies: list[bytes]) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    queue = list(reversed(bodies))
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            async with session.post(f"http://127.0.0.1:{port}/alerts", data=body, headers=headers) as r:
                await r.read()
            latencies.append(time.perf_counter() - t0)
            codes[r.status] = codes.get(r.status, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
    return latencies, codes


def _prunes(engines: list[StandinEngine]) -> int:
    return sum(1 for e in engines if e.requests.exists()
               for line in e.requests.read_text().splitlines() if "/build/prune" in line)


def actuator_load(work: Path, posts: int, hosts: int = 10) -> list[Row]:
    engines = [StandinEngine(work, f"act-e{i}", 50, prune_seconds=0.5) for i in range(hosts)]
    token = work / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    cfg = work / "actuator.yml"
    cfg.write_text("docker_hosts:\n" + "".join(f"  - {{url: '{e.url}', name: e{i}}}\n" for i, e in enumerate(engines))
                   + "builders:\n" + "".join(f"  e{i}/default: {{budget: 1GB}}\n" for i in range(hosts))
                   + f"actuator:\n  listen: '127.0.0.1:{port}'\n  auth: {{bearer_token_file: {token}}}\n"
                   f"  audit_log: {work}/audit.jsonl\n  state_file: {work}/state.json\n  settle_delay: 0s\n"
                   "  cooldown: 1h\n")
    svc = Service("buildkit_cache.actuator", ["--config", str(cfg)], work / "actuator.log")
    rows = []
    try:
        wait_for("the actuator", lambda: "listening on" in svc.output() or svc.proc.poll() is not None, every=0.1)
        rss0 = rss_mb(svc.proc.pid)
        latencies, codes = asyncio.run(_post_all(port, [_notification("same", "e0")] * posts))
        wait_for("the prune", lambda: _prunes(engines) >= 1, timeout=30, every=0.1)
        time.sleep(1.0)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        rows.append(Row("actuator", f"the same notification {posts:,} times, {CLIENTS} clients at once",
                        f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms; {_prunes(engines)} prune",
                        f"answers {codes}", "target p99 under 50 ms and exactly 1 prune",
                        {"p99_ms": p99 * 1e3, "prunes": _prunes(engines)}))
        rss1 = rss_mb(svc.proc.pid)
        bodies = [_notification(f"incident-{i}", f"e{i % hosts}", ("prune-idle", "prune-to-budget")[i % 2])
                  for i in range(posts)]
        latencies, codes = asyncio.run(_post_all(port, bodies))
        time.sleep(3.0)  # the prunes it started (0.5 s each, one builder at a time) are done
        rss2 = rss_mb(svc.proc.pid)
        audit = [json.loads(line) for line in (work / "audit.jsonl").read_text().splitlines()]
        received = sum(1 for e in audit if e["event"] == "received")
        status, text = _get(port, "/metrics")
        got = samples(text)
        answered = sum(v for (n, labels), v in got.items() if n == "buildkit_cache_actuator_notifications_total")
        decisions = sum(v for (n, labels), v in got.items() if n == "buildkit_cache_actuator_alerts_total")
        runs: dict[str, int] = {}
        for (n, labels), v in got.items():
            if n == "buildkit_cache_actuator_prunes_total":
                result = dict(labels)["result"]
                runs[result] = runs.get(result, 0) + int(v)
        p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
        rows.append(Row("actuator", f"{posts:,} distinct notifications naming {hosts} configured builders",
                        f"p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms; prunes by result {runs}",
                        f"audit 'received' {received:,} of {2 * posts:,} sent; notifications_total {answered:,.0f}, "
                        f"alerts_total {decisions:,.0f}",
                        f"RSS {rss0:.0f} MB at start, {rss1:.0f} after the first {posts:,}, {rss2:.0f} after these",
                        {"p99_ms": p99 * 1e3, "received": received, "answered": answered, "rss_mb": rss2}))
    finally:
        svc.stop()
        for e in engines:
            e.stop()
    return rows


def _get(port: int, path: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, r.read().decode()
