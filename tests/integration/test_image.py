"""The image and the compose file as shipped, on a private sid engine (its CLI has buildx and compose).

The Dockerfile is built with no network inside the build: the base image is a local stand-in
(Debian 12's python3, `docker import`ed, passed as BASE) and the Python packages come from a
wheelhouse made here on the host (the `wheelhouse` build context), because no registry is reachable
(../shared FACTS). Then deploy/docker-compose.yml brings up `exporter` and `actuator` the way its
header says, with only the host paths this engine lacks overridden: its socket and its data root."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lab.engines import ENGINE_CACHE, PrivateDockerd
from lab.procs import wait_for
from tests.conftest import ENGINES, engine_get
from tests.integration.test_actuator_docker import TOKEN, notification

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "buildkit-cache-exporter:local"  # the compose file's image
BASE = "bkce-python-base:test"
PROJECT = "buildkit-cache"  # the compose file's name
BUDGET = 12_000_000

# The engines whose CLI has buildx and compose: sid's.
SID = [e for e in ENGINES if e.release == "sid" and not e.containerd_store]
pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine", SID, ids=[e.id for e in SID], indirect=True)]


# -- building the image ----------------------------------------------------------------------------

def make_wheelhouse(dest: Path, src: Path) -> None:
    """This checkout's wheel and its dependencies' wheels for the base image's Python (3.11). Built
    from a copy (`src`): setuptools leaves build/ in the tree it builds."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dest), str(src)], check=True, capture_output=True)
    (own,) = dest.glob("buildkit_cache_exporter-*.whl")
    arch = platform.machine()
    tags = [f"manylinux_2_{v}_{arch}" for v in (34, 28, 17, 12, 5)] + [f"manylinux2014_{arch}", f"manylinux1_{arch}"]
    # With what building from source needs (the Quick start's `pip install .`, pipx's own venv).
    subprocess.run([*pip, "download", "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                    *(a for t in tags for a in ("--platform", t)), "-d", str(dest), str(own),
                    "setuptools>=68", "wheel", "pip"],
                   check=True, capture_output=True)


def copy_context(dest: Path) -> None:
    """The build context: the repository's files, tracked or new, never ignored ones (the engine sees only /tmp)."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def base(dockerd: PrivateDockerd, tmp_path_factory) -> str:
    """Debian 12 with python3 and pipx, as an image: the Dockerfile's BASE, and a fresh machine."""
    tree = ENGINE_CACHE / "python-base"
    if not (tree / ".ready").exists():
        pytest.fail("the image's stand-in base is not set up: run scripts/setup (scripts/engine-tree python-base)")
    base_tar = tmp_path_factory.mktemp("base") / "base.tar"
    subprocess.run(["tar", "-C", str(tree), "--exclude=./.ready", "-cf", str(base_tar), "."], check=True)
    dockerd.cli("import", str(base_tar), BASE)
    base_tar.unlink()
    return BASE


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheelhouse")
    src = tmp_path_factory.mktemp("wheel-src")
    copy_context(src)
    make_wheelhouse(wheels, src)
    return wheels


@pytest.fixture(scope="module")
def image(dockerd: PrivateDockerd, base, wheelhouse, tmp_path_factory) -> str:
    ctx = tmp_path_factory.mktemp("context")
    copy_context(ctx)
    dockerd.cli("build", "--network", "none", "--build-arg", f"BASE={base}",
                "--build-context", f"wheelhouse={wheelhouse}", "-t", IMAGE, str(ctx), timeout=600)
    return IMAGE


# -- the running engine's network namespace ------------------------------------------------------------

_CLIENT = r"""
import sys, urllib.request
url, token, body = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(url, data=body.encode() if body else None,
                             headers={"Authorization": "Bearer " + token} if token else {})
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        sys.stdout.write(f"{r.status}\n" + r.read().decode())
except urllib.error.HTTPError as e:
    sys.stdout.write(f"{e.code}\n" + e.read().decode())
"""


