"""The actuator as users run it, pruning a real private dockerd's build cache."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from lab.engines import write_build_context
from lab.procs import Process, Service, free_port, http_get, value, wait_for
from tests.conftest import engine_get
from tests.support import buildkit

pytestmark = pytest.mark.integration
TOKEN = "integration-token-0123456789"


def notification(action: str, builder: str, host: str = "test", fp: str = "fp-1",
                 starts: str = "2026-11-22T10:00:00Z") -> dict:
    return {"version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0, "status": "firing", "receiver": "actuator",
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am",
            "alerts": [{"status": "firing", "labels": {"alertname": "BuildKitCacheOverBudget", "host": host,
                                                       "builder": builder, "buildkit_action": action},
                        "annotations": {}, "startsAt": starts, "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "", "fingerprint": fp}]}


class Actuator:
    def __init__(self, dockerd, tmp_path: Path, budget: int, dry_run: bool = False, extra: str = "",
                 state: Path | None = None, builders: str = "  kamal: {budget: 20GB}"):
        self.port = free_port()
        self.state = state or tmp_path / f"state-{self.port}.json"
        self.audit = tmp_path / f"audit-{self.port}.jsonl"
        token = tmp_path / "token"
        token.write_text(TOKEN + "\n")
        cfg = tmp_path / f"actuator-{self.port}.yml"
        cfg.write_text(f"""
docker_hosts:
  - {{url: "{dockerd.url}", name: test}}
builders:
  default: {{budget: {budget}}}
{builders}
actuator:
  listen: 127.0.0.1:{self.port}
  auth: {{bearer_token_file: {token}}}
  cooldown: 1h
  settle_delay: 1s
  audit_log: {self.audit}
  state_file: {self.state}
{extra}
""")
        args = ["--config", str(cfg)] + (["--dry-run"] if dry_run else [])
        self.log = tmp_path / f"actuator-{self.port}.log"
        self.svc = self._start(args)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for("the actuator", lambda: http_get(self.url + "/healthz")[0] == 200, timeout=30)

    def _start(self, args: list[str]) -> Process:
        return Service("buildkit_cache.actuator", args, self.log)

    def post(self, body: dict, token: str = TOKEN) -> int:
        import urllib.error
        import urllib.request
        req = urllib.request.Request(self.url + "/alerts", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def events(self, kind: str | None = None) -> list[dict]:
        if not self.audit.exists():
            return []
        lines = [json.loads(x) for x in self.audit.read_text().splitlines()]
        return [e for e in lines if kind is None or e["event"] == kind]

    def metrics(self) -> str:
        return http_get(self.url + "/metrics")[1]

    def stop(self) -> None:
        assert self.svc.stop() == 0, self.svc.output()


def non_shared_bytes(dockerd) -> int:
    """What BuildKit counts against keep-storage: every record but image layers (shared)."""
    return sum(r["Size"] for r in engine_get(dockerd, "/system/df")["BuildCache"] if not r["Shared"])


def disk_avail(dockerd) -> int:
    """Bytes available on the filesystem holding the engine's snapshots (each a tmpfs of its own)."""
    path = (dockerd.containerd_root / "io.containerd.snapshotter.v1.overlayfs" if dockerd.engine.containerd_store
            else dockerd.data_root / "overlay2")
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_firing_prune_to_budget_alert_brings_the_cache_to_its_budget(big_cache, tmp_path):
    dockerd = big_cache
    before = non_shared_bytes(dockerd)
    shared = {r["ID"] for r in engine_get(dockerd, "/system/df")["BuildCache"] if r["Shared"]}
    budget = 12_000_000
    assert before > budget * 2
    act = Actuator(dockerd, tmp_path, budget)
    try:
        assert act.post(notification("prune-to-budget", "default")) == 200
        wait_for("the prune", lambda: act.events("pruned"), timeout=60)
        pruned = act.events("pruned")[0]
        after = non_shared_bytes(dockerd)
        assert after <= budget
        # A cap, not a wipe: below API 1.48 max-used-space is ignored and would prune everything.
        assert after >= budget // 3, f"prune-to-budget left {after} of {before} bytes: not a cap"
        assert pruned["cache_bytes_after"] is not None
        assert pruned["cache_freed_bytes"] == before - after == pruned["reclaimed_bytes"]
        text = act.metrics()
        assert value(text, "buildkit_cache_actuator_prunes_total", host="test", builder="default",
                     action="prune-to-budget", result="success") == 1
        assert value(text, "buildkit_cache_actuator_reclaimed_bytes_total", host="test", builder="default",
                     action="prune-to-budget") == before - after
        # Records shared with images are untouched.
        assert shared <= {r["ID"] for r in engine_get(dockerd, "/system/df")["BuildCache"]}
    finally:
        act.stop()


