"""Shared fixtures: one private dockerd per test session, real BuildKit build cache, a buildx-like
builder container. Nothing here is skipped: a skipped test fails the run (see the hook below)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from lab import engines
from lab.engines import PrivateDockerd, write_build_context
from tests.support import builder_container, buildkit

FIXTURES = Path(__file__).parent / "fixtures"


# hypothesis keeps a cache folder: in a temporary one, removed at the end, not in the checkout.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="bkce-hypothesis-", dir=os.environ.get("BKCE_WORK") or None)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)


def pytest_unconfigure(config):
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _root_logger_as_it_was():
    """A test that runs a CLI's main() gets its logging.basicConfig (root at INFO, a stderr
    handler): undone after the test, so the next tests do not log, and pytest does not keep, what
    that one set up."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for h in root.handlers:
        if h not in handlers and type(h).__module__.split(".")[0] != "_pytest":
            root.removeHandler(h)
    root.setLevel(level)


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


# -- the private dockerd, one per engine of the matrix ----------------------------------------------

ENGINES = engines.matrix()


def work_dir(prefix: str) -> Path:
    """A folder for one session's engines, under scripts/test's run folder (removed after the run)."""
    base = Path(os.environ.get("BKCE_WORK") or tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups from the marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test: --dist loadgroup), every test of one engine runs in the
    same worker, which starts that engine's dockerd once; the engines run side by side."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if isinstance(params.get("engine"), engines.Engine):
            item.add_marker(pytest.mark.xdist_group(params["engine"].id))


def pytest_report_header(config):
    return ["engines: " + "; ".join(f"{e.id}: {e.describe()}" for e in ENGINES),
            f"BuildKit: {buildkit.VERSION} built from source ({buildkit.BUILDKIT_BIN}), standalone, rootless "
            "and as buildx's docker-container builders"]


@pytest.fixture(scope="session", params=ENGINES, ids=[e.id for e in ENGINES])
def engine(request) -> engines.Engine:
    eng = request.param
    if not eng.ready:
        pytest.fail(f"the {eng.release} engine is not set up: run scripts/setup (scripts/engine-tree {eng.release})")
    return eng


@pytest.fixture(scope="session")
def dockerd(engine):
    """A private dockerd of this engine, in namespaces of its own; every Docker test runs on each."""
    if os.geteuid() != 0:
        pytest.fail("the integration tests start a private dockerd and must run as root (see README)")
    d = PrivateDockerd(work_dir(f"bkce-{engine.id}-"), engine)
    try:
        d.start()
        yield d
    finally:
        d.close()


def engine_get(dockerd: PrivateDockerd, path: str):
    """GET from the Engine API over its socket, independently of the code under test."""
    return dockerd.api(path)


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
def standin_image(dockerd):
    """The builder stand-in (tests/support/builder_container.py): only for what a real buildkitd
    cannot be made to do (garbage, a flood, a buildctl without --format)."""
    builder_container.build_image(dockerd)
    return builder_container.IMAGE


@pytest.fixture
def make_builder(dockerd):
    """Real docker-container builders, made by buildx as users make them (tests/support/buildkit.py),
    removed with their state at the end of the test."""
    made: list[buildkit.Builder] = []

    def make(name: str, small: bool = False, flags: tuple[str, ...] = (), node: str = "") -> buildkit.Builder:
        b = buildkit.create(dockerd, name, small, flags, node)
        made.append(b)
        return b

    yield make
    for b in made:
        b.remove()


@pytest.fixture(scope="session")
def layer_contexts(tmp_path_factory):
    """Build contexts for real builders: COPY and RUN layers, and a cache mount."""
    root = tmp_path_factory.mktemp("layers")
    return [buildkit.write_context(root / f"l{i}", f"l{i}", layers, cache_mb=cache)
            for i, (layers, cache) in enumerate([([("copy", 2), ("run", 1)], 1), ([("copy", 1), ("run", 2)], 1)])]


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory):
    """This checkout's wheel and its dependencies' for Debian 12's Python (the image's stand-in base):
    made once a run, on the host (no index is reachable inside a build here)."""
    from tests.support.image import copy_context, make_wheelhouse

    wheels = tmp_path_factory.mktemp("wheelhouse")
    src = tmp_path_factory.mktemp("wheel-src")
    copy_context(src)
    make_wheelhouse(wheels, src)
    return wheels
