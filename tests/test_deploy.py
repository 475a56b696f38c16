"""The deploy/ files as shipped: promtool, amtool, and what users rely on in them."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from buildkit_cache.config import ACTION_KINDS, load
from lab.procs import ROOT

pytestmark = pytest.mark.slow  # runs promtool, amtool, systemd-analyze and the programs on each example

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "alerts" / "buildkit-cache.rules.yml"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=ROOT, timeout=120)


def alerting_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_checks_the_rules_clean():
    done = run("promtool", "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout and "WARNING" not in done.stdout + done.stderr


def test_promtool_rule_unit_tests_pass():
    done = run("promtool", "test", "rules", *map(str, sorted((DEPLOY / "alerts" / "tests").glob("*.yml"))))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test_that_expects_it_to_fire():
    tested = set()
    for f in (DEPLOY / "alerts" / "tests").glob("*.yml"):
        for t in yaml.safe_load(f.read_text())["tests"]:
            tested |= {a["alertname"] for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert {r["alert"] for r in alerting_rules()} == tested


def test_amtool_checks_the_route_clean():
    done = run("amtool", "check-config", str(DEPLOY / "alerts" / "alertmanager.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_route_sends_actions_to_the_actuator_with_bearer_auth():
    cfg = yaml.safe_load((DEPLOY / "alerts" / "alertmanager.yml").read_text())
    (route,) = [r for r in cfg["route"]["routes"] if r["receiver"] == "buildkit-actuator"]
    assert route["matchers"] == ['buildkit_action=~".+"']
    assert route["group_by"] == ["instance", "namespace", "pod", "host", "builder"]  # one incident per pod too
    (receiver,) = [r for r in cfg["receivers"] if r["name"] == "buildkit-actuator"]
    hook = receiver["webhook_configs"][0]
    assert hook["send_resolved"] is True
    assert hook["http_config"]["authorization"]["type"] == "Bearer"
    assert "credentials_file" in hook["http_config"]["authorization"]


def test_prometheus_config_is_valid(tmp_path):
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    done = run("promtool", "check", "config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert {j["job_name"] for j in cfg["scrape_configs"]} == {"buildkit-cache-exporter", "buildkit-cache-actuator"}


def test_rules_annotate_link_the_runbook_and_ask_only_for_built_in_actions():
    runbook = (ROOT / "docs" / "runbook.md").read_text().lower()
    anchors = {"#" + m.replace(" ", "-") for m in re.findall(r"^## (.+)$", runbook, re.M)}
    for rule in alerting_rules():
        ann = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(ann), rule["alert"]
        assert "{{" in ann["description"], f"{rule['alert']}: the description shows no numbers"
        assert "#" + ann["runbook_url"].split("#")[1] in anchors, rule["alert"]
        action = rule["labels"].get("buildkit_action")
        assert action is None or action in ACTION_KINDS, rule["alert"]


def test_rules_hard_code_no_byte_thresholds():
    for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]:
        numbers = [float(n) for n in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?(?:e\d+)?)(?![\w.])", rule["expr"])]
        # Ratios, factors and durations only: 24 * 3600 seconds is the largest number allowed.
        assert all(n <= 3600 for n in numbers), (rule.get("alert", rule.get("record")), numbers)


def test_dashboard_has_the_variables_and_panels_users_expect():
    dash = json.loads((DEPLOY / "grafana" / "buildkit-cache.json").read_text())
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "instance", "host", "builder"]
    titles = {p["title"] for p in dash["panels"]}
    assert {"Cache by record type", "In use, shared, reclaimable", "State volume, cache and budget",
            "Filesystem used (bytes)", "Filesystem used (inodes)", "Idle bytes by age", "GC policy caps",
            "Prunes", "Bytes reclaimed", "Measurements", "Cache by Docker host", "Fullest filesystem by Docker host",
            "Top builders by cache", "Top builders by growth per day", "Free space under builder state in a week"} <= titles
    by_title = {p["title"]: p for p in dash["panels"]}
    steps = by_title["Filesystem used (bytes)"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps[1:]] == [0.85, 0.95]  # the alert thresholds, drawn
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"


def test_example_config_loads_and_compose_and_units_parse():
    cfg = load(str(DEPLOY / "config.example.yml"))
    assert cfg.actuator.listen == ("127.0.0.1", 9863)
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"exporter", "actuator", "prometheus", "alertmanager", "grafana"}
    for unit in (DEPLOY / "systemd").glob("*.service"):
        ini = configparser.ConfigParser(strict=False)
        ini.read_string(unit.read_text())
        assert ini["Service"]["ExecStart"].startswith("/opt/buildkit-cache/bin/buildkit-cache-")
        assert ini["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` in a root of their own: the units as shipped, the program paths they
    start (stand-ins), and the system's own units they refer to (sysinit.target, ...)."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
        units.append(str(root / "etc/systemd/system" / unit.name))
        ini = configparser.ConfigParser(strict=False)
        ini.read_string(unit.read_text())
        program = root / ini["Service"]["ExecStart"].split()[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
        # Hardened as the README says: descriptors for many connections, and a sandbox.
        for key in ("LimitNOFILE", "NoNewPrivileges", "ProtectSystem", "CapabilityBoundingSet"):
            assert key in ini["Service"], (unit.name, key)
    done = run("systemd-analyze", "verify", f"--root={root}", *units)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def commented_examples(text: str) -> list[tuple[int, str]]:
    """Each commented-out example of the file, uncommented alone: (its first line, the whole file
    with it uncommented). An example starts at a line `<indent># key:` (or `# - key:`) and goes on
    while the next lines are commented at the same column and indented further."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)# ((?:- )?[a-z_][\w.-]*:(?: |$).*)$", lines[i])  # keys are lower case
        if not m:
            i += 1
            continue
        col, start = len(m.group(1)), i
        block = [m.group(1) + m.group(2)]
        i += 1
        while i < len(lines):
            n = re.match(r"^(\s*)# ( +\S.*)$", lines[i])
            if not n or len(n.group(1)) != col or n.group(2).lstrip().startswith("#"):
                break
            block.append(n.group(1) + n.group(2))
            i += 1
        out.append((start + 1, "\n".join(lines[:start] + block + lines[i:]) + "\n"))
    return out


