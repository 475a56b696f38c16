"""Real BuildKit builders, made the way users make them.

The buildkitd and buildctl are BuildKit v0.32.2 built from source (scripts/engines-from-source,
under $BKCE_ENGINE_CACHE/buildkit-v0.32.2), with runc 1.4.3, in an image made the way BuildKit's
release image is laid out (busybox, the two binaries and runc, ENTRYPOINT buildkitd), imported into
the test engine because no registry is reachable. buildx uses that local image when its pull fails.

A docker-container builder is made by the engine's own buildx (`docker buildx create --driver
docker-container --driver-opt image=...`, buildx 0.13 on 26.1, 0.29 on 28.5 and 29.7), which names
its container `buildx_buildkit_<name>0` and its state volume `..._state`. Docker 20.10 has no
buildx: there the same container is made by hand, with the settings buildx gives it. Builds go
through `docker buildx build` where there is buildx, else through the builder's own buildctl.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.engines import ENGINE_CACHE, PrivateDockerd, UnixHTTPConnection, build_twice_if_runc_lost_it, busybox_files

BUILDKIT_BIN = ENGINE_CACHE / "buildkit-v0.32.2" / "bin"
# The same BuildKit with its gRPC message limit lowered to 128 KiB (scripts/build-buildkit-small):
# `buildctl du` is refused past a few hundred records, as the stock one is past ~140,000.
SMALL_BIN = ENGINE_CACHE / "buildkit-v0.32.2-small" / "bin"
RUNC = ENGINE_CACHE / "docker-29.7.2" / "bin" / "runc"
IMAGE = "bkce-buildkit:v0.32.2"
SMALL_IMAGE = "bkce-buildkit:v0.32.2-limit128k"
# Rootless, as moby/buildkit:v0.32.2-rootless is laid out (user 1000 with subordinate ids 100000-165535,
# ENTRYPOINT rootlesskit buildkitd): Debian 12's rootlesskit and newuidmap (scripts/engine-tree
# buildkit-rootless), and the binaries above.
ROOTLESS_IMAGE = "bkce-buildkit:v0.32.2-rootless"
ROOTLESS_STATE = "/home/user/.local/share/buildkit"
ROOTLESS_SOCKET = "/run/user/1000/buildkit/buildkitd.sock"
VERSION = "v0.32.2"


def require_built() -> None:
    for path in (BUILDKIT_BIN / "buildkitd", BUILDKIT_BIN / "buildctl", SMALL_BIN / "buildkitd", RUNC):
        if not path.exists():
            raise RuntimeError(f"{path} is missing: run scripts/setup (scripts/engines-from-source)")


def build_image(dockerd: PrivateDockerd, small: bool = False) -> str:
    """The buildkitd image in this engine (once per engine): busybox (`timeout`, `du`, `df`, ...),
    buildkitd, buildctl and runc, like BuildKit's release image."""
    tag = SMALL_IMAGE if small else IMAGE
    if dockerd.has_image(tag):
        return tag
    require_built()
    bindir = SMALL_BIN if small else BUILDKIT_BIN
    files, links = busybox_files()
    links["bin/mount"] = "busybox"
    for name in ("buildkitd", "buildctl") + (("bkce-recordgen",) if small else ()):
        files[f"usr/bin/{name}"] = ((bindir / name).read_bytes(), 0o755)
    files["usr/bin/runc"] = (RUNC.read_bytes(), 0o755)
    for d in ("tmp", "run", "etc/buildkit", "var/lib/buildkit"):
        files[f"{d}/.keep"] = b""
    dockerd.import_rootfs(tag, files, links, changes=('ENTRYPOINT ["buildkitd"]',))
    return tag


# Every capability of this machine's bounding set (all but SYS_RESOURCE).
PRIVILEGED_CAPS = ("AUDIT_CONTROL", "AUDIT_READ", "AUDIT_WRITE", "BLOCK_SUSPEND", "CHOWN", "DAC_OVERRIDE",
                   "DAC_READ_SEARCH", "FOWNER", "FSETID", "IPC_LOCK", "IPC_OWNER", "KILL", "LEASE",
                   "LINUX_IMMUTABLE", "MAC_ADMIN", "MAC_OVERRIDE", "MKNOD", "NET_ADMIN", "NET_BIND_SERVICE",
                   "NET_BROADCAST", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYSLOG", "SYS_ADMIN",
                   "SYS_BOOT", "SYS_CHROOT", "SYS_MODULE", "SYS_NICE", "SYS_PACCT", "SYS_PTRACE", "SYS_RAWIO",
                   "SYS_TIME", "SYS_TTY_CONFIG", "WAKE_ALARM")


