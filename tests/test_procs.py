"""The programs' own children (du for state volumes, buildctl for remote builders) end with them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lab.procs import ROOT


def test_a_child_dies_with_the_process_that_started_it(tmp_path):
    marker = tmp_path / "pid"
    code = ("import sys, threading; from buildkit_cache.procs import run_capped;"
            "threading.Thread(target=run_capped, args=(['sh', '-c', 'echo $$ > " + str(marker) +
            "; exec sleep 300'], 600, 'sleep')).start()")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 10
    while not (marker.exists() and marker.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(marker.read_text())
    os.kill(parent.pid, signal.SIGKILL)  # no clean-up of its own: the kernel's doing
    parent.wait()
    deadline = time.monotonic() + 5
    while alive(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
