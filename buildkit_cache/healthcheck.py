"""The image's HEALTHCHECK: is the program this container runs serving, and healthy?

    python3 -m buildkit_cache.healthcheck [PROGRAM ARGS...]

With no arguments it reads the command line of the container's first process (one image runs either
program), finds `buildkit-cache-exporter` or `buildkit-cache-actuator` in it, reads the same
`--config` and `--listen` that process was given, and asks its health endpoint on that address
(the exporter's /-/healthy, the actuator's /healthz, which answers 503 while prunes cannot work).
Exit 0 when healthy, 1 when not, with one line saying why. Standard library only, 5 s at most."""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

PROGRAMS = {"buildkit-cache-exporter": ("exporter", "/-/healthy"),
            "buildkit-cache-actuator": ("actuator", "/healthz")}


def first_process() -> list[str]:
    return Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]


def probe_url(argv: list[str]) -> str:
    """The health URL of the program `argv` runs; ValueError when it runs neither."""
    for i, arg in enumerate(argv):
        name = Path(arg).name
        if name in PROGRAMS:
            section, path = PROGRAMS[name]
            rest = argv[i + 1:]
            break
    else:
        raise ValueError(f"not running {' or '.join(PROGRAMS)}: {' '.join(argv)!r}")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--listen")
    args, _ = parser.parse_known_args(rest)
    from .cli_support import Exit, load_config

    try:
        cfg, (host, port) = load_config(name, args.config, args.listen, section)
    except Exit:
        raise ValueError("its config does not load (the line above says why)") from None
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    scheme = "https" if section == "actuator" and cfg.actuator.tls else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}{path}"


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    try:
        url = probe_url(argv or first_process())
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    # Its own certificate on a loopback address: what is checked is that it answers.
    context = ssl._create_unverified_context() if url.startswith("https") else None  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as reply:  # noqa: S310
            print(f"healthy: {url}: {reply.read(200).decode(errors='replace').strip()}")
            return 0
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url}: {exc.code} {exc.read(200).decode(errors='replace').strip()}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
