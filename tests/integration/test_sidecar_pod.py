"""The exporter as the sidecar of a rootless buildkitd pod, run as the pod would run it.

buildkitd is BuildKit v0.32.2, rootless (Debian's rootlesskit, uid 1000, subordinate ids 100000+,
`--oci-worker-no-process-sandbox`), as moby/buildkit's examples/kubernetes run it, with real builds
whose steps leave directories of another user in the image with mode 0700 (as apt's `partial`
directories are): on disk they belong to a shifted uid that the sidecar's uid 1000 may not read.
Nothing is chowned. The exporter is the shipped image (built from the Dockerfile), in buildkitd's
network namespace (`--network container:`), sharing its socket volume and its state volume
(read-only), with the config deploy/kubernetes gives it. Run twice:

- as the manifests run it, Pod Security "restricted" (uid 1000, every capability dropped,
  no-new-privileges, a read-only root): every measurement succeeds; the walk says how many
  directories it could not read, and measures the rest;
- with CAP_DAC_READ_SEARCH (deploy/kubernetes/components/complete-walk): the walk is whole.

Then the actuator of deploy/kubernetes/components/actuator, in the same pod, prunes through the
socket to a budget, and BuildKit's own `buildctl du` says the cache is at it.

What this machine needs beyond a Kubernetes node: `--cap-add SYS_ADMIN` on the buildkitd container,
because this kernel refuses newuidmap's uid map without it (stock kernels do not).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from lab.engines import PrivateDockerd
from lab.procs import ROOT, samples, wait_for
from tests.conftest import ENGINES
from tests.integration.test_actuator_docker import notification
from tests.support import buildkit
from tests.support.image import BASE_TREE, build_shipped_image, import_tree

D29 = [e for e in ENGINES if e.release == "docker29" and e.containerd_store]
pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine", D29, ids=[e.id for e in D29], indirect=True)]
TAG = "bkce-sidecar:test"
# The steps of a build as an image's apt would leave them: directories of user 42 (_apt), mode 0700.
DOCKERFILE = """FROM scratch
COPY busybox /bin/busybox
COPY data.bin /data.bin
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox mkdir -p /var/cache/apt/archives/partial /var/lib/apt/lists/partial && \
/bin/busybox dd if=/dev/urandom of=/var/cache/apt/archives/partial/pkg.deb bs=1024 count=768 2>/dev/null && \
/bin/busybox chown -R 42:0 /var/cache/apt/archives/partial /var/lib/apt/lists/partial && \
/bin/busybox chmod 0700 /var/cache/apt/archives/partial /var/lib/apt/lists/partial"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/urandom of=/layer bs=1024 count={kib} 2>/dev/null"]
"""


def shipped_config(overlay: str = "with-actuator") -> str:
    """The config deploy/kubernetes gives the pod (with the actuator component: the same ConfigMap)."""
    kubectl = ROOT / ".venv" / "bin" / "kubectl"
    done = subprocess.run([str(kubectl) if kubectl.exists() else "kubectl", "kustomize",
                           str(ROOT / "deploy" / "kubernetes" / overlay)], capture_output=True, text=True, check=True)
    (cm,) = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "ConfigMap"]
    return str(cm["data"]["config.yml"])


def metrics(dockerd: PrivateDockerd, container: str) -> dict:
    done = dockerd.cli("exec", container, "python3", "-c",
                       "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9862/metrics').read().decode())",
                       check=False)
    return samples(done.stdout.decode()) if done.returncode == 0 else {}


def get(found: dict, name: str, **labels: str) -> float | None:
    for (n, ls), v in found.items():
        if n == name and labels.items() <= dict(ls).items():
            return v
    return None


def walk_as(root: str, uid: int | None) -> tuple[int, int, int]:
    """An independent `du -sx`: allocated bytes and entries, hard links once, and the directories a
    process of `uid` (no capabilities) may not read, whose contents it cannot count (None: root)."""
    dev = os.lstat(root).st_dev
    seen, total, count, unreadable = set(), 0, 0, 0

    def readable(st: os.stat_result) -> bool:
        if uid is None:
            return True
        bits = stat.S_IRUSR | stat.S_IXUSR if st.st_uid == uid else stat.S_IROTH | stat.S_IXOTH
        if st.st_uid != uid and st.st_gid == uid:
            bits = stat.S_IRGRP | stat.S_IXGRP
        return st.st_mode & bits == bits

    for dirpath, dirnames, filenames in os.walk(root):
        st = os.lstat(dirpath)
        if st.st_dev != dev:
            dirnames[:] = []
            continue
        total += st.st_blocks * 512
        count += 1
        if not readable(st):
            unreadable += 1
            dirnames[:] = []
            continue
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            fst = os.lstat(os.path.join(dirpath, name))
            if fst.st_ino in seen:
                continue
            if fst.st_nlink > 1:
                seen.add(fst.st_ino)
            total += fst.st_blocks * 512
            count += 1
    return total, count, unreadable


def quiet(mountpoint: str) -> tuple[int, int, int]:
    """The state as uid 1000 sees it, once buildkitd is done writing it after the builds (its build
    history, for a moment): the same walk three times in a row, a second apart."""
    seen = []
    while len(seen) < 3 or len(set(seen[-3:])) > 1:
        seen.append(walk_as(mountpoint, 1000))
        time.sleep(1)
    return seen[-1]


@pytest.fixture(scope="module")
def shipped(dockerd, wheelhouse, tmp_path_factory):
    """The shipped image, built from the Dockerfile, and the rootless buildkitd's."""
    work = tmp_path_factory.mktemp("shipped")
    base = import_tree(dockerd, BASE_TREE, "bkce-sidecar-base:test", work)
    done = build_shipped_image(dockerd, work, TAG, base, wheelhouse)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    yield buildkit.build_rootless_image(dockerd, work)
    dockerd.cli("rmi", TAG, "bkce-sidecar-base:test", check=False)


