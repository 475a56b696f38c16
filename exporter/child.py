"""A measurement run in a process of its own, for builders whose answers are large.

Decoding 30 MB of records holds the interpreter's lock for tens of milliseconds at a time, and
reading them over HTTP competes for it the whole while, so a scrape served during it waits: its
latency would grow with the size of the cache. A builder whose last `records` counted at least
`CHILD_RECORDS` records is measured in a child forked from a forkserver that has the core
imported; the child reads, decodes and summarises, sends back only the summary (a few hundred
bytes) and exits, so the exporter never holds the answer and its memory does not depend on it.
The child has the measurement's deadline: past it, it is killed.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from typing import Any

from buildkit_cache.builders import Builder
from buildkit_cache.config import Config
from buildkit_cache.errors import BuilderError, Unavailable

from .measurements import BY_NAME

CHILD_RECORDS = 5000

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["buildkit_cache.builders", "buildkit_cache.exporter.measurements"])


def _measure(conn: multiprocessing.connection.Connection, measurement: str, builder: Builder, cfg: Config) -> None:
    try:
        conn.send(("ok", BY_NAME[measurement].run(builder, cfg)))
    except Unavailable as exc:
        conn.send(("unavailable", str(exc)))
    except (BuilderError, OSError) as exc:
        conn.send(("error", str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs it
        conn.send(("bug", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run(measurement: str, builder: Builder, cfg: Config, timeout: float) -> Any:
    """BY_NAME[measurement].run(builder, cfg) in a child; raises what it would have raised
    (Unavailable, BuilderError), or Unavailable at the deadline."""
    receive, send = _context.Pipe(duplex=False)
    proc = _context.Process(target=_measure, args=(send, measurement, builder, cfg), daemon=True,
                            name=f"measure {builder.ref} {measurement}")
    try:
        proc.start()
    except BaseException:
        send.close()
        receive.close()
        raise
    try:
        send.close()
        if not receive.poll(timeout):
            raise Unavailable(f"{builder.ref}: {measurement} did not finish within {timeout:g}s")
        try:
            kind, value = receive.recv()
        except EOFError:
            proc.join(5)
            raise BuilderError(f"{builder.ref}: the process measuring {measurement} ended without an answer "
                               f"(exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        proc.close()
        receive.close()
    if kind == "ok":
        return value
    if kind == "unavailable":
        raise Unavailable(value)
    raise BuilderError(value if kind == "error" else f"{builder.ref}: {measurement}: {value}")
