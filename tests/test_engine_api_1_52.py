"""The exporter against API 1.52 (Docker 29), which no engine here runs: a stand-in engine serves
replies built from the documented schema (tests/fixtures/docker-engine-1.52-schema/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.procs import ROOT, Process, samples, wait_for

SCHEMA = ROOT / "tests/fixtures/docker-engine-1.52-schema"


@pytest.fixture
def standin(tmp_path):
    procs = []

    def start(df_file: Path) -> tuple[str, Path]:
        sock, requests = tmp_path / f"engine-{len(procs)}.sock", tmp_path / f"requests-{len(procs)}.jsonl"
        procs.append(Process([sys.executable, "-m", "lab.standin_engine", "--socket", str(sock), "--df", str(df_file),
                              "--api", "1.52", "--requests", str(requests)], tmp_path / "standin.log"))
        wait_for("the stand-in engine", lambda: sock.exists())
        return f"unix://{sock}", requests

    yield start
    for p in procs:
        p.stop()


def once(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--once", "--format", "prometheus", "--docker-host", url],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_on_api_1_52_records_are_asked_for_with_verbose_and_read_from_build_cache_usage(standin):
    url, requests = standin(SCHEMA / "system-df-verbose.json")
    done = once(url)
    # The stand-in's data root is not on this machine: only the filesystem measurement fails.
    got = samples(done.stdout)
    L = {"host": "local", "builder": "default"}
    assert got[("buildkit_cache_measurement_success", frozenset({**L, "measurement": "records"}.items()))] == 1
    items = json.loads((SCHEMA / "system-df-verbose.json").read_text())["BuildCacheUsage"]["Items"]
    total = sum(v for (name, labels), v in got.items() if name == "buildkit_cache_size_bytes")
    count = sum(v for (name, labels), v in got.items() if name == "buildkit_cache_records")
    assert (total, count) == (sum(r["Size"] for r in items), len(items))
    df = [json.loads(line) for line in requests.read_text().splitlines() if "/system/df" in line]
    assert df and all(r["query"] == {"type": "build-cache", "verbose": "1"} for r in df), df


def test_a_reply_without_a_record_list_is_a_failed_measurement_not_an_empty_cache(standin):
    url, _ = standin(SCHEMA / "system-df-summary-only.json")
    done = once(url)
    assert done.returncode == 1
    got = samples(done.stdout)
    L = {"host": "local", "builder": "default"}
    assert got[("buildkit_cache_measurement_success", frozenset({**L, "measurement": "records"}.items()))] == 0
    assert not [k for k in got if k[0] == "buildkit_cache_size_bytes"], "no figures from a failed measurement"
    assert "BuildCacheUsage counts 43 records but lists none" in done.stderr
