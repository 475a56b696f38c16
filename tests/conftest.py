"""Shared fixtures: one private dockerd per test session, real BuildKit build cache, a buildx-like
builder container. Nothing here is skipped: a skipped test fails the run (see the hook below)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
from pathlib import Path

import pytest

from tests.support import builder_container
from tests.support.dockerd import BUSYBOX, PrivateDockerd

FIXTURES = Path(__file__).parent / "fixtures"


# -- a skipped test is a missing test --------------------------------------------------------------

_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _skipped and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.write_line(f"FAILED: {len(_skipped)} test(s) skipped; every test must run", red=True)


# -- the private dockerd ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dockerd():
    if os.geteuid() != 0:
        pytest.fail("the integration tests start a private dockerd and must run as root (see README)")
    root = Path(tempfile.mkdtemp(prefix="bkce-dockerd-", dir="/tmp"))
    d = PrivateDockerd(root)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def engine_get(dockerd: PrivateDockerd, path: str):
    """GET from the Engine API over its socket, independently of the code under test."""

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(dockerd.socket))

    conn = Conn("localhost", timeout=120)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, body
    return json.loads(body)


def write_build_context(ctx: Path, name: str, data_mb: int, cache_mb: int) -> None:
    """A Dockerfile whose build makes regular, source.local and exec.cachemount records."""
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "busybox").write_bytes(Path(BUSYBOX).read_bytes())
    (ctx / "busybox").chmod(0o755)
    (ctx / "data.bin").write_bytes(os.urandom(data_mb * 1024 * 1024))
    (ctx / "Dockerfile").write_text(
        "FROM scratch\n"
        "COPY busybox /bin/busybox\n"
        "COPY data.bin /data.bin\n"
        f'RUN --mount=type=cache,target=/cache,id={name} ["/bin/busybox", "sh", "-c", '
        f'"/bin/busybox dd if=/dev/urandom of=/cache/{name} bs=1M count={cache_mb} 2>/dev/null && '
        f'/bin/busybox dd if=/dev/urandom of=/layer-{name} bs=1M count=1 2>/dev/null"]\n'
    )


@pytest.fixture(scope="session")
def build_contexts(tmp_path_factory):
    contexts = []
    for i, (data, cache) in enumerate([(2, 3), (1, 2)]):
        ctx = tmp_path_factory.mktemp(f"ctx{i}")
        write_build_context(ctx, f"app{i}", data, cache)
        contexts.append((ctx, f"app{i}:latest"))
    return contexts


@pytest.fixture
def build_cache(dockerd, build_contexts):
    """Real build cache in the private dockerd: two builds with cache mounts.

    Per test, because the actuator's tests prune it: builds whose cache survived take a moment,
    pruned ones are rebuilt."""
    for ctx, tag in build_contexts:
        dockerd.build(ctx, tag)
    return dockerd


@pytest.fixture
def big_cache(dockerd, tmp_path):
    """Fresh, sizeable build cache: several builds with large contexts and small cache mounts."""
    dockerd.cli("builder", "prune", "--all", "--force")
    for i, (data, cache) in enumerate([(6, 1), (5, 1), (4, 1), (3, 1)]):
        ctx = tmp_path / f"big{i}"
        write_build_context(ctx, f"big{i}", data, cache)
        dockerd.build(ctx, f"big{i}:latest")
    return dockerd


@pytest.fixture(scope="session")
def builder_image(dockerd):
    builder_container.build_image(dockerd)
    return builder_container.IMAGE
