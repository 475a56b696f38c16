"""State volume measurement (fs.tree_usage: GNU du for bytes and inodes, side by side) against
`du -s` on the same tree in the same run; the Python walk (systems without GNU du) beside."""

from __future__ import annotations

import os
import subprocess
from functools import partial
from pathlib import Path

from buildkit_cache import fs

from .common import Row, timed


def make_tree(root: Path, files: int) -> None:
    """Like a BuildKit state dir full of node_modules: 100 files a directory, one in ten of 5 kB
    (the rest empty), two levels deep, and a hard link in every directory."""
    per = 100
    for d in range(files // per):
        dp = root / f"snapshots/{d // 100:04d}/fs/{d % 100:02d}"
        dp.mkdir(parents=True, exist_ok=True)
        for f in range(per - 1):
            fd = os.open(dp / f"f{f}", os.O_CREAT | os.O_WRONLY, 0o644)
            if f % 10 == 0:
                os.write(fd, b"x" * 5000)
            os.close(fd)
        os.link(dp / "f0", dp / "hard")


def du(*args: str) -> int:
    return int(subprocess.run(["du", "-s", "-x", *args], capture_output=True, text=True, check=True).stdout.split()[0])


def walk(work: Path, sizes: list[int], repeat: int = 3) -> list[Row]:
    rows = []
    for n in sizes:
        root = work / f"tree-{n}"
        make_tree(root, n)
        du(str(root))  # warm the cache
        du_bytes, du_s, _ = timed(partial(du, "-B1", str(root)), repeat)
        du_inodes, du_i, _ = timed(partial(du, "--inodes", str(root)), repeat)
        ours, ours_s, _ = timed(partial(fs.tree_usage, str(root), 600), repeat)
        py, py_s, _ = timed(partial(fs.walk_tree, str(root)), repeat)
        same = ours.bytes == du_bytes and ours.files == du_inodes and py == ours
        rows.append(Row("walk", f"{du_inodes:,} inodes, {du_bytes / 1e6:.0f} MB: tree_usage (median of {repeat})",
                        f"{ours_s:.2f} s ({ours_s / du_s:.2f}x du -s)",
                        f"du -s -B1 {du_s:.2f} s, du -s --inodes {du_i:.2f} s",
                        f"Python walk {py_s:.2f} s ({py_s / du_s:.2f}x); figures equal to du's: {'yes' if same else 'NO'}",
                        {"ratio": ours_s / du_s, "py_ratio": py_s / du_s, "same": float(same)}))
        subprocess.run(["rm", "-rf", str(root)], check=True)
    return rows
