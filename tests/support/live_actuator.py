"""The actuator's app on a real socket, served by an event loop in a thread of its own, with builders
that answer with recorded outputs: for tests that send it many requests over HTTP."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from buildkit_cache.actuator.app import make_app
from buildkit_cache.actuator.audit import AuditLog, Recorder
from buildkit_cache.actuator.auth import Credentials
from buildkit_cache.actuator.metrics import ActuatorMetrics
from buildkit_cache.actuator.service import ActuatorService
from buildkit_cache.config import parse_config
from lab.procs import free_port
from tests.support.recorded import RecordedBuilder, StaticInventory


class LiveActuator:
    """The actuator's app on 127.0.0.1, served by an event loop in a thread."""

    def __init__(self, tmp_path: Path, cfg: dict[str, Any], builders: tuple[str, ...], token: str):
        self.token = token
        self.builders = {n: RecordedBuilder(n) for n in builders}
        self.cfg = parse_config(cfg)
        self.metrics = ActuatorMetrics(list(self.cfg.actuator.enabled_actions))
        self.recorder = Recorder(AuditLog(str(tmp_path / "audit.jsonl")), self.metrics)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.service = ActuatorService(self.cfg, StaticInventory(self.builders.values()), self.recorder, dry_run=False)
        app = make_app(self.service, Credentials(bearer_token=self.token.encode()), self.recorder,
                       self.cfg.actuator.max_body)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        ready.set()
        self.loop.run_forever()

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
        """One request on a connection of its own (what a connection is left in after a malformed
        request is the server's business, and a hostile sender's)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            r.read()
            return r.status
        finally:
            conn.close()

    def prunes(self) -> int:
        return sum(len(b.prunes) for b in self.builders.values())

    def idle(self) -> None:
        """Wait until the prunes started so far are done."""
        deadline = time.monotonic() + 10
        while self.service.tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
