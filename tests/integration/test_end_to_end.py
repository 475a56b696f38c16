"""End to end, as deployed: real build cache over its budget, the exporter and the actuator, a real
Prometheus loading the shipped rules and a real Alertmanager loading the shipped route."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from lab.procs import ROOT, http_get, value, wait_for
from lab.stack import Stack
from tests.conftest import engine_get

pytestmark = pytest.mark.integration
BUDGET = 12_000_000


def unshared(dockerd) -> int:
    return sum(r["Size"] for r in engine_get(dockerd, "/system/df")["BuildCache"] or [] if not r["Shared"])


@pytest.fixture
def stack(big_cache, make_builder, layer_contexts, tmp_path):
    # A real buildx builder too (BuildKit's GC is on by default): its series feed the dashboard's GC
    # and volume panels.
    kamal = make_builder("kamal")
    kamal.build(layer_contexts[0])
    kamal.settle()
    stack = Stack(big_cache, tmp_path, host="test", budget=BUDGET, interval="1s", for_="1s")
    try:
        yield stack
    finally:
        stack.stop()


def test_over_budget_cache_is_pruned_by_the_shipped_rules_and_route(big_cache, stack):
    dockerd, prom = big_cache, stack.prom
    assert unshared(dockerd) > 2 * BUDGET
    # The shipped rules load and every one of them evaluates without error.
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = yaml.safe_load((ROOT / "deploy/alerts/buildkit-cache.rules.yml").read_text())
    assert len(rules) == sum(len(g["rules"]) for g in shipped["groups"])
    def evaluated():
        current = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return current if all(r["health"] != "unknown" for r in current) else None

    assert [r["name"] for r in wait_for("the rules to evaluate", evaluated) if r["health"] != "ok"] == []

    # Prometheus fires, Alertmanager routes to the actuator, the actuator prunes.
    wait_for("the budget alert", lambda: prom.firing("BuildKitCacheOverBudget"), timeout=90)
    wait_for("the prune", lambda: [e for e in stack.audit() if e["event"] == "pruned"], timeout=90)
    assert unshared(dockerd) <= BUDGET
    # The exporter sees the smaller cache, the alert resolves, Alertmanager tells the actuator.
    wait_for("the alert to resolve", lambda: not prom.firing("BuildKitCacheOverBudget"), timeout=90)
    wait_for("the resolved notification", lambda: any(e["event"] == "skipped" and e["decision"] == "resolved"
                                                      for e in stack.audit()), timeout=90)
    text = http_get(stack.actuator_url + "/metrics")[1]
    assert value(text, "buildkit_cache_actuator_prunes_total", host="test", builder="default",
                 action="prune-to-budget", result="success") == 1
    pruned = [e for e in stack.audit() if e["event"] == "pruned"]
    assert len(pruned) == 1 and pruned[0]["cache_freed_bytes"] > BUDGET
    # The webhook was authenticated and answered 200 each time.
    assert value(text, "buildkit_cache_actuator_notifications_total", code="401") == 0
    assert value(text, "buildkit_cache_actuator_notifications_total", code="200") >= 2

    # Every expression of the shipped dashboard returns data from this Prometheus.
    check_dashboard(stack)


def fill(expr: str, instance: str) -> str:
    """Variables as Grafana fills them: regex-escaped, with backslashes doubled inside PromQL strings."""
    escaped = re.escape(instance).replace("\\", "\\\\")
    return (expr.replace("$instance", escaped).replace("$host", ".+").replace("$builder", "default|kamal")
            .replace("$__rate_interval", "1m").replace("$__interval", "15s"))


def check_dashboard(stack) -> None:
    prom = stack.prom
    dash = json.loads((ROOT / "deploy/grafana/buildkit-cache.json").read_text())
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [(a["name"], a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    assert len(exprs) >= 15
    empty = []
    for title, expr in exprs:
        q = fill(expr, stack.exporter_target)
        # The dashboard's range is hours; this Prometheus is a minute old: look back over all of it.
        if not wait_for_quiet(lambda q=q: prom.query(q)):
            empty.append((title, q))
    assert empty == []
    # The template variables find this exporter and its builders.
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"])
        assert m, var
        series = prom.query(fill(m.group(1), stack.exporter_target))
        found = {s["metric"].get(m.group(2)) for s in series}
        assert found and None not in found, (var["name"], found)


def wait_for_quiet(check, timeout: float = 30.0):
    try:
        return wait_for("data", check, timeout=timeout)
    except AssertionError:
        return None
