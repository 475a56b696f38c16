"""Command-line glue both programs share: load the config, or say in one line what is wrong."""

from __future__ import annotations

import sys

import yaml

from .config import Config, ConfigError, as_dict, load
from .config_schema import as_listen


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
        listen = as_listen(listen_flag) if listen_flag else getattr(cfg, default_listen).listen
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise Exit(2) from None
    except ValueError as exc:
        print(f"{prog}: --listen: {exc}", file=sys.stderr)
        raise Exit(2) from None
    return cfg, listen


def print_effective_config(cfg: Config) -> None:
    sys.stdout.write(yaml.safe_dump(as_dict(cfg), sort_keys=False))
