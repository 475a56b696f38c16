"""deploy/kamal/accessories.yml runs the same containers as deploy/docker-compose.yml: both are turned
into the `docker run` settings they stand for (Kamal: `options` become `--<name> <value>`, `files` and
`volumes` become bind mounts, `network` becomes --network) and compared."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from buildkit_cache.config import load
from lab.procs import ROOT

DEPLOY = ROOT / "deploy"
KAMAL = yaml.safe_load((DEPLOY / "kamal" / "accessories.yml").read_text())["accessories"]
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
PAIRS = [("exporter", "buildkit-cache-exporter"), ("actuator", "buildkit-cache-actuator")]
SOCKET_GROUP = "<the Docker socket's group>"


def _mount(spec: str) -> tuple[str, str, bool]:
    """(target, source, read-only) of a short-syntax mount; named volumes' sources are 'volume'."""
    source, target, *opts = spec.split(":")
    named = not source.startswith(("/", "."))
    return target, "volume" if named else source, "ro" in ",".join(opts).split(",")


def _group(value: object) -> str:
    text = str(value)
    # compose: ${DOCKER_GID:?...}; Kamal: the number. Both are the socket's group on that host.
    if text.startswith("${DOCKER_GID") or re.fullmatch(r"\d+", text):
        return SOCKET_GROUP
    return text


def compose_settings(name: str) -> dict:
    svc = dict(COMPOSE[name])
    svc.update({k: v for k, v in (COMPOSE[name].get("<<") or {}).items() if k not in svc})
    mounts = {}
    for spec in svc.get("volumes", []):
        target, source, ro = _mount(spec)
        # Files the user provides next to the compose file; Kamal uploads its own copies.
        mounts[target] = ("file" if source.startswith("./") else source, ro)
    return {
        "image": svc["image"].rsplit("/", 1)[-1].split(":")[0],
        "user": svc.get("user"),
        "group_add": sorted(_group(g) for g in svc.get("group_add", [])),
        "network": svc.get("network_mode"),
        "entrypoint": svc.get("entrypoint"),
        "command": svc.get("command"),
        "stop_seconds": int(str(svc["stop_grace_period"]).rstrip("s")) if "stop_grace_period" in svc else None,
        "mounts": mounts,
    }


def kamal_settings(name: str) -> dict:
    acc = KAMAL[name]
    options = acc.get("options") or {}
    mounts = {}
    for f in acc.get("files", []):
        if isinstance(f, dict):
            mounts[f["remote"]] = ("file", "ro" in str(f.get("options", "")).split(","))
        else:
            target, _, ro = _mount(f)
            mounts[target] = ("file", ro)
    for spec in acc.get("volumes", []):
        target, source, ro = _mount(spec)
        mounts[target] = (source, ro)
    entry = options.get("entrypoint")
    return {
        "image": acc["image"].rsplit("/", 1)[-1].split(":")[0],
        "user": options.get("user"),
        "group_add": sorted(_group(g) for g in ([options["group-add"]] if "group-add" in options else [])),
        "network": acc.get("network"),
        "entrypoint": [entry] if entry else None,
        "command": shlex.split(acc["cmd"]) if acc.get("cmd") else None,
        "stop_seconds": int(options["stop-timeout"]) if "stop-timeout" in options else None,
        "mounts": mounts,
    }


@pytest.mark.parametrize(("service", "accessory"), PAIRS)
def test_the_kamal_accessory_runs_the_compose_service_container(service, accessory):
    assert kamal_settings(accessory) == compose_settings(service)


def test_the_mapping_sees_what_differs():
    """The comparison is not blind: a changed mount or a missing group shows."""
    k = kamal_settings("buildkit-cache-actuator")
    c = compose_settings("actuator")
    assert c["group_add"] == [SOCKET_GROUP] and c["user"] is None
    assert c["mounts"]["/var/log/buildkit-cache-actuator"] == ("volume", False)
    KAMAL["buildkit-cache-actuator"]["options"].pop("group-add")
    try:
        assert kamal_settings("buildkit-cache-actuator") != c
    finally:
        KAMAL["buildkit-cache-actuator"]["options"]["group-add"] = "988"
    assert kamal_settings("buildkit-cache-actuator") == k


def test_the_kamal_snippet_names_the_builder_as_kamal_2_does():
    """Kamal 2: kamal-remote-<remote with each non-alphanumeric replaced by ->; its comment's example
    is what config.example.yml configures."""
    text = (DEPLOY / "kamal" / "accessories.yml").read_text()
    remote = "ssh://root@10.0.0.5"
    name = "kamal-remote-" + re.sub(r"[^A-Za-z0-9]", "-", remote)
    assert name == "kamal-remote-ssh---root-10-0-0-5" and name in text
    example = load(DEPLOY / "config.example.yml")
    assert name in {n for _, n in example.builder_settings()}
