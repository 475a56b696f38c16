"""The exporter as users run it: a long-lived process following a changing Docker host."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from lab.procs import Service, free_port, http_get, value, wait_for
from tests.support import buildkit

pytestmark = pytest.mark.integration


@pytest.fixture
def exporter(dockerd, tmp_path):
    port = free_port()
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"""
docker_hosts:
  - url: {dockerd.url}
    name: test
    timeout: 3s
builders:
  live: {{budget: 1GB}}
exporter:
  listen: 127.0.0.1:{port}
  timeout: 5s
  intervals: {{discovery: 1s, records: 1s, gc_policy: 1s, filesystem: 1s, state_volume: 1s, refresh: 5s}}
""")
    svc = Service("buildkit_cache.exporter", ["--config", str(cfg)], tmp_path / "exporter.log")
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for("the exporter to serve", lambda: http_get(url)[0] == 200, timeout=30)
    yield svc, url
    assert svc.stop() == 0, svc.output()


def scrape(url: str) -> str:
    status, text = http_get(url)
    assert status == 200
    return text


def test_builders_that_appear_stop_restart_and_vanish_are_followed(dockerd, make_builder, exporter):
    svc, url = exporter
    L = {"host": "test", "builder": "live"}
    live = make_builder("live")
    wait_for("the new builder", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                               measurement="records", **L) == 1)
    assert value(scrape(url), "buildkit_cache_budget_bytes", **L) == 1e9
    dockerd.cli("stop", "-t", "5", live.container)
    wait_for("records to fail", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                               measurement="records", **L) == 0)
    dockerd.cli("start", live.container)
    buildkit.wait_ready(live)
    wait_for("records to recover", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                  measurement="records", **L) == 1)
    live.remove()
    wait_for("the builder to vanish", lambda: 'builder="live"' not in scrape(url))
    log = svc.output()
    assert "found builder test/live (driver docker-container, container buildx_buildkit_live0)" in log
    assert "builder test/live is gone" in log


def test_promtool_accepts_a_real_scrape(dockerd, make_builder, layer_contexts, build_cache, exporter):
    _, url = exporter
    lint = make_builder("lint")
    lint.build(layer_contexts[0])
    wait_for("the builder's gc policy", lambda: value(scrape(url), "buildkit_cache_gc_enabled",
                                                      host="test", builder="lint") is not None)
    text = scrape(url)
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_dockerd_going_down_shows_success_0_and_recovers_without_restart(build_cache, exporter):
    dockerd = build_cache
    svc, url = exporter
    L = {"host": "test", "builder": "default"}
    wait_for("records", lambda: value(scrape(url), "buildkit_cache_measurement_success", measurement="records", **L) == 1)
    before = value(scrape(url), "buildkit_cache_measurement_last_success_timestamp_seconds", measurement="records", **L)
    dockerd.stop()
    try:
        wait_for("records to fail", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                   measurement="records", **L) == 0, timeout=60)
        wait_for("the host to be down", lambda: value(scrape(url), "buildkit_cache_docker_host_up", host="test") == 0)
        # Scrapes stay fast and complete while Docker is down: served from the snapshot.
        t0 = time.monotonic()
        text = scrape(url)
        assert time.monotonic() - t0 < 1.0
        assert value(text, "buildkit_cache_size_bytes", record_type="regular", state="shared", **L) is None
        assert value(text, "buildkit_cache_measurement_last_success_timestamp_seconds", measurement="records", **L) >= before
    finally:
        dockerd.start()
    wait_for("records to recover", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                  measurement="records", **L) == 1, timeout=60)
    wait_for("the host to be up", lambda: value(scrape(url), "buildkit_cache_docker_host_up", host="test") == 1)
    assert svc.proc.poll() is None
    log = svc.output()
    assert "docker host test: discovery failed" in log
    assert "docker host test: reachable again" in log


def test_a_hung_builder_costs_its_own_measurement_and_nothing_else(dockerd, make_builder, build_cache, exporter):
    """A real buildkitd that stops answering (SIGSTOP: it takes connections and answers nothing),
    found at the next safety refresh (`refresh`, 5s here; its databases do not change): the exec's
    deadline frees the worker, the container's `timeout` kills the buildctl, no second one is
    started beside a hung first, and the Docker host and the other builders stay fresh."""
    _, url = exporter
    hung = make_builder("hung")
    H = {"host": "test", "builder": "hung"}
    wait_for("the builder measured", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                   measurement="records", **H) == 1, timeout=60)
    pid = hung.freeze()
    try:
        wait_for("the hung builder's records to fail", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                                       measurement="records", **H) == 0, timeout=60)
        most = 0
        for _ in range(20):  # several more rounds of the hung measurement
            time.sleep(1)
            du = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).startswith("buildctl du")
                  and _in_container(p, hung.container, dockerd)]
            most = max(most, len(du))
        assert most <= 1, f"{most} hung buildctl at once: a second one was started beside the first"
        text = scrape(url)
        assert value(text, "buildkit_cache_measurement_consecutive_failures", measurement="records", **H) >= 2
        assert value(text, "buildkit_cache_docker_host_up", host="test") == 1
        D = {"host": "test", "builder": "default", "measurement": "records"}
        assert value(text, "buildkit_cache_measurement_success", **D) == 1
        age = time.time() - value(text, "buildkit_cache_measurement_last_success_timestamp_seconds", **D)
        assert age < 10, f"the engine's records are {age:.0f}s old"
        # Its other measurements go on too.
        assert value(text, "buildkit_cache_measurement_success", measurement="state_volume", **H) == 1
    finally:
        hung.thaw(pid)
    wait_for("records to recover", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                  measurement="records", **H) == 1, timeout=90)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


_container_ids: dict[str, str] = {}


def _in_container(proc: Path, container: str, dockerd) -> bool:
    """Whether a process runs in that container: its cgroup names the container's id."""
    if container not in _container_ids:
        _container_ids[container] = dockerd.cli("inspect", "-f", "{{.Id}}", container).stdout.decode().strip()
    try:
        return _container_ids[container] in (proc / "cgroup").read_text()
    except OSError:
        return False
