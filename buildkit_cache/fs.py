"""Measurements of paths the process can see: a tree's usage (GNU `du`) and statvfs (like `df`)."""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import stat
import subprocess
from dataclasses import replace

from .errors import BuilderError
from .models import FilesystemUsage, TreeUsage
from .procs import run_capped_all

log = logging.getLogger(__name__)


# The image's GNU du with the file capability cap_dac_read_search (Dockerfile): a sidecar running as a
# non-root user, given CAP_DAC_READ_SEARCH, reads a rootless buildkitd's whole state with it. Where
# the capability is not in the bounding set, the kernel refuses to run it: plain du is used then.
PRIVILEGED_DU = "/usr/local/libexec/buildkit-cache/du"


@functools.cache
def gnu_du() -> str | None:
    """The path of GNU du (busybox du has no --inodes): the image's privileged one where it may
    run, else the system's, else None."""
    for path in (PRIVILEGED_DU, shutil.which("du")):
        if not path or not os.path.exists(path):
            continue
        try:
            version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,  # noqa: S603
                                     check=False).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("%s cannot run here: %s", path, exc)
            continue
        if "GNU coreutils" in version:
            return path
    return None


def state_usage(root: str, timeout: float) -> TreeUsage:
    """A state directory's tree usage, with its databases' bytes."""
    tree = tree_usage(root, timeout)
    return replace(tree, databases_bytes=databases_bytes(root))


# GNU du's complaint about a directory it may list in its parent but not read (a rootless buildkitd's
# snapshots hold directories of shifted users with mode 0700, such as apt's `partial`).
_UNREADABLE = re.compile(r"^(?:\S*/)?du: cannot (?:read directory|access) '(.*)': Permission denied$")


def tree_usage(root: str, timeout: float) -> TreeUsage:
    """Allocated bytes and inodes under `root`: `du -s -x -B1` and `du -s -x --inodes`, run side by
    side so the wall time is one du's (docs/benchmarks.md), or the Python walk without GNU du.

    Both stay on root's filesystem and count a hard-linked file once. Files that vanish while du
    reads (BuildKit deleting a snapshot) are skipped as du skips them. Directories this process may
    not read are counted and named (`TreeUsage.unreadable`): the rest is measured, and the figure
    says it is short. Any other complaint of du fails the measurement rather than export a wrong figure."""
    du = gnu_du()
    if du is None:
        return walk_tree(root)
    results = run_capped_all([[du, "-s", "-x", "-B1", "--", root], [du, "-s", "-x", "--inodes", "--", root]],
                             timeout, f"du of {root}", cap=1024 * 1024)
    figures = []
    unreadable: list[str] = []
    for (code, out, err), what in zip(results, ("bytes", "inodes"), strict=True):
        denied = [m.group(1) for m in map(_UNREADABLE.match, err.splitlines()) if m]
        problems = [line for line in err.splitlines() if line and not line.endswith("No such file or directory")
                    and not _UNREADABLE.match(line)]
        fields = out.split("\t", 1)
        if problems or not fields[0].strip().isdigit():
            raise BuilderError(f"du ({what}) of {root} failed (exit {code}): "
                               f"{(problems or [out.strip() or 'no output'])[0][:300]}")
        if len(err.splitlines()) > len(denied):
            log.debug("du of %s: %d entries vanished while it read", root, len(err.splitlines()) - len(denied))
        figures.append(int(fields[0]))
        unreadable = denied if len(denied) > len(unreadable) else unreadable
    return TreeUsage(bytes=figures[0], files=figures[1], unreadable=len(unreadable),
                     unreadable_example=min(unreadable, default=""))


def walk_tree(root: str) -> TreeUsage:
    """Allocated bytes and inode count under `root`, like `du -s -x` and `du -s -x --inodes`, in
    Python (about 1.6x du's time): for systems without GNU du. See `_walk`."""
    try:
        return _walk(root)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise BuilderError(f"{root}: a directory is nested past this system's path length limit "
                               f"({len(exc.filename or '')} characters deep); GNU du measures such trees "
                               "(Debian: coreutils)") from None
        raise


def _walk(root: str) -> TreeUsage:
    """Allocated bytes and inode count under `root`, like `du -s -x` and `du -s -x --inodes`, in
    Python (about 1.6x du's time): for systems without GNU du.

    Stays on root's filesystem, counts hard-linked files once, never follows symlinks. Entries that
    vanish during the walk (BuildKit deleting a snapshot) are skipped, not errors.
    """
    top = os.lstat(root)
    device = top.st_dev
    seen_links: set[int] = set()
    total_bytes = top.st_blocks * 512
    files = 1
    unreadable: list[str] = []
    stack = [root] if stat.S_ISDIR(top.st_mode) else []
    while stack:
        path = stack.pop()
        try:
            entries = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError:
            unreadable.append(path)
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_dev != device:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if st.st_ino in seen_links:
                        continue
                    seen_links.add(st.st_ino)
                total_bytes += st.st_blocks * 512
                files += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return TreeUsage(bytes=total_bytes, files=files, unreadable=len(unreadable),
                     unreadable_example=min(unreadable, default=""))


def statvfs_usage(path: str) -> FilesystemUsage:
    """node_exporter's size/avail/files/files_free for the filesystem holding `path`."""
    st = os.statvfs(path)
    return FilesystemUsage(
        size_bytes=st.f_blocks * st.f_frsize,
        avail_bytes=st.f_bavail * st.f_frsize,
        files=st.f_files,
        files_free=st.f_ffree,
        free_bytes=st.f_bfree * st.f_frsize,
    )


Fingerprint = tuple[tuple[str, int, int, int], ...]


def databases_bytes(state_dir: str) -> int | None:
    """Bytes of BuildKit's bolt databases in a state directory (what `buildctl du` leaves out:
    moby/buildkit#4218), or None when they cannot be read."""
    fp = databases_fingerprint(state_dir)
    return sum(size for _, _, size, _ in fp) if fp else None


def databases_fingerprint(state_dir: str) -> Fingerprint | None:
    """(name, inode, size, mtime in ns) of every BuildKit bolt database (`*.db`) in a state directory
    and the directories right under it, or None when it cannot be read.

    BuildKit writes them whenever records are added, used, pruned or collected, and neither DiskUsage
    nor a workers listing does (../FACTS: "What changes on disk"): two equal fingerprints mean the
    cache did not change in between. A few stat calls, no walk: `cache.db` and `history.db` at the
    top, `runc-overlayfs/metadata_v2.db` and `containerdmeta.db` a level down (dockerd's embedded
    builder keeps `cache.db`, `metadata_v2.db`, `containerdmeta.db` and `snapshots.db` at the top of
    `<data-root>/buildkit`). Snapshot and content directories are not entered."""
    found: list[tuple[str, int, int, int]] = []
    try:
        with os.scandir(state_dir) as top:
            entries = list(top)
        for entry in entries:
            if entry.name.endswith(".db") and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                found.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns))
            elif entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as below:
                    for sub in below:
                        if sub.name.endswith(".db") and sub.is_file(follow_symlinks=False):
                            st = sub.stat(follow_symlinks=False)
                            found.append((f"{entry.name}/{sub.name}", st.st_ino, st.st_size, st.st_mtime_ns))
    except OSError as exc:
        log.debug("fingerprint of %s: %s", state_dir, exc)
        return None
    return tuple(sorted(found))
