"""`buildkit-cache-actuator`: command line, logging and the HTTP server."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

from buildkit_cache import __version__
from buildkit_cache.checks import missing_buildctl, socket_problem
from buildkit_cache.cli_support import Exit, check_against_hosts, load_config, print_effective_config, serve
from buildkit_cache.config import Config
from buildkit_cache.inventory import Inventory

from . import cooldowns
from .app import make_app
from .audit import AuditLog, Recorder
from .auth import AuthSetupError, load_credentials, server_ssl_context
from .metrics import ActuatorMetrics
from .service import CLAIM_MARGIN, ActuatorService
from .state import MemoryState, StateError, StateFile

log = logging.getLogger("actuator")
PROG = "buildkit-cache-actuator"
# Where the shipped units (deploy/systemd) and the README keep the config: --cooldowns and
# --clear-cooldown read it when no --config is given, so they see the running service's state file.
SERVICE_CONFIG = "/etc/buildkit-cache/config.yml"
# Set from the downward API by deploy/kubernetes: the pod this actuator runs in, whose alerts alone it takes.
POD_ENV = ("BUILDKIT_CACHE_POD_NAMESPACE", "BUILDKIT_CACHE_POD_NAME")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Alertmanager webhook that prunes BuildKit build caches: it runs the action an alert names "
                    "(buildkit_action label: prune-to-budget, prune-idle, prune-all, or one of your own) on the "
                    "builder its host and builder labels name, once per incident, one prune at a time per builder.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML config file shared with the exporter")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to serve on (default: actuator.listen, 127.0.0.1:9863)")
    p.add_argument("--dry-run", action="store_true",
                   help="log and audit what each prune would remove, prune nothing (also actuator.dry_run)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="accept alerts without authentication (only for a loopback-only test setup)")
    p.add_argument("--check-config", action="store_true", help="validate the config, print the effective config and exit")
    p.add_argument("--cooldowns", action="store_true",
                   help="print each builder's and action's last prune and cooldown from actuator.state_file, and exit "
                        f"(without --config: {SERVICE_CONFIG}, the service's)")
    p.add_argument("--clear-cooldown", metavar="HOST/BUILDER[/ACTION]",
                   help="clear those cooldowns (safe while the actuator runs; audited), and exit "
                        f"(without --config: {SERVICE_CONFIG}, the service's)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Audit lines are JSON, one per line, with nothing around them.
    audit = logging.getLogger("actuator.audit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit.addHandler(handler)
    audit.propagate = False
    audit.setLevel(logging.INFO)


def _this_pod(prog: str) -> tuple[str, str] | tuple[()] | None:
    """(namespace, name) of the pod from the environment; None outside a pod; () when half set."""
    namespace, name = (os.environ.get(v, "") for v in POD_ENV)
    if bool(namespace) != bool(name):
        print(f"{prog}: {POD_ENV[0]} and {POD_ENV[1]} go together (deploy/kubernetes sets both from the downward "
              "API): set both or neither", file=sys.stderr)
        return ()
    return (namespace, name) if name else None


def _service_config(prog: str) -> str | None:
    """The config --cooldowns and --clear-cooldown read without --config: the service's."""
    if os.path.exists(SERVICE_CONFIG):
        return SERVICE_CONFIG
    print(f"{prog}: --cooldowns and --clear-cooldown read the state file the actuator's config names: pass "
          f"--config FILE (the file the actuator runs with; {SERVICE_CONFIG} does not exist)", file=sys.stderr)
    return None


