"""Load: 50 concurrent clients for 60 s posting good, duplicate and bad notifications to the actuator
on a real socket. Its memory stays bounded, and every notification is accounted for: each answer's
status in the metrics, each accepted one in the audit trail, each alert's decision in the counters."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import resource
import time

import aiohttp
import pytest

from tests.support.live_actuator import LiveActuator

TOKEN = "load-token"
SECONDS = 60.0
CLIENTS = 50
CFG = {
    "docker_hosts": [{"url": "unix:///nonexistent/docker.sock", "name": "h1"}],
    "builders": {"kamal": {"budget": "20MB"}, "ci": {"budget": "1GB"}},
    "actuator": {"cooldown": "1h", "settle_delay": "0s", "prune_timeout": "5s"},
}

pytestmark = pytest.mark.slow  # a minute of load


def notification(fp: str, builder: str = "kamal", action: str = "prune-to-budget") -> dict:
    return {"version": "4", "status": "firing", "receiver": "r", "groupKey": "g", "truncatedAlerts": 0,
            "alerts": [{"status": "firing", "fingerprint": fp, "startsAt": "2026-11-28T10:00:00Z",
                        "labels": {"host": "h1", "builder": builder, "buildkit_action": action}}]}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Discard(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


@pytest.fixture
def audit_log_as_in_production():
    """The audit lines logged at INFO to a stream and not propagated, as actuator/cli.py sets it up:
    written out, kept nowhere. Returns what undoes pytest's own capture for the call (below)."""
    logger = logging.getLogger("actuator.audit")
    handler = logging.StreamHandler(_Discard())
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def without_pytest_capture() -> None:
        # pytest (9.x) attaches its capture handlers to non-propagating loggers too, for each test
        # phase, and keeps every record for the report: 8 MB every 5 s at this rate, memory that is
        # pytest's and not the actuator's (it failed this test in CI). Taken off for the call.
        for h in list(logger.handlers):
            if type(h).__module__.startswith("_pytest"):
                logger.removeHandler(h)

    yield without_pytest_capture
    logger.removeHandler(handler)
    logger.level, logger.propagate = saved


def test_fifty_clients_for_a_minute_memory_bounded_and_every_notification_accounted_for(
        tmp_path, audit_log_as_in_production):
    audit_log_as_in_production()
    live = LiveActuator(tmp_path, CFG, ("kamal", "ci", "other"), TOKEN)
    sent: collections.Counter[tuple[str, int]] = collections.Counter()
    alerts_answered = 0
    rss: list[float] = []

    async def client(i: int, session: aiohttp.ClientSession, deadline: float) -> None:
        nonlocal alerts_answered
        n = 0
        while time.monotonic() < deadline:
            n += 1
            kind = ("good", "duplicate", "bad-token", "bad-json", "unknown-builder")[n % 5]
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            if kind == "good":  # a new incident each time, on configured builders
                body = json.dumps(notification(f"c{i}-{n}", builder=("kamal", "ci")[n % 2], action="prune-idle"))
            elif kind == "duplicate":
                body = json.dumps(notification("the-same-one"))
            elif kind == "bad-token":
                body, headers["Authorization"] = json.dumps(notification("x")), "Bearer wrong"
            elif kind == "bad-json":
                body = '{"alerts": [' * 50
            else:
                body = json.dumps(notification(f"u{i}-{n}", builder=f"nope-{i}-{n}", action="prune-all"))
            async with session.post(f"http://127.0.0.1:{live.port}/alerts", data=body, headers=headers) as r:
                await r.read()
                sent[(kind, r.status)] += 1
                if r.status in (200, 503) and kind not in ("bad-token", "bad-json"):
                    alerts_answered += r.status == 200

    async def run() -> None:
        deadline = time.monotonic() + SECONDS
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
            tasks = [asyncio.create_task(client(i, session, deadline)) for i in range(CLIENTS)]
            while time.monotonic() < deadline:
                await asyncio.sleep(5)
                rss.append(rss_mb())
            await asyncio.gather(*tasks)

    try:
        asyncio.run(run())
        live.idle()
        total = sum(sent.values())
        by_status: collections.Counter[int] = collections.Counter()
        for (_, status), count in sent.items():
            by_status[status] += count
        print(f"{total} requests in {SECONDS:.0f}s from {CLIENTS} clients: {dict(sent)}; RSS MB every 5 s: "
              f"{[round(x) for x in rss]}")
        assert total > 2000 and set(by_status) <= {200, 400, 401, 503}, by_status
        assert by_status[200] > total / 2
        # Every answer is in the metrics, under its status.
        m = live.metrics.registry
        for status, count in by_status.items():
            assert m.get_sample_value("buildkit_cache_actuator_notifications_total", {"code": str(status)}) == count
        # Every notification read (200) has its 'received' line, and each of its alerts a decision.
        live.recorder.audit.flush()  # the audit thread writes the file: what was recorded so far
        lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert sum(1 for e in lines if e["event"] == "received") == by_status[200]
        decisions = sum(v for name, v in _samples(m, "buildkit_cache_actuator_alerts_total"))
        assert decisions == alerts_answered == by_status[200]
        # Good, new incidents were pruned once each per (builder, action): the cooldown holds.
        assert len(live.builders["kamal"].prunes) == 2 and len(live.builders["ci"].prunes) == 1
        # Bad credentials: each counted; past a few a second they are not written (the audit file
        # must not fill the disk it watches), and those are counted too.
        rejected = sum(1 for e in lines if e["event"] == "rejected")
        dropped = m.get_sample_value("buildkit_cache_actuator_audit_lines_dropped_total", {"event": "rejected"})
        assert rejected + dropped == by_status[401] + by_status[400]
        # Memory: what the first 15 s took is all it takes.
        assert max(rss[3:]) - rss[2] < 25, rss
    finally:
        live.close()


def _samples(registry, name: str) -> list[tuple[str, float]]:
    return [(s.name, s.value) for fam in registry.collect() for s in fam.samples if s.name == name]
