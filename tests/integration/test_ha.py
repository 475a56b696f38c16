"""High availability, for real: a real Prometheus on the shipped rules sends to two Alertmanagers
clustered on loopback (Debian's prometheus-alertmanager, --cluster.*), each routing the shipped way
to two actuator replicas that share nothing (each its own state file and audit trail, as on two
hosts' worth of state), all on one engine with one builder over its budget.

What it shows (docs/actuator.md, "Replicas and HA Alertmanagers"): Alertmanager delivers at least
once; each replica prunes at most once per incident by its own record; BuildKit runs the prunes one
after the other, so they converge on the budget; and the bytes reclaimed, summed over the replicas as
the dashboard sums them, are what the cache really lost, never twice that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lab.procs import Service, free_port, http_get, samples, wait_for
from lab.stack import Alertmanager, Prometheus, adapted_alertmanager, shortened_rules
from tests.conftest import ENGINES, engine_get

# Docker 28.5: keep-storage is a cap there as on every engine (FACTS), and it is the newest.
SID = [e for e in ENGINES if e.release == "sid" and not e.containerd_store]
pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine", SID, ids=[e.id for e in SID], indirect=True)]
BUDGET = 12_000_000


def unshared(dockerd) -> int:
    return sum(r["Size"] for r in engine_get(dockerd, "/system/df")["BuildCache"] or [] if not r["Shared"])


def audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_clustered_alertmanagers_and_two_replicas_converge_on_the_budget(big_cache, tmp_path):
    dockerd = big_cache
    before = unshared(dockerd)
    assert before > 2 * BUDGET
    token = tmp_path / "token"
    token.write_text("ha-token\n")
    procs: list = []
    exporter = f"127.0.0.1:{free_port()}"
    replicas = []
    try:
        for name in ("a", "b"):
            work = tmp_path / name
            work.mkdir()
            port = free_port()
            cfg = work / "config.yml"
            cfg.write_text(yaml.safe_dump({
                "docker_hosts": [{"url": dockerd.url, "name": "local"}],
                "builders": {"default": {"budget": BUDGET}},
                "exporter": {"listen": exporter, "intervals": {k: "1s" for k in ("discovery", "records", "filesystem")}},
                "actuator": {"listen": f"127.0.0.1:{port}", "auth": {"bearer_token_file": str(token)},
                             "settle_delay": "1s", "audit_log": str(work / "audit.jsonl"),
                             "state_file": str(work / "state.json")}}))
            procs.append(Service("buildkit_cache.actuator", ["--config", str(cfg)], work / "actuator.log"))
            replicas.append((f"127.0.0.1:{port}", work / "audit.jsonl"))
            if name == "a":
                procs.append(Service("buildkit_cache.exporter", ["--config", str(cfg)], work / "exporter.log"))
        for target, _ in replicas:
            wait_for(f"replica {target}", lambda t=target: http_get(f"http://{t}/healthz")[0] == 200)
        wait_for("the exporter", lambda: http_get(f"http://{exporter}/metrics")[0] == 200)

        # Two Alertmanagers in one cluster, each with the shipped route to both replicas.
        gossip = (free_port(), free_port())
        ams = []
        for i, name in enumerate(("am1", "am2")):
            work = tmp_path / name
            work.mkdir()
            config = adapted_alertmanager(work / "alertmanager.yml", [f"http://{t}/alerts" for t, _ in replicas], token)
            ams.append(Alertmanager(work, config, cluster_port=gossip[i], peers=(gossip[0],) if i else ()))
            procs.append(ams[-1])
        wait_for("the cluster", lambda: all(
            len(json.loads(http_get(am.url + "/api/v2/status")[1])["cluster"]["peers"]) == 2 for am in ams), timeout=60)

        prom = Prometheus(tmp_path, shortened_rules(tmp_path / "rules.yml"), exporter, [t for t, _ in replicas],
                          [f"127.0.0.1:{am.port}" for am in ams])
        procs.append(prom)

        # Both replicas hear of the incident; each prunes it at most once; BuildKit runs them in turn.
        def pruned() -> list[list[dict]]:
            return [[e for e in audit(path) if e["event"] == "pruned"] for _, path in replicas]

        wait_for("a prune", lambda: any(pruned()), timeout=120)
        wait_for("the cache at the budget", lambda: unshared(dockerd) <= BUDGET, timeout=60)
        wait_for("every replica's decision", lambda: all(
            any(e["event"] in ("pruned", "skipped", "failed") for e in audit(path)) for _, path in replicas), timeout=60)
        after = unshared(dockerd)
        # A few more group intervals: repeats are skipped, never pruned again.
        wait_for("repeats", lambda: sum(1 for _, p in replicas for e in audit(p) if e["event"] == "received") >= 4,
                 timeout=60)
        by_replica = pruned()
        assert all(len(p) <= 1 for p in by_replica), by_replica
        # A replica that hears of it after the other's prune finds the cache under its budget: that is
        # a skip too (each replica keeps its own cooldown; the cache itself is what they share).
        for _, path in replicas:
            later = [e for e in audit(path) if e["event"] == "skipped"]
            assert all(e["decision"] in ("cooldown", "duplicate_in_progress", "under_budget", "resolved")
                       for e in later), later
        assert unshared(dockerd) == after <= BUDGET

        # Reclaimed bytes summed over the replicas (what the dashboard sums) are what the cache lost.
        reclaimed = 0.0
        for target, _ in replicas:
            text = http_get(f"http://{target}/metrics")[1]
            reclaimed += sum(v for (name, _), v in samples(text).items()
                             if name == "buildkit_cache_actuator_reclaimed_bytes_total")
        lost = before - after
        assert 0.9 * lost <= reclaimed <= 1.1 * lost, (reclaimed, lost, by_replica)
        total_audited = sum(p[0]["reclaimed_bytes"] for p in by_replica if p)
        assert total_audited == pytest.approx(reclaimed)
    finally:
        for p in reversed(procs):
            p.stop()
