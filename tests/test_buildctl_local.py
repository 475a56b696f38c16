"""A local buildctl (remote buildkitd builders): its answer is read to a deadline and a size cap, so a
buildctl that hangs or floods costs one measurement, never the exporter's memory or a thread."""

from __future__ import annotations

import os
import resource
import time

import pytest

from buildkit_cache.buildctl import LocalBuildctl
from buildkit_cache.errors import BuilderError, CommandFailed, Unavailable
from buildkit_cache.procs import run_capped


def fake(tmp_path, script: str) -> str:
    path = tmp_path / "buildctl"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def test_the_answer_and_errors_come_back_whole(tmp_path):
    ctl = LocalBuildctl("tcp://10.0.0.9:1234", fake(tmp_path, 'echo "$@"; echo warn >&2\n'))
    assert ctl(["du", "--format", "json"]) == "--addr tcp://10.0.0.9:1234 du --format json\n"
    failing = LocalBuildctl("tcp://10.0.0.9:1234", fake(tmp_path, "echo 'connection refused' >&2; exit 1\n"))
    with pytest.raises(Unavailable, match="connection refused"):
        failing(["du"])
    other = LocalBuildctl("tcp://10.0.0.9:1234", fake(tmp_path, "echo nope >&2; exit 3\n"))
    with pytest.raises(CommandFailed, match="nope"):
        other(["du"])


def test_a_buildctl_that_never_answers_is_killed_at_the_deadline(tmp_path):
    marker = tmp_path / "pid"
    ctl = LocalBuildctl("tcp://h:1", fake(tmp_path, f"echo $$ > {marker}; exec sleep 1000\n"), timeout=1.0)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="did not answer within 1s"):
        ctl(["du"])
    assert time.monotonic() - started < 3
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left behind


def test_a_flood_of_output_is_cut_at_the_cap_without_reading_it_into_memory(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(BuilderError, match="printed more than 8 MiB"):
        run_capped(["sh", "-c", "yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"], 30, "flood", cap=8 * 1024 * 1024)
    assert time.monotonic() - started < 10
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 64, f"peak RSS grew {grown_mb:.0f} MB"