REMOUNT_CGROUPS = ('for d in /sys/fs/cgroup /sys/fs/cgroup/*; do mount -o remount,bind,rw "$d" 2>/dev/null; done; '
                   'exec buildkitd "$@"')


def build_rootless_image(dockerd: PrivateDockerd, work: Path) -> str:
    """The rootless buildkitd image in this engine (once per engine)."""
    import tarfile

    if dockerd.has_image(ROOTLESS_IMAGE):
        return ROOTLESS_IMAGE
    require_built()
    tree = ENGINE_CACHE / "buildkit-rootless"
    if not (tree / ".ready").exists():
        raise RuntimeError(f"{tree} is missing: run scripts/setup (scripts/engine-tree buildkit-rootless)")
    tar = work / "rootless.tar"
    # --xattrs: newuidmap and newgidmap may hold their privilege as file capabilities.
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C", str(tree), "--exclude=./.ready",
                    "--exclude=./.packages", "-cf", str(tar), "."], check=True)
    passwd = (tree / "etc/passwd").read_text() + "user:x:1000:1000::/home/user:/bin/sh\n"
    group = (tree / "etc/group").read_text() + "user:x:1000:\n"
    import io

    with tarfile.open(tar, "a") as t:
        def add(name: str, data: bytes | None, mode: int, uid: int = 0) -> None:
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid = mode, uid, uid
            if data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))

        add("etc/passwd", passwd.encode(), 0o644)
        add("etc/group", group.encode(), 0o644)
        add("etc/subuid", b"user:100000:65536\n", 0o644)
        add("etc/subgid", b"user:100000:65536\n", 0o644)
        for name in ("buildkitd", "buildctl"):
            add(f"usr/bin/{name}", (BUILDKIT_BIN / name).read_bytes(), 0o755)
        add("usr/bin/runc", RUNC.read_bytes(), 0o755)
        for d in ("run/user", "home", "home/user/.local", "home/user/.local/share"):
            add(d, None, 0o755)
        for d in ("run/user/1000", "run/user/1000/buildkit", "home/user", "home/user/.local/share/buildkit",
                  "home/user/.local/tmp"):
            add(d, None, 0o700, uid=1000)
    changes = ("USER 1000:1000", "ENV HOME=/home/user", "ENV USER=user", "ENV XDG_RUNTIME_DIR=/run/user/1000",
               "ENV TMPDIR=/home/user/.local/tmp", f"ENV BUILDKIT_HOST=unix://{ROOTLESS_SOCKET}",
               'ENTRYPOINT ["rootlesskit", "buildkitd"]')
    dockerd.cli("import", *(a for c in changes for a in ("--change", c)), str(tar), ROOTLESS_IMAGE)
    tar.unlink()
    return ROOTLESS_IMAGE


def has_buildx(dockerd: PrivateDockerd) -> bool:
    return dockerd.engine.release != "bookworm"