def http(dockerd: PrivateDockerd, url: str, body: dict | None = None, token: str = "") -> tuple[int, str]:
    """An HTTP request from inside the engine's network namespace, where network_mode: host lands."""
    done = subprocess.run(["nsenter", "--target", str(dockerd.pid), "--net", "--", sys.executable, "-c", _CLIENT,
                           url, token, json.dumps(body) if body is not None else ""],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or not done.stdout:
        return 0, done.stderr
    status, _, text = done.stdout.partition("\n")
    return int(status), text


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(p.split("=", 1) for p in line[line.find("{") + 1:line.rfind("}")].replace('"', "").split(",")
                       if "=" in p) if "{" in line else {}
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


# -- compose --------------------------------------------------------------------------------------------

class Compose:
    """deploy/ copied where the engine can see it, set up as its header says."""

    def __init__(self, dockerd: PrivateDockerd, work: Path):
        self.dockerd = dockerd
        self.dir = work / "deploy"
        shutil.copytree(ROOT / "deploy", self.dir)
        # cp config.example.yml config.yml, then "set your budgets".
        cfg = yaml.safe_load((self.dir / "config.example.yml").read_text())
        cfg["builders"] = {"default": {"budget": BUDGET}}
        cfg["exporter"]["intervals"] = {"discovery": "2s", "records": "2s", "filesystem": "2s", "state_volume": "5s"}
        cfg["actuator"]["settle_delay"] = "1s"
        (self.dir / "config.yml").write_text(yaml.safe_dump(cfg))
        (self.dir / "secrets").mkdir()
        (self.dir / "secrets" / "actuator-token").write_text(TOKEN + "\n")
        # DOCKER_GID=$(stat -c %g /var/run/docker.sock)
        self.gid = os.stat(dockerd.socket).st_gid
        # Only the host paths this engine lacks: its socket, and its data root (at the same path inside,
        # as the compose file mounts /var/lib/docker for an engine whose data root is there).
        data, sock = dockerd.data_root, dockerd.socket
        (self.dir / "test-paths.yml").write_text(f"""
services:
  exporter:
    volumes: !override
      - {sock}:/var/run/docker.sock
      - {data}:{data}:ro
      - ./config.yml:/etc/buildkit-cache/config.yml:ro
  actuator:
    volumes:
      - {sock}:/var/run/docker.sock
""")
        shipped = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]["exporter"]["volumes"]
        assert [v.split(":")[1] for v in shipped] == ["/var/run/docker.sock", "/var/lib/docker",
                                                     "/etc/buildkit-cache/config.yml"], "the override follows the shipped mounts"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = self.dockerd.cli_argv("compose", "-f", str(self.dir / "docker-compose.yml"),
                                     "-f", str(self.dir / "test-paths.yml"), *args)
        done = subprocess.run(argv, env={**self.dockerd.env(), "DOCKER_GID": str(self.gid)}, cwd=self.dir,
                              capture_output=True, text=True, timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)}: {done.returncode}\n{done.stderr}")
        return done

    def inspect(self, service: str, fmt: str) -> str:
        return self.dockerd.cli("inspect", "-f", fmt, f"{PROJECT}-{service}-1").stdout.decode().strip()


@pytest.fixture
def compose(dockerd, image, tmp_path):
    c = Compose(dockerd, tmp_path)
    try:
        yield c
    finally:
        c.run("down", "--volumes", "--timeout", "10", check=False)


def test_compose_runs_the_exporter_and_the_actuator_as_shipped(big_cache, compose):
    dockerd = big_cache
    compose.run("up", "-d", "exporter", "actuator")
    time.sleep(20)
    for service in ("exporter", "actuator"):
        state = compose.inspect(service, "{{.State.Status}} {{.RestartCount}}")
        logs = dockerd.cli("logs", f"{PROJECT}-{service}-1", check=False).stderr.decode()[-2000:]
        assert state == "running 0", f"{service}: {state}\n{logs}"

    # The exporter's figures are the engine's.
    def metrics() -> str:
        status, text = http(dockerd, "http://127.0.0.1:9862/metrics")
        assert status == 200, text
        return text

    wait_for("the exporter's first collection",
             lambda: sample(metrics(), "buildkit_cache_measurement_success", builder="default",
                            measurement="records") == 1, timeout=60)
    text = metrics()
    engine_total = sum(r["Size"] for r in engine_get(dockerd, "/system/df")["BuildCache"])
    exported = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("buildkit_cache_size_bytes{") and 'builder="default"' in line)
    assert exported == engine_total > BUDGET
    for measurement in ("filesystem", "records"):
        assert sample(text, "buildkit_cache_measurement_success", builder="default", measurement=measurement) == 1
    assert sample(text, "buildkit_cache_filesystem_size_bytes", builder="default") > 0

    # The actuator: not root, in the socket's group, healthy.
    ids = dockerd.cli("exec", f"{PROJECT}-actuator-1", "id", "-u").stdout.decode().strip()
    groups = dockerd.cli("exec", f"{PROJECT}-actuator-1", "id", "-G").stdout.decode().split()
    assert ids == "10001" and str(compose.gid) in groups, (ids, groups)
    assert http(dockerd, "http://127.0.0.1:9863/healthz")[0] == 200

    # A firing prune-to-budget brings the cache under budget within 60 s.
    status, body = http(dockerd, "http://127.0.0.1:9863/alerts", notification("prune-to-budget", "default", host="local"),
                        token=TOKEN)
    assert status == 200, body

    def unshared() -> int:
        return sum(r["Size"] for r in engine_get(dockerd, "/system/df")["BuildCache"] if not r["Shared"])

    wait_for("the cache under budget", lambda: unshared() <= BUDGET, timeout=60)

    # The audit line sits in the actuator's volume.
    def audit() -> str:
        return dockerd.cli("run", "--rm", "--network", "none", "--entrypoint", "cat",
                           "-v", f"{PROJECT}_actuator-audit:/audit:ro", IMAGE, "/audit/audit.jsonl",
                           check=False).stdout.decode()

    wait_for("the pruned audit line", lambda: '"event":"pruned"' in audit(), timeout=30)
    pruned = [json.loads(line) for line in audit().splitlines() if '"event":"pruned"' in line]
    assert len(pruned) == 1 and pruned[0]["builder"] == "default", pruned
    assert compose.inspect("actuator", "{{.RestartCount}}") == "0"


