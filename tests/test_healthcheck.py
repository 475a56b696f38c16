"""The image's healthcheck finds the program a container runs and asks it on its config's address."""

from __future__ import annotations

import http.server
import threading

from buildkit_cache import healthcheck
from lab.procs import free_port

PY = "/opt/buildkit-cache/bin/python3"


def test_it_asks_the_program_on_the_address_its_config_gives(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("exporter: {listen: '0.0.0.0:9100'}\nactuator: {listen: '[::]:9200'}\n")
    exporter = [PY, "/opt/buildkit-cache/bin/buildkit-cache-exporter", "--config", str(cfg)]
    assert healthcheck.probe_url(exporter) == "http://127.0.0.1:9100/-/healthy"
    assert healthcheck.probe_url([*exporter, "--listen", "10.0.0.1:1234"]) == "http://10.0.0.1:1234/-/healthy"
    actuator = [PY, "/usr/local/bin/buildkit-cache-actuator", f"--config={cfg}"]
    assert healthcheck.probe_url(actuator) == "http://[::1]:9200/healthz"


def test_it_says_unhealthy_and_why(tmp_path, capsys):
    assert healthcheck.main(["/bin/sleep", "100"]) == 1
    assert "not running buildkit-cache-exporter or buildkit-cache-actuator" in capsys.readouterr().err
    bad = tmp_path / "bad.yml"
    bad.write_text("exporter: {lisen: x}\n")
    assert healthcheck.main(["buildkit-cache-exporter", "--config", str(bad)]) == 1
    assert "lisen" in capsys.readouterr().err

    port = free_port()

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path == "/-/healthy" else 503
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"ok\n" if code == 200 else b"cannot prune: the audit log is not writable\n")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        listen = f"127.0.0.1:{port}"
        assert healthcheck.main(["buildkit-cache-actuator", "--listen", listen]) == 1
        assert f"unhealthy: http://{listen}/healthz: 503 cannot prune: the audit log is not writable" in capsys.readouterr().err
        assert healthcheck.main(["buildkit-cache-exporter", "--listen", listen]) == 0
        assert capsys.readouterr().out == f"healthy: http://{listen}/-/healthy: ok\n"
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main(["buildkit-cache-exporter", "--listen", listen]) == 1
    assert "unhealthy" in capsys.readouterr().err
