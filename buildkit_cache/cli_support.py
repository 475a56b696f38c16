"""Command-line glue both programs share: load the config, or say in one line what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable

import yaml
from aiohttp import web

from .checks import missing_buildctl, unmatched_builder_settings
from .config import LISTEN, Config, ConfigError, as_dict, load
from .errors import BuilderError


class Exit(Exception):
    """Stop the program with this exit code; the message is already printed."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def load_config(prog: str, path: str | None, listen_flag: str | None, default_listen: str,
                docker_hosts: list[str] | None = None) -> tuple[Config, tuple[str, int]]:
    """The config and the address to listen on (`--listen`, else the config's `default_listen` key)."""
    try:
        cfg = load(path, docker_hosts)
        listen = LISTEN.read(listen_flag) if listen_flag else getattr(cfg, default_listen).listen
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise Exit(2) from None
    except ValueError as exc:
        print(f"{prog}: --listen: {exc}", file=sys.stderr)
        raise Exit(2) from None
    if not any(h.url.startswith("ssh://") for h in cfg.docker_hosts):
        # The Docker SDK imports paramiko, and with it cryptography (16 MB of the exporter's ~60), as
        # it is imported, for ssh:// hosts alone: without one, its import is declined (the SDK then
        # leaves ssh:// support out, as when paramiko is not installed).
        sys.modules.setdefault("paramiko", None)  # type: ignore[arg-type]
    return cfg, listen


def print_effective_config(cfg: Config) -> None:
    sys.stdout.write(yaml.safe_dump(as_dict(cfg), sort_keys=False))


def check_against_hosts(prog: str, cfg: Config) -> None:
    """For --check-config: warn (on stderr) about builder settings no Docker host's builders match."""
    from .inventory import Inventory  # the Docker SDK only where Docker is asked

    inventory = Inventory(cfg)
    found: dict[str, list[str]] = {}
    for name in inventory.hosts:
        try:
            found[name] = [b.ref.name for b in inventory.discover(name).builders]
        except BuilderError as exc:
            print(f"{prog}: warning: cannot check the builders of Docker host {name!r}: {exc}", file=sys.stderr)
    for line in unmatched_builder_settings(cfg, found):
        print(f"{prog}: warning: {cfg.source}: {line}", file=sys.stderr)
    if problem := missing_buildctl(cfg):
        print(f"{prog}: warning: {problem}", file=sys.stderr)


# A connection must send a whole request within this after it opens (or after its last answer):
# aiohttp 3.14.4+ closes it otherwise, so half-sent requests cannot hold descriptors for ever.
HEADER_TIMEOUT = 15.0


Drain = Callable[[], Awaitable[None]]


def serve(app: web.Application, prog: str, listen: tuple[str, int], started: str,
          ssl_context: ssl.SSLContext | None = None, drain: Drain | None = None) -> int:
    """Run an aiohttp app until SIGTERM, SIGINT or SIGHUP; the exit code.

    On the signal, `drain` runs first while the listener stays open (the actuator answers 503 and
    lets running prunes finish), then the server stops: connections are never refused meanwhile.
    SIGHUP (a closed terminal, `systemctl kill -s HUP`) stops it the same way: nothing is reloaded,
    the config is read at start, so a supervisor's restart is how a new config is taken."""
    log = logging.getLogger(prog)

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None, keepalive_timeout=HEADER_TIMEOUT, shutdown_timeout=10.0)
        await runner.setup()
        loop = asyncio.get_running_loop()
        listener = None
        try:
            if runner.server is None:
                raise RuntimeError("the app runner has no server after setup")
            # The listener made here rather than by aiohttp's TCPSite, for one setting it does not
            # pass on: a TLS client that never finishes its handshake is dropped after HEADER_TIMEOUT,
            # as a plain one that never sends its headers is (asyncio's default is 60 s).
            listener = await loop.create_server(
                runner.server, listen[0], listen[1], ssl=ssl_context, reuse_address=True,
                ssl_handshake_timeout=HEADER_TIMEOUT if ssl_context is not None else None)
            log.info("%s", started)
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            log.info("shutting down")
            if drain is not None:
                await drain()
        finally:
            if listener is not None:
                listener.close()  # no new connections; the runner's clean-up ends the open ones
            await runner.cleanup()
            if listener is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.wait_closed(), 5.0)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"{prog}: cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