def _actuator(dockerd: PrivateDockerd, tmp_path: Path, config: dict, *run_args: str) -> subprocess.CompletedProcess[bytes]:
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(config))
    return dockerd.cli("run", "--rm", "--network", "none", *run_args, "-v", f"{dockerd.socket}:/var/run/docker.sock",
                       "-v", f"{cfg}:/etc/buildkit-cache/config.yml:ro", "--entrypoint", "buildkit-cache-actuator",
                       IMAGE, "--config", "/etc/buildkit-cache/config.yml", check=False, timeout=120)


def test_the_actuator_image_refuses_to_start_without_credentials(dockerd, image, tmp_path):
    gid = str(os.stat(dockerd.socket).st_gid)
    done = _actuator(dockerd, tmp_path, {"actuator": {"auth": {}}}, "--group-add", gid)
    assert done.returncode == 2, done
    assert b"auth" in done.stderr and b"--insecure-no-auth" in done.stderr, done.stderr


def test_the_actuator_image_without_the_socket_group_says_why_and_exits(dockerd, image, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    config = {"actuator": {"auth": {"bearer_token_file": "/etc/buildkit-cache/actuator-token"}}}
    done = _actuator(dockerd, tmp_path, config, "-v", f"{token}:/etc/buildkit-cache/actuator-token:ro")
    gid = os.stat(dockerd.socket).st_gid
    assert done.returncode == 2, done
    assert f"group {gid}".encode() in done.stderr and b"--group-add" in done.stderr, done.stderr


# -- the Quick start, as written, on a fresh Debian 12 -----------------------------------------------

def quick_start() -> tuple[str, str]:
    """The README's Quick start: its install command (run as root, so without `sudo`) and the pipx line."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start"):readme.index("\n## ", readme.index("## Quick start") + 5)]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    install = block.splitlines()[0].split("#")[0].strip()
    assert install.startswith("sudo "), install
    (pipx,) = re.findall(r"`(pipx install [^`]*)`", section)
    return install.removeprefix("sudo "), pipx


def test_the_quick_start_works_as_written_on_debian_12(dockerd, build_cache, base, wheelhouse, tmp_path):
    """In a container of Debian 12 (python3 3.11, which refuses pip into the system): the venv line
    as root, then pipx as a user; both leave the commands on PATH, and they measure the engine."""
    install, pipx = quick_start()
    src = tmp_path / "src"
    copy_context(src)
    script = f"""set -e
useradd --create-home someone
chmod -R a+rX /src /wheels
su - someone -c 'export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; cp -r /src ~/src && cd ~/src && {pipx}'
su - someone -c 'command -v buildkit-cache-exporter'
su - someone -c 'buildkit-cache-actuator --help' | grep -q 'usage: buildkit-cache-actuator'
cd /src
{install}
command -v buildkit-cache-exporter
buildkit-cache-exporter --once > /tmp/once.txt
grep -Eq '^  default +docker +[0-9]+ ' /tmp/once.txt
echo QUICK-START-OK
"""
    done = dockerd.cli("run", "--rm", "--network", "none", "-e", "PIP_NO_INDEX=1", "-e", "PIP_FIND_LINKS=/wheels",
                       "-v", f"{wheelhouse}:/wheels", "-v", f"{src}:/src", "-v", f"{dockerd.socket}:/var/run/docker.sock",
                       # The engine's data root at its own path, as on a host where it is /var/lib/docker.
                       "-v", f"{dockerd.data_root}:{dockerd.data_root}:ro", base, "sh", "-c", script, check=False, timeout=600)
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0 and "QUICK-START-OK" in out, out[-3000:]
    assert "/home/someone/.local/bin/buildkit-cache-exporter\n" in out, out  # pipx, for the user, on PATH
    assert "/usr/local/bin/buildkit-cache-exporter\n" in out, out  # the venv, for everyone
