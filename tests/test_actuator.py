"""The actuator's decisions and HTTP outcomes (aiohttp test client; builders answer from recordings)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from buildkit_cache.actuator import decide as D
from buildkit_cache.actuator.app import make_app
from buildkit_cache.actuator.audit import AuditLog, Recorder
from buildkit_cache.actuator.auth import Credentials
from buildkit_cache.actuator.metrics import ActuatorMetrics
from buildkit_cache.actuator.payload import PayloadError, parse_notification
from buildkit_cache.actuator.service import ActuatorService, Directory
from buildkit_cache.actuator.state import StateFile
from buildkit_cache.builders import Discovered
from buildkit_cache.config import parse_config
from buildkit_cache.errors import Unavailable
from buildkit_cache.models import DRIVER_CONTAINER, BuilderRef, PruneRequest
from tests.support.recorded import RecordedBuilder, StaticInventory

TOKEN = b"s3cret-token"


def alert(action="prune-to-budget", host="h1", builder="kamal", status="firing", fp="fp1", **extra):
    labels = {"alertname": "BuildKitCacheOverBudget", "host": host, "builder": builder, **extra}
    if action is not None:
        labels["buildkit_action"] = action
    return {"status": status, "labels": labels, "annotations": {"summary": "x"}, "startsAt": "2026-11-22T10:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom", "fingerprint": fp}


def notification(*alerts, status="firing"):
    return {"version": "4", "groupKey": '{}:{host="h1"}', "truncatedAlerts": 0, "status": status,
            "receiver": "buildkit-actuator", "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://am", "alerts": list(alerts), "notification_reason": "new field, ignored"}


CFG = {
    "docker_hosts": [{"url": "unix:///nonexistent/docker.sock", "name": "h1"}],
    "builders": {"kamal": {"budget": "20MB"}, "nobudget": {}, "limited": {"budget": "1GB", "actions": ["prune-idle"]}},
    "actuator": {"cooldown": "1h", "settle_delay": "0s", "prune_timeout": "2s",
                 "actions": {"nightly": {"kind": "prune-idle", "idle_for": "1d"}}},
}


class Harness:
    def __init__(self, aiohttp_client, tmp_path):
        self.aiohttp_client = aiohttp_client
        self.tmp_path = tmp_path
        self.builders = {n: RecordedBuilder(n) for n in ("kamal", "nobudget", "limited")}

    async def start(self, cfg=CFG, dry_run=False, credentials=None, **service_kw):
        credentials = credentials or Credentials(bearer_token=TOKEN)
        self.cfg = parse_config(cfg)
        self.metrics = ActuatorMetrics(list(self.cfg.actuator.enabled_actions))
        self.audit_path = self.tmp_path / "audit.jsonl"
        self.recorder = Recorder(AuditLog(str(self.audit_path)), self.metrics)
        self.service = ActuatorService(self.cfg, StaticInventory(self.builders.values()), self.recorder,
                                       dry_run=dry_run, **service_kw)
        self.client = await self.aiohttp_client(make_app(self.service, credentials, self.recorder,
                                                         self.cfg.actuator.max_body))
        return self

    async def post(self, body, token=TOKEN, raw=None, headers=None):
        h = {"Authorization": f"Bearer {token.decode()}"} if token else {}
        h.update(headers or {})
        data = raw if raw is not None else json.dumps(body)
        return await self.client.post("/alerts", data=data, headers=h)

    async def settle(self):
        while self.service.tasks:
            await asyncio.wait(set(self.service.tasks))

    def audit_lines(self):
        self.recorder.audit.flush()  # the audit thread writes the file: what was recorded so far
        return [json.loads(x) for x in self.audit_path.read_text().splitlines()]

    def metric(self, name, **labels):
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def harness(aiohttp_client, tmp_path):
    return Harness(aiohttp_client, tmp_path)


# -- payload ----------------------------------------------------------------------------------------


def test_payload_parses_and_ignores_unknown_fields():
    n = parse_notification(notification(alert(), alert(status="resolved", fp="fp2")))
    assert n.status == "firing" and n.receiver == "buildkit-actuator"
    assert [a.fingerprint for a in n.firing()] == ["fp1"]
    assert n.alerts[0].labels["buildkit_action"] == "prune-to-budget"


@pytest.mark.parametrize("body,message", [
    ([], "expected a JSON object"),
    ({"version": "3", "status": "firing", "alerts": []}, 'version: expected "4"'),
    ({"status": "burning", "alerts": []}, "status: expected firing or resolved"),
    ({"status": "firing"}, "alerts: expected a list"),
    ({"status": "firing", "alerts": [{"status": "firing", "labels": {"a": 1}}]}, r"alerts\[0\].labels: expected string"),
    ({"status": "firing", "alerts": ["x"]}, r"alerts\[0\]: expected an object"),
])
def test_bad_payloads_say_what_is_wrong(body, message):
    with pytest.raises(PayloadError, match=message):
        parse_notification(body)


# -- decisions --------------------------------------------------------------------------------------


def decide(**kw):
    """The decision on a host whose builders are kamal, nobudget, limited and elsewhere."""
    refs = {("h1", n): BuilderRef("h1", n, DRIVER_CONTAINER) for n in ("kamal", "nobudget", "limited", "elsewhere")}
    return D.decide(parse_notification(notification(alert(**kw))).alerts[0], parse_config(CFG), refs)


def test_an_actuator_in_a_pod_takes_alerts_about_its_own_pod_only():
    """On Kubernetes every buildkitd pod's builder is host=remote, builder=buildkitd: the pod labels
    tell them apart. An alert about another pod, or about no pod, is refused, never acted on."""
    refs = {("h1", "kamal"): BuilderRef("h1", "kamal", DRIVER_CONTAINER)}

    def decide_in(this, **labels):
        n = parse_notification(notification(alert(**labels)))
        return D.decide(n.alerts[0], parse_config(CFG), refs, pod=this)

    mine = ("ci", "buildkitd-1")
    assert decide_in(mine, namespace="ci", pod="buildkitd-1").accepted
    other = decide_in(mine, namespace="ci", pod="buildkitd-0")
    assert other.decision == D.OTHER_POD and "'buildkitd-0'" in other.reason and "buildkitd-1" in other.reason
    assert decide_in(mine, namespace="build", pod="buildkitd-1").decision == D.OTHER_POD
    assert decide_in(mine).decision == D.OTHER_POD  # no pod named: not this one's
    assert decide_in(None, namespace="ci", pod="buildkitd-0").accepted  # outside a pod, the labels are labels


def test_decisions():
    d = decide()
    assert d.accepted and d.request == PruneRequest(keep_storage=20_000_000)
    assert decide(action="prune-idle").request == PruneRequest(keep_duration_seconds=7 * 86400)
    assert decide(action="nightly").request == PruneRequest(keep_duration_seconds=86400)
    assert decide(action="prune-all").request == PruneRequest(all=True)
    assert decide(status="resolved").decision == D.RESOLVED
    assert decide(action=None).decision == D.NO_ACTION
    unknown = decide(action="rm -rf /; prune")
    assert unknown.decision == D.UNKNOWN_ACTION and unknown.action_name == "unknown"
    assert decide(builder="").decision == D.MISSING_BUILDER
    assert decide(builder="nobudget").decision == D.NO_BUDGET
    assert decide(builder="limited").decision == D.NOT_ALLOWED
    assert decide(builder="limited", action="prune-idle").accepted
    # A builder the config does not name may still be pruned by actions that need no budget.
    assert decide(builder="elsewhere", action="prune-idle").accepted


def test_cooldown():
    assert not D.in_cooldown(None, 1000.0, 3600)
    assert D.in_cooldown(1000.0, 1000.0 + 3599, 3600)
    assert not D.in_cooldown(1000.0, 1000.0 + 3600, 3600)


# -- HTTP -------------------------------------------------------------------------------------------


async def test_a_firing_alert_prunes_the_builder_to_its_budget(harness):
    h = await harness.start()
    r = await h.post(notification(alert()))
    assert r.status == 200
    body = await r.json()
    assert body["alerts"] == [{"fingerprint": "fp1", "decision": "accepted", "reason": "accepted"}]
    await h.settle()
    assert h.builders["kamal"].prunes == [PruneRequest(keep_storage=20_000_000)]
    events = [e["event"] for e in h.audit_lines()]
    assert events == ["received", "accepted", "started", "pruned"]  # accepted: on disk before the prune
    pruned = h.audit_lines()[-1]
    assert pruned["reclaimed_bytes"] == 9441280 + 708608 + 2109440 and pruned["records"] == 3
    assert pruned["cache_bytes_before"] == 44961792 and pruned["cache_bytes_after"] == 0
    assert pruned["cache_freed_bytes"] == 44961792 and pruned["passes"] == 1
    # The records BuildKit said it deleted, by id: to compare with a dry run's.
    assert len(pruned["record_ids"]) == 3 and all(len(i) == 25 for i in pruned["record_ids"])
    assert h.metric("buildkit_cache_actuator_prunes_total", host="h1", builder="kamal", action="prune-to-budget",
                    result="success") == 1
    assert h.metric("buildkit_cache_actuator_reclaimed_bytes_total", host="h1", builder="kamal",
                    action="prune-to-budget") == pruned["reclaimed_bytes"]
    assert h.metric("buildkit_cache_actuator_alerts_total", action="prune-to-budget", decision="accepted") == 1
    assert h.metric("buildkit_cache_actuator_notifications_total", code="200") == 1
    assert h.metric("buildkit_cache_actuator_prunes_in_progress") == 0
    assert h.metric("buildkit_cache_actuator_last_prune_timestamp_seconds", host="h1", builder="kamal",
                    action="prune-to-budget") > 1.7e9


async def test_an_alert_for_a_builder_at_or_under_its_budget_prunes_nothing_and_takes_no_cooldown(harness):
    """The alert's figures are older than the prune: if the cache is at or under its budget when the
    prune would start, nothing is pruned, and the next alert is not held back by a cooldown."""
    cfg = {**CFG, "builders": {**CFG["builders"], "kamal": {"budget": "44961792"}}}  # exactly the recorded cache
    h = await harness.start(cfg)
    for fp in ("fp1", "fp2"):
        r = await h.post(notification(alert(fp=fp)))
        assert (await r.json())["alerts"][0]["decision"] == D.ACCEPTED
        await h.settle()
    assert h.builders["kamal"].prunes == []
    skipped = [e for e in h.audit_lines() if e["event"] == "skipped"]
    assert [e["decision"] for e in skipped] == ["under_budget", "under_budget"]
    assert "44,961,792 bytes" in skipped[0]["reason"] and skipped[0]["cooldown"].startswith("none")
    assert h.metric("buildkit_cache_actuator_prunes_total", host="h1", builder="kamal", action="prune-to-budget",
                    result="under_budget") == 2


async def test_a_prune_cut_short_by_buildkit_gets_more_passes_until_under_budget(harness):
    harness.builders["kamal"].short_prunes = True
    h = await harness.start()
    await h.post(notification(alert()))
    await h.settle()
    b = h.builders["kamal"]
    # Two records go per pass: 45MB of recorded cache is under the 20MB budget after three.
    assert sum(r.size for r in b.current) < 20_000_000
    pruned = h.audit_lines()[-1]
    assert pruned["event"] == "pruned" and pruned["passes"] == len(b.prunes) == 3


async def test_passes_are_bounded(harness):
    harness.builders["kamal"].short_prunes = True
    cfg = {**CFG, "builders": {**CFG["builders"], "kamal": {"budget": "1MB"}}}
    h = await harness.start(cfg)
    await h.post(notification(alert()))
    await h.settle()
    assert len(h.builders["kamal"].prunes) == 5
    assert h.audit_lines()[-1]["passes"] == 5


@pytest.mark.slow  # waits out timeouts
async def test_reply_comes_before_a_slow_prune(harness):
    harness.builders["kamal"].prune_seconds = 1.5
    h = await harness.start()
    t0 = time.monotonic()
    r = await h.post(notification(alert()))
    elapsed = time.monotonic() - t0
    assert r.status == 200 and elapsed < 0.75, elapsed  # half the prune: the answer did not wait for it
    assert h.builders["kamal"].prunes == []
    await h.settle()
    assert len(h.builders["kamal"].prunes) == 1


async def test_fifty_concurrent_copies_of_a_notification_prune_once(harness):
    harness.builders["kamal"].prune_seconds = 0.3
    h = await harness.start()
    responses = await asyncio.gather(*(h.post(notification(alert())) for _ in range(50)))
    assert all(r.status == 200 for r in responses)
    decisions = [(await r.json())["alerts"][0]["decision"] for r in responses]
    assert decisions.count("accepted") == 1
    assert set(decisions) == {"accepted", D.BUSY}
    await h.settle()
    assert len(h.builders["kamal"].prunes) == 1
    # Once it ran, the same incident stays quiet for the cooldown.
    r = await h.post(notification(alert()))
    assert (await r.json())["alerts"][0]["decision"] == D.COOLDOWN
    await h.settle()
    assert len(h.builders["kamal"].prunes) == 1
    assert h.metric("buildkit_cache_actuator_alerts_total", action="prune-to-budget", decision="cooldown") == 1


async def test_never_two_prunes_at_a_time_on_a_builder(harness):
    harness.builders["kamal"].prune_seconds = 0.3
    h = await harness.start()
    await asyncio.gather(h.post(notification(alert())), h.post(notification(alert(action="prune-idle"))),
                         h.post(notification(alert(action="prune-all"))))
    await h.settle()
    b = h.builders["kamal"]
    assert len(b.prunes) == 3 and b.max_running == 1


async def test_a_failed_prune_is_audited_and_may_be_retried_at_once(harness):
    harness.builders["kamal"].broken.add("prune")
    h = await harness.start()
    await h.post(notification(alert()))
    await h.settle()
    failed = h.audit_lines()[-1]
    assert failed["event"] == "failed" and "container is not running" in failed["reason"]
    assert h.metric("buildkit_cache_actuator_prunes_total", host="h1", builder="kamal", action="prune-to-budget",
                    result="failure") == 1
    h.builders["kamal"].broken.discard("prune")
    r = await h.post(notification(alert()))
    assert (await r.json())["alerts"][0]["decision"] == "accepted"
    await h.settle()
    assert len(h.builders["kamal"].prunes) == 1


@pytest.mark.slow  # waits out timeouts
async def test_a_prune_past_its_timeout_fails_and_still_blocks_a_second_prune(harness):
    harness.builders["kamal"].prune_seconds = 2.5  # prune_timeout is 2s
    h = await harness.start()
    await h.post(notification(alert()))
    await asyncio.sleep(0.1)
    await h.post(notification(alert(action="prune-all")))
    await h.settle()
    events = [(e["event"], e.get("action")) for e in h.audit_lines() if e["event"] in ("failed", "pruned")]
    assert events[0] == ("failed", "prune-to-budget")
    assert "did not finish within 2s" in [e for e in h.audit_lines() if e["event"] == "failed"][0]["reason"]
    assert h.builders["kamal"].max_running == 1
    assert h.metric("buildkit_cache_actuator_prunes_total", host="h1", builder="kamal", action="prune-to-budget",
                    result="timeout") == 1


async def test_resolved_notifications_prune_nothing(harness):
    h = await harness.start()
    r = await h.post(notification(alert(status="resolved"), status="resolved"))
    assert r.status == 200 and (await r.json())["alerts"][0]["decision"] == D.RESOLVED
    await h.settle()
    assert h.builders["kamal"].prunes == []
    # Counted and audited with the action and builder it named, not as "unknown".
    assert h.metric("buildkit_cache_actuator_alerts_total", action="prune-to-budget", decision=D.RESOLVED) == 1
    (line,) = [e for e in h.audit_lines() if e["event"] == "skipped"]
    assert (line["action"], line["host"], line["builder"]) == ("prune-to-budget", "h1", "kamal")


async def test_unknown_action_or_builder_is_2xx_logged_counted_and_prunes_nothing(harness):
    h = await harness.start()
    r = await h.post(notification(alert(action="$(reboot)")))
    assert r.status == 200 and (await r.json())["alerts"][0]["decision"] == D.UNKNOWN_ACTION
    r = await h.post(notification(alert(builder="ghost", action="prune-idle")))
    assert r.status == 200
    await h.settle()
    assert all(b.prunes == [] for b in h.builders.values())
    assert h.metric("buildkit_cache_actuator_alerts_total", action="unknown", decision=D.UNKNOWN_ACTION) == 1
    assert h.metric("buildkit_cache_actuator_alerts_total", action="prune-idle", decision=D.UNKNOWN_BUILDER) == 1
    skipped = [e for e in h.audit_lines() if e["event"] == "skipped"]
    assert [e["decision"] for e in skipped] == [D.UNKNOWN_ACTION, D.UNKNOWN_BUILDER]
    assert "no builder 'ghost' on host 'h1'; builders known here: h1/kamal, h1/limited, h1/nobudget" in \
        skipped[1]["reason"]
    # A typo in a prune-to-budget rule is an unknown builder too, not a missing budget.
    r = await h.post(notification(alert(builder="kamall", fp="typo")))
    assert (await r.json())["alerts"][0]["decision"] == D.UNKNOWN_BUILDER


async def test_the_actuators_metrics_carry_no_created_series(harness):
    h = await harness.start()
    await h.post(notification(alert()))
    await h.settle()
    text = await (await h.client.get("/metrics")).text()
    assert "buildkit_cache_actuator_prunes_total{" in text and "_created" not in text


async def test_bad_credentials_get_401_and_change_nothing(harness):
    h = await harness.start()
    for token in (b"wrong", None):
        r = await h.post(notification(alert()), token=token)
        assert r.status == 401
        assert "Bearer" in r.headers["WWW-Authenticate"]
    r = await h.post(notification(alert()), token=None, headers={"Authorization": "Basic " + base64.b64encode(b"a:b").decode()})
    assert r.status == 401
    await h.settle()
    assert h.builders["kamal"].prunes == []
    assert h.metric("buildkit_cache_actuator_notifications_total", code="401") == 3
    assert all(e["event"] == "rejected" for e in h.audit_lines())


async def test_basic_auth(harness):
    h = await harness.start(credentials=Credentials(basic_username=b"am", basic_password=b"pw"))
    good = {"Authorization": "Basic " + base64.b64encode(b"am:pw").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"am:pW").decode()}
    assert (await h.post(notification(alert()), token=None, headers=bad)).status == 401
    assert (await h.post(notification(alert()), token=None, headers={"Authorization": "Basic !!!"})).status == 401
    assert (await h.post(notification(alert()), token=None, headers=good)).status == 200


async def test_bodies_that_are_not_payloads_get_400(harness):
    h = await harness.start()
    r = await h.post(None, raw=b"{not json")
    assert r.status == 400 and "not JSON" in (await r.json())["error"]
    r = await h.post({"status": "firing", "alerts": "many"})
    assert r.status == 400 and "alerts: expected a list" in (await r.json())["error"]
    r = await h.post(None, raw=b"\xff\xfe")
    assert r.status == 400
    assert h.metric("buildkit_cache_actuator_notifications_total", code="400") == 3


async def test_oversized_bodies_get_413(harness):
    cfg = {**CFG, "actuator": {**CFG["actuator"], "max_body": "2KiB"}}
    h = await harness.start(cfg)
    big = notification(*[alert(fp=f"fp{i}") for i in range(100)])
    r = await h.post(big)
    assert r.status == 413
    assert h.metric("buildkit_cache_actuator_notifications_total", code="413") == 1
    assert h.builders["kamal"].prunes == []


async def test_503_only_when_it_cannot_accept_work(harness):
    harness.builders["kamal"].prune_seconds = 0.5
    h = await harness.start(max_pending=1)
    assert (await h.post(notification(alert()))).status == 200
    r = await h.post(notification(alert(builder="limited", action="prune-idle")))
    assert r.status == 503
    await h.settle()
    assert (await h.post(notification(alert(builder="limited", action="prune-idle")))).status == 200


async def test_dry_run_takes_the_same_path_and_prunes_nothing(harness, caplog):
    h = await harness.start(dry_run=True)
    with caplog.at_level("WARNING", logger="actuator"):
        r = await h.post(notification(alert(builder="kamal")))
        assert (await r.json())["dry_run"] is True
        await h.settle()
    assert h.builders["kamal"].prunes == []
    entry = h.audit_lines()[-1]
    assert entry["event"] == "dry_run" and entry["records"] > 0
    total = sum(r.size for r in h.builders["kamal"].records())
    assert entry["cache_bytes"] == total
    # A 20MB budget on the recorded cache: at least the excess goes, never everything.
    assert total - 20_000_000 <= entry["bytes"] < total
    assert entry["bytes_low"] <= entry["bytes"] <= entry["bytes_high"]
    assert len(entry["record_ids"]) == entry["records"]
    assert any("DRY-RUN would prune" in m and "h1/kamal" in m for m in caplog.messages)
    # A dry run takes no cooldown: the same alert again is another dry run.
    r = await h.post(notification(alert(builder="kamal")))
    assert (await r.json())["alerts"][0]["decision"] == D.ACCEPTED
    await h.settle()
    assert h.metric("buildkit_cache_actuator_prunes_total", host="h1", builder="kamal", action="prune-to-budget",
                    result="dry_run") == 2


async def test_a_dry_run_never_blocks_the_real_prune_that_follows(aiohttp_client, tmp_path):
    """The first thing a user tries: a dry run, then the same alert for real (the actuator restarted
    without --dry-run, the state file kept). Exactly one real prune."""
    state = str(tmp_path / "state.json")
    dry = await Harness(aiohttp_client, tmp_path).start(dry_run=True, state=StateFile(state, time.time))
    assert (await (await dry.post(notification(alert(builder="kamal")))).json())["alerts"][0]["decision"] == D.ACCEPTED
    await dry.settle()
    assert dry.builders["kamal"].prunes == []
    real = await Harness(aiohttp_client, tmp_path).start(state=StateFile(state, time.time))
    assert (await (await real.post(notification(alert(builder="kamal")))).json())["alerts"][0]["decision"] == D.ACCEPTED
    await real.settle()
    assert len(real.builders["kamal"].prunes) == 1
    # ...and that real prune does hold its cooldown.
    again = await (await real.post(notification(alert(builder="kamal")))).json()
    assert again["alerts"][0]["decision"] == D.COOLDOWN


async def test_healthz_and_metrics_need_no_credentials(harness):
    h = await harness.start()
    assert (await h.client.get("/healthz")).status == 200
    r = await h.client.get("/metrics")
    assert r.status == 200
    assert "buildkit_cache_actuator_notifications_total" in await r.text()


async def test_hostile_bodies_and_headers_get_4xx_never_500(harness):
    h = await harness.start()
    deep = b"[" * 100_000 + b"]" * 100_000
    r = await h.post(None, raw=deep)
    assert r.status == 400 and "nested too deep" in (await r.json())["error"]
    # A header that is not UTF-8: no credentials, not a crash.
    r = await h.client.post("/alerts", data=b"{}", headers={"Authorization": "Bearer \udcff\udcfe"},
                            skip_auto_headers=())
    assert r.status in (400, 401)
    assert h.metric("buildkit_cache_actuator_notifications_total", code="500") is None


async def test_a_flood_of_unauthenticated_requests_is_counted_not_written(harness):
    h = await harness.start()
    for _ in range(50):
        assert (await h.post(notification(alert()), token=b"wrong")).status == 401
    lines = [e for e in h.audit_lines() if e["event"] == "rejected"]
    assert 1 <= len(lines) <= 20
    assert h.metric("buildkit_cache_actuator_audit_lines_dropped_total", event="rejected") == 50 - len(lines)
    assert h.metric("buildkit_cache_actuator_notifications_total", code="401") == 50


async def test_no_prune_without_an_audit_record(harness):
    h = await harness.start()
    h.audit_path.unlink()
    h.audit_path.mkdir()  # the file replaced by a directory: nothing can be appended
    try:
        r = await h.post(notification(alert()))
        assert r.status == 503 and "cannot write the audit trail" in (await r.json())["error"]
        await h.settle()
        assert h.builders["kamal"].prunes == []
        assert h.metric("buildkit_cache_actuator_audit_writable") == 0
        assert h.metric("buildkit_cache_actuator_audit_write_failures_total") >= 1
    finally:
        h.audit_path.rmdir()
    # Writable again: the lines kept meanwhile are written first, then work is taken.
    r = await h.post(notification(alert()))
    assert r.status == 200
    await h.settle()
    assert len(h.builders["kamal"].prunes) == 1
    events = [e["event"] for e in h.audit_lines()]
    assert events.count("received") == 1 and events[-1] == "pruned"
    assert h.metric("buildkit_cache_actuator_audit_writable") == 1


# -- limits of one notification ---------------------------------------------------------------------


@pytest.mark.parametrize(("make", "limit", "code"), [
    (lambda: notification(*[alert(fp=str(i)) for i in range(501)]), "alerts", 400),
    (lambda: notification(*[alert(builder=f"b{i}", fp=str(i)) for i in range(51)]), "builders", 400),
    (lambda: notification(alert(builder="k" * 1025)), "label_length", 400),
    (lambda: notification(alert(**{f"l{i}": "v" for i in range(70)})), "labels", 400),
    (lambda: {**notification(alert()), "receiver": "r" * 5000}, "string_length", 400),
])
async def test_a_notification_past_a_limit_is_refused_and_counted(harness, make, limit, code):
    h = await harness.start()
    r = await h.post(make())
    assert r.status == code, await r.text()
    assert h.metric("buildkit_cache_actuator_limit_hits_total", limit=limit) == 1
    await h.settle()
    assert all(not b.prunes for b in h.builders.values())


async def test_a_lone_surrogate_in_a_label_is_refused_and_metrics_still_answer(harness):
    h = await harness.start()
    r = await h.post(None, raw='{"status":"firing","alerts":[{"status":"firing","labels":{"host":"h1",'
                               '"builder":"\\ud800","buildkit_action":"prune-all"}}]}')
    assert r.status == 400 and "surrogate" in (await r.json())["error"]
    assert (await h.client.get("/metrics")).status == 200


async def test_a_compressed_body_is_limited_after_decompression(harness):
    import gzip
    h = await harness.start()
    bomb = gzip.compress(b" " * 20_000_000, 9)  # 20 MB of JSON whitespace in ~20 kB
    r = await h.post(None, raw=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status == 413
    assert h.metric("buildkit_cache_actuator_limit_hits_total", limit="body") == 1
    good = gzip.compress(json.dumps(notification(alert())).encode())
    r = await h.post(None, raw=good, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert r.status == 200
    garbage = await h.post(None, raw=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert garbage.status == 400


@pytest.mark.slow  # waits out timeouts
async def test_a_timeout_after_progress_keeps_what_was_freed_and_the_cooldown(harness):
    """Passes of a keep-storage prune delete records, then time runs out: the bytes count, the line
    says so, and a re-sent notification does not prune again at once."""
    harness.builders["kamal"].short_prunes = True
    harness.builders["kamal"].prune_seconds = 0.8  # prune_timeout is 2s: the third pass ends late
    cfg = {**CFG, "builders": {**CFG["builders"], "kamal": {"budget": "1MB"}}}
    h = await harness.start(cfg)
    await h.post(notification(alert()))
    await h.settle()
    failed = [e for e in h.audit_lines() if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["result"] == "timeout", h.audit_lines()
    assert failed[0]["records"] == 6 and failed[0]["reclaimed_bytes"] > 0
    assert failed[0]["cooldown"].startswith("kept")
    assert h.metric("buildkit_cache_actuator_reclaimed_bytes_total", host="h1", builder="kamal",
                    action="prune-to-budget") == failed[0]["reclaimed_bytes"]
    r = await h.post(notification(alert()))
    assert (await r.json())["alerts"][0]["decision"] == D.COOLDOWN


class _SlowHosts:
    """Two Docker hosts: `slow` answers discovery after 1.5 s, `quick` at once; discoveries counted."""

    def __init__(self):
        self.hosts = {"slow": None, "quick": None}
        self.remotes = []
        self.calls = []

    def discover(self, host):
        self.calls.append(host)
        if host == "slow":
            time.sleep(1.5)
        return Discovered(builders=[RecordedBuilder("kamal", host=host)])


@pytest.mark.slow  # waits out timeouts
async def test_lookups_are_warmed_at_start_and_a_slow_host_delays_only_its_own():
    inv = _SlowHosts()
    directory = Directory(inv)
    warming = asyncio.create_task(directory.warm())
    await asyncio.sleep(0.2)
    started = time.monotonic()
    quick = await directory.lookup("quick", "kamal")
    assert ("quick", "kamal") in quick and time.monotonic() - started < 0.5  # not behind `slow`
    await warming
    assert sorted(inv.calls) == ["quick", "slow"]
    assert ("slow", "kamal") in await directory.lookup("slow", "kamal")
    assert sorted(inv.calls) == ["quick", "slow"]  # answered from what the warm-up found


@pytest.mark.slow  # waits out timeouts
async def test_a_state_lock_held_by_another_process_gets_503_fast_and_healthz_says_why(aiohttp_client, tmp_path):
    """M2: nothing waits on the lock on the event loop: both answers within a second."""
    import fcntl
    import os

    state = tmp_path / "state.json"
    h = await Harness(aiohttp_client, tmp_path).start(state=StateFile(str(state), time.time))
    fd = os.open(str(state) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        r = await h.post(notification(alert(builder="kamal")))
        assert r.status == 503 and (await r.json())["alerts"][0]["decision"] == D.STATE_FAILED
        health = await h.client.get("/healthz")
        assert health.status == 503 and "held by another process" in await health.text()
        assert time.monotonic() - started < 2.0
    finally:
        os.close(fd)
    assert (await h.client.get("/healthz")).status == 200
    assert h.builders["kamal"].prunes == []


async def test_an_alert_that_ended_is_not_acted_on(harness):
    h = await harness.start()
    body = notification(alert(builder="kamal"))
    body["alerts"][0]["endsAt"] = "2020-01-01T00:00:00Z"  # firing, but it ended long ago: an old notification
    r = await h.post(body)
    assert r.status == 200 and (await r.json())["alerts"][0]["decision"] == D.EXPIRED
    await h.settle()
    assert h.builders["kamal"].prunes == []


async def test_a_prune_is_on_disk_before_it_starts_or_does_not_start(harness, monkeypatch):
    """M1: the accepted line is written and fsync'd before BuildKit is asked; a full disk (fsync's
    ENOSPC) refuses the prune with 503 and leaves no cut-off line for the next one to be glued to."""
    import errno

    import buildkit_cache.actuator.audit as audit_module

    h = await harness.start()
    real_fsync = audit_module.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_module.os, "fsync", full)
    r = await h.post(notification(alert(builder="kamal")))
    assert r.status == 503 and (await r.json())["alerts"][0]["decision"] == D.AUDIT_FAILED
    await h.settle()
    assert h.builders["kamal"].prunes == []
    text = h.audit_path.read_text()
    assert all(json.loads(line) for line in text.splitlines())  # whole lines only
    assert '"event":"accepted"' not in text
    monkeypatch.setattr(audit_module.os, "fsync", real_fsync)  # space again: the re-send prunes
    r = await h.post(notification(alert(builder="kamal")))
    assert r.status == 200 and (await r.json())["alerts"][0]["decision"] == D.ACCEPTED
    await h.settle()
    assert len(h.builders["kamal"].prunes) == 1
    events = [e["event"] for e in h.audit_lines()]
    assert events.index("accepted") < events.index("started") < events.index("pruned")


class _DeadHost:
    """Host `dead` accepts and never answers (discovery hangs); `live` answers at once."""

    def __init__(self):
        self.hosts = {"dead": None, "live": None}
        self.remotes = []
        self.calls = []

    def discover(self, host):
        self.calls.append(host)
        if host == "dead":
            time.sleep(3)
            raise Unavailable("GET /info on dead: no answer")
        return Discovered(builders=[RecordedBuilder("kamal", host=host)])


@pytest.mark.slow  # waits out timeouts
async def test_a_dead_host_costs_its_own_alerts_once_not_every_reply(monkeypatch):
    """M6: six lookups of a dead host at once wait for one failure, not six in a row; the next ones
    fail at once for a while; a live host is answered meanwhile in milliseconds."""
    import buildkit_cache.actuator.service as service_module

    monkeypatch.setattr(service_module, "DISCOVERY_TIMEOUT", 1.0)
    inv = _DeadHost()
    directory = Directory(inv)
    started = time.monotonic()
    dead = [asyncio.create_task(directory.lookup("dead", "kamal")) for _ in range(6)]
    await asyncio.sleep(0.1)
    live_started = time.monotonic()
    assert ("live", "kamal") in await directory.lookup("live", "kamal")
    assert time.monotonic() - live_started < 0.5
    assert await asyncio.gather(*dead) == [None] * 6
    assert time.monotonic() - started < 2.5  # one timeout, not six
    again = time.monotonic()
    assert await directory.lookup("dead", "kamal") is None and time.monotonic() - again < 0.1
    assert inv.calls.count("dead") == 1


async def test_the_audit_probe_fails_where_a_real_line_would(harness, monkeypatch):
    """M1: on a full disk an empty append succeeds; the probe asks for real space, so new
    notifications get 503 and /healthz says why before any prune is tried."""
    import errno

    import buildkit_cache.actuator.audit as audit_module

    h = await harness.start()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_module.os, "posix_fallocate", full)
    r = await h.post(notification(alert(builder="kamal")))
    assert r.status == 503 and "No space left on device" in await r.text()
    health = await h.client.get("/healthz")
    assert health.status == 503 and "No space left on device" in await health.text()
    assert h.builders["kamal"].prunes == []
    size = h.audit_path.stat().st_size
    monkeypatch.undo()  # space again
    assert (await h.client.get("/healthz")).status == 200
    assert h.audit_path.stat().st_size >= size  # the probe left nothing behind but real lines


def test_recording_an_audit_line_never_waits_for_the_disk(tmp_path):
    """The event loop records decisions and outcomes: a write stuck on a stalled disk (here, the
    audit thread holding the file's lock) must not stop it. The line is written once the disk
    answers, in order; a durable line (before a prune) still waits for its fsync."""
    import threading

    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    audit._lock.acquire()  # the audit thread in a write that does not return
    try:
        done = threading.Event()
        t = threading.Thread(target=lambda: (audit.record("received", alerts=1), audit.record("skipped"),
                                             done.set()))
        t.start()
        assert done.wait(5), "recording waited for the disk"
        durable = threading.Thread(target=lambda: audit.record("accepted", durable=True))
        durable.start()
        durable.join(0.5)
        assert durable.is_alive(), "a durable line returned before it was on disk"
    finally:
        audit._lock.release()
    durable.join(5)
    audit.flush()
    assert [json.loads(x)["event"] for x in path.read_text().splitlines()] == ["received", "skipped", "accepted"]
    audit.close()
