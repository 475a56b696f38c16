"""Local processes run to a deadline and an output cap: buildctl for remote builders, GNU du for
state volumes. Never a shell: every argv is a list of fixed flags and paths from the config or the
Docker host, nothing from an alert."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import time
from collections.abc import Callable
from functools import cache

from .errors import BuilderError, TimedOut

MAX_OUTPUT = 64 * 1024 * 1024


@cache
def _with_parent() -> tuple[str, ...]:
    """What a child's argv is prefixed with so that the kernel kills it when the process that
    started it ends (PR_SET_PDEATHSIG), and a du or buildctl never outlives a stopped exporter or
    actuator under PID 1: util-linux's `setpriv --pdeathsig`, an exec wrapper. Not `preexec_fn`,
    which Python calls unsafe in a process with threads (these children are started from several).
    Without setpriv (not Linux), nothing: the deadline below still ends the child."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    try:
        ok = subprocess.run([setpriv, "--pdeathsig", "KILL", "--", "true"], stdin=subprocess.DEVNULL,  # noqa: S603
                            capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (setpriv, "--pdeathsig", "KILL", "--") if ok else ()


def run_capped(argv: list[str], timeout: float, what: str, cap: int = MAX_OUTPUT,
               on_stdout: Callable[[bytes], None] | None = None) -> tuple[int, str, str]:
    """Run `argv` to its end, its deadline or `cap` bytes of output, whichever comes first:
    (exit code, stdout, stderr). A command that never ends or never stops printing is killed,
    never read into memory whole. `on_stdout` hears its standard output as it comes."""
    return run_capped_all([argv], timeout, what, cap, on_stdout)[0]


def run_capped_all(argvs: list[list[str]], timeout: float, what: str,
                   cap: int = MAX_OUTPUT, on_stdout: Callable[[bytes], None] | None = None) -> list[tuple[int, str, str]]:
    """`run_capped` for several commands at once, side by side (one deadline for all of them)."""
    env = {**os.environ, "LC_ALL": "C"}
    procs = [subprocess.Popen([*_with_parent(), *argv], stdin=subprocess.DEVNULL,  # noqa: S603
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for argv in argvs]
    bufs = [(bytearray(), bytearray()) for _ in procs]
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            for proc, (out, err) in zip(procs, bufs, strict=True):
                for pipe, buf in ((proc.stdout, out), (proc.stderr, err)):
                    if pipe is not None:
                        sel.register(pipe, selectors.EVENT_READ, (buf, out, err))
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimedOut(f"{what} did not answer within {timeout:g}s")
                for key, _ in sel.select(min(left, 5.0)):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf, out, err = key.data
                    buf.extend(chunk)
                    if on_stdout is not None and buf is out:
                        on_stdout(chunk)
                    if len(out) + len(err) > cap:
                        raise BuilderError(f"{what} printed more than {cap // (1024 * 1024)} MiB; not read further")
        codes = [proc.wait(max(0.1, deadline - time.monotonic())) for proc in procs]
    except subprocess.TimeoutExpired:
        raise TimedOut(f"{what} did not answer within {timeout:g}s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    return [(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
            for code, (out, err) in zip(codes, bufs, strict=True)]
