"""A real Prometheus and Alertmanager loading the shipped deploy/ files, for the end-to-end test and
the demo. Only what the issue allows is changed: targets, the actuator's URL and token file, `for:`
durations and intervals."""

from __future__ import annotations

import json
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from .engines import PrivateDockerd
from .procs import ROOT, Process, Service, free_port, http_get, wait_for

DEPLOY = ROOT / "deploy"


def shortened_rules(dst: Path, for_: str = "1s") -> Path:
    """The shipped rules with every `for:` shortened; expressions, labels and annotations untouched."""
    rules = yaml.safe_load((DEPLOY / "alerts" / "buildkit-cache.rules.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = for_
    dst.write_text(yaml.safe_dump(rules, sort_keys=False))
    return dst


def adapted_alertmanager(dst: Path, actuator_url: str | list[str], token_file: Path) -> Path:
    """The shipped route with the actuator's URL (or one webhook per URL: replicas), the token file
    and the timings replaced."""
    cfg = yaml.safe_load((DEPLOY / "alerts" / "alertmanager.yml").read_text())
    for route in [cfg["route"], *cfg["route"].get("routes", [])]:
        for key, value in (("group_wait", "1s"), ("group_interval", "1s"), ("repeat_interval", "1h")):
            if key in route or route is cfg["route"]:
                route[key] = value
    (receiver,) = [r for r in cfg["receivers"] if r["name"] == "buildkit-actuator"]
    hook = receiver["webhook_configs"][0]
    hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    urls = [actuator_url] if isinstance(actuator_url, str) else actuator_url
    receiver["webhook_configs"] = [{**hook, "url": url} for url in urls]
    cfg["global"]["resolve_timeout"] = "5s"
    dst.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


class Alertmanager:
    def __init__(self, workdir: Path, config: Path, cluster_port: int | None = None, peers: tuple[int, ...] = ()):
        """One Alertmanager; with `cluster_port`, a member of a cluster on loopback with `peers`."""
        self.port = free_port()
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        assert binary, "prometheus-alertmanager is not installed (scripts/test installs it)"
        (workdir / "am-data").mkdir(exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        cluster = ["--cluster.listen-address="]
        if cluster_port:
            cluster = [f"--cluster.listen-address=127.0.0.1:{cluster_port}", "--cluster.advertise-address="
                       f"127.0.0.1:{cluster_port}", *(f"--cluster.peer=127.0.0.1:{p}" for p in peers)]
        self.proc = Process([binary, f"--config.file={config}", f"--storage.path={workdir / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{self.port}", *cluster],
                            workdir / "alertmanager.log")
        wait_for("Alertmanager", lambda: http_get(self.url + "/-/ready")[0] == 200, timeout=60)

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = json.loads(http_get(self.url + "/api/v2/alerts")[1])
        return alerts

    def stop(self) -> None:
        self.proc.stop()


class Prometheus:
    def __init__(self, workdir: Path, rules: Path, exporter: str, actuator: str | list[str],
                 alertmanager: str | list[str]):
        """Loads deploy/prometheus/prometheus.yml with its targets replaced and 1s intervals; alerts go
        to every Alertmanager given, as Prometheus sends them to each of an HA pair."""
        self.port = free_port()
        cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        cfg["global"]["scrape_interval"] = "1s"
        cfg["global"]["evaluation_interval"] = "1s"
        cfg["rule_files"] = [str(rules)]
        def listed(t: str | list[str]) -> list[str]:
            return [t] if isinstance(t, str) else list(t)

        cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = listed(alertmanager)
        targets = {"buildkit-cache-exporter": exporter, "buildkit-cache-actuator": actuator}
        for job in cfg["scrape_configs"]:
            job["static_configs"][0]["targets"] = listed(targets[job["job_name"]])
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (scripts/test installs it)"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Process([binary, f"--config.file={path}", f"--storage.tsdb.path={workdir / 'prom-data'}",
                             f"--web.listen-address=127.0.0.1:{self.port}"], workdir / "prometheus.log")
        wait_for("Prometheus", lambda: http_get(self.url + "/-/ready")[0] == 200, timeout=60)

    def api(self, path: str, **params: str) -> Any:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {status} {body[:500]}")
        return data["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == alertname
                and a["state"] == "firing"]

    def stop(self) -> None:
        self.proc.stop()


class Stack:
    """The exporter, the actuator, Alertmanager and Prometheus on one dockerd, wired as deploy/ wires
    them, with one builder (`default`) under a budget. Stops what it started if a start fails."""

    def __init__(self, dockerd: PrivateDockerd, workdir: Path, *, host: str, budget: int, interval: str, for_: str):
        token = workdir / "token"
        token.write_text(f"{host}-token\n")
        self.audit_path = workdir / "audit.jsonl"
        exporter_port, actuator_port = free_port(), free_port()
        self.exporter_target = f"127.0.0.1:{exporter_port}"
        self.metrics_url = f"http://{self.exporter_target}/metrics"
        self.actuator_url = f"http://127.0.0.1:{actuator_port}"
        cfg = workdir / "config.yml"
        cfg.write_text(yaml.safe_dump({
            "docker_hosts": [{"url": dockerd.url, "name": host}],
            "builders": {"default": {"budget": budget}},
            "exporter": {"listen": self.exporter_target, "intervals": {
                k: interval for k in ("discovery", "records", "gc_policy", "filesystem", "state_volume")}},
            "actuator": {"listen": f"127.0.0.1:{actuator_port}", "auth": {"bearer_token_file": str(token)},
                         "settle_delay": "1s", "audit_log": str(self.audit_path),
                         "state_file": str(workdir / "actuator-state.json")},
        }))
        self.procs: list[Any] = []
        try:
            self.procs.append(Service("buildkit_cache.exporter", ["--config", str(cfg)], workdir / "exporter.log"))
            self.procs.append(Service("buildkit_cache.actuator", ["--config", str(cfg)], workdir / "actuator.log"))
            wait_for("the exporter", lambda: http_get(self.metrics_url)[0] == 200)
            wait_for("the actuator", lambda: http_get(self.actuator_url + "/healthz")[0] == 200)
            self.am = Alertmanager(workdir, adapted_alertmanager(workdir / "alertmanager.yml",
                                                                 self.actuator_url + "/alerts", token))
            self.procs.append(self.am)
            self.prom = Prometheus(workdir, shortened_rules(workdir / "rules.yml", for_), self.exporter_target,
                                   f"127.0.0.1:{actuator_port}", f"127.0.0.1:{self.am.port}")
            self.procs.append(self.prom)
        except BaseException:
            self.stop()
            raise

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(x) for x in self.audit_path.read_text().splitlines()]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs = []
