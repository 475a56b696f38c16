"""Private Docker engines for the tests and the demo: the engines users run, none of them the host's.

The matrix is Debian's docker.io of three releases and Docker Engine 29 built from source, each
store where the engine has two:

    bookworm  20.10.24   (API 1.41)
    trixie    26.1.5     (API 1.45)
    sid       28.5.2     (API 1.51), and 28.5.2 with the containerd image store
    docker29  29.7.2     (API 1.55) with its default containerd image store, and with overlay2

The host's own package serves the host's release; the others run from Debian root filesystems made
once by `scripts/engine-tree` under $BKCE_ENGINE_CACHE (default /var/cache/bkce-test-engines).
Docker 29.7.2 (dockerd, containerd 2.3.3, runc 1.4.3, built by ../shared/engines/build-docker29
into $BKCE_ENGINE_CACHE/docker-29.7.2, see scripts/engines-from-source) runs in the sid tree, whose
docker CLI (28.5), buildx (0.29) and compose (2.40) talk to it: its binaries are bound over the
tree's /usr/local/bin, first on PATH, so that its own containerd and runc are the ones used (Debian
12's runc 1.1.5 cannot start containers under 29.5 and later).

Each dockerd runs in mount and network namespaces of its own (`unshare --mount --net`):
- its own network namespace, because a dockerd started with --bridge=none deletes an existing
  `docker0` (FACTS), and a user's Docker must keep its bridge;
- its own mount namespace, so its overlay mounts vanish with it, and, for a tree, so the tree can be
  the root (pivot_root: under a plain chroot `docker exec` lands in the host's root). The host's /tmp
  is bound at the same path inside, so sockets, data roots and build contexts have one path.
The docker CLI runs in the same namespaces (`nsenter`), from the engine's own release.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUSYBOX = "/bin/busybox"
ENGINE_CACHE = Path(os.environ.get("BKCE_ENGINE_CACHE", "/var/cache/bkce-test-engines"))

# (release, containerd image store): the engines every Docker test runs against. "docker29" is
# Docker Engine 29.7.2 built from source, run in the sid tree.
MATRIX: tuple[tuple[str, bool], ...] = (("bookworm", False), ("trixie", False), ("sid", False), ("sid", True),
                                        ("docker29", True), ("docker29", False))
DOCKER29 = "docker-29.7.2"  # its folder under ENGINE_CACHE, made by scripts/engines-from-source

# Runs inside `unshare --mount --net --fork --propagation private`: $1 is the root (a tree or /),
# the rest the command. DATA_ROOT is made a mount point of its own first: dockerd would otherwise
# bind it onto itself without its submounts (hiding a containerd root mounted below it).
_LAUNCH = r"""
set -e
tree=$1; shift
ip link set lo up
if [ -n "$DATA_ROOT" ]; then mount --rbind "$DATA_ROOT" "$DATA_ROOT"; fi
if [ "$tree" != / ]; then
    mount --bind "$tree" "$tree"
    if [ -n "$ENGINE_BIN" ]; then mount --bind "$ENGINE_BIN" "$tree/usr/local/bin"; fi
    mount --rbind /tmp "$tree/tmp"
    mount -t proc proc "$tree/proc"
    mount --rbind /sys "$tree/sys"
    mount --rbind /dev "$tree/dev"
    mount -t tmpfs tmpfs "$tree/run"
    cd "$tree"
    mkdir -p .oldroot
    pivot_root . .oldroot
    cd /
    umount -l /.oldroot
fi
exec "$@"
"""


def host_release() -> str:
    """The host's Debian release code name (bookworm, trixie, ...), from /etc/os-release."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return ""
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return m.group(1) if m else ""


def _version(text: str) -> str:
    m = re.search(r"version (\d+\.\d+\.\d+)", text)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class Engine:
    release: str
    containerd_store: bool
    tree: str  # "/" for the host's own package
    version: str  # "28.5.2", or "" when the tree is not built yet
    bin_dir: str = ""  # an engine built from source: its binaries, first on PATH in the tree

    @property
    def id(self) -> str:
        """The test id: docker-28.5.2, docker-28.5.2-containerd (the release if not built yet)."""
        return f"docker-{self.version or self.release}" + ("-containerd" if self.containerd_store else "")

    @property
    def ready(self) -> bool:
        return bool(self.version)

    def dockerd(self) -> str:
        if self.bin_dir:
            return "/usr/local/bin/dockerd"
        return "/usr/sbin/dockerd" if self.tree != "/" else (shutil.which("dockerd") or "/usr/sbin/dockerd")

    def describe(self) -> str:
        store = "containerd image store" if self.containerd_store else "overlay2"
        if self.bin_dir:
            return f"Docker {self.version or '29.7.2 (not built)'} built from source, {store}, in the sid tree"
        where = "the host's package" if self.tree == "/" else self.tree
        return f"Docker {self.version or self.release} (Debian {self.release}, {where}), {store}"

    def at_least(self, version: str) -> bool:
        def parts(v: str) -> tuple[int, ...]:
            return tuple(int(p) for p in v.split("."))

        return bool(self.version) and parts(self.version) >= parts(version)


