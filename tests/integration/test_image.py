"""The image and the compose file as shipped, on Debian 13's, sid's and Docker 29's engines (their
CLIs have buildx and compose: 2.26 and 2.40).

The Dockerfile is built with no network inside the build (tests/support/image.py: stand-ins for the
base image and BuildKit's, and a wheelhouse). Then the README's compose block runs as written
(Compose says what the test adds) and the exporter's figures, the healthchecks, the users, a prune
and the audit volume are checked."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lab.engines import PrivateDockerd, busybox_files
from lab.procs import wait_for
from tests.conftest import ENGINES, engine_get
from tests.integration.test_actuator_docker import TOKEN, notification
from tests.support import buildkit
from tests.support.image import BASE_TREE, build_shipped_image, copy_context, import_tree

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "buildkit-cache-exporter:local"  # the compose file's image
BASE = "bkce-python-base:test"
PROJECT = "buildkit-cache"  # the compose file's name
BUDGET = 12_000_000

# The engines whose CLI has buildx and compose: Debian 13's (compose 2.26), sid's (2.40) and Docker
# 29's (run with sid's CLI), each with its default image store.
COMPOSE = [e for e in ENGINES if (e.release in ("trixie", "sid") and not e.containerd_store)
           or (e.release == "docker29" and e.containerd_store)]
pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine", COMPOSE, ids=[e.id for e in COMPOSE], indirect=True)]


# -- building the image ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(dockerd: PrivateDockerd, tmp_path_factory) -> str:
    """Debian 12 with python3 and pipx, as an image: the Dockerfile's BASE, and a fresh machine."""
    return import_tree(dockerd, BASE_TREE, BASE, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def image(dockerd: PrivateDockerd, base, wheelhouse, tmp_path_factory) -> str:
    done = build_shipped_image(dockerd, tmp_path_factory.mktemp("build"), IMAGE, base, wheelhouse)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
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

THIRD_PARTY = {"prometheus": "prom/prometheus:v2.53.0", "alertmanager": "prom/alertmanager:v0.27.0",
               "grafana": "grafana/grafana-oss:11.1.0"}


class Compose:
    """The README's compose block, run as written in a copy of the repository, with the engine's CLI.

    What the test adds, none of it a change to a README line: stand-ins for the images a registry
    would give (the Dockerfile's BASE and BUILDKIT, and Prometheus, Alertmanager and Grafana, which
    only sleep: what is tested here is the exporter and the actuator); the wheelhouse; the budget
    where the block says "set your budgets"; the engine's socket at /var/run/docker.sock for the
    CLI (in a mount namespace of its own); and, in a second compose file named by COMPOSE_FILE, the
    host paths the engine's containers need that differ from a host's (its socket and data root)
    and the build's network (this engine has no bridge)."""

    def __init__(self, dockerd: PrivateDockerd, work: Path, wheelhouse: Path):
        self.dockerd = dockerd
        self.repo = work / "repo"
        copy_context(self.repo)
        shutil.copytree(wheelhouse, self.repo / "wheelhouse")
        self.dir = self.repo / "deploy"
        # BuildKit's release image as the Dockerfile names it: the real buildctl and buildkitd.
        dockerd.cli("tag", buildkit.build_image(dockerd), "moby/buildkit:v0.32.2")
        dockerd.cli("tag", BASE, "python:3.12-slim")
        files, links = busybox_files()
        dockerd.import_rootfs("bkce-sleeper:test", files, links)
        for image in THIRD_PARTY.values():
            dockerd.cli("tag", "bkce-sleeper:test", image)
        data, sock = dockerd.data_root, dockerd.socket
        sleepers = "".join(f"""
  {service}:
    entrypoint: ["/bin/sh", "-c", "exec sleep 2147483647"]""" for service in THIRD_PARTY)
        (self.dir / "test-paths.yml").write_text(f"""
services:
  exporter:
    build: {{network: none}}
    volumes: !override
      - {sock}:/var/run/docker.sock
      - {data}:{data}:ro
      - ./config.yml:/etc/buildkit-cache/config.yml:ro
  actuator:
    build: {{network: none}}
    volumes:
      - {sock}:/var/run/docker.sock{sleepers}
""")
        shipped = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]["exporter"]["volumes"]
        assert [v.split(":")[1] for v in shipped] == ["/var/run/docker.sock", "/var/lib/docker",
                                                     "/etc/buildkit-cache/config.yml"], "the override follows the shipped mounts"

    def set_budgets(self) -> None:
        """What a reader does at "set your budgets"."""
        path = self.dir / "config.yml"
        cfg = yaml.safe_load(path.read_text())
        cfg["builders"] = {"default": {"budget": BUDGET}}
        cfg["exporter"]["intervals"] = {"discovery": "2s", "records": "2s", "filesystem": "2s", "state_volume": "5s"}
        cfg["actuator"]["settle_delay"] = "1s"
        path.write_text(yaml.safe_dump(cfg))

    def readme_block(self) -> None:
        readme = (ROOT / "README.md").read_text()
        section = readme[readme.index("### With Docker Compose"):]
        lines = section.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
        at = next(i for i, line in enumerate(lines) if "set your budgets" in line) + 1
        # Two runs of the block's lines, the budgets set between them; the second goes on where the
        # first ended (its working directory).
        cwd = self.repo / ".block-cwd"
        self._run_lines(lines[:at] + [f"pwd > {cwd}"], str(self.repo))
        self.set_budgets()
        self._run_lines(lines[at:], cwd.read_text().strip())
        self.gid = os.stat(self.dockerd.socket).st_gid
        self.token = (self.dir / "secrets" / "actuator-token").read_text().strip()

    def _run_lines(self, lines: list[str], cwd: str) -> None:
        # The engine's socket where the CLI and the block's `stat` look, in a mount namespace of the CLI's own.
        prelude = (f"mount -t tmpfs none /run && touch /run/docker.sock && mount --bind {self.dockerd.socket} /run/docker.sock"
                   f" && cd {shlex.quote(cwd)}")
        argv = ["nsenter", "--target", str(self.dockerd.pid), "--mount", "--net", "--",
                "unshare", "--mount", "--propagation", "private", "--", "bash", "-c",
                "\n".join(["set -e", prelude, *lines])]
        env = {k: v for k, v in self.dockerd.env().items() if k != "DOCKER_HOST"}
        env["COMPOSE_FILE"] = "docker-compose.yml:test-paths.yml"
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"the README's compose block: {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = self.dockerd.cli_argv("compose", "-f", str(self.dir / "docker-compose.yml"),
                                     "-f", str(self.dir / "test-paths.yml"), *args)
        done = subprocess.run(argv, env={**self.dockerd.env(), "DOCKER_GID": str(os.stat(self.dockerd.socket).st_gid)},
                              cwd=self.dir, capture_output=True, text=True, timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)}: {done.returncode}\n{done.stderr}")
        return done

    def inspect(self, service: str, fmt: str) -> str:
        return self.dockerd.cli("inspect", "-f", fmt, f"{PROJECT}-{service}-1").stdout.decode().strip()


