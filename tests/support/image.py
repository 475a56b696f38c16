"""Building the shipped Dockerfile where no registry is reachable, and Debian machines as images.

The Dockerfile's two images from a registry get local stand-ins, passed as its build arguments: the
base (Debian 12's python3, `docker import`ed from the tree scripts/engine-tree makes) and BuildKit's
release image, whose /usr/bin/buildctl is BuildKit v0.32.2's, built from source (tests/support/buildkit.py).
The Python packages come from a wheelhouse made here on the host, put where the Dockerfile looks for
one (./wheelhouse in the context), because pip cannot reach an index inside a build here (FACTS)."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.engines import ENGINE_CACHE, PrivateDockerd
from tests.support import buildkit

ROOT = Path(__file__).resolve().parents[2]

# Fresh Debian servers (systemd, pipx, curl, Alertmanager) as images: scripts/engine-tree's trees,
# and their Python.
MACHINES = {"debian12": ("machine-bookworm", "3.11"), "debian13": ("machine-trixie", "3.13")}
# The Dockerfile's BASE (python:3.12-slim cannot be pulled here): Debian 12's python3 and venv.
BASE_TREE = "python-base"


def copy_context(dest: Path) -> None:
    """The repository's files, tracked or new, never ignored ones (the engine sees only /tmp)."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def make_wheelhouse(dest: Path, src: Path, python: str = "3.11") -> None:
    """This checkout's wheel and its dependencies' wheels for a Debian machine's Python. Built from
    a copy (`src`): setuptools leaves build/ in the tree it builds."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), str(src)], check=True, capture_output=True)
    (own,) = dest.glob("buildkit_cache_exporter-*.whl")
    arch = platform.machine()
    tags = [f"manylinux_2_{v}_{arch}" for v in (36, 34, 28, 17, 12, 5)] + [f"manylinux2014_{arch}", f"manylinux1_{arch}"]
    # With what building from source needs (the Quick start's `pip install .`, pipx's own venv).
    subprocess.run([*pip, "download", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                    *(a for t in tags for a in ("--platform", t)), "-d", str(dest), str(own),
                    "setuptools>=68", "wheel", "pip"],
                   check=True, capture_output=True)


def import_tree(dockerd: PrivateDockerd, name: str, tag: str, work: Path) -> str:
    """One of scripts/engine-tree's trees (MACHINES' or BASE_TREE) as an image named `tag`."""
    tree = ENGINE_CACHE / name
    if not (tree / ".ready").exists():
        pytest.fail(f"{name} is not set up: run scripts/setup (scripts/engine-tree {name})")
    tar = work / f"{name}.tar"
    subprocess.run(["tar", "-C", str(tree), "--exclude=./.ready", "--exclude=./.packages", "-cf", str(tar), "."], check=True)
    dockerd.cli("import", str(tar), tag)
    tar.unlink()
    return tag


def build_shipped_image(dockerd: PrivateDockerd, work: Path, tag: str, base: str, wheelhouse: Path,
                        engine_default_builder: bool = False) -> subprocess.CompletedProcess[bytes]:
    """`docker build` of the repository as shipped, with the stand-ins as build arguments; with
    `engine_default_builder`, the builder that engine's `docker build` uses when nothing is said
    (20.10: the legacy builder), else BuildKit."""
    buildctl_image = buildkit.build_image(dockerd)
    ctx = work / "context"
    copy_context(ctx)
    shutil.copytree(wheelhouse, ctx / "wheelhouse")
    env = dockerd.env()
    if engine_default_builder:
        env.pop("DOCKER_BUILDKIT")
    argv = dockerd.cli_argv("build", "--network", "none", "--build-arg", f"BASE={base}",
                            "--build-arg", f"BUILDKIT={buildctl_image}", "-t", tag, str(ctx))
    done = subprocess.run(argv, env=env, capture_output=True, timeout=900, check=False)
    shutil.rmtree(ctx)
    return done

