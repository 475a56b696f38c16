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


@pytest.mark.slow  # root: runs the program as another user
def test_a_docker_socket_it_may_not_use_is_named_with_its_owner_and_the_fix(tmp_path):
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from lab.procs import ROOT

    # A folder the other user may enter (the test's own are root's only), removed at the end.
    folder = Path(tempfile.mkdtemp(prefix="bkce-socket-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        path = folder / "docker.sock"
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
            os.chmod(path, 0o660)
            s.listen()
            # As nobody, keeping only CAP_DAC_READ_SEARCH: it reads the checkout wherever it is (a
            # clone under a 0700 folder), and grants no write, which a socket's connect needs.
            done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                   "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", sys.executable,
                                   "-m", "buildkit_cache.exporter", "--once", "--docker-host", f"unix://{path}"],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT)
    finally:
        shutil.rmtree(folder)
    assert done.returncode == 1
    assert f"cannot use {path}: it belongs to root:root" in done.stderr
    assert "docker run --group-add 0; compose: DOCKER_GID=0; systemd: SupplementaryGroups=root" in done.stderr
    assert "PermissionError" not in done.stderr and "Connection aborted" not in done.stderr
    missing = subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", "--once", "--docker-host",
                              f"unix://{tmp_path}/none.sock"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert f"the Docker socket {tmp_path}/none.sock does not exist: is Docker running?" in missing.stderr
    assert "FileNotFoundError" not in missing.stderr
