"""The package as installed: one import namespace, every module importable, both commands answer."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys

import pytest

import buildkit_cache
from lab.procs import ROOT

pytestmark = pytest.mark.slow  # builds and installs wheels


def test_every_module_of_the_package_imports():
    names = [m.name for m in pkgutil.walk_packages(buildkit_cache.__path__, "buildkit_cache.")]
    # exporter/ and actuator/ are mapped into the namespace (pyproject's package-dir).
    for sub in ("buildkit_cache.exporter", "buildkit_cache.actuator"):
        pkg = importlib.import_module(sub)
        names += [sub] + [m.name for m in pkgutil.walk_packages(pkg.__path__, sub + ".")]
    assert {"buildkit_cache.exporter.cli", "buildkit_cache.actuator.cli",
            "buildkit_cache.exporter.measurements.records"} <= set(names)
    for name in names:
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_both_commands_answer_help():
    for module, words in (("buildkit_cache.exporter", "--once"), ("buildkit_cache.actuator", "--dry-run")):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)
        assert done.returncode == 0 and words in done.stdout, done.stderr


def test_the_wheel_installs_one_top_level_package(tmp_path):
    # Built from a copy: setuptools leaves a build/ folder beside the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "buildkit_cache", "exporter", "actuator"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"buildkit_cache"}
    assert "buildkit_cache/exporter/cli.py" in names and "buildkit_cache/actuator/cli.py" in names
    assert "buildkit_cache/exporter/measurements/records.py" in names