def start_rootless(dockerd: PrivateDockerd, name: str, state_dir: str, sock_dir: str, address: str, image: str) -> None:
    """A rootless buildkitd container as the pod's: its state and socket on volumes of its own.
    (`--cap-add SYS_ADMIN`: this machine's kernel needs it for newuidmap, see the module's text.)"""
    dockerd.cli("run", "-d", "--name", name, "--security-opt", "seccomp=unconfined",
                "--security-opt", "apparmor=unconfined", "--cap-add", "SYS_ADMIN", "--network", "none",
                "-v", f"{name}-state:{state_dir}", "-v", f"{name}-socket:{sock_dir}", image,
                "--addr", address, "--oci-worker-no-process-sandbox")
    wait_for(f"the rootless buildkitd {name}", lambda: dockerd.cli("exec", name, "buildctl", "debug", "workers",
                                                                   check=False).returncode == 0, timeout=60)


def build_in(dockerd: PrivateDockerd, name: str, ctx: Path, inside: str) -> None:
    dockerd.cli("cp", str(ctx), f"{name}:{inside}")
    dockerd.cli("exec", name, "buildctl", "build", "--frontend", "dockerfile.v0",
                "--local", f"context={inside}", "--local", f"dockerfile={inside}")


def apt_like_context(ctx: Path, i: int) -> Path:
    ctx.mkdir()
    shutil.copy(buildkit.lab_busybox(), ctx / "busybox")
    (ctx / "data.bin").write_bytes(os.urandom(1024 * 1024 * (i + 1)))
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("{kib}", str(1024 * (i + 1))))
    return ctx


