"""The exporter collects in a process of its own (exporter/collector.py): the server's replica of the
store follows it, a collector that dies is replaced without the server stopping, and a server
that is killed takes its collector with it."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from lab.procs import ROOT, Process, Service, free_port, http_get, value, wait_for

DF = ROOT / "tests/fixtures/docker-engine-28.5/system-df-build-cache.json"


def collectors(pid: int) -> list[int]:
    """The exporter's collector process(es): children started by multiprocessing's spawn."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def exporter_on_standin(tmp_path: Path, df: Path, intervals: str) -> tuple[Process, Service, str, Path]:
    """The exporter as users run it, against a stand-in engine answering /system/df with `df`:
    (engine, exporter, its /metrics URL, the engine's request log)."""
    sock, requests = tmp_path / "engine.sock", tmp_path / "requests.jsonl"
    engine = Process([sys.executable, "-m", "lab.standin_engine", "--socket", str(sock), "--df", str(df),
                      "--api", "1.47", "--root", str(tmp_path), "--requests", str(requests)], tmp_path / "engine.log")
    wait_for("the stand-in engine", sock.exists)
    port = free_port()
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"docker_hosts: [{{url: 'unix://{sock}', name: standin}}]\n"
                   f"exporter: {{listen: '127.0.0.1:{port}', intervals: {{{intervals}}}}}\n")
    svc = Service("buildkit_cache.exporter", ["--config", str(cfg)], tmp_path / "exporter.log")
    return engine, svc, f"http://127.0.0.1:{port}/metrics", requests


def test_a_dead_collector_is_replaced_and_a_killed_server_takes_it_along(tmp_path):
    engine, svc, url, _ = exporter_on_standin(tmp_path, DF, "records: 1s, discovery: 1s")
    L = {"host": "standin", "builder": "default", "measurement": "records"}

    def last_success() -> float:
        return value(http_get(url)[1], "buildkit_cache_measurement_last_success_timestamp_seconds", **L) or 0.0

    try:
        wait_for("records", lambda: http_get(url)[0] == 200 and last_success() > 0, timeout=60)
        (first,) = collectors(svc.proc.pid)
        os.kill(first, signal.SIGKILL)
        killed_at = time.time()
        wait_for("the server to say so", lambda: "the collector process ended" in svc.output(), timeout=30)
        assert http_get(url)[0] == 200  # serving all along, the last results kept
        wait_for("fresh records from a new collector", lambda: last_success() > killed_at, timeout=60)
        (second,) = collectors(svc.proc.pid)
        assert second != first and svc.proc.poll() is None
        svc.proc.kill()  # no clean-up of its own: the collector notices at its next write
        svc.proc.wait()
        wait_for("the collector to end with its server", lambda: not alive(second), timeout=30)
    finally:
        svc.stop()
        engine.stop()


def test_a_large_builder_is_measured_again_and_again_from_the_collector(tmp_path):
    """Past 5,000 records, records run in a child of the collector (exporter/child.py)."""
    import json

    recorded = json.loads(DF.read_text())
    items = [dict(recorded["BuildCache"][i % len(recorded["BuildCache"])], ID=f"r{i}") for i in range(6000)]
    df = tmp_path / "df.json"
    df.write_text(json.dumps({**recorded, "BuildCache": items}))
    engine, svc, url, requests = exporter_on_standin(tmp_path, df, "records: 1s")
    L = {"host": "standin", "builder": "default"}
    try:
        def runs() -> int:
            return sum(1 for line in requests.read_text().splitlines() if "/system/df" in line) \
                if requests.exists() else 0

        wait_for("four records measurements", lambda: runs() >= 4, timeout=60)
        text = http_get(url)[1]
        assert value(text, "buildkit_cache_measurement_success", measurement="records", **L) == 1, svc.output()
        count = sum(value(text, "buildkit_cache_records", record_type=t, state=s, **L) or 0
                    for t in ("regular", "source.local", "exec.cachemount") for s in ("in_use", "shared", "reclaimable"))
        assert count == 6000
        assert "failed" not in svc.output()
    finally:
        svc.stop()
        engine.stop()


def test_the_server_process_never_loads_the_docker_sdk():
    """The SDK (with paramiko and cryptography: ~25 MB) is the collector's alone."""
    import subprocess

    code = ("import sys, buildkit_cache.exporter.cli, buildkit_cache.exporter.collector, buildkit_cache.exporter.metrics;"
            "print(sorted(m for m in ('docker', 'paramiko', 'requests') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"
