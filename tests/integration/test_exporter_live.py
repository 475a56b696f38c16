"""The exporter as users run it: a long-lived process following a changing Docker host."""

from __future__ import annotations

import subprocess
import time

import pytest

from lab.procs import Service, free_port, http_get, value, wait_for
from tests.support import builder_container

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
  intervals: {{discovery: 1s, records: 1s, gc_policy: 1s, filesystem: 1s, state_volume: 1s}}
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


def test_builders_that_appear_stop_restart_and_vanish_are_followed(dockerd, builder_image, exporter):
    svc, url = exporter
    L = {"host": "test", "builder": "live"}
    container, volume = builder_container.start_builder(dockerd, "live0")
    try:
        wait_for("the new builder", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                   measurement="records", **L) == 1)
        assert value(scrape(url), "buildkit_cache_budget_bytes", **L) == 1e9
        dockerd.cli("stop", "-t", "0", container)
        wait_for("records to fail", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                   measurement="records", **L) == 0)
        dockerd.cli("start", container)
        wait_for("records to recover", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                      measurement="records", **L) == 1)
    finally:
        dockerd.cli("rm", "-f", container, check=False)
        dockerd.cli("volume", "rm", volume, check=False)
    wait_for("the builder to vanish", lambda: value(scrape(url), "buildkit_cache_builder_info", **L, driver="docker-container",
                                                     buildkit_version="v0.0.0+unknown", container=container,
                                                     volume=volume, address="") is None
             and 'builder="live"' not in scrape(url))
    log = svc.output()
    assert "found builder test/live (driver docker-container, container buildx_buildkit_live0)" in log
    assert "builder test/live is gone" in log


def test_promtool_accepts_a_real_scrape(dockerd, builder_image, build_cache, exporter):
    _, url = exporter
    container, volume = builder_container.start_builder(dockerd, "lint0")
    try:
        wait_for("the builder's gc policy", lambda: value(scrape(url), "buildkit_cache_gc_enabled",
                                                          host="test", builder="lint") is not None)
        text = scrape(url)
    finally:
        dockerd.cli("rm", "-f", container, check=False)
        dockerd.cli("volume", "rm", volume, check=False)
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


def test_a_hung_builder_costs_its_own_measurement_and_nothing_else(dockerd, builder_image, build_cache, exporter):
    """Its buildctl never answers: the exec's deadline frees the worker, the container's `timeout`
    kills the command, and the Docker host and the other builders stay fresh."""
    _, url = exporter
    container, volume = builder_container.start_builder(dockerd, "hung0")
    dockerd.cli("exec", container, "touch", "/fixtures/hang")
    try:
        H = {"host": "test", "builder": "hung"}
        wait_for("the hung builder's records to fail", lambda: value(scrape(url), "buildkit_cache_measurement_success",
                                                                       measurement="records", **H) == 0, timeout=60)
        most = 0
        for _ in range(20):  # several more rounds of the hung measurement
            time.sleep(1)
            hung = dockerd.cli("exec", container, "pgrep", "-f", "sleep 100000", check=False).stdout.decode().split()
            most = max(most, len(hung))
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
        dockerd.cli("rm", "-f", container, check=False)
        dockerd.cli("volume", "rm", volume, check=False)
