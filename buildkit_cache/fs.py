"""Measurements of paths the process can see: a tree walk (like `du`) and statvfs (like `df`)."""

from __future__ import annotations

import os
import stat

from .models import FilesystemUsage, TreeUsage


def walk_tree(root: str) -> TreeUsage:
    """Allocated bytes and inode count under `root`, like `du -s -x` and `du -s -x --inodes`.

    Stays on root's filesystem, counts hard-linked files once, never follows symlinks. Entries that
    vanish during the walk (BuildKit deleting a snapshot) are skipped, not errors.
    """
    top = os.lstat(root)
    device = top.st_dev
    seen_links: set[int] = set()
    total_bytes = top.st_blocks * 512
    files = 1
    stack = [root] if stat.S_ISDIR(top.st_mode) else []
    while stack:
        path = stack.pop()
        try:
            entries = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
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
    return TreeUsage(bytes=total_bytes, files=files)


def statvfs_usage(path: str) -> FilesystemUsage:
    """node_exporter's size/avail/files/files_free for the filesystem holding `path`."""
    st = os.statvfs(path)
    return FilesystemUsage(
        size_bytes=st.f_blocks * st.f_frsize,
        avail_bytes=st.f_bavail * st.f_frsize,
        files=st.f_files,
        files_free=st.f_ffree,
    )
