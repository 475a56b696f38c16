"""A Docker host reached over ssh:// as users configure it: sshd on loopback leads to the private
dockerd; the exporter measures its builders and the actuator prunes through it."""

from __future__ import annotations

import json
import time

import pytest

from buildkit_cache.config import parse_config
from buildkit_cache.docker_api import DockerHost
from buildkit_cache.errors import Unavailable
from buildkit_cache.exporter.collect import collect_once as collect_snapshot
from buildkit_cache.exporter.metrics import registry_for
from buildkit_cache.inventory import Inventory
from lab.procs import Service, free_port, http_get, wait_for
from lab.sshd import LoopbackSSHD
from tests.conftest import engine_get
from tests.integration.test_actuator_docker import TOKEN, notification

pytestmark = pytest.mark.integration


@pytest.fixture
def sshd(dockerd, tmp_path):
    s = LoopbackSSHD(tmp_path / "ssh", dockerd.socket)
    yield s
    s.stop()


async def test_an_ssh_host_is_measured_through_sshd(build_cache, make_builder, layer_contexts, sshd, monkeypatch):
    dockerd = build_cache
    viassh = make_builder("viassh")
    viassh.build(layer_contexts[0])
    du = viassh.settle()
    monkeypatch.setenv("PATH", sshd.path)
    cfg = parse_config({"docker_hosts": [{"url": sshd.url, "name": "remote"}]})
    store = await collect_snapshot(cfg, Inventory(cfg))
    reg = registry_for(store, cfg)
    assert reg.get_sample_value("buildkit_cache_docker_host_up", {"host": "remote"}) == 1, store.hosts
    raw = engine_get(dockerd, "/system/df")["BuildCache"]
    total = sum(v.value for fam in reg.collect() if fam.name == "buildkit_cache_size_bytes" for v in fam.samples
                if v.labels["builder"] == "default")
    assert total == sum(r["Size"] for r in raw) > 0
    # The remote host's files are not visible here: the state volume is measured inside the builder.
    L = {"host": "remote", "builder": "viassh"}
    assert reg.get_sample_value("buildkit_cache_measurement_success", {**L, "measurement": "state_volume"}) == 1
    assert reg.get_sample_value("buildkit_cache_state_volume_files", L) > 10
    # Its records: buildctl du through docker exec, over ssh.
    got = sum(v.value for fam in reg.collect() if fam.name == "buildkit_cache_size_bytes" for v in fam.samples
              if v.labels["builder"] == "viassh")
    assert got == sum(r["size"] for r in du) > 0




def test_an_exec_over_ssh_is_read_to_the_end_and_stops_at_its_deadline(dockerd, make_builder, sshd, monkeypatch):
    """Over ssh:// an exec's output comes through the ssh client's pipe. It is read whole, the
    client's exit afterwards is no failure, and a command that never ends costs its deadline only
    (the SDK's reader would wait on the pipe for ever)."""
    container = make_builder("sshexec").container
    monkeypatch.setenv("PATH", sshd.path)
    host = DockerHost("remote", sshd.url, timeout=10)
    for _ in range(5):  # each exec ends its ssh client; the next must not trip over it
        big = host.exec(container, ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x; echo err >&2"])
        assert (big.exit_code, len(big.stdout), big.stderr) == (0, 300000, "err\n")
    started = time.monotonic()
    with pytest.raises(Unavailable, match="did not finish within 2s"):
        host.exec(container, ["sleep", "1000"], timeout=2)
    assert time.monotonic() - started < 8
    assert host.exec(container, ["sh", "-c", ":"]).exit_code == 0  # and the host is usable after it


def test_the_actuator_prunes_through_sshd(big_cache, sshd, tmp_path):
    dockerd = big_cache
    port = free_port()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    audit = tmp_path / "audit.jsonl"
    cfg = tmp_path / "actuator.yml"
    cfg.write_text(json.dumps({
        "docker_hosts": [{"url": sshd.url, "name": "test"}],
        "builders": {"default": {"budget": 12_000_000}},
        "actuator": {"listen": f"127.0.0.1:{port}", "auth": {"bearer_token_file": str(token)}, "settle_delay": "1s",
                     "audit_log": str(audit), "state_file": str(tmp_path / "state.json")},
    }))
    svc = Service("buildkit_cache.actuator", ["--config", str(cfg)], tmp_path / "actuator.log",
                  env={"PATH": sshd.path})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the actuator", lambda: http_get(url + "/healthz")[0] == 200, timeout=30)
        import urllib.request

        req = urllib.request.Request(url + "/alerts", data=json.dumps(notification("prune-to-budget", "default")).encode(),
                                     method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        wait_for("the prune", lambda: audit.exists() and '"event":"pruned"' in audit.read_text(), timeout=90)
    finally:
        assert svc.stop() == 0, svc.output()
    unshared = sum(r["Size"] for r in engine_get(dockerd, "/system/df")["BuildCache"] if not r["Shared"])
    assert 12_000_000 // 3 <= unshared <= 12_000_000
