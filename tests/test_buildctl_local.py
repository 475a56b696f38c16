"""A local buildctl (remote buildkitd builders): its answer is read to a deadline and a size cap, so a
buildctl that hangs or floods costs one measurement, never the exporter's memory or a thread."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest

from buildkit_cache.buildctl import LocalBuildctl
from buildkit_cache.errors import BuilderError, CommandFailed, Unavailable
from buildkit_cache.procs import run_capped


def fake(tmp_path, script: str) -> str:
    path = tmp_path / "buildctl"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def test_the_answer_and_errors_come_back_whole(tmp_path):
    ctl = LocalBuildctl("tcp://10.0.0.9:1234", fake(tmp_path, 'echo "$@"; echo warn >&2\n'))
    assert ctl(["du", "--format", "json"]) == "--addr tcp://10.0.0.9:1234 du --format json\n"
    failing = LocalBuildctl("tcp://10.0.0.9:1234", fake(tmp_path, "echo 'connection refused' >&2; exit 1\n"))
    with pytest.raises(Unavailable, match="connection refused"):
        failing(["du"])
    other = LocalBuildctl("tcp://10.0.0.9:1234", fake(tmp_path, "echo nope >&2; exit 3\n"))
    with pytest.raises(CommandFailed, match="nope"):
        other(["du"])


def test_a_buildctl_that_never_answers_is_killed_at_the_deadline(tmp_path):
    marker = tmp_path / "pid"
    ctl = LocalBuildctl("tcp://h:1", fake(tmp_path, f"echo $$ > {marker}; exec sleep 1000\n"), timeout=1.0)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="did not answer within 1s"):
        ctl(["du"])
    assert time.monotonic() - started < 3
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left behind


def test_a_flood_of_output_is_cut_at_the_cap_without_reading_it_into_memory(tmp_path):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(BuilderError, match="printed more than 8 MiB"):
        run_capped(["sh", "-c", "yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"], 30, "flood", cap=8 * 1024 * 1024)
    assert time.monotonic() - started < 10
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 64, f"peak RSS grew {grown_mb:.0f} MB"



def test_an_exec_answer_sent_with_the_upgrade_headers_is_read_whole(tmp_path):
    """A quick command's output can reach this side in the same packet as the engine's `101 UPGRADED`
    headers, and so sit in the HTTP client's buffer: it is read from there, never lost. (Reading the
    socket around that buffer gave 3 empty answers with exit code 0 in 400 execs under load.) The
    engine here answers each request on a socket of its own, the exec's start in one write."""
    import socket
    import threading

    from buildkit_cache.docker_api import DockerHost

    du = (Path(__file__).parent / "fixtures" / "buildctl" / "du.json").read_bytes()
    frames = b"\x01\x00\x00\x00" + len(du).to_bytes(4, "big") + du + b"\x02\x00\x00\x00\x00\x00\x00\x05warn\n"

    def answer(path: str) -> bytes:
        def js(status: str, body: dict) -> bytes:
            data = json.dumps(body).encode()
            return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                    "Connection: close\r\n\r\n").encode() + data
        if path.endswith("/version"):
            return js("200 OK", {"ApiVersion": "1.41", "Version": "20.10.24", "MinAPIVersion": "1.12"})
        if path.endswith("/exec") and "/containers/" in path:
            return js("201 Created", {"Id": "e1"})
        if path.endswith("/exec/e1/start"):
            return (b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker.raw-stream\r\n"
                    b"Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n" + frames)
        if path.endswith("/exec/e1/json"):
            return js("200 OK", {"ExitCode": 0, "Running": False})
        return js("404 Not Found", {"message": f"no {path}"})

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "engine.sock"))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(answer(head.split(b" ")[1].decode().split("?")[0]))  # headers and stream at once

    threading.Thread(target=serve, daemon=True).start()
    try:
        host = DockerHost("h", f"unix://{tmp_path / 'engine.sock'}", timeout=10)
        result = host.exec("c1", ["buildctl", "du", "--format", "json"])
        assert (result.exit_code, result.stdout, result.stderr) == (0, du.decode(), "warn\n")
    finally:
        server.close()
