"""`buildkit-cache-actuator` as a process: refusing unsafe starts, bad secrets, TLS with client certs."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from lab.procs import ROOT, Service, free_port, wait_for
from tests.support.pki import make_pki

pytestmark = pytest.mark.slow  # starts the programs as processes (and waits out a 15 s header timeout)


def run(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "buildkit_cache.actuator", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_refuses_to_start_without_authentication(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"actuator: {{listen: '127.0.0.1:{free_port()}'}}\n")
    done = run("--config", str(cfg))
    assert done.returncode == 2
    assert "refusing to start without authentication" in done.stderr
    assert "--insecure-no-auth" in done.stderr


def test_an_unreadable_or_empty_token_file_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"actuator: {{auth: {{bearer_token_file: {tmp_path}/missing}}}}\n")
    done = run("--config", str(cfg))
    assert done.returncode == 2
    assert f"actuator.auth.bearer_token_file: cannot read {tmp_path}/missing: No such file or directory" in done.stderr
    (tmp_path / "empty").write_text("\n")
    cfg.write_text(f"actuator: {{auth: {{bearer_token_file: {tmp_path}/empty}}}}\n")
    done = run("--config", str(cfg))
    assert done.returncode == 2 and "is empty" in done.stderr


def test_check_config_shows_loopback_default_and_actions(tmp_path):
    cfg = tmp_path / "c.yml"
    (tmp_path / "token").write_text("t\n")
    cfg.write_text(f"docker_hosts: [unix://{tmp_path}/none.sock]\nactuator:\n  auth: {{bearer_token_file: {tmp_path}/token}}\n"
                   "  actions:\n    nightly: {kind: prune-idle, idle_for: 1d}\n")
    done = run("--config", str(cfg), "--check-config")
    assert done.returncode == 0, done.stderr
    eff = yaml.safe_load(done.stdout)["actuator"]
    assert eff["listen"] == "127.0.0.1:9863"
    assert eff["actions"]["nightly"] == {"kind": "prune-idle", "idle_for": "1d", "enabled": True}
    bad = run("--config", str(ROOT / "tests/fixtures/buildctl/du.json"), "--check-config")
    assert bad.returncode == 2 and "(top level): expected a mapping" in bad.stderr


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki")


def test_tls_with_client_certificates(tmp_path, pki: Path):
    port = free_port()
    token = tmp_path / "token"
    token.write_text("tok\n")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"""
docker_hosts: ["unix://{tmp_path}/no-docker.sock"]
actuator:
  listen: 127.0.0.1:{port}
  auth: {{bearer_token_file: {token}}}
  tls: {{cert_file: {pki}/server.pem, key_file: {pki}/server.key, client_ca_file: {pki}/ca.pem}}
  state_file: {tmp_path}/state.json
