"""`buildkit-cache-exporter`: command line, logging and the HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from buildkit_cache import __version__
from buildkit_cache.checks import missing_buildctl, socket_problem
from buildkit_cache.cli_support import Exit, check_against_hosts, load_config, print_effective_config, serve
from buildkit_cache.config import Config, ConfigError

from .measurements import intervals

if TYPE_CHECKING:
    from .collect import Collection, Snapshot

log = logging.getLogger("exporter")
PROG = "buildkit-cache-exporter"

LANDING = """<!doctype html><html><head><title>BuildKit cache exporter</title></head><body>
<h1>BuildKit cache exporter</h1><p>Version {version}.</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/-/healthy">/-/healthy</a></li></ul>
</body></html>"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export the build cache of every BuildKit builder on one or more Docker hosts to Prometheus: "
                    "the engine's embedded builder, buildx docker-container builders and their state volumes, "
                    "and remote buildkitd listed in the config.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML config file shared with the actuator (default: none, built-in defaults)")
    p.add_argument("--docker-host", metavar="URL", action="append", dest="docker_hosts",
                   help="Docker host to watch (unix://, tcp://, ssh://); repeatable; replaces docker_hosts from the "
                        "config (default: $DOCKER_HOST, else unix:///var/run/docker.sock)")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to serve /metrics on (default: exporter.listen, 127.0.0.1:9862)")
    p.add_argument("--check-config", action="store_true", help="validate the config, print the effective config and exit")
    p.add_argument("--once", action="store_true",
                   help="collect once, print a table per host (a line per builder) and exit; exits 1 if any "
                        "builder or host failed")
    p.add_argument("--format", choices=["table", "prometheus"], default="table",
                   help="with --once: a table for people (default), or the exposition /metrics serves")
    p.add_argument("--top", metavar="N", type=int, default=0,
                   help="with --once: then each builder's N largest cache records (type, size, last use, usage "
                        "count, description): what fills the cache")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header admits gzip: listed (or `*`) with a q-value above 0."""
    allowed: dict[str, bool] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            key, _, val = p.strip().partition("=")
            if key == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        allowed[name.strip().lower()] = q > 0
    return allowed.get("gzip", allowed.get("*", False))


def make_app(collection: Collection, cfg: Config, run: bool = True) -> web.Application:
    """The HTTP server; with `run`, the collection runs in the background while it serves."""
    from .metrics import Exposition

    app = web.Application()
    exposition = Exposition(lambda: collection.snapshot, cfg)
    if run:
        collection.on_change = exposition.changed
        exposition.start()

    async def metrics(request: web.Request) -> web.Response:
        headers = {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        gzipped = accepts_gzip(request.headers.get("Accept-Encoding", ""))
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=exposition.render(gzipped), headers=headers)

    app.router.add_get("/metrics", metrics)

    async def healthy(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def landing(_request: web.Request) -> web.Response:
        return web.Response(text=LANDING.format(version=__version__), content_type="text/html")

    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/", landing)
    if run:
        async def background(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(collection.run_forever())
            yield
            exposition.stop()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            collection.close()

        app.cleanup_ctx.append(background)
    return app


async def _once(cfg: Config, fmt: str, top: int = 0) -> int:
    from buildkit_cache.inventory import Inventory

    from . import table
    from .collect import collect_once
    from .metrics import Exposition

    snap = await collect_once(cfg, Inventory(cfg))
    failed = [f"{h}: {s.error}" for h, s in snap.hosts.items() if not s.up]
    failed += [f"{state.builder.ref} {m}: {r.error}" for state in snap.builders.values()
               for m, r in state.results.items() if not r.success]
    if fmt == "prometheus":
        sys.stdout.buffer.write(Exposition(lambda: snap, cfg).render())
    else:
        sys.stdout.write(table.render(snap, cfg, failed))
    if top:
        failed += await _top(snap, top)
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


async def _top(snap: Snapshot, n: int) -> list[str]:
    """Each measured builder's `n` largest records, after the table; what could not be read."""
    import shutil
    from datetime import UTC, datetime

    from buildkit_cache.errors import BuilderError
    from buildkit_cache.models import RECORDS

    from . import table

    failed = []
    width = shutil.get_terminal_size((120, 24)).columns
    for _key, state in sorted(snap.builders.items()):
        result = state.results.get(RECORDS)
        if result is None or not result.success:
            continue
        try:
            records = await asyncio.get_running_loop().run_in_executor(None, state.builder.records)
        except BuilderError as exc:
            failed.append(f"{state.builder.ref} top records: {exc}")
            continue
        sys.stdout.write("\n" + table.render_top(state.builder.ref, records, n, datetime.now(UTC), width))
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top and not args.once:
        print(f"{PROG}: --top needs --once", file=sys.stderr)
        return 2
    if args.top < 0:
        print(f"{PROG}: --top takes a number of records, 1 or more", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, listen = load_config(PROG, args.config, args.listen, "exporter", args.docker_hosts)
    except Exit as exc:
        return exc.code
    try:
        # The exporter's own section: each measurement's interval, defaults filled in.
        cfg = dataclasses.replace(cfg, exporter=dataclasses.replace(cfg.exporter, intervals=intervals(cfg)))
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print_effective_config(cfg)
        check_against_hosts(PROG, cfg)
        return 0
    if args.once:
        return asyncio.run(_once(cfg, args.format, args.top))
    if problem := missing_buildctl(cfg):
        logging.getLogger(PROG).warning("%s", problem)
    for host in cfg.docker_hosts:  # it keeps trying: the socket's group may be fixed while it runs
        if problem := socket_problem(host.url):
            logging.getLogger(PROG).warning("docker_hosts %r: %s", host.name, problem)
    # The Docker SDK is imported from here on, once the config said whether ssh:// support is needed.
    from buildkit_cache.inventory import Inventory

    from .collect import Collection

    app = make_app(Collection(cfg, Inventory(cfg)), cfg)
    watching = ", ".join(f"{h.name} ({h.url})" for h in cfg.docker_hosts)
    watching += "".join(f", remote {n} ({b.address})" for _h, n, b in cfg.remote_builders())
    return serve(app, PROG, listen, f"serving /metrics on http://{listen[0]}:{listen[1]}, watching {watching}")
