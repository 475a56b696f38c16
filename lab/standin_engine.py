"""A stand-in Docker Engine API on a unix socket, for what no real engine here can show: a newer API
(1.52: Docker 29) and caches of any size. It serves what a test gives it and records each request.

    python -m lab.standin_engine --socket PATH --df FILE [--api 1.52] [--requests FILE]
                                 [--root DIR] [--prune-seconds S]

Only the calls the exporter and the actuator's engine path make are answered: /_ping, /version,
/info (DockerRootDir: --root), /containers/json, /volumes, /system/df (the body of FILE, as is)
and POST /build/prune (nothing deleted, after --prune-seconds). Everything else is 404.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler


def make_app(df_body: bytes, api: str, requests_log: Path | None, root: str = "/nonexistent/standin",
             prune_seconds: float = 0.0) -> web.Application:
    version = {"Version": "29.0.0-standin", "ApiVersion": api, "MinAPIVersion": "1.24", "Os": "linux",
               "Arch": "amd64", "KernelVersion": "standin", "Components": []}
    info = {"ServerVersion": version["Version"], "DockerRootDir": root, "Driver": "overlay2",
            "DriverStatus": [], "OSType": "linux"}

    @web.middleware
    async def log_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
        if requests_log is not None:
            with open(requests_log, "a") as f:  # noqa: ASYNC230 - one line to a local file, in a stand-in
                f.write(json.dumps({"method": request.method, "path": request.path,
                                    "query": dict(request.query)}) + "\n")
        return await handler(request)

    def strip(path: str) -> str:
        # /v1.52/system/df -> /system/df
        parts = path.split("/", 2)
        return "/" + parts[2] if len(parts) > 2 and parts[1].startswith("v1.") else path

    async def handle(request: web.Request) -> web.StreamResponse:
        path = strip(request.path)
        if path == "/_ping":
            return web.Response(text="OK", headers={"API-Version": api})
        if path == "/version":
            return web.json_response(version)
        if path == "/info":
            return web.json_response(info)
        if path == "/containers/json":
            return web.json_response([])
        if path == "/volumes":
            return web.json_response({"Volumes": [], "Warnings": None})
        if path == "/system/df":
            return web.Response(body=df_body, content_type="application/json")
        if path == "/build/prune" and request.method == "POST":
            await asyncio.sleep(prune_seconds)
            return web.json_response({"CachesDeleted": [], "SpaceReclaimed": 0})
        return web.json_response({"message": f"page not found: {request.path}"}, status=404)

    app = web.Application(middlewares=[log_requests])
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--df", required=True, help="file whose content GET /system/df returns")
    ap.add_argument("--api", default="1.52")
    ap.add_argument("--requests", help="append each request, as a JSON line, to this file")
    ap.add_argument("--root", default="/nonexistent/standin", help="the DockerRootDir /info reports")
    ap.add_argument("--prune-seconds", type=float, default=0.0, help="how long POST /build/prune takes")
    args = ap.parse_args()
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    app = make_app(Path(args.df).read_bytes(), args.api, Path(args.requests) if args.requests else None,
                   args.root, args.prune_seconds)
    web.run_app(app, path=args.socket, print=None)


if __name__ == "__main__":
    main()
