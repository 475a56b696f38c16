"""The HTTP side: `POST /alerts`, `GET /healthz`, `GET /metrics`. Replies fast; prunes run later."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from buildkit_cache.config import Config

from . import decide as D
from .audit import AuditLog
from .auth import Credentials
from .metrics import ActuatorMetrics
from .payload import PayloadError, parse_notification
from .runner import PruneRunner

log = logging.getLogger("actuator")

RUNNER: web.AppKey[PruneRunner] = web.AppKey("runner", PruneRunner)


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"status": "error", "error": message}, status=status, headers=headers or None)


def make_app(cfg: Config, runner: PruneRunner, credentials: Credentials, metrics: ActuatorMetrics,
             audit: AuditLog) -> web.Application:
    max_body = cfg.actuator.max_body_bytes

    @web.middleware
    async def count_outcomes(request: web.Request, handler):
        if request.path != "/alerts":
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.notifications.labels(str(exc.status)).inc()
            raise
        metrics.notifications.labels(str(response.status)).inc()
        return response

    async def alerts(request: web.Request) -> web.Response:
        if credentials.enabled and not credentials.allows(request.headers.get("Authorization")):
            audit.record("rejected", reason="bad or missing credentials", remote=request.remote or "")
            return _error(401, "unauthorized", **{"WWW-Authenticate": 'Bearer realm="buildkit-cache-actuator"'})
        if not runner.can_accept():
            return _error(503, "not accepting work right now; retry later")
        if request.content_length is not None and request.content_length > max_body:
            return _error(413, f"body over {max_body} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body over {max_body} bytes")
        try:
            notification = parse_notification(json.loads(body))
        except (ValueError, UnicodeDecodeError) as exc:
            # json.JSONDecodeError and PayloadError are ValueErrors.
            what = str(exc) if isinstance(exc, PayloadError) else "body is not JSON"
            audit.record("rejected", reason=f"bad payload: {what}", remote=request.remote or "")
            return _error(400, f"not an Alertmanager webhook payload: {what}")
        audit.record("received", status=notification.status, receiver=notification.receiver,
                     group_key=notification.group_key, alerts=len(notification.alerts),
                     firing=len(notification.firing()))
        results = []
        for alert in notification.alerts:
            d = D.decide(alert, cfg)
            if d.accepted:
                d = runner.submit(d)
            if not d.accepted:
                metrics.alerts.labels(d.action_name, d.decision).inc()
                audit.record("skipped", decision=d.decision, reason=d.reason, action=d.action_name,
                             host=d.host or None, builder=d.builder or None, fingerprint=d.fingerprint)
            results.append({"fingerprint": d.fingerprint, "decision": d.decision, "reason": d.reason})
        return web.json_response({"status": "ok", "dry_run": runner.dry_run, "alerts": results})

    async def healthz(_request: web.Request) -> web.Response:
        if not runner.accepting:
            return web.Response(status=503, text="shutting down\n")
        return web.Response(text="ok\n")

    async def on_cleanup(app: web.Application) -> None:
        await app[RUNNER].close()

    app = web.Application(client_max_size=max_body, middlewares=[count_outcomes])
    app[RUNNER] = runner
    app.router.add_post("/alerts", alerts)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    app.on_cleanup.append(on_cleanup)
    return app