def test_the_exporter_as_a_rootless_buildkitds_sidecar_reports_its_records_state_and_disk(dockerd, shipped,
                                                                                          tmp_path):
    image = shipped
    cfg = yaml.safe_load(shipped_config())
    (name, builder), = cfg["builders"].items()
    state_dir, sock_dir = builder["state_dir"], os.path.dirname(builder["address"].removeprefix("unix://"))
    assert (state_dir, builder["address"]) == (buildkit.ROOTLESS_STATE, f"unix://{buildkit.ROOTLESS_SOCKET}")
    containers = ["buildkitd"]
    try:
        start_rootless(dockerd, "buildkitd", state_dir, sock_dir, builder["address"], image)
        # Real builds in it: two images' worth of layers, each with apt-like 0700 directories of user 42.
        for i in range(2):
            build_in(dockerd, "buildkitd", apt_like_context(tmp_path / f"ctx{i}", i), f"/home/user/.local/tmp/ctx{i}")
        # Its own du first: BuildKit stores the sizes it computes for DiskUsage (cache.db grows), so
        # the state is taken as it is once they are, as the exporter's measurements find it.
        du = json.loads(dockerd.cli("exec", "buildkitd", "buildctl", "du", "--format", "json").stdout)
        mountpoint = json.loads(dockerd.cli("volume", "inspect", "buildkitd-state").stdout)[0]["Mountpoint"]

        (tmp_path / "config.yml").write_text(yaml.safe_dump(cfg))

        def sidecar(cname: str, *security: str) -> dict:
            containers.append(cname)
            dockerd.cli("run", "-d", "--name", cname, "--network", "container:buildkitd", "--user", "1000:1000",
                        "--read-only", "--tmpfs", "/tmp", *security, "-v", f"buildkitd-state:{state_dir}:ro",
                        "-v", f"buildkitd-socket:{sock_dir}", "-v", f"{tmp_path / 'config.yml'}:/etc/buildkit-cache/config.yml:ro",
                        TAG, "--config", "/etc/buildkit-cache/config.yml")
            wait_for("the sidecar's figures", lambda: get(metrics(dockerd, cname), "buildkit_cache_measurement_success",
                                                          builder=name, measurement="state_volume") is not None,
                     timeout=90)
            found = metrics(dockerd, cname)
            dockerd.cli("stop", cname)
            return found

        # BuildKit may still write a build's history a while after the build (2 files, 139 kB, seen
        # once in a few runs on a loaded machine, after three equal walks): the figures are compared
        # with a state that stood still while the sidecar measured it, measured again if it did not.
        for attempt in range(3):
            size, files, unreadable = quiet(mountpoint)
            assert unreadable >= 4, "the builds left directories of a shifted user that uid 1000 may not read"
            cname = f"exporter-{attempt}"
            restricted = sidecar(cname, "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
            if quiet(mountpoint) == (size, files, unreadable):
                break
        else:
            raise AssertionError("the state changed while each of three sidecars measured it")
        log = dockerd.cli("logs", cname).stderr.decode()
        for found in (restricted,):
            for m in ("records", "gc_policy", "filesystem", "state_volume"):
                assert get(found, "buildkit_cache_measurement_success", builder=name, measurement=m) == 1, m

            def total(metric: str, found: dict = found) -> float:
                return sum(v for (n, ls), v in found.items() if n == metric and dict(ls)["builder"] == name)

            # Records: what that buildkitd reports (`buildctl du`).
            assert total("buildkit_cache_records") == len(du) > 0
            assert total("buildkit_cache_size_bytes") == sum(r["size"] for r in du)
        # Restricted: what uid 1000 may read, and how many directories it may not.
        assert get(restricted, "buildkit_cache_state_volume_unreadable_directories", builder=name) == unreadable
        assert get(restricted, "buildkit_cache_state_volume_size_bytes", builder=name) == size
        assert get(restricted, "buildkit_cache_state_volume_files", builder=name) == files
        assert "may not be read by this process" in log and "CAP_DAC_READ_SEARCH" in log
        st = os.statvfs(mountpoint)
        assert get(restricted, "buildkit_cache_filesystem_size_bytes", builder=name) == st.f_blocks * st.f_frsize
        assert get(restricted, "buildkit_cache_budget_bytes", builder=name) == 40e9
        assert get(restricted, "buildkit_cache_state_databases_bytes", builder=name) > 0

        # With CAP_DAC_READ_SEARCH (and no no-new-privileges, so the image's du may take it): whole.
        whole = sidecar("exporter-dac", "--cap-drop", "ALL", "--cap-add", "DAC_READ_SEARCH")
        full_size, full_files, _ = walk_as(mountpoint, None)
        assert get(whole, "buildkit_cache_state_volume_unreadable_directories", builder=name) == 0
        assert get(whole, "buildkit_cache_state_volume_size_bytes", builder=name) == full_size > size
        assert get(whole, "buildkit_cache_state_volume_files", builder=name) == full_files > files

        # The actuator of deploy/kubernetes/components/actuator, in the same pod, prunes through the
        # socket, to a budget of half the cache (the budget the test sets).
        budget = sum(r["size"] for r in du if not r["shared"]) // 2 // 1_000_000 * 1_000_000
        cfg["builders"][name]["budget"] = budget
        (tmp_path / "config.yml").write_text(yaml.safe_dump(cfg))
        token = tmp_path / "token"
        token.mkdir()
        (token / "actuator-token").write_text("sidecar-token\n")
        (token / "actuator-token").chmod(0o644)
        containers.append("actuator")
        dockerd.cli("run", "-d", "--name", "actuator", "--network", "container:buildkitd", "--user", "1000:1000",
                    "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp",
                    "--tmpfs", "/var/log/buildkit-cache-actuator:uid=1000",
                    "--tmpfs", "/var/lib/buildkit-cache-actuator:uid=1000", "-v", f"buildkitd-socket:{sock_dir}",
                    "-v", f"{tmp_path / 'config.yml'}:/etc/buildkit-cache/config.yml:ro",
                    "-v", f"{token}:/etc/buildkit-cache-token:ro",
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
        after = json.loads(dockerd.cli("exec", "buildkitd", "buildctl", "du", "--format", "json").stdout) or []
        assert sum(r["size"] for r in after if not r["shared"]) <= budget
    except BaseException:
        for c in containers[1:]:
            print(c, dockerd.cli("logs", c, check=False).stderr.decode()[-3000:])
        raise
    finally:
        dockerd.cli("rm", "-f", *containers, check=False)
        dockerd.cli("volume", "rm", "buildkitd-state", "buildkitd-socket", check=False)


def test_an_alert_about_one_pod_prunes_that_pod_and_another_pods_actuator_refuses_it(dockerd, shipped, tmp_path):
    """Two buildkitd pods of one StatefulSet (buildkitd-0, buildkitd-1), each with its actuator as the
    actuator component runs it (the downward API's namespace and pod name in its environment). The
    same alert, about buildkitd-1, sent to both: buildkitd-1's actuator prunes its own buildkitd;
    buildkitd-0's refuses it (other_pod) and its buildkitd keeps every record."""
    cfg = yaml.safe_load(shipped_config())
    (name, builder), = cfg["builders"].items()
    state_dir, sock_dir = builder["state_dir"], os.path.dirname(builder["address"].removeprefix("unix://"))
    (tmp_path / "config.yml").write_text(yaml.safe_dump(cfg))
    token = tmp_path / "token"
    token.mkdir()
    (token / "actuator-token").write_text("pods-token\n")
    (token / "actuator-token").chmod(0o644)
    pods = ("buildkitd-0", "buildkitd-1")
    containers: list[str] = []
    try:
        for i, pod in enumerate(pods):
            start_rootless(dockerd, pod, state_dir, sock_dir, builder["address"], shipped)
            containers.append(pod)
            build_in(dockerd, pod, apt_like_context(tmp_path / f"ctx-{pod}", i), "/home/user/.local/tmp/ctx")
            containers.append(f"{pod}-actuator")
            dockerd.cli("run", "-d", "--name", f"{pod}-actuator", "--network", f"container:{pod}",
                        "--user", "1000:1000", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                        "--tmpfs", "/tmp", "--tmpfs", "/var/log/buildkit-cache-actuator:uid=1000",
                        "--tmpfs", "/var/lib/buildkit-cache-actuator:uid=1000", "-v", f"{pod}-socket:{sock_dir}",
                        "-v", f"{tmp_path / 'config.yml'}:/etc/buildkit-cache/config.yml:ro",
                        "-v", f"{token}:/etc/buildkit-cache-token:ro",
                        "-e", "BUILDKIT_CACHE_POD_NAMESPACE=ci", "-e", f"BUILDKIT_CACHE_POD_NAME={pod}",
                        "--entrypoint", "buildkit-cache-actuator", TAG, "--config", "/etc/buildkit-cache/config.yml")

        def du(pod: str) -> list[dict]:
            return json.loads(dockerd.cli("exec", pod, "buildctl", "du", "--format", "json").stdout) or []

        before = {pod: sorted(r["id"] for r in du(pod)) for pod in pods}
        assert all(before.values())
        alert = notification("prune-all", name, host="remote")
        alert["alerts"][0]["labels"].update(namespace="ci", pod="buildkitd-1")
        post = ("import sys, urllib.request; r = urllib.request.Request('http://127.0.0.1:9863/alerts', "
                "data=sys.argv[1].encode(), headers={'Authorization': 'Bearer pods-token'}); "
                "print(urllib.request.urlopen(r).read().decode())")
        answers = {}
        for pod in pods:
            wait_for(f"{pod}'s actuator", lambda pod=pod: dockerd.cli(
                "exec", f"{pod}-actuator", "python3", "-m", "buildkit_cache.healthcheck", check=False).returncode == 0,
                timeout=60)
            answers[pod] = json.loads(dockerd.cli("exec", f"{pod}-actuator", "python3", "-c", post,
                                                  json.dumps(alert)).stdout)["alerts"][0]
        assert answers["buildkitd-1"]["decision"] == "accepted", answers
        assert answers["buildkitd-0"]["decision"] == "other_pod", answers
        assert "'buildkitd-1'" in answers["buildkitd-0"]["reason"]

        def audit(pod: str) -> list[dict]:
            text = dockerd.cli("exec", f"{pod}-actuator", "cat", "/var/log/buildkit-cache-actuator/audit.jsonl",
                               check=False).stdout.decode()
            return [json.loads(line) for line in text.splitlines()]

        wait_for("buildkitd-1's prune", lambda: [e for e in audit("buildkitd-1") if e["event"] == "pruned"], timeout=60)
        assert [r for r in du("buildkitd-1") if not r["inUse"]] == []
        assert sorted(r["id"] for r in du("buildkitd-0")) == before["buildkitd-0"]
        assert not [e for e in audit("buildkitd-0") if e["event"] in ("started", "pruned")]
    finally:
        dockerd.cli("rm", "-f", *containers, check=False)
        dockerd.cli("volume", "rm", *(f"{p}-{v}" for p in pods for v in ("state", "socket")), check=False)
