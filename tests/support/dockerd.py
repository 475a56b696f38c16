"""A private dockerd for tests and the demo: own data root, socket and pid file, no bridge.

It can run beside another dockerd (FACTS: two default-bridge daemons clash over docker0), so it
starts with --bridge=none --iptables=false and builds use --network host.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

DOCKER_CLI = "/usr/bin/docker"  # Debian's 20.10 client: builds with the embedded BuildKit
BUSYBOX = "/bin/busybox"


class PrivateDockerd:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.socket = self.root / "docker.sock"
        self.pidfile = self.root / "docker.pid"
        self.log_path = self.root / "dockerd.log"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        for d in (self.data_root, self.exec_root):
            d.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                shutil.which("dockerd") or "/usr/sbin/dockerd",
                "--data-root", str(self.data_root),
                "--exec-root", str(self.exec_root),
                "--pidfile", str(self.pidfile),
                "--host", self.url,
                "--bridge=none",
                "--iptables=false",
                "--storage-driver", "overlay2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}; see {self.log_path}:\n{self.tail_log()}")
            if self.socket.exists() and self.cli("version", check=False, capture=True).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not answer within {timeout}s; see {self.log_path}:\n{self.tail_log()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # dockerd's own containerd lives in its session: make sure nothing is left behind.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- docker CLI -----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.url, "DOCKER_BUILDKIT": "1",
                "DOCKER_CONFIG": str(self.root / "cli-config")}

    def cli(self, *args: str, check: bool = True, capture: bool = True, input: bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run([DOCKER_CLI, *args], env=self.env(), capture_output=capture, input=input,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {done.returncode}:\n"
                               f"{(done.stderr or b'').decode(errors='replace')}")
        return done

    def build(self, context: Path, tag: str, *extra: str) -> None:
        """A real BuildKit build with the engine's embedded builder."""
        self.cli("build", "--network", "host", "-t", tag, *extra, str(context))

    def import_rootfs(self, tag: str, files: dict[str, bytes | tuple[bytes, int]],
                      links: dict[str, str] | None = None) -> None:
        """Make an image from a tarball built in memory (no registry is reachable)."""
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
        self.cli("import", "-", tag, input=buf.getvalue())


def busybox_files() -> tuple[dict[str, bytes | tuple[bytes, int]], dict[str, str]]:
    """A minimal rootfs: static busybox and the applets the exporter runs in a builder container."""
    files: dict[str, bytes | tuple[bytes, int]] = {"bin/busybox": (Path(BUSYBOX).read_bytes(), 0o755)}
    links = {f"bin/{a}": "busybox" for a in ("sh", "cat", "du", "df", "find", "wc", "sleep", "mkdir", "dd",
                                                "echo", "rm", "touch", "ln", "ls", "head")}
    return files, links