@pytest.fixture
def compose(dockerd, base, wheelhouse, tmp_path):
    c = Compose(dockerd, tmp_path, wheelhouse)
    try:
        yield c
    finally:
        c.run("down", "--volumes", "--timeout", "10", check=False)


def test_compose_runs_the_exporter_and_the_actuator_as_shipped(big_cache, compose):
    dockerd = big_cache
    compose.readme_block()
    assert sorted(compose.run("ps", "--services").stdout.split()) == ["actuator", "alertmanager", "exporter",
                                                                     "grafana", "prometheus"]
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
    # The healthchecks of the compose file (the image's): both healthy.
    for service in ("exporter", "actuator"):
        wait_for(f"{service} healthy", lambda service=service: compose.inspect(service, "{{.State.Health.Status}}") == "healthy",
                 timeout=120)

    # The actuator: not root, in the socket's group, healthy.
    ids = dockerd.cli("exec", f"{PROJECT}-actuator-1", "id", "-u").stdout.decode().strip()
    groups = dockerd.cli("exec", f"{PROJECT}-actuator-1", "id", "-G").stdout.decode().split()
    assert ids == "10001" and str(compose.gid) in groups, (ids, groups)
    assert http(dockerd, "http://127.0.0.1:9863/healthz")[0] == 200

    # A firing prune-to-budget brings the cache under budget within 60 s.
    status, body = http(dockerd, "http://127.0.0.1:9863/alerts", notification("prune-to-budget", "default", host="local"),
                        token=compose.token)
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
