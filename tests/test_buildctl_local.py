"""A local buildctl (remote buildkitd builders): its answer is read to a deadline and a size cap, so a
buildctl that hangs or floods costs one measurement, never the exporter's memory or a thread."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

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


def test_an_exec_whose_output_the_engine_lost_is_asked_once_more():
    """`docker exec` into a builder: under load the engine can end the stream before the output is
    copied (moby/moby#27289), an empty success. du and debug workers always print: asked again, once;
    a prune (no retry) never is."""
    from buildkit_cache.buildctl import BuildctlClient, ContainerBuildctl
    from buildkit_cache.docker_api import ExecResult

    du = (Path(__file__).parent / "fixtures" / "buildctl" / "du.json").read_text()

    class Host:
        timeout = 10.0

        def __init__(self, answers):
            self.answers, self.calls = list(answers), []

        def exec(self, container, argv, timeout=None, retry=True):
            self.calls.append((argv[5:], retry))  # after `timeout -s KILL N buildctl`
            return self.answers.pop(0)

    host = Host([ExecResult(0, "", ""), ExecResult(0, du, "")])
    records = BuildctlClient(ContainerBuildctl(host, "buildx_buildkit_kamal0")).du()  # type: ignore[arg-type]
    assert len(records) == len(json.loads(du)) and len(host.calls) == 2
    # Twice empty: a clear failure, not "no records".
    host = Host([ExecResult(0, "", ""), ExecResult(0, "", "")])
    with pytest.raises(BuilderError):
        BuildctlClient(ContainerBuildctl(host, "buildx_buildkit_kamal0")).du()  # type: ignore[arg-type]
    # A prune is never sent twice.
    host = Host([ExecResult(0, "", "")])
    assert ContainerBuildctl(host, "b")(["prune", "--keep-storage", "10"], retry=False) == ""  # type: ignore[arg-type]
    assert host.calls == [(["prune", "--keep-storage", "10"], False)]
