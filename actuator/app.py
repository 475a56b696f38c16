"""The HTTP side: `POST /alerts`, `GET /healthz`, `GET /metrics`. Replies fast; prunes run later."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from . import decide as D
from .audit import Recorder
from .auth import Credentials
from .payload import Notification, PayloadError, parse_notification
from .service import ActuatorService

SERVICE: web.AppKey[ActuatorService] = web.AppKey("service", ActuatorService)
WARMING: web.AppKey[asyncio.Task[None]] = web.AppKey("warming", asyncio.Task)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"status": "error", "error": message}, status=status, headers=headers or None)


def make_app(service: ActuatorService, credentials: Credentials, recorder: Recorder, max_body: int) -> web.Application:
    metrics = recorder.metrics

    @web.middleware
    async def count_outcomes(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/alerts":
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.notifications.labels(str(exc.status)).inc()
            raise
        metrics.notifications.labels(str(response.status)).inc()
        return response

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Only /alerts needs credentials; /healthz and /metrics are for monitoring."""
        if request.path == "/alerts" and credentials.enabled and not credentials.allows(request.headers.get("Authorization")):
            recorder.rejected("bad or missing credentials", request.remote or "")
            return _error(401, "unauthorized", **{"WWW-Authenticate": 'Bearer realm="buildkit-cache-actuator"'})
        return await handler(request)

    async def alerts(request: web.Request) -> web.Response:
        refusal = await service.refusal()
        if refusal:
            return _error(503, f"not accepting work right now ({refusal}); retry later")
        notification = await _read_notification(request, max_body, recorder)
        if isinstance(notification, web.Response):
            return notification
        decisions = await service.handle(notification)
        results = [{"fingerprint": d.fingerprint, "decision": d.decision, "reason": d.reason} for d in decisions]
        # A Docker host that could not be asked, a claim that could not be recorded: Alertmanager
        # retries a 5xx (the rest is idempotent).
        status = 503 if any(d.decision in D.RETRY_LATER for d in decisions) else 200
        return web.json_response({"status": "ok", "dry_run": service.dry_run, "alerts": results}, status=status)

    async def healthz(_request: web.Request) -> web.Response:
        if not service.accepting:
            return web.Response(status=503, text="shutting down\n")
        problem = service.recorder.audit.failure if not await service.recorder.audit.check_writable() else None
        problem = problem or await service.state_problem() or await service.docker_problem()
        if problem:  # never ok while prunes cannot work
            return web.Response(status=503, text=f"cannot prune: {problem}\n")
        return web.Response(text="ok\n")

    async def on_startup(app: web.Application) -> None:
        # In the background: serving starts at once; a lookup that arrives first waits for it.
        app[WARMING] = asyncio.get_running_loop().create_task(app[SERVICE].directory.warm(), name="warm lookups")

    async def on_cleanup(app: web.Application) -> None:
        app[WARMING].cancel()
        await app[SERVICE].close()

    app = web.Application(client_max_size=max_body, middlewares=[count_outcomes, authenticate])
    app[SERVICE] = service
    app.router.add_post("/alerts", alerts)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", make_aiohttp_handler(metrics.registry))
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def _read_notification(request: web.Request, max_body: int, recorder: Recorder) -> Notification | web.Response:
    """The notification a request carries, or the 4xx answer to a body that is not one."""
    metrics = recorder.metrics
    if request.content_length is not None and request.content_length > max_body:
        metrics.limit_hits.labels("body").inc()
        return _error(413, f"body over {max_body} bytes")
    try:
        body = await request.read()  # decompressed (Content-Encoding): the limit holds after it
    except web.HTTPRequestEntityTooLarge:
        metrics.limit_hits.labels("body").inc()
        return _error(413, f"body over {max_body} bytes")
    except web.RequestPayloadError as exc:  # a Content-Encoding that does not decode, a cut body
        recorder.rejected(f"bad payload: {exc}", request.remote or "")
        return _error(400, "the body cannot be read: a Content-Encoding that does not decode, or cut short")
    try:
        return parse_notification(json.loads(body))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # json.JSONDecodeError and PayloadError are ValueErrors; JSON nested too deep for Python
        # to read is RecursionError.
        what = (str(exc) if isinstance(exc, PayloadError) else
                "JSON nested too deep" if isinstance(exc, RecursionError) else "body is not JSON")
        if isinstance(exc, PayloadError) and exc.limit:
            metrics.limit_hits.labels(exc.limit).inc()
        recorder.rejected(f"bad payload: {what}", request.remote or "")
        return _error(400, f"not an Alertmanager webhook payload: {what}")