def test_every_commented_example_of_the_example_config_is_valid(tmp_path):
    """Uncommented one at a time, each example passes --check-config of both programs."""
    text = (ROOT / "deploy/config.example.yml").read_text()
    examples = commented_examples(text)
    assert len(examples) >= 7, [n for n, _ in examples]  # docker host, builders, auth, tls, actions...
    for line, config in examples:
        path = tmp_path / f"example-{line}.yml"
        path.write_text(config)
        for prog in ("buildkit_cache.exporter", "buildkit_cache.actuator"):
            done = subprocess.run([sys.executable, "-m", prog, "--config", str(path), "--check-config"],
                                  capture_output=True, text=True, cwd=ROOT, timeout=60)
            # The example's files (TLS certificates, secrets) are placeholders that do not exist here:
            # saying so is not the example's fault. Anything about its keys and values is.
            errors = [x for x in done.stderr.splitlines() if ": warning:" not in x and " WARNING " not in x]
            problems = [x for x in errors if "no such file" not in x and "cannot read" not in x]
            assert not problems, f"deploy/config.example.yml line {line}, {prog}: {problems}"


def test_the_readmes_per_pod_routes_fit_the_shipped_route_and_reach_each_pods_actuator(tmp_path):
    """README, On Kubernetes: the yaml block, put where it says (under the buildkit-actuator route),
    is a valid Alertmanager config, and an alert about pod buildkitd-0 reaches that pod's receiver."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### On Kubernetes, beside buildkitd"):]
    snippet = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    cfg = yaml.safe_load((DEPLOY / "alerts" / "alertmanager.yml").read_text())
    (route,) = [r for r in cfg["route"]["routes"] if r["receiver"] == "buildkit-actuator"]
    route["routes"] = snippet["routes"]
    cfg["receivers"] += snippet["receivers"]
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(cfg))
    done = run("amtool", "check-config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    done = run("amtool", "config", "routes", "test", f"--config.file={path}", "namespace=ci", "pod=buildkitd-0",
               "buildkit_action=prune-to-budget", "builder=buildkitd", "host=remote")
    assert done.returncode == 0 and done.stdout.split() == ["buildkitd-0,default"], done.stdout + done.stderr