def engine(release: str, containerd_store: bool = False) -> Engine:
    if release == "docker29":
        bin_dir = ENGINE_CACHE / DOCKER29 / "bin"
        sid = ENGINE_CACHE / "sid"
        try:
            version = (bin_dir / ".version").read_text().strip() if (sid / ".ready").exists() else ""
        except OSError:
            version = ""
        return Engine(release, containerd_store, str(sid), version, str(bin_dir))
    if release == host_release():
        try:
            out = subprocess.run(["dockerd", "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        return Engine(release, containerd_store, "/", _version(out))
    tree = ENGINE_CACHE / release
    try:
        version = _version((tree / ".ready").read_text())
    except OSError:
        version = ""
    return Engine(release, containerd_store, str(tree), version)


def matrix() -> list[Engine]:
    return [engine(r, c) for r, c in MATRIX]


def host_engine() -> Engine:
    """The host release's engine (the demo's)."""
    return engine(host_release() or "bookworm")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 120):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


# runc inside BuildKit losing a build step's process as it starts, before the step runs: once in
# about 700 builds on a loaded 2-core machine, as "container process is already dead" or as a
# failure of runc's own init ("read init-p: connection reset by peer", "procReady not received").
RUNC_LOST_IT = ("runc run failed: container process is already dead",
                "runc run failed: unable to start container process: error during container init: ")


def build_twice_if_runc_lost_it(build: Callable[[], object]) -> None:
    """`build`, again once if runc inside BuildKit lost a build step's process as it started:
    BuildKit's failure, not what a test or the demo checks. The same build again runs from the
    cache it left."""
    try:
        build()
    except RuntimeError as e:
        if not any(m in str(e) for m in RUNC_LOST_IT):
            raise
        build()


class PrivateDockerd:
    """One engine of the matrix with its own data root, socket and namespaces under `root`."""

    def __init__(self, root: Path, eng: Engine | None = None, extra: tuple[str, ...] = ()):
        self.root = Path(root)
        self.engine = eng or host_engine()
        self.extra = extra  # more dockerd arguments (another --host, TLS files)
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.socket = self.root / "docker.sock"
        self.pidfile = self.root / "docker.pid"
        self.log_path = self.root / "dockerd.log"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self._mnt_ns = 0
        self._tmpfs = False
        self._data_tmpfs = False

    @property
    def containerd_root(self) -> Path:
        """Where the engine's own containerd keeps its content and snapshots (containerd store)."""
        return self.data_root / "containerd" / "daemon"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        if not self.engine.ready:
            how = "scripts/engines-from-source" if self.engine.bin_dir else f"scripts/engine-tree {self.engine.release}"
            raise RuntimeError(f"engine {self.engine.release} is not set up: run scripts/setup ({how})")
        for d in (self.data_root, self.exec_root):
            d.mkdir(parents=True, exist_ok=True)
        if not self._data_tmpfs:
            # The data root on a filesystem of its own, as /var/lib/docker often is: what the disk got
            # back after a prune, or whether it moved, is this engine's alone, not the sum of every
            # test writing to /tmp beside it. Pages are used only as written.
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8g", "bkce-docker", str(self.data_root)], check=True)
            self._data_tmpfs = True
        config = self.root / "daemon.json"
        daemon: dict[str, Any] = {}
        # Docker 29 takes the containerd store by default (nothing said: what fresh installs get);
        # older engines take it only when asked.
        if self.engine.bin_dir and not self.engine.containerd_store:
            daemon["features"] = {"containerd-snapshotter": False}
        elif self.engine.containerd_store and not self.engine.bin_dir:
            daemon["features"] = {"containerd-snapshotter": True}
        if self.engine.containerd_store:
            # containerd's root on a filesystem of its own, as on hosts where /var/lib/containerd
            # and /var/lib/docker are different disks: the exporter must measure the right one.
            if not self._tmpfs:
                (self.data_root / "containerd").mkdir(exist_ok=True)
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "bkce-containerd",
                                str(self.data_root / "containerd")], check=True)
                self._tmpfs = True
        config.write_text(json.dumps(daemon))
        self.pidfile.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        argv = [
            "unshare", "--mount", "--net", "--fork", "--propagation", "private", "--",
            "/bin/sh", "-c", _LAUNCH, "sh", self.engine.tree,
            self.engine.dockerd(),
            "--config-file", str(config),
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "--host", self.url,
            "--bridge=none",
            "--iptables=false",
            *self.extra,
        ]
        if not self.engine.containerd_store:
            argv += ["--storage-driver", "overlay2"]
        env = {**os.environ, "DATA_ROOT": str(self.data_root), "ENGINE_BIN": self.engine.bin_dir}
        if self.engine.bin_dir:
            env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}; see {self.log_path}:\n{self.tail_log()}")
            if self.socket.exists() and self._ping():
                self.pid = int(self.pidfile.read_text().strip())
                self._mnt_ns = os.stat(f"/proc/{self.pid}/ns/mnt").st_ino
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer within {timeout}s; see {self.log_path}:\n{self.tail_log()}")

    def _ping(self) -> bool:
        try:
            conn = UnixHTTPConnection(str(self.socket), timeout=5)
            conn.request("GET", "/_ping")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop dockerd and everything left in its namespaces (containerd, shims)."""
        if self.proc is None:
            return
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._kill_namespace()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        self.pid = 0

    def _kill_namespace(self) -> None:
        if not self._mnt_ns:
            return
        for _ in range(50):
            left = []
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == os.getpid():
                    continue
                try:
                    if os.stat(f"/proc/{entry}/ns/mnt").st_ino == self._mnt_ns:
                        left.append(int(entry))
                except OSError:
                    continue
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def close(self) -> None:
        """Stop, and remove everything this engine made under its root."""
        self.stop()
        if self._tmpfs:
            subprocess.run(["umount", "-l", str(self.data_root / "containerd")], check=False)
            self._tmpfs = False
        if self._data_tmpfs:
            subprocess.run(["umount", "-l", str(self.data_root)], check=False)
            self._data_tmpfs = False
        shutil.rmtree(self.root, ignore_errors=True)

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- the Engine API, independently of the code under test -----------------------------------

    # What an engine answers a GET that is right again a moment later: the containerd store can fail
    # a listing while it deletes ("snapshot ... not found"); 20.10 computes one /system/df at a time,
    # and the exporter's may be running.
    BUSY = (b"does not exist", b"a disk usage operation is already running")

    def api(self, path: str, method: str = "GET") -> Any:
        for attempt in range(20):
            conn = UnixHTTPConnection(str(self.socket))
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                return json.loads(body)
            if method != "GET" or not any(b in body for b in self.BUSY) or attempt == 19:
                raise AssertionError(f"{method} {path}: {resp.status} {body[:300]!r}")
            time.sleep(0.5)

    # -- docker CLI -----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.url, "DOCKER_BUILDKIT": "1",
                "DOCKER_CONFIG": str(self.root / "cli-config")}

    def in_netns(self, argv: list[str]) -> list[str]:
        """`argv` run in this engine's network namespace (to reach what it serves on its loopback)."""
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv]

    def cli_argv(self, *args: str) -> list[str]:
        """The engine's own docker CLI, run in its namespaces."""
        # /usr/bin/docker: Debian's CLI of the same release, never another one found first on PATH.
        return ["nsenter", "--target", str(self.pid), "--mount", "--net", "--", "/usr/bin/docker", *args]

    def cli(self, *args: str, check: bool = True, capture: bool = True, input: bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        if not self.pid:
            raise RuntimeError("dockerd is not running")
        done = subprocess.run(self.cli_argv(*args), env=self.env(), capture_output=capture, input=input,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {done.returncode}:\n"
                               f"{(done.stderr or b'').decode(errors='replace')}")
        return done

    def build(self, context: Path, tag: str, *extra: str) -> None:
        """A real BuildKit build with the engine's embedded builder."""
        build_twice_if_runc_lost_it(lambda: self.cli("build", "--network", "host", "-t", tag, *extra, str(context)))

    def has_image(self, tag: str) -> bool:
        return self.cli("image", "inspect", tag, check=False).returncode == 0

    def import_rootfs(self, tag: str, files: dict[str, bytes | tuple[bytes, int]],
                      links: dict[str, str] | None = None, changes: tuple[str, ...] = ()) -> None:
        """Make an image from a tarball built in memory (no registry is reachable); `changes` are
        Dockerfile instructions for its config (`docker import --change`)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            dirs: set[str] = set()
            for path in list(files) + list(links or {}):
                parts = path.strip("/").split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    d = "/".join(parts[:i])
                    if d not in dirs:
                        dirs.add(d)
                        info = tarfile.TarInfo(d)
                        info.type = tarfile.DIRTYPE
                        info.mode = 0o755
                        tar.addfile(info)
            for path, content in files.items():
                data, mode = content if isinstance(content, tuple) else (content, 0o644)
                info = tarfile.TarInfo(path.strip("/"))
                info.size = len(data)
                info.mode = mode
                tar.addfile(info, io.BytesIO(data))
            for path, target in (links or {}).items():
                info = tarfile.TarInfo(path.strip("/"))
                info.type = tarfile.SYMTYPE
                info.linkname = target
                tar.addfile(info)
        self.cli("import", *(a for c in changes for a in ("--change", c)), "-", tag, input=buf.getvalue())


def busybox_files() -> tuple[dict[str, bytes | tuple[bytes, int]], dict[str, str]]:
    """A minimal rootfs: static busybox and the applets the exporter runs in a builder container."""
    files: dict[str, bytes | tuple[bytes, int]] = {"bin/busybox": (Path(BUSYBOX).read_bytes(), 0o755)}
    links = {f"bin/{a}": "busybox" for a in ("sh", "cat", "du", "df", "find", "wc", "sleep", "mkdir", "dd",
                                                "echo", "rm", "touch", "ln", "ls", "head", "timeout", "ps", "pgrep", "yes")}
    return files, links


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
