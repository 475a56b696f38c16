"""State volume usage: GNU du's figures, hard links once, one filesystem only, and the same figures
from the Python walk used where there is no GNU du."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from buildkit_cache import fs
from buildkit_cache.errors import Unavailable


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "state"
    for d in range(20):
        sub = root / f"snapshots/{d}/fs/usr/lib"
        sub.mkdir(parents=True)
        for f in range(30):
            (sub / f"f{f}").write_bytes(b"x" * (f * 700))
    (root / "snapshots/0/fs/usr/lib/f1").rename(root / "moved")
    for i in range(5):  # one file, six names: counted once
        os.link(root / "moved", root / f"snapshots/{i}/hard")
    os.symlink("/etc", root / "link-to-etc")
    return root


@pytest.fixture
def mounted(tree):
    """The tree with another filesystem mounted inside it (a tmpfs of 20 MB): root only."""
    other = tree / "mnt"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "bkce-test", str(other)], check=True)
    (other / "big").write_bytes(b"y" * 20_000_000)
    try:
        yield tree
    finally:
        subprocess.run(["umount", str(other)], check=True)


def du(*args: str) -> int:
    return int(subprocess.run(["du", "-s", "-x", *args], capture_output=True, text=True, check=True).stdout.split()[0])


def names_in(tree: Path) -> int:
    return sum(len(files) + len(dirs) for _, dirs, files in os.walk(tree)) + 1


def test_figures_are_du_s_and_du_s_inodes(tree):
    usage = fs.tree_usage(str(tree), 30)
    assert usage.bytes == du("-B1", str(tree))
    assert usage.files == du("--inodes", str(tree))
    assert usage.files == names_in(tree) - 5  # hard links once; the symlink's target left out


def test_the_python_walk_agrees_where_there_is_no_gnu_du(tree, monkeypatch):
    expected = fs.tree_usage(str(tree), 30)
    monkeypatch.setattr(fs, "gnu_du", lambda: None)
    assert fs.tree_usage(str(tree), 30) == expected
    assert fs.walk_tree(str(tree)) == expected


@pytest.mark.slow  # root: mounts a tmpfs
def test_another_filesystem_mounted_inside_is_left_out_by_du_and_the_walk(mounted, monkeypatch):
    usage = fs.tree_usage(str(mounted), 30)
    assert usage.bytes == du("-B1", str(mounted)) < 20_000_000
    assert usage.files == du("--inodes", str(mounted))
    assert usage.files == names_in(mounted) - 5 - 2  # the tmpfs left out: its root and its file
    monkeypatch.setattr(fs, "gnu_du", lambda: None)
    assert fs.walk_tree(str(mounted)) == usage


@pytest.mark.slow  # builds a deep tree / waits out a deadline
def test_a_du_past_its_deadline_is_killed(tmp_path, monkeypatch):
    slow = tmp_path / "du"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    monkeypatch.setattr(fs, "gnu_du", lambda: str(slow))
    with pytest.raises(Unavailable, match="within 1s"):
        fs.tree_usage(str(tmp_path), 1)
    running = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(slow).encode() in _cmdline(p)]
    assert running == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.slow  # builds a deep tree / waits out a deadline
def test_a_tree_deeper_than_the_path_limit_is_measured_by_du_or_named_by_the_walk(tmp_path):
    """L1: 5,000 nested directories (paths past PATH_MAX): GNU du measures it; the Python walk, for
    systems without GNU du, says what is wrong instead of a bare 'File name too long'."""
    from buildkit_cache.errors import BuilderError

    root = tmp_path / "deep"
    root.mkdir()
    try:
        fd = os.open(root, os.O_RDONLY)
        try:
            for _ in range(5000):  # relative to the last: no path ever gets long here
                os.mkdir("d", dir_fd=fd)
                nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = nxt
        finally:
            os.close(fd)
        usage = fs.tree_usage(str(root), 120)
        assert usage.files == 5001
        with pytest.raises(BuilderError, match="nested past this system's path length limit"):
            fs.walk_tree(str(root))
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)  # pytest's own clean-up cannot: it recurses


@pytest.mark.slow  # root: makes and mounts an ext4 filesystem
def test_used_is_what_df_says_on_a_filesystem_with_blocks_reserved_for_root(tmp_path):
    """ext4 reserves 5% for root by default: those blocks are neither used nor available to others.
    `df` says used / (used + available); 1 - available / size would count them as used."""
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    subprocess.run(["truncate", "-s", "200M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "5", str(image)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        (mnt / "data").write_bytes(b"z" * 60_000_000)
        os.sync()
        usage = fs.statvfs_usage(str(mnt))
        assert usage.free_bytes > usage.avail_bytes  # the reserved blocks
        df = subprocess.run(["df", "--output=used,avail,pcent", "-B1", str(mnt)], capture_output=True, text=True,
                            check=True).stdout.splitlines()[1].split()
        used, avail, pcent = int(df[0]), int(df[1]), int(df[2].rstrip("%"))
        assert (usage.size_bytes - usage.free_bytes, usage.avail_bytes) == (used, avail)
        assert usage.used_ratio == used / (used + avail)
        assert pcent - 1 < usage.used_ratio * 100 <= pcent  # df rounds up
        assert usage.used_ratio < 1 - usage.avail_bytes / usage.size_bytes
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_database_replaced_by_a_copy_is_a_change_though_its_size_and_time_are_the_same(tmp_path):
    """A BuildKit database copied and renamed over the original (size and mtime kept): buildkitd
    goes on writing the unlinked file, so the new inode is the one sign of it, and counts."""
    state = tmp_path / "state"
    (state / "runc-overlayfs").mkdir(parents=True)
    (state / "cache.db").write_bytes(b"b" * 4096)
    (state / "runc-overlayfs/metadata_v2.db").write_bytes(b"m" * 8192)
    before = fs.databases_fingerprint(str(state))
    assert before is not None and [name for name, *_ in before] == ["cache.db", "runc-overlayfs/metadata_v2.db"]
    assert fs.databases_fingerprint(str(state)) == before  # nothing changed: equal
    shutil.copy2(state / "cache.db", tmp_path / "copy.db")  # same bytes, same mtime
    os.replace(tmp_path / "copy.db", state / "cache.db")
    after = fs.databases_fingerprint(str(state))
    assert after is not None and [(n, s, t) for n, _, s, t in after] == [(n, s, t) for n, _, s, t in before]
    assert after != before
