"""The exporter as the sidecar of a buildkitd pod, run as the pod would run it: the shipped image
(built from the Dockerfile), in the buildkitd container's network namespace (`--network container:`),
sharing its socket volume and its state volume (read-only), as uid 1000 with a read-only root, with
the config deploy/kubernetes gives it, unchanged. buildkitd cannot run here: its container is the
builder stand-in, and the image's buildctl (from the BUILDKIT build argument) answers with the
outputs recorded from a real one (tests/fixtures/buildctl, mounted where the stand-in reads them).
Its figures are that buildkitd's records, the state volume's walk and its filesystem's statvfs; the
actuator beside them (deploy/kubernetes/components/actuator) prunes through the same socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from lab.engines import PrivateDockerd
from lab.procs import ROOT, samples, wait_for
from tests.conftest import ENGINES
from tests.integration.test_actuator_docker import notification
from tests.integration.test_exporter_docker import walk
from tests.support import builder_container
from tests.support.image import BASE_TREE, build_shipped_image, import_tree

SID = [e for e in ENGINES if e.release == "sid" and not e.containerd_store]
pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine", SID, ids=[e.id for e in SID], indirect=True)]
TAG = "bkce-sidecar:test"


def shipped_config() -> str:
    """The config deploy/kubernetes gives the pod (with the actuator component: the same ConfigMap)."""
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "kubectl") if (ROOT / ".venv" / "bin" / "kubectl").exists()
                           else "kubectl", "kustomize", str(ROOT / "deploy" / "kubernetes" / "with-actuator")],
                          capture_output=True, text=True, check=True)
    (cm,) = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "ConfigMap"]
    return cm["data"]["config.yml"]


def metrics(dockerd: PrivateDockerd) -> dict:
    done = dockerd.cli("exec", "exporter", "python3", "-c",
                       "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9862/metrics').read().decode())",
                       check=False)
    return samples(done.stdout.decode()) if done.returncode == 0 else {}


def get(found: dict, name: str, **labels: str) -> float | None:
    for (n, ls), v in found.items():
        if n == name and labels.items() <= dict(ls).items():
            return v
    return None


def test_the_exporter_as_buildkitds_sidecar_reports_its_records_state_and_disk(dockerd, wheelhouse, tmp_path):
    wheels = wheelhouse
    base = import_tree(dockerd, BASE_TREE, "bkce-sidecar-base:test", tmp_path)
    done = build_shipped_image(dockerd, tmp_path, TAG, base, wheels)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    cfg = yaml.safe_load(shipped_config())
    (name, builder), = cfg["builders"].items()
    state_dir, sock_dir = builder["state_dir"], os.path.dirname(builder["address"].removeprefix("unix://"))
    (tmp_path / "config.yml").write_text(shipped_config())
    fixtures = tmp_path / "fixtures"  # where the engine sees it (it sees /tmp only)
    shutil.copytree(builder_container.FIXTURES, fixtures)
    try:
        dockerd.cli("run", "-d", "--name", "buildkitd", "--network", "none", "-v", f"bk-state:{state_dir}",
                    "-v", f"bk-socket:{sock_dir}", builder_container.IMAGE, "/bin/sleep", "2147483647")
        # What buildkitd keeps there: its bolt databases and snapshots.
        dockerd.cli("exec", "buildkitd", "sh", "-c",
                    f"mkdir -p {state_dir}/runc-overlayfs/snapshots/1/fs && cd {state_dir} && "
                    "for f in cache.db history.db runc-overlayfs/metadata_v2.db runc-overlayfs/containerdmeta.db; do "
                    "dd if=/dev/zero of=$f bs=1024 count=32 2>/dev/null; done && "
                    "i=0; while [ $i -lt 30 ]; do dd if=/dev/zero of=runc-overlayfs/snapshots/1/fs/f$i bs=1024 count=64 "
                    "2>/dev/null; i=$((i+1)); done && chown -R 1000:1000 .")
        dockerd.cli("run", "-d", "--name", "exporter", "--network", "container:buildkitd", "--user", "1000:1000",
                    "--read-only", "--tmpfs", "/tmp", "-v", f"bk-state:{state_dir}:ro", "-v", f"bk-socket:{sock_dir}",
                    "-v", f"{tmp_path / 'config.yml'}:/etc/buildkit-cache/config.yml:ro",
                    "-v", f"{fixtures}:/fixtures:ro", TAG, "--config", "/etc/buildkit-cache/config.yml")
        wait_for("the sidecar's figures", lambda: get(metrics(dockerd), "buildkit_cache_measurement_success",
                                                      builder=name, measurement="state_volume") == 1, timeout=90)
        found = metrics(dockerd)
        for m in ("records", "gc_policy", "filesystem", "state_volume"):
            assert get(found, "buildkit_cache_measurement_success", builder=name, measurement=m) == 1, m
        # Records: what that buildkitd reports (`buildctl du`).
        du = json.loads((builder_container.FIXTURES / "du.json").read_text())
        def total(metric: str) -> float:
            return sum(v for (n, ls), v in found.items() if n == metric and dict(ls)["builder"] == name)

        assert total("buildkit_cache_records") == len(du)
        assert total("buildkit_cache_size_bytes") == sum(r["size"] for r in du)
        # The state directory: the volume walked independently; its filesystem's statvfs.
        mountpoint = json.loads(dockerd.cli("volume", "inspect", "bk-state").stdout)[0]["Mountpoint"]
        size, files = walk(mountpoint)
        assert get(found, "buildkit_cache_state_volume_size_bytes", builder=name) == size
        assert get(found, "buildkit_cache_state_volume_files", builder=name) == files
        assert get(found, "buildkit_cache_state_databases_bytes", builder=name) == 4 * 32 * 1024
        st = os.statvfs(mountpoint)
        assert get(found, "buildkit_cache_filesystem_size_bytes", builder=name) == st.f_blocks * st.f_frsize
        assert get(found, "buildkit_cache_budget_bytes", builder=name) == 40e9

        # The actuator of deploy/kubernetes/components/actuator, in the same pod, prunes through the socket.
        token = tmp_path / "token"
        token.mkdir()
        (token / "actuator-token").write_text("sidecar-token\n")
        (token / "actuator-token").chmod(0o644)
        dockerd.cli("run", "-d", "--name", "actuator", "--network", "container:buildkitd", "--user", "1000:1000",
                    "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/var/log/buildkit-cache-actuator:uid=1000",
                    "--tmpfs", "/var/lib/buildkit-cache-actuator:uid=1000", "-v", f"bk-socket:{sock_dir}",
                    "-v", f"{tmp_path / 'config.yml'}:/etc/buildkit-cache/config.yml:ro",
                    "-v", f"{token}:/etc/buildkit-cache-token:ro", "-v", f"{fixtures}:/fixtures:ro",
                    "--entrypoint", "buildkit-cache-actuator", TAG, "--config", "/etc/buildkit-cache/config.yml")
        body = json.dumps(notification("prune-to-budget", name, host="remote"))
        post = ("import sys, urllib.request; r = urllib.request.Request('http://127.0.0.1:9863/alerts', "
                "data=sys.argv[1].encode(), headers={'Authorization': 'Bearer sidecar-token'}); "
                "print(urllib.request.urlopen(r).read().decode())")
        wait_for("the actuator", lambda: dockerd.cli("exec", "actuator", "python3", "-m", "buildkit_cache.healthcheck",
                                                     check=False).returncode == 0, timeout=60)
        answer = json.loads(dockerd.cli("exec", "actuator", "python3", "-c", post, body).stdout)
        assert answer["alerts"][0]["decision"] == "accepted", answer

        def pruned() -> list[dict]:
            text = dockerd.cli("exec", "actuator", "cat", "/var/log/buildkit-cache-actuator/audit.jsonl",
                               check=False).stdout.decode()
            return [e for e in map(json.loads, text.splitlines()) if e["event"] == "pruned"]

        (entry,) = wait_for("the prune", pruned, timeout=60)
        assert entry["builder"] == name and entry["records"] > 0
    except BaseException:
        print(dockerd.cli("logs", "exporter", check=False).stderr.decode()[-3000:])
        raise
    finally:
        dockerd.cli("rm", "-f", "actuator", "exporter", "buildkitd", check=False)
        dockerd.cli("volume", "rm", "bk-state", "bk-socket", check=False)
        dockerd.cli("rmi", TAG, "bkce-sidecar-base:test", check=False)
