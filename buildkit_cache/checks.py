"""Checks both programs run before they start and in `--check-config`: what start-up would trip on,
said in a line that names the cause."""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import shutil
import stat
from collections.abc import Mapping, Sequence
from urllib.parse import urlparse

from .config import Config


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def socket_problem(url: str) -> str | None:
    """Why this process may never use a unix:// Docker socket (its permissions), or None. A socket
    that is not there yet (Docker not started) is not such a problem: it may come."""
    parsed = urlparse(url)
    if parsed.scheme != "unix":
        return None
    path = parsed.path or "/var/run/docker.sock"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot look at {path}: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    if os.access(path, os.R_OK | os.W_OK):
        return None
    uid, groups = os.getuid(), sorted(set(os.getgroups()) | {os.getgid()})
    return (f"cannot use {path}: it belongs to {_user_name(st.st_uid)}:{_group_name(st.st_gid)} "
            f"(group id {st.st_gid}) with mode {stat.filemode(st.st_mode)[1:]}, and this process "
            f"(user {_user_name(uid)}, uid {uid}, groups {', '.join(str(g) for g in groups)}) is not in "
            f"group {st.st_gid}; add it (docker run --group-add {st.st_gid}; compose: "
            f"DOCKER_GID={st.st_gid}; systemd: SupplementaryGroups={_group_name(st.st_gid)})")


def unmatched_builder_settings(cfg: Config, found: Mapping[str, Sequence[str]]) -> list[str]:
    """Settings for builders that no Docker host has: they would be silently ignored. `found`: the
    builder names each (reached) Docker host has now. Remote builders are not discovered: not checked."""
    lines = []
    for (host, name), settings in sorted(cfg.builder_settings().items()):
        if settings.address or host not in found or name in found[host]:
            continue
        names = sorted(found[host])
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        lines.append(f"builders: no builder {name!r} on Docker host {host!r}{hint}; its budget and actions apply to "
                     f"nothing. Builders found there: {', '.join(names) or 'none'}")
    return lines


def missing_buildctl(cfg: Config) -> str | None:
    """Remote buildkitd builders are reached with a local buildctl: a line naming them when there is
    none, or None."""
    remote = [f"{host}/{name}" for host, name, _ in cfg.remote_builders()]
    if not remote or shutil.which(cfg.exporter.buildctl):
        return None
    return (f"remote builders {', '.join(remote)} need a local buildctl, and {cfg.exporter.buildctl!r} is not found "
            f"(PATH {os.environ.get('PATH', '')}): every measurement and prune of them fails until it is there. "
            "Install buildctl from BuildKit's releases or set exporter.buildctl to its path "
            "(the project's image carries one, at /usr/local/bin/buildctl)")