def test_fifty_concurrent_copies_of_a_notification_make_one_prune(big_cache, tmp_path):
    dockerd = big_cache
    act = Actuator(dockerd, tmp_path, 12_000_000)

    async def burst() -> list[int]:
        async with aiohttp.ClientSession() as s:
            async def one() -> int:
                async with s.post(act.url + "/alerts", json=notification("prune-to-budget", "default"),
                                  headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    return r.status
            return await asyncio.gather(*(one() for _ in range(50)))

    try:
        codes = asyncio.run(burst())
        assert codes == [200] * 50
        wait_for("the prune", lambda: act.events("pruned"), timeout=60)
        time.sleep(2)
        assert len(act.events("started")) == 1 and len(act.events("pruned")) == 1
        skipped = [e["decision"] for e in act.events("skipped")]
        assert len(skipped) == 49 and set(skipped) <= {"duplicate_in_progress", "cooldown"}
        text = act.metrics()
        assert value(text, "buildkit_cache_actuator_notifications_total", code="200") == 50
    finally:
        act.stop()



def test_a_notification_redelivered_after_a_restart_within_the_cooldown_prunes_nothing(big_cache, tmp_path):
    """The cooldown lives in the state file, so a new process keeps it (a SIGKILL during a prune:
    tests/test_actuator_state.py)."""
    dockerd = big_cache
    state = tmp_path / "state.json"
    act = Actuator(dockerd, tmp_path, 12_000_000, state=state)
    try:
        assert act.post(notification("prune-to-budget", "default")) == 200
        wait_for("the prune", lambda: act.events("pruned"), timeout=60)
    finally:
        act.stop()
    # More cache, so a second prune would have something to take.
    write_build_context(tmp_path / "again", "again", 4, 1)
    dockerd.build(tmp_path / "again", "again:latest")
    before = non_shared_bytes(dockerd)
    assert before > 12_000_000
    again = Actuator(dockerd, tmp_path, 12_000_000, state=state)
    try:
        assert again.post(notification("prune-to-budget", "default")) == 200
        time.sleep(2)
        assert again.events("started") == []
        assert [e["decision"] for e in again.events("skipped")] == ["cooldown"]
    finally:
        again.stop()
    assert non_shared_bytes(dockerd) == before

def test_a_wrong_token_gets_401_and_the_cache_is_untouched(big_cache, tmp_path):
    dockerd = big_cache
    before = engine_get(dockerd, "/system/df")["BuildCache"]
    act = Actuator(dockerd, tmp_path, 1_000_000)
    try:
        assert act.post(notification("prune-all", "default"), token="not-the-token") == 401
        time.sleep(2)
        assert act.events("started") == [] and [e["event"] for e in act.events()] == ["rejected"]
    finally:
        act.stop()
    after = engine_get(dockerd, "/system/df")["BuildCache"]
    assert sorted(r["ID"] for r in after) == sorted(r["ID"] for r in before)


# Longer than from the dry run's read of the records (which marks the engine's cache mounts used) to
# the real prune: with 2 s, a loaded machine's actuator start let the cache mounts turn idle again
# in between, and the real prune took them (4 MiB over the estimate, on every engine).
IDLE = "  actions:\n    quick-idle: {kind: prune-idle, idle_for: 20s}"


@pytest.mark.parametrize(("action", "budget"), [("prune-to-budget", 12_000_000), ("prune-to-budget", 1),
                                                 ("quick-idle", 12_000_000), ("prune-all", 12_000_000)],
                         ids=["prune-to-budget", "prune-to-1-byte", "prune-idle", "prune-all"])
def test_a_dry_run_estimate_is_within_10_percent_of_the_real_prune(big_cache, tmp_path, action, budget):
    """The engine marks its cache mounts used whenever it measures them: a keep-storage prune takes
    them last (all of them for a 1-byte budget), an idle prune never, prune-all takes them. An
    estimate that held them back, or took them as any other record, is off by their size."""
    dockerd = big_cache
    time.sleep(22)  # every record idle for longer than quick-idle's 20s
    dry = Actuator(dockerd, tmp_path, budget, dry_run=True, extra=IDLE)
    try:
        assert dry.post(notification(action, "default")) == 200
        wait_for("the dry run", lambda: dry.events("dry_run"), timeout=60)
    finally:
        dry.stop()
    estimate = dry.events("dry_run")[0]
    assert "DRY-RUN would prune" in dry.svc.output()
    assert estimate["records"] > 0
    real = Actuator(dockerd, tmp_path, budget, extra=IDLE)
    try:
        assert real.post(notification(action, "default")) == 200
        wait_for("the prune", lambda: real.events("pruned"), timeout=60)
    finally:
        real.stop()
    freed = real.events("pruned")[0]["cache_freed_bytes"]
    assert freed > 0
    print(f"{dockerd.engine.id} {action}: dry-run estimate {estimate['bytes']} bytes, real prune freed {freed} bytes")
    assert abs(estimate["bytes"] - freed) <= 0.10 * freed, (estimate, freed)


def test_the_audit_says_what_the_disk_got_back_beside_what_buildkit_reported(big_cache, tmp_path):
    """A prune-all deletes records whose layers images still hold: BuildKit reports their bytes as
    reclaimed, the disk gets none of them back. Users compare the audit trail with df."""
    dockerd = big_cache
    act = Actuator(dockerd, tmp_path, 1)
    try:
        avail_before = disk_avail(dockerd)
        assert act.post(notification("prune-all", "default")) == 200
        wait_for("the prune", lambda: act.events("pruned"), timeout=60)
        avail_after = disk_avail(dockerd)
        text = act.metrics()
    finally:
        act.stop()
    pruned = act.events("pruned")[0]
    seen = avail_after - avail_before
    print(f"{dockerd.engine.id}: BuildKit reported {pruned['reclaimed_bytes']}, the disk got back "
          f"{pruned['disk_freed_bytes']} (seen by the test: {seen})")
    assert pruned["disk_avail_bytes_after"] - pruned["disk_avail_bytes_before"] == pruned["disk_freed_bytes"]
    # What the actuator saw is what df sees, give or take the machine's own writes meanwhile.
    assert abs(pruned["disk_freed_bytes"] - seen) <= 1_000_000 + 0.1 * abs(seen)
    assert pruned["disk_freed_bytes"] < pruned["reclaimed_bytes"]
    assert value(text, "buildkit_cache_actuator_disk_freed_bytes_total", host="test", builder="default",
                 action="prune-all") == max(pruned["disk_freed_bytes"], 0)


def test_prune_all_takes_cache_mounts_and_internal_records_too(big_cache, tmp_path):
    dockerd = big_cache
    act = Actuator(dockerd, tmp_path, 1)
    try:
        assert act.post(notification("prune-all", "default")) == 200
        wait_for("the prune", lambda: act.events("pruned"), timeout=60)
    finally:
        act.stop()
    left = engine_get(dockerd, "/system/df")["BuildCache"] or []
    assert [r for r in left if not r["InUse"]] == []


def unshared(records: list[dict]) -> int:
    """What BuildKit's keep-storage counts, from its own `buildctl du`: every record not shared."""
    return sum(r["size"] for r in records if not r["shared"])


def prunes_in(dockerd, container: str, since: float) -> list[str]:
    """The `buildctl prune` commands started in a builder container, from the engine's event log."""
    return [c for c in buildkit.exec_starts(dockerd, since, container=container) if " prune" in f" {c}"]


def test_docker_container_builder_is_pruned_with_buildctl_through_docker_exec(dockerd, make_builder, layer_contexts,
                                                                              tmp_path):
    kamal = make_builder("kamal")
    for ctx in layer_contexts:
        kamal.build(ctx)
    before = kamal.settle()
    budget = unshared(before) // 2 // 1_000_000 * 1_000_000
    assert budget >= 2_000_000
    since = time.time()
    act = Actuator(dockerd, tmp_path, 1, extra="  actions:\n    nightly: {kind: prune-idle, idle_for: 1d}",
                   builders=f"  kamal: {{budget: {budget}}}")
    try:
        assert act.post(notification("prune-to-budget", "kamal", fp="budget")) == 200
        wait_for("the prune to budget", lambda: len(act.events("pruned")) == 1, timeout=60)
        after_budget = kamal.du()
        assert act.post(notification("nightly", "kamal", fp="nightly")) == 200
        wait_for("the idle prune", lambda: len(act.events("pruned")) == 2, timeout=60)
        after_idle = kamal.du()
        assert act.post(notification("prune-all", "kamal", fp="all")) == 200
        wait_for("the prune-all", lambda: len(act.events("pruned")) == 3, timeout=60)
        after_all = kamal.du()
    finally:
        act.stop()
    # The prune to budget left the budget's worth of cache, as BuildKit's own figures say.
    assert budget // 3 <= unshared(after_budget) <= budget, (budget, unshared(after_budget))
    first = act.events("pruned")[0]
    gone = {r["id"] for r in before} - {r["id"] for r in after_budget}
    assert first["records"] == len(gone) > 0
    assert first["reclaimed_bytes"] == sum(r["size"] for r in before if r["id"] in gone)
    # Nothing was unused for a day: the idle prune took nothing. prune-all took every record.
    assert {r["id"] for r in after_idle} == {r["id"] for r in after_budget}
    assert [r for r in after_all if not r["inUse"]] == []
    # What ran in the builder: buildctl with the configured values, nothing from the alert.
    calls = prunes_in(dockerd, kamal.container, since)
    assert [c.split("buildctl ", 1)[1] for c in calls] == [
        f"prune --keep-storage {budget // 1_000_000} --format json", "prune --keep-duration 86400s --format json",
        "prune --all --format json"], calls
    assert all("fp" not in c and "BuildKit" not in c and "nightly" not in c for c in calls)


def test_an_unknown_builder_is_answered_200_and_nothing_is_pruned(big_cache, tmp_path):
    dockerd = big_cache
    before = non_shared_bytes(dockerd)
    act = Actuator(dockerd, tmp_path, 1)
    try:
        assert act.post(notification("prune-all", "nosuchbuilder")) == 200
        assert act.post(notification("prune-all", "default", host="otherhost")) == 200
        wait_for("two skips", lambda: len(act.events("skipped")) == 2, timeout=30)
        assert {e["decision"] for e in act.events("skipped")} == {"unknown_builder"}
    finally:
        act.stop()
    assert non_shared_bytes(dockerd) == before


@pytest.fixture
def frozen(make_builder, layer_contexts):
    """A real builder with cache, and a way to stop its buildkitd where it stands (SIGSTOP): a prune
    sent to it waits until it is thawed, as a prune of a big cache takes minutes."""
    made = []

    def make(name: str) -> buildkit.Builder:
        b = make_builder(name)
        b.build(layer_contexts[0])
        b.settle()
        made.append(b)
        return b

    yield make


def test_sigterm_during_a_prune_answers_503_meanwhile_and_records_the_outcome(dockerd, frozen, tmp_path):
    """While it drains, the listener stays open: notifications get 503 (Alertmanager retries) and
    /healthz says it is shutting down; the running prune finishes and its line is written."""
    slow = frozen("slow")
    act = Actuator(dockerd, tmp_path, 12_000_000)
    freeze = slow.freeze_at_prune()
    try:
        assert act.post(notification("prune-all", "slow")) == 200
        wait_for("the prune to start", lambda: act.events("started"), timeout=30)
        wait_for("buildkitd frozen at the prune", freeze.frozen.is_set, timeout=30)
        time.sleep(1)
        act.svc.proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert act.post(notification("prune-all", "default", fp="fp-2")) == 503
        code, text = http_get(act.url + "/healthz")
        assert code == 503 and "shutting down" in text
        assert act.svc.proc.poll() is None, "it must wait for the running prune"
        assert act.events("pruned") == []
        freeze.thaw()
        assert act.svc.proc.wait(40) == 0
        pruned = act.events("pruned")
        assert len(pruned) == 1 and pruned[0]["builder"] == "slow" and pruned[0]["container"] == slow.container
        assert pruned[0]["records"] > 0
    finally:
        freeze.thaw()
        act.svc.stop()
    assert [r for r in slow.du() if not r["inUse"]] == []


def test_sigkill_during_a_prune_then_a_restart_starts_no_second_prune(dockerd, frozen, tmp_path):
    """The process dies while BuildKit (here: buildctl in the builder container) still prunes; the
    next process finds the claim in the state file and starts nothing for the re-sent notification."""
    killed = frozen("killed")
    state = tmp_path / "state.json"
    since = time.time()
    first = Actuator(dockerd, tmp_path, 12_000_000, state=state)
    second = None
    freeze = killed.freeze_at_prune()
    try:
        assert first.post(notification("prune-all", "killed")) == 200
        wait_for("the prune to start", lambda: first.events("started"), timeout=30)
        wait_for("buildkitd frozen at the prune", freeze.frozen.is_set, timeout=30)
        first.svc.proc.kill()
        first.svc.proc.wait(10)
        freeze.thaw()  # the prune goes on in the builder, its actuator gone
        second = Actuator(dockerd, tmp_path, 12_000_000, state=state)
        assert second.post(notification("prune-all", "killed")) == 200
        time.sleep(3)
        assert [e["decision"] for e in second.events("skipped")] == ["duplicate_in_progress"]
        assert second.events("started") == []
        assert "still claimed when the actuator stopped" in second.svc.output()
        assert len(prunes_in(dockerd, killed.container, since)) == 1
    finally:
        freeze.thaw()
        if second is not None:
            second.stop()


def test_dockerd_going_down_during_a_prune_is_recorded_said_by_healthz_and_recovered_from(build_cache, frozen,
                                                                                         tmp_path):
    dockerd = build_cache
    downed = frozen("downed")
    act = Actuator(dockerd, tmp_path, 12_000_000)
    freeze = downed.freeze_at_prune()
    try:
        assert act.post(notification("prune-all", "downed")) == 200
        wait_for("buildkitd frozen at the prune", freeze.frozen.is_set, timeout=30)
        dockerd.stop()  # it kills its containers, the frozen buildkitd among them
        try:
            wait_for("the prune to fail", lambda: act.events("failed"), timeout=60)
            failed = act.events("failed")[0]
            assert failed["builder"] == "downed" and failed["cooldown"].startswith("none"), failed
            wait_for("/healthz to say so", lambda: http_get(act.url + "/healthz")[0] == 503, timeout=30)
            assert "cannot prune: docker host test" in http_get(act.url + "/healthz")[1]
        finally:
            dockerd.start()
        # Without a restart: healthy again, and the next notification prunes.
        wait_for("/healthz to recover", lambda: http_get(act.url + "/healthz")[0] == 200, timeout=60)
        assert act.post(notification("prune-to-budget", "default", fp="fp-2")) == 200
        wait_for("the prune", lambda: act.events("pruned"), timeout=60)
        assert act.svc.proc.poll() is None
    finally:
        freeze.thaw()
        act.stop()


def test_a_name_that_came_to_mean_another_container_is_refused_then_the_new_one_is_pruned(dockerd, make_builder,
                                                                                        layer_contexts, tmp_path):
    """H1 (a): at start only buildx_buildkit_ci10 (builder ci1); then buildx_buildkit_ci1 appears (node
    1 of builder ci, `buildx create --append`) and, the two names colliding, takes the name ci1 (as
    the exporter shows it). An alert about ci1 that started before is about the old container:
    refused and audited, nothing pruned anywhere. One that starts after prunes the container the
    name means now."""
    since = time.time()
    old = make_builder("ci1")
    old.build(layer_contexts[0])
    act = Actuator(dockerd, tmp_path, 1)
    try:
        time.sleep(1)  # the start-up's lookup has seen ci1 -> buildx_buildkit_ci10
        new = make_builder("ci", node="ci1")
        new.build(layer_contexts[1])
        new.settle()
        time.sleep(2.5)  # older than any list the actuator may reuse
        assert act.post(notification("prune-all", "ci1", fp="before")) == 200
        wait_for("the refusal", lambda: act.events("skipped"), timeout=30)
        (skip,) = act.events("skipped")
        assert skip["decision"] == "builder_changed" and "buildx_buildkit_ci1" in skip["reason"], skip
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
        assert act.post(notification("prune-all", "ci1", fp="after", starts=now)) == 200
        wait_for("the prune", lambda: act.events("pruned"), timeout=30)
        assert act.events("pruned")[0]["container"] == "buildx_buildkit_ci1"
    finally:
        act.stop()
    assert [c.split("buildctl ", 1)[1] for c in prunes_in(dockerd, "buildx_buildkit_ci1", since)] == [
        "prune --all --format json"]
    assert prunes_in(dockerd, "buildx_buildkit_ci10", since) == []
    assert [r for r in new.du() if not r["inUse"]] == [] and old.du() != []


def test_a_leaked_volume_whose_container_came_back_is_prunable_at_once(dockerd, make_builder, layer_contexts,
                                                                         tmp_path):
    """H1 (b): at start only the volume buildx_buildkit_foo0_state; its builder created afterwards."""
    volume = "buildx_buildkit_foo0_state"
    dockerd.cli("volume", "create", volume)
    since = time.time()
    act = Actuator(dockerd, tmp_path, 1)
    try:
        time.sleep(1)  # the start-up's lookup has seen the volume alone
        foo = make_builder("foo")
        foo.build(layer_contexts[0])
        foo.settle()
        time.sleep(2.5)
        assert act.post(notification("prune-all", "foo")) == 200
        wait_for("the prune", lambda: act.events("pruned") or act.events("failed") or act.events("skipped"),
                 timeout=30)
        assert act.events("pruned"), act.events()
    finally:
        act.stop()
        dockerd.cli("volume", "rm", "-f", volume, check=False)
    assert len(prunes_in(dockerd, foo.container, since)) == 1
    assert [r for r in foo.du() if not r["inUse"]] == []


def test_sigterm_ends_the_actuator_within_its_drain_time_whatever_buildkit_is_doing(dockerd, frozen, tmp_path):
    """A prune whose answer never comes (its buildctl stopped where it stands, SIGSTOP, after it
    reached buildkitd): SIGTERM waits the drain time, records the prune as interrupted, and the
    process exits; the thread still waiting on the answer does not hold it."""
    from buildkit_cache.actuator.service import DRAIN_TIMEOUT

    stuck = frozen("stuck")
    act = Actuator(dockerd, tmp_path, 12_000_000)
    freeze = stuck.freeze_at_prune()
    clients: list[int] = []
    try:
        assert act.post(notification("prune-all", "stuck")) == 200
        wait_for("buildkitd frozen at the prune", freeze.frozen.is_set, timeout=30)
        clients = wait_for("buildctl prune in the builder", lambda: stuck.processes("buildctl", "prune"), timeout=30)
        for pid in clients:
            os.kill(pid, signal.SIGSTOP)
        freeze.thaw()
        stopped = time.monotonic()
        act.svc.proc.send_signal(signal.SIGTERM)
        assert act.svc.proc.wait(DRAIN_TIMEOUT + 20) == 0
        assert time.monotonic() - stopped < DRAIN_TIMEOUT + 15
        (failed,) = act.events("failed")
        assert failed["result"] == "interrupted" and failed["builder"] == "stuck"
    finally:
        freeze.thaw()
        for pid in clients:
            os.kill(pid, signal.SIGKILL)
        act.svc.stop()


def test_the_dry_run_names_the_records_the_prune_then_deletes(dockerd, make_builder, layer_contexts, tmp_path):
    kamal = make_builder("kamal")
    for ctx in layer_contexts:
        kamal.build(ctx)
    before = kamal.settle()
    budget = unshared(before) // 2
    builders = f"  kamal: {{budget: {budget}}}"
    dry = Actuator(dockerd, tmp_path, 1, dry_run=True, builders=builders)
    try:
        assert dry.post(notification("prune-to-budget", "kamal")) == 200
        wait_for("the dry run", lambda: dry.events("dry_run"), timeout=60)
    finally:
        dry.stop()
    act = Actuator(dockerd, tmp_path, 1, builders=builders)
    try:
        assert act.post(notification("prune-to-budget", "kamal")) == 200
        wait_for("the prune", lambda: act.events("pruned"), timeout=60)
    finally:
        act.stop()
    (plan,), (pruned,) = dry.events("dry_run"), act.events("pruned")
    assert plan["bytes_low"] <= pruned["reclaimed_bytes"] <= plan["bytes_high"]
    if not plan.get("ties"):
        assert plan["record_ids"] == pruned["record_ids"]
    assert unshared(kamal.du()) <= budget
