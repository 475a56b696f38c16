"""The shipped Dockerfile builds with a plain `docker build` on every engine of the matrix (on
20.10 that is the legacy builder), and the image it makes carries both programs, `buildctl`, and a
healthcheck that tells for either program whether it serves and is healthy."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from lab.engines import PrivateDockerd
from lab.procs import wait_for
from tests.support import buildkit
from tests.support.image import BASE_TREE, build_shipped_image, import_tree

pytestmark = pytest.mark.integration
TAG = "bkce-built:test"


def health(dockerd: PrivateDockerd, container: str) -> tuple[str, str]:
    state = json.loads(dockerd.cli("inspect", "-f", "{{json .State.Health}}", container).stdout)
    log = state["Log"][-1]["Output"] if state.get("Log") else ""
    return state["Status"], log


def test_the_dockerfile_builds_with_docker_build_and_both_programs_report_health(dockerd, wheelhouse, tmp_path):
    base = import_tree(dockerd, BASE_TREE, "bkce-built-base:test", tmp_path)
    done = build_shipped_image(dockerd, tmp_path, TAG, base, wheelhouse, engine_default_builder=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    for program in ("buildkit-cache-exporter", "buildkit-cache-actuator"):
        out = dockerd.cli("run", "--rm", "--network", "none", "--entrypoint", program, TAG, "--version").stdout.decode()
        assert out.startswith(program), out
    # buildctl from the BUILDKIT image's /usr/bin/buildctl: BuildKit v0.32.2's own.
    got = dockerd.cli("run", "--rm", "--network", "none", "--entrypoint", "cat", TAG, "/usr/local/bin/buildctl").stdout
    assert got == (buildkit.BUILDKIT_BIN / "buildctl").read_bytes()
    check = json.loads(dockerd.cli("inspect", "-f", "{{json .Config.Healthcheck}}", TAG).stdout)
    assert check["Test"] == ["CMD", "python3", "-m", "buildkit_cache.healthcheck"], check

    # The image's own healthcheck (only its timing shortened), for each program on its config's address.
    cfg = tmp_path / "config.yml"
    token = tmp_path / "token"
    token.write_text("a-token-of-the-test\n")
    cfg.write_text(yaml.safe_dump({"docker_hosts": ["unix:///var/run/docker.sock"],
                                   "exporter": {"listen": "127.0.0.1:19862"},
                                   "actuator": {"listen": "127.0.0.1:19863",
                                                "auth": {"bearer_token_file": "/etc/buildkit-cache/actuator-token"}}}))
    common = ["run", "-d", "--network", "none", "--health-interval", "1s", "--health-start-period", "30s",
              "-v", f"{dockerd.socket}:/var/run/docker.sock", "-v", f"{cfg}:/etc/buildkit-cache/config.yml:ro",
              "-v", f"{token}:/etc/buildkit-cache/actuator-token:ro"]
    gid = str(os.stat(dockerd.socket).st_gid)
    dockerd.cli(*common, "--name", "exp", "--user", "0:0", TAG)
    dockerd.cli(*common, "--name", "act", "--group-add", gid, "--entrypoint", "buildkit-cache-actuator", TAG,
                "--config", "/etc/buildkit-cache/config.yml")
    try:
        for name, url in (("exp", "http://127.0.0.1:19862/-/healthy"), ("act", "http://127.0.0.1:19863/healthz")):
            wait_for(f"{name} healthy", lambda name=name: health(dockerd, name)[0] == "healthy", timeout=60)
            assert url in health(dockerd, name)[1], health(dockerd, name)
        # Nothing serving where it looks: unhealthy, and it says where it looked.
        done = dockerd.cli("exec", "act", "python3", "-m", "buildkit_cache.healthcheck", "buildkit-cache-actuator",
                           "--config", "/etc/buildkit-cache/config.yml", "--listen", "127.0.0.1:1", check=False)
        assert done.returncode == 1 and b"unhealthy: http://127.0.0.1:1/healthz" in done.stderr, done
    finally:
        dockerd.cli("rm", "-f", "exp", "act", check=False)
        dockerd.cli("rmi", TAG, "bkce-built-base:test", check=False)
