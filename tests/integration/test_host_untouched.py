"""Tests and the demo never touch the host's own Docker: a test engine leaves the host's network
(its docker0 bridge above all: a --bridge=none dockerd deletes it, FACTS) and /tmp as they were."""

from __future__ import annotations

import subprocess

import pytest

from lab.engines import PrivateDockerd, write_build_context
from tests.conftest import work_dir

pytestmark = pytest.mark.integration


def links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_an_engine_leaves_the_hosts_docker0_bridge_and_removes_what_it_made(engine, tmp_path):
    made_bridge = "docker0" not in links()
    if made_bridge:  # stand in for the user's Docker, which would own it
        subprocess.run(["ip", "link", "add", "docker0", "type", "bridge"], check=True)
    try:
        before = links()
        root = work_dir("bkce-h-")  # short: unix socket paths must stay under 104 bytes
        d = PrivateDockerd(root, engine)
        try:
            d.start()
            write_build_context(tmp_path / "ctx", "host", 1, 1)
            d.build(tmp_path / "ctx", "host:latest")
            assert "docker0" in links()
        finally:
            d.close()
        assert "docker0" in links()
        assert links() == before
        assert not root.exists()
    finally:
        if made_bridge:
            subprocess.run(["ip", "link", "del", "docker0"], check=False)