""")
    svc = Service("buildkit_cache.actuator", ["--config", str(cfg)], tmp_path / "actuator.log")
    url = f"https://127.0.0.1:{port}/alerts"
    body = json.dumps({"version": "4", "status": "resolved", "alerts": []}).encode()

    def post(ctx):
        req = urllib.request.Request(url, data=body, method="POST", headers={"Authorization": "Bearer tok"})
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status

    with_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with_cert.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    without_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    try:
        assert wait_for("the actuator over TLS", lambda: post(with_cert) == 200, timeout=30)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            post(without_cert)
    finally:
        assert svc.stop() == 0, svc.output()
    assert "listening on https://127.0.0.1" in svc.output()


def test_check_config_catches_what_start_up_would(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"actuator: {{auth: {{bearer_token_file: {tmp_path}/missing}}}}\n")
    done = run("--config", str(cfg), "--check-config")
    assert done.returncode == 2 and done.stdout == ""
    assert f"actuator.auth.bearer_token_file: cannot read {tmp_path}/missing" in done.stderr


@pytest.mark.parametrize("program", ["buildkit_cache.exporter", "buildkit_cache.actuator"])
def test_a_remote_builder_without_a_buildctl_is_said_at_check_and_at_start(tmp_path, program):
    (tmp_path / "token").write_text("t\n")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"docker_hosts: [unix://{tmp_path}/none.sock]\n"
                   "builders: {ci: {address: 'tcp://10.0.0.9:1234', budget: 1GB}}\n"
                   f"exporter: {{buildctl: {tmp_path}/no-buildctl, listen: '127.0.0.1:{free_port()}'}}\n"
                   f"actuator: {{auth: {{bearer_token_file: {tmp_path}/token}}, listen: '127.0.0.1:{free_port()}', "
                   f"state_file: {tmp_path}/state.json}}\n")
    done = subprocess.run([sys.executable, "-m", program, "--config", str(cfg), "--check-config"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 0, done.stderr
    said = f"remote builders 10.0.0.9/ci need a local buildctl, and '{tmp_path}/no-buildctl' is not found"
    assert said in done.stderr and "exporter.buildctl" in done.stderr, done.stderr
    svc = Service(program, ["--config", str(cfg)], tmp_path / "out.log")
    try:
        wait_for("the warning", lambda: said in svc.output(), timeout=20)
    finally:
        svc.stop()
    # With a buildctl there, nothing is said.
    (tmp_path / "no-buildctl").write_text("#!/bin/sh\n")
    (tmp_path / "no-buildctl").chmod(0o755)
    done = subprocess.run([sys.executable, "-m", program, "--config", str(cfg), "--check-config"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert done.returncode == 0 and "buildctl" not in done.stderr, done.stderr


def test_half_sent_requests_are_closed_and_good_ones_answered_meanwhile(tmp_path):
    """Slow-loris: connections that never finish their headers hold nothing for long (HEADER_TIMEOUT),
    and a good request gets through while they are open."""
    import socket
    import time

    from buildkit_cache.cli_support import HEADER_TIMEOUT

    (tmp_path / "token").write_text("t\n")
    port = free_port()
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"docker_hosts: [unix://{tmp_path}/none.sock]\n"
                   f"actuator: {{auth: {{bearer_token_file: {tmp_path}/token}}, listen: '127.0.0.1:{port}', "
                   f"state_file: {tmp_path}/state.json}}\n")
    svc = Service("buildkit_cache.actuator", ["--config", str(cfg)], tmp_path / "out.log")
    slow = []
    try:
        wait_for("the actuator", lambda: "listening on" in svc.output(), timeout=20)
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /alerts HTTP/1.1\r\nHost: x\r\nContent-Le")
            slow.append(s)
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
        assert time.monotonic() - started < 2
        time.sleep(HEADER_TIMEOUT + 3)
        closed = 0
        for s in slow:
            s.settimeout(1)
            try:
                closed += s.recv(100) == b""
            except (ConnectionResetError, TimeoutError):
                closed += 0
        assert closed == len(slow), f"{closed} of {len(slow)} half-sent requests closed"
    finally:
        for s in slow:
            s.close()
        svc.stop()


def test_secrets_are_never_logged(tmp_path):
    """Neither the configured token nor a wrong one a sender tries ends up in the log or the audit trail."""
    secret, wrong = "s3cret-Zq81-token", "guess-Kp27-token"
    (tmp_path / "token").write_text(secret + "\n")
    port = free_port()
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"docker_hosts: [unix://{tmp_path}/none.sock]\n"
                   f"actuator: {{auth: {{bearer_token_file: {tmp_path}/token}}, listen: '127.0.0.1:{port}', "
                   f"state_file: {tmp_path}/state.json, audit_log: {tmp_path}/audit.jsonl}}\n")
    svc = Service("buildkit_cache.actuator", ["--config", str(cfg), "--log-level", "debug"], tmp_path / "out.log")
    try:
        wait_for("the actuator", lambda: "listening on" in svc.output(), timeout=20)
        for token in (secret, wrong):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", method="POST",
                                         data=b'{"status":"resolved","alerts":[]}',
                                         headers={"Authorization": f"Bearer {token}"})
            try:
                urllib.request.urlopen(req, timeout=5).close()
            except urllib.error.HTTPError as e:
                assert e.code == 401
    finally:
        svc.stop()
    check = run("--config", str(cfg), "--check-config")
    seen = svc.output() + (tmp_path / "audit.jsonl").read_text() + check.stdout + check.stderr
    assert '"event":"rejected"' in seen and '"event":"received"' in seen
    assert secret not in seen and wrong not in seen


def test_cooldowns_are_shown_and_cleared_safely_with_an_audit_line(tmp_path):
    import time

    from buildkit_cache.actuator.state import Entry, StateFile

    state, audit = tmp_path / "state.json", tmp_path / "audit.jsonl"
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"actuator: {{state_file: '{state}', audit_log: '{audit}', cooldown: 1h}}\n")
    now = time.time()
    with StateFile(str(state), time.time).locked() as shared:
        shared.put(("local", "default", "prune-to-budget"), Entry(now - 600, False, now - 500, "gone"))
        shared.put(("local", "ci", "prune-all"), Entry(now - 5, True, now + 600, "another"))
    shown = run("--config", str(cfg), "--cooldowns")
    assert shown.returncode == 0, shown.stderr
    assert "local/default" in shown.stdout and ("cooldown, 2999s left" in shown.stdout or "cooldown, 3000s left" in shown.stdout)
    assert "local/ci" in shown.stdout and "running or queued" in shown.stdout

    done = run("--config", str(cfg), "--clear-cooldown", "local/default")
    assert done.returncode == 0 and done.stdout.strip() == "cleared: local/default prune-to-budget"
    line = json.loads(audit.read_text().splitlines()[-1])
    assert line["event"] == "cooldown_cleared" and (line["host"], line["builder"], line["action"]) == (
        "local", "default", "prune-to-budget")
    # A prune still running keeps its claim: clearing it could start a second one.
    done = run("--config", str(cfg), "--clear-cooldown", "local/ci/prune-all")
    assert done.returncode == 1 and "still running" in done.stderr
    with StateFile(str(state), time.time).locked() as shared:
        assert list(shared.entries) == [("local", "ci", "prune-all")]
    done = run("--config", str(cfg), "--clear-cooldown", "default")
    assert done.returncode == 2 and "HOST/BUILDER" in done.stderr


def test_a_token_file_readable_by_everyone_is_warned_about(tmp_path):
    import os

    token = tmp_path / "token"
    token.write_text("a-token-of-some-length\n")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"docker_hosts: [unix://{tmp_path}/none.sock]\nactuator: {{auth: {{bearer_token_file: {token}}}}}\n")
    os.chmod(token, 0o644)
    assert "is readable by every user (mode 0644)" in run("--config", str(cfg), "--check-config").stderr
    os.chmod(token, 0o640)
    assert "readable by every user" not in run("--config", str(cfg), "--check-config").stderr


def test_sighup_drains_and_stops_like_sigterm(tmp_path):
    """L1: SIGHUP (a closed terminal, `systemctl kill -s HUP`) is no sudden death: the actuator stops
    as on SIGTERM, exit 0 (a supervisor's restart takes a new config)."""
    import signal

    port = free_port()
    token = tmp_path / "token"
    token.write_text("tok\n")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"docker_hosts: ['unix://{tmp_path}/no-docker.sock']\n"
                   f"actuator: {{listen: '127.0.0.1:{port}', auth: {{bearer_token_file: {token}}}, "
                   f"state_file: {tmp_path}/state.json}}\n")
    svc = Service("buildkit_cache.actuator", ["--config", str(cfg)], tmp_path / "actuator.log")
    wait_for("the actuator to listen", lambda: "listening on" in svc.output(), timeout=30)
    svc.proc.send_signal(signal.SIGHUP)
    assert svc.proc.wait(timeout=30) == 0, svc.output()
    assert "shutting down" in svc.output()


