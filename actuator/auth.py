"""Who may post alerts: bearer token or basic auth, compared in constant time; optional TLS."""

from __future__ import annotations

import base64
import hmac
import logging
import os
import ssl
import stat
from dataclasses import dataclass

from buildkit_cache.config import AuthConfig, ServerTLS

log = logging.getLogger("actuator")


class AuthSetupError(ValueError):
    """A secret file that cannot be used; the actuator refuses to start."""


def _read_secret(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
            mode = os.fstat(f.fileno()).st_mode
    except OSError as exc:
        raise AuthSetupError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise AuthSetupError(f"{key}: {path} is empty")
    if mode & stat.S_IROTH:
        log.warning("%s: %s is readable by every user (mode %04o): anyone on this host can post alerts; "
                    "chmod 0640 it (owner root, group of the actuator's user)", key, path, stat.S_IMODE(mode))
    return secret


@dataclass(frozen=True)
class Credentials:
    bearer_token: bytes | None = None
    basic_username: bytes | None = None
    basic_password: bytes | None = None

    @property
    def enabled(self) -> bool:
        return self.bearer_token is not None or self.basic_username is not None

    def allows(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries valid credentials."""
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.bearer_token is not None:
            # Headers arrive decoded with surrogate escapes: bytes that are not UTF-8 compare as bytes.
            return hmac.compare_digest(value.encode("utf-8", "surrogateescape"), self.bearer_token)
        if scheme.lower() == "basic" and self.basic_username is not None:
            try:
                user, sep, password = base64.b64decode(value.encode("utf-8", "surrogateescape"),
                                                       validate=True).partition(b":")
            except ValueError:
                return False
            # Compare both, always, so timing says nothing about which one was wrong.
            ok_user = hmac.compare_digest(user, self.basic_username)
            ok_pass = hmac.compare_digest(password, self.basic_password or b"")
            return bool(sep) and ok_user and ok_pass
        return False


def load_credentials(auth: AuthConfig) -> Credentials:
    token = _read_secret(auth.bearer_token_file, "actuator.auth.bearer_token_file") if auth.bearer_token_file else None
    user = password = None
    if auth.basic_auth:
        user = auth.basic_auth.username.encode()
        password = _read_secret(auth.basic_auth.password_file, "actuator.auth.basic_auth.password_file")
    return Credentials(token, user, password)


def server_ssl_context(tls: ServerTLS) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        if tls.client_ca_file:
            ctx.load_verify_locations(tls.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise AuthSetupError(f"actuator.tls: {exc}") from None
    return ctx