def settled(du: Callable[[], list[dict[str, Any]]], timeout: float = 30.0) -> list[dict[str, Any]]:
    """BuildKit's records once none is in use. A build's client returns before BuildKit has let go
    of its records (it still writes the build's history, releases its solve's refs): meanwhile they
    are in use, an in-use record shows in place of its mutable twin, and the listing moves until it
    lets go (cache/manager.go DiskUsage). After `timeout`, the records as they are."""
    deadline = time.monotonic() + timeout
    while True:
        records = du()
        if not any(r.get("inUse") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@dataclass
class Builder:
    """A docker-container builder: container `buildx_buildkit_<name>0`, volume `..._state`."""

    dockerd: PrivateDockerd
    name: str
    image: str
    by_buildx: bool
    node: str = ""  # buildx's node name: `<name>0` for the first node of a builder
    builds: int = field(default=0)

    @property
    def container(self) -> str:
        return f"buildx_buildkit_{self.node or self.name + '0'}"

    @property
    def volume(self) -> str:
        return f"{self.container}_state"

    def mountpoint(self) -> str:
        return str(self.dockerd.api(f"/volumes/{self.volume}")["Mountpoint"])

    # -- BuildKit's own answers, independently of the code under test ---------------------------

    def buildctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self.dockerd.cli("exec", self.container, "buildctl", *args, check=check)

    def du(self) -> list[dict[str, Any]]:
        """`buildctl du --format json`: BuildKit's own list of records."""
        return json.loads(self.buildctl("du", "--format", "json").stdout or b"[]") or []

    def total(self) -> int:
        return sum(r["size"] for r in self.du())

    # -- builds ---------------------------------------------------------------------------------

    def build(self, context: Path, image: str | None = None) -> None:
        """A real build of `context` (a folder with a Dockerfile); with `image`, its result is kept
        as an image in the builder's own store, so its layers' records are shared."""
        self.builds += 1
        if self.by_buildx:
            out = ["--output", f"type=image,name={image}"] if image else []
            build_twice_if_runc_lost_it(lambda: self.dockerd.cli("buildx", "build", "--builder", self.name, *out,
                                                                 str(context), timeout=600))
            return
        # No buildx (Docker 20.10): the context into the builder, and its own buildctl.
        inside = f"/tmp/context-{self.builds}"
        self.dockerd.cli("cp", str(context), f"{self.container}:{inside}")
        out = ["--output", f"type=image,name={image}"] if image else []
        self.buildctl("build", "--frontend", "dockerfile.v0", "--local", f"context={inside}",
                      "--local", f"dockerfile={inside}", *out)
        self.dockerd.cli("exec", self.container, "rm", "-rf", inside)

    def settle(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """`du` once no record is in use (`settled`): buildx returns before BuildKit has let go."""
        return settled(self.du, timeout)

    def pid(self) -> int:
        """buildkitd's process id on this machine (the engine shares its PID namespace). buildx runs
        it under an init (`docker-init`): it is looked for in the container's process tree."""
        first = int(self.dockerd.cli("inspect", "-f", "{{.State.Pid}}", self.container).stdout.decode().strip())
        todo = [first]
        while todo:
            pid = todo.pop()
            if Path(f"/proc/{pid}/comm").read_text().strip() == "buildkitd":
                return pid
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        raise RuntimeError(f"no buildkitd in {self.container}")

    def zombies(self) -> list[str]:
        """Processes in the container that exited and were never reaped (`Z`): what an exec leaves
        behind where no init reaps orphans (busybox `timeout` watches its command from one)."""
        first = int(self.dockerd.cli("inspect", "-f", "{{.State.Pid}}", self.container).stdout.decode().strip())
        found, todo = [], [first]
        while todo:
            pid = todo.pop()
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                todo += [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                         for c in (task / "children").read_text().split()]
            except OSError:
                continue  # gone meanwhile
            comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
            if state == "Z":
                found.append(f"{pid} {comm}")
        return found

    def freeze(self) -> int:
        """Stop buildkitd where it stands (SIGSTOP): every call to it waits, as with a hung builder,
        until `thaw`. Returns its pid."""
        import os
        import signal

        pid = self.pid()
        os.kill(pid, signal.SIGSTOP)
        return pid

    def processes(self, name: str, *args: str) -> list[int]:
        """This machine's pids of the container's processes called `name` (its cgroup names it)
        whose arguments include `args`: `processes("buildctl", "prune")` is not the `buildctl du`
        the actuator ran just before, still exiting."""
        cid = self.dockerd.cli("inspect", "-f", "{{.Id}}", self.container).stdout.decode().strip()
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "comm").read_text().strip() == name and \
                        cid in (proc / "cgroup").read_text() and \
                        all(a in (proc / "cmdline").read_bytes().split(b"\0") for a in map(str.encode, args)):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    def freeze_at_prune(self) -> FreezeAtPrune:
        """Freeze buildkitd the moment a `buildctl prune` is created in its container (the engine's
        `exec_create` event comes before the command can start, let alone reach buildkitd): the prune
        then runs, really, until `thaw()`, as a prune of a big cache takes minutes."""
        return FreezeAtPrune(self)

    def thaw(self, pid: int) -> None:
        import os
        import signal

        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def remove(self, keep_state: bool = False) -> None:
        if self.by_buildx:
            args = ["buildx", "rm", *(["--keep-state"] if keep_state else []), self.name]
            if self.dockerd.cli(*args, check=False).returncode == 0:
                return
        self.dockerd.cli("rm", "-f", self.container, check=False)
        if not keep_state:
            self.dockerd.cli("volume", "rm", "-f", self.volume, check=False)


class FreezeAtPrune:
    def __init__(self, builder: Builder):
        import threading

        self.builder = builder
        self.pid = builder.pid()
        self.frozen = threading.Event()
        self._conn = UnixHTTPConnection(str(builder.dockerd.socket), timeout=None)  # type: ignore[arg-type]
        filters = json.dumps({"type": ["container"], "event": ["exec_create"], "container": [builder.container]})
        from urllib.parse import quote

        self._conn.request("GET", f"/events?filters={quote(filters)}")
        self._resp = self._conn.getresponse()
        self._sock = self._conn.sock
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import os
        import signal

        try:
            for line in self._resp:
                if b"buildctl prune" in line or b"buildctl\\u0020prune" in line:
                    os.kill(self.pid, signal.SIGSTOP)
                    self.frozen.set()
                    return
        except (OSError, ValueError, AttributeError):
            return

    def thaw(self) -> None:
        self.builder.thaw(self.pid)
        import socket

        try:
            if self._sock is not None:
                self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()


def create(dockerd: PrivateDockerd, name: str, small: bool = False, flags: tuple[str, ...] = (),
           node: str = "") -> Builder:
    """A docker-container builder named `name`, started (bootstrapped) and answering. With `node`,
    its node is named so (`buildx create --node ci1`: container buildx_buildkit_ci1), else `<name>0`."""
    image = build_image(dockerd, small)
    builder = Builder(dockerd, name, image, has_buildx(dockerd), node)
    if builder.by_buildx:
        args = ["buildx", "create", "--name", name, "--driver", "docker-container",
                "--driver-opt", f"image={image}", "--driver-opt", "network=host"]
        if node:
            args += ["--node", node]
        if flags:
            args += ["--buildkitd-flags", " ".join(flags)]
        dockerd.cli(*args, "--bootstrap", timeout=180)
    else:
        # What buildx's docker-container driver makes (driver/docker-container/driver.go): the
        # state volume at /var/lib/buildkit, a privileged container running buildkitd. Docker
        # 20.10's --privileged asks for a capability this machine's bounding set lacks (FACTS):
        # every capability there is, unconfined, does what --privileged does for buildkitd.
        dockerd.cli("volume", "create", builder.volume)
        # --privileged also mounts the cgroup hierarchies writable, where runc makes the build
        # steps' cgroups: done here by remounting them before buildkitd starts.
        caps = [a for c in PRIVILEGED_CAPS for a in ("--cap-add", c)]
        # --init: buildx runs its builders under an init (docker-init), which reaps what exec'd
        # processes leave orphaned (busybox `timeout`'s watcher, at every measurement).
        dockerd.cli("run", "-d", "--init", "--name", builder.container, *caps, "--security-opt", "seccomp=unconfined",
                    "--security-opt", "apparmor=unconfined", "--security-opt", "systempaths=unconfined",
                    "--network", "host", "--restart", "unless-stopped", "-v", f"{builder.volume}:/var/lib/buildkit",
                    "--entrypoint", "/bin/sh", image, "-c", REMOUNT_CGROUPS, "sh", *flags)
    wait_ready(builder)
    return builder


def wait_ready(builder: Builder, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = builder.buildctl("debug", "workers", check=False)
        if done.returncode == 0 and done.stdout.strip():
            return
        if time.monotonic() > deadline:
            logs = builder.dockerd.cli("logs", "--tail", "30", builder.container, check=False)
            raise RuntimeError(f"buildkitd in {builder.container} did not answer within {timeout:g}s: "
                               f"{done.stderr.decode()[-500:]}\n{logs.stderr.decode()[-2000:]}")
        time.sleep(0.3)


def write_context(ctx: Path, name: str, layers: list[tuple[str, int]], cache_mb: int = 0) -> Path:
    """A Dockerfile FROM scratch: busybox, then `layers` in order, each ("copy" or "run", megabytes):
    a COPY of a file of that size, or a RUN writing one. With `cache_mb`, a RUN writing that much into
    a cache mount of its own (an exec.cachemount record). Each build with a new `name` makes new records."""
    import os

    ctx.mkdir(parents=True, exist_ok=True)
    shutil.copy(lab_busybox(), ctx / "busybox")
    lines = ["FROM scratch", "COPY busybox /bin/busybox"]
    for i, (kind, mb) in enumerate(layers):
        if kind == "copy":
            (ctx / f"{name}-{i}.bin").write_bytes(os.urandom(int(mb * 1024 * 1024)))
            lines.append(f"COPY {name}-{i}.bin /{name}-{i}.bin")
        else:
            kib = int(mb * 1024)
            lines.append(f'RUN ["/bin/busybox", "sh", "-c", "/bin/busybox dd if=/dev/urandom of=/{name}-{i} '
                         f'bs=1024 count={kib} 2>/dev/null"]')
    if cache_mb:
        lines.append(f'RUN --mount=type=cache,target=/cache,id={name} ["/bin/busybox", "sh", "-c", '
                     f'"/bin/busybox dd if=/dev/urandom of=/cache/{name} bs=1024 count={cache_mb * 1024} 2>/dev/null"]')
    (ctx / "Dockerfile").write_text("\n".join(lines) + "\n")
    return ctx


def lab_busybox() -> str:
    from lab.engines import BUSYBOX

    return BUSYBOX


def exec_starts(dockerd: PrivateDockerd, since: float, until: float | None = None,
                container: str | None = None) -> list[str]:
    """The commands `docker exec` started (in `container`, or in any) between two times, from the
    engine's own event log (`exec_start: buildctl du --format json`): what the programs asked of a
    builder, seen from outside."""
    until = until if until is not None else time.time()
    filters = json.dumps({"type": ["container"], "event": ["exec_start"]})
    from urllib.parse import quote

    conn = UnixHTTPConnection(str(dockerd.socket), timeout=30)
    conn.request("GET", f"/events?since={since:.3f}&until={until:.3f}&filters={quote(filters)}")
    body = conn.getresponse().read().decode()
    out = []
    for line in body.splitlines():
        if line.strip():
            event = json.loads(line)
            if container is None or event.get("Actor", {}).get("Attributes", {}).get("name") == container:
                out.append(str(event.get("Action", "")).removeprefix("exec_start: "))
    return out


class Buildkitd:
    """A standalone buildkitd run as a process on this machine, as Kubernetes or a systemd unit runs
    it: reached by address (unix:// or tcp://), its state under `root`. It runs in a mount namespace
    of its own (`unshare --mount`), so its overlay mounts vanish with it; runc is the one built with
    Docker 29."""

    def __init__(self, root: Path, address: str | None = None, small: bool = False,
                 flags: tuple[str, ...] = ()):
        require_built()
        self.root = root
        self.state = root / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.socket = root / "buildkitd.sock"
        self.address = address or f"unix://{self.socket}"
        bindir = SMALL_BIN if small else BUILDKIT_BIN
        self.buildctl_path = str(bindir / "buildctl")
        env_path = f"{bindir}:{RUNC.parent}:/usr/sbin:/usr/bin:/sbin:/bin"
        self.log = root / "buildkitd.log"
        argv = ["unshare", "--mount", "--propagation", "private", "--",
                str(bindir / "buildkitd"), "--root", str(self.state), "--addr", self.address, *flags]
        import os

        self.proc = subprocess.Popen(argv, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "PATH": env_path})
        deadline = time.monotonic() + 60
        while self.buildctl("debug", "workers", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"buildkitd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def buildctl(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run([self.buildctl_path, "--addr", self.address, *args], capture_output=True,
                              timeout=timeout, check=False)
        if check and done.returncode:
            raise RuntimeError(f"buildctl {' '.join(args)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
        return done

    def du(self) -> list[dict[str, Any]]:
        return json.loads(self.buildctl("du", "--format", "json").stdout or b"[]") or []

    def build(self, context: Path) -> None:
        build_twice_if_runc_lost_it(lambda: self.buildctl("build", "--frontend", "dockerfile.v0", "--local",
                                                          f"context={context}", "--local", f"dockerfile={context}"))

    def settle(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """`du` once no record is in use (`settled`): buildctl returns before BuildKit has let go."""
        return settled(self.du, timeout)

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