def test_a_tls_client_that_never_says_hello_is_dropped_after_the_header_timeout(tmp_path, pki: Path):
    """L1: asyncio's own default is 60 s; the actuator holds a silent TLS connection as long as a
    silent plain one, 15 s."""
    import socket
    import time

    port = free_port()
    token = tmp_path / "token"
    token.write_text("tok\n")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"docker_hosts: ['unix://{tmp_path}/no-docker.sock']\n"
                   f"actuator: {{listen: '127.0.0.1:{port}', auth: {{bearer_token_file: {token}}}, "
                   f"tls: {{cert_file: {pki}/server.pem, key_file: {pki}/server.key}}, state_file: {tmp_path}/s.json}}\n")
    svc = Service("buildkit_cache.actuator", ["--config", str(cfg)], tmp_path / "actuator.log")
    try:
        wait_for("the actuator to listen", lambda: "listening on" in svc.output(), timeout=30)
        silent = socket.create_connection(("127.0.0.1", port))
        silent.settimeout(40)
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server, having said nothing
        assert 13 < time.monotonic() - started < 20
        silent.close()
    finally:
        svc.stop()


def test_cooldowns_without_a_config_read_the_services_or_say_which_flag_to_pass(tmp_path, monkeypatch):
    from buildkit_cache.actuator import cli

    missing = tmp_path / "no-such-config.yml"
    monkeypatch.setattr(cli, "SERVICE_CONFIG", str(missing))
    for args in (["--cooldowns"], ["--clear-cooldown", "local/default"]):
        assert cli.main(args) == 2
    # With the service's config in place, it is the one read: its state file's folder is named.
    missing.write_text(f"actuator: {{state_file: '{tmp_path}/nowhere/state.json'}}\n")
    assert cli.main(["--cooldowns"]) == 2


def test_a_state_file_that_was_never_made_says_to_pass_the_services_config(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"actuator: {{state_file: '{tmp_path}/nowhere/state.json'}}\n")
    done = run("--config", str(cfg), "--cooldowns")
    assert done.returncode == 2
    assert "does not exist: has the actuator run with this config? Pass --config FILE" in done.stderr
    assert "No such file" not in done.stderr
