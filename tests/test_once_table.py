"""`--once` for people: a table per host, a line per builder, human units, and a last line that says
what failed; `--format prometheus` gives what /metrics serves."""

from __future__ import annotations

import pytest

from buildkit_cache.config import parse_config
from buildkit_cache.exporter import table
from buildkit_cache.exporter.collect import Collection, HostState
from tests.support.recorded import RecordedBuilder, StaticInventory

CLOCK = 1795363200.0 + 30 * 86400  # a month after the recorded cache was last used


async def test_one_line_per_builder_in_human_units_and_what_failed():
    cfg = parse_config({"docker_hosts": [{"url": "unix:///nonexistent/docker.sock", "name": "h1"}],
                        "builders": {"kamal": {"budget": "30MB"}, "ci": {"budget": "1GB"}}})
    c = Collection(cfg, StaticInventory([RecordedBuilder("kamal"), RecordedBuilder("ci", broken={"records"})]),
                   clock=lambda: CLOCK)
    try:
        snap = await c.collect_once()
    finally:
        c.close()
    snap = type(snap)(snap.builders, {"h1": HostState(True, version="28.5.2", api_version="1.51")})
    text = table.render(snap, cfg, ["h1/ci records: container is not running"])
    lines = text.splitlines()
    assert lines[0] == "host h1 (Docker 28.5.2, API 1.51)"
    header, ci, kamal = lines[1].split(), lines[2], lines[3]
    assert header[:5] == ["BUILDER", "DRIVER", "RECORDS", "TOTAL", "RECLAIMABLE"]
    # The recorded cache: 19 records, 44.96 MB (buildctl du's own total), all reclaimable and a month idle.
    assert kamal.split()[:6] == ["kamal", "docker-container", "19", "45MB", "45MB", "45MB"]
    assert "46.4MB" in kamal and "1,234" in kamal  # the state volume: du -sk's 45272 KiB, its files
    assert "15MB over" in kamal  # against its 30MB budget
    assert ci.split()[:6] == ["ci", "docker-container", "-", "-", "-", "-"]
    assert lines[-1] == "failed: 1: h1/ci records: container is not running"
    assert "e+0" not in text  # no exposition-style numbers


@pytest.mark.slow  # starts the program
def test_once_in_prometheus_format_is_what_metrics_serves(tmp_path):
    """The same engine, asked by `--once --format prometheus` and by the server: the same families,
    label sets and values, but for when and how long each measurement ran."""
    import re
    import sys

    from lab.procs import ROOT, Process, Service, free_port, http_get, samples, wait_for

    df = ROOT / "tests/fixtures/docker-engine-28.5/system-df-build-cache.json"
    sock = tmp_path / "engine.sock"
    engine = Process([sys.executable, "-m", "lab.standin_engine", "--socket", str(sock), "--df", str(df),
                      "--api", "1.47", "--root", str(tmp_path)], tmp_path / "engine.log")
    port = free_port()
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"docker_hosts: [{{url: 'unix://{sock}', name: standin}}]\n"
                   f"builders: {{default: {{budget: 1GB}}}}\nexporter: {{listen: '127.0.0.1:{port}'}}\n")
    try:
        wait_for("the stand-in engine", sock.exists)
        import subprocess

        once = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--config", str(cfg), "--once",
                               "--format", "prometheus"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        svc = Service("buildkit_cache.exporter", ["--config", str(cfg)], tmp_path / "exporter.log")
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            wait_for("records", lambda: "buildkit_cache_size_bytes{" in http_get(url)[1], timeout=30)
            served = http_get(url)[1]
        finally:
            svc.stop()
    finally:
        engine.stop()

    def comparable(text):
        # When and how long, and the free space of a live filesystem (this test writes its logs
        # there), differ between two runs; the rest is the same collection rendered the same way.
        moving = re.compile(r"measurement_(duration_seconds|last_success_timestamp_seconds)$|_(avail_bytes|files_free)$")
        return {k: (None if moving.search(k[0]) else v) for k, v in samples(text).items()}

    assert comparable(once.stdout) == comparable(served)
    assert re.findall(r"^# (?:HELP|TYPE) .*$", once.stdout, re.M) == re.findall(r"^# (?:HELP|TYPE) .*$", served, re.M)
