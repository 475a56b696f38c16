"""An sshd on loopback that leads to a private dockerd, the way users reach a remote Docker host
(`ssh://user@host`): the docker SDK runs `docker system dial-stdio` there, which this sshd points at
the test engine's socket. Keys and config live in the test's folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .procs import Process, free_port, wait_for


class LoopbackSSHD:
    def __init__(self, workdir: Path, docker_socket: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)], check=True)
        public = (self.dir / "client_key.pub").read_text().strip()
        # The remote docker CLI finds the engine through DOCKER_HOST, set for this key only.
        (self.dir / "authorized_keys").write_text(f'environment="DOCKER_HOST=unix://{docker_socket}" {public}\n')
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitUserEnvironment DOCKER_HOST\nUsePAM no\nStrictModes no\n"
        )
        # The client side: the SDK runs the system `ssh`, which reads the user's ~/.ssh/config (found
        # from the passwd entry, not $HOME). Rather than touch root's, an `ssh` first on PATH adds
        # this config: what a user's own ~/.ssh/config would say for their build host.
        (self.dir / "ssh_config").write_text(
            f"Host 127.0.0.1\n  Port {self.port}\n  IdentityFile {self.dir / 'client_key'}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        )
        self.bin = self.dir / "bin"
        self.bin.mkdir(exist_ok=True)
        (self.bin / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {self.dir / "ssh_config"} "$@"\n')
        (self.bin / "ssh").chmod(0o755)
        self.url = f"ssh://root@127.0.0.1:{self.port}"
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        self.proc = Process(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / "sshd_config")], self.dir / "sshd.log")
        try:
            wait_for("sshd", lambda: self.ssh("true").returncode == 0, timeout=30)
        except BaseException:
            self.stop()  # never leave an sshd behind
            raise

    @property
    def path(self) -> str:
        """PATH for a client of this sshd."""
        return f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    def ssh(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "root@127.0.0.1", *command], env={**os.environ, "PATH": self.path},
                              capture_output=True, text=True, timeout=30)

    def stop(self) -> None:
        self.proc.stop()