def _open_state(cfg: Config, prog: str) -> MemoryState | StateFile | None:
    """The state file, checked, with what a stopped actuator left claimed said; None if unusable."""
    if not cfg.actuator.state_file:
        log.warning("actuator.state_file is empty: cooldowns and running prunes are kept in memory only, and a "
                    "restart forgets them")
        return MemoryState()
    state = StateFile(cfg.actuator.state_file, time.time)
    try:
        left = state.check()
    except (StateError, OSError) as exc:
        print(f"{prog}: {cfg.source}: actuator.state_file: {exc}", file=sys.stderr)
        return None
    hold = cfg.actuator.prune_timeout + cfg.actuator.settle_delay + CLAIM_MARGIN  # as the service's Claims hold it
    for key, entry in left:
        ends = min(entry.busy_until, entry.started + hold)
        until = (f"before {_when(ends)}" if math.isfinite(ends) and ends <= entry.started + hold
                 else f"for {hold:g}s from now (its times cannot be obeyed)")
        log.warning("%s on %s/%s was still claimed when the actuator stopped (started %s): no second one "
                    "starts %s, nor before its cooldown ends", key[2], key[0], key[1],
                    _when(entry.started) if math.isfinite(entry.started) else repr(entry.started), until)
    return state


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    prog = PROG
    if (args.cooldowns or args.clear_cooldown) and not args.config:
        args.config = _service_config(prog)
        if args.config is None:
            return 2
    try:
        cfg, (host, port) = load_config(prog, args.config, args.listen, "actuator")
    except Exit as exc:
        return exc.code
    if args.cooldowns:
        return cooldowns.show(cfg, prog)
    if args.clear_cooldown:
        return cooldowns.clear(cfg, prog, args.clear_cooldown)
    # What start-up needs, checked by --check-config too: the secrets, TLS files, the audit file,
    # and a Docker socket this process may use.
    try:
        credentials = load_credentials(cfg.actuator.auth)
        ssl_context = server_ssl_context(cfg.actuator.tls) if cfg.actuator.tls else None
        audit = AuditLog(cfg.actuator.audit_log, create=not args.check_config)
    except AuthSetupError as exc:
        print(f"{prog}: {cfg.source}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: {cfg.source}: actuator.audit_log: cannot write {cfg.actuator.audit_log}: {exc.strerror}",
              file=sys.stderr)
        return 2
    problems = [f"docker_hosts {h.name!r}: {p}" for h in cfg.docker_hosts if (p := socket_problem(h.url))]
    for line in problems:
        print(f"{prog}: {line}", file=sys.stderr)
    if problems:
        return 2
    if args.check_config:
        print_effective_config(cfg)
        check_against_hosts(prog, cfg)
        return 0
    if not credentials.enabled and not args.insecure_no_auth:
        print(f"{prog}: refusing to start without authentication: set actuator.auth.bearer_token_file or "
              "actuator.auth.basic_auth, or pass --insecure-no-auth", file=sys.stderr)
        return 2
    state = _open_state(cfg, prog)
    if state is None:
        return 2
    if problem := missing_buildctl(cfg):
        logging.getLogger(prog).warning("%s", problem)
    pod = _this_pod(prog)
    if pod == ():
        return 2
    dry_run = args.dry_run or cfg.actuator.dry_run
    metrics = ActuatorMetrics(list(cfg.actuator.enabled_actions))
    recorder = Recorder(audit, metrics)
    service = ActuatorService(cfg, Inventory(cfg), recorder, dry_run=dry_run, state=state, pod=pod or None)
    app = make_app(service, credentials, recorder, cfg.actuator.max_body)
    started = "listening on {}://{}:{}{}; actions: {}; cooldown {:g}s{}{}".format(
        "https" if ssl_context else "http", host, port, "" if credentials.enabled else " WITHOUT AUTHENTICATION",
        ", ".join(sorted(cfg.actuator.enabled_actions)), cfg.actuator.cooldown,
        f"; alerts about pod {pod[1]} in namespace {pod[0]} only" if pod else "",
        "; DRY-RUN: nothing will be pruned" if dry_run else "")
    try:
        return serve(app, PROG, (host, port), started, ssl_context, drain=service.drain)
    finally:
        audit.close()  # the lines still on their way to the file
