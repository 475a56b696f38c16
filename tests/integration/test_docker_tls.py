"""A Docker host on tcp:// with TLS, as users configure one (`docker_hosts[].tls`): a private
Docker 29.7.2 serving its API with --tlsverify on its own loopback, and the exporter run in its
network namespace. The CA the config names is the one used, whatever REQUESTS_CA_BUNDLE or
CURL_CA_BUNDLE say (requests let them override it); `docker exec` through TLS (buildctl du in a real
builder) reads the same way as through the socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lab.engines import PrivateDockerd
from lab.procs import ROOT, samples
from tests.conftest import ENGINES, work_dir
from tests.support import buildkit
from tests.support.pki import make_pki

D29 = [e for e in ENGINES if e.release == "docker29" and e.containerd_store]
pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine", D29, ids=[e.id for e in D29], indirect=True)]


@pytest.fixture
def tls_engine(engine, tmp_path, layer_contexts):
    pki = make_pki(tmp_path / "pki")
    d = PrivateDockerd(work_dir("bkce-tls-"), engine, extra=(
        "--host", "tcp://127.0.0.1:2376", "--tlsverify", "--tlscacert", str(pki / "ca.pem"),
        "--tlscert", str(pki / "server.pem"), "--tlskey", str(pki / "server.key")))
    try:
        d.start()
        kamal = buildkit.create(d, "kamal")
        kamal.build(layer_contexts[0])
        kamal.settle()
        yield d, pki, kamal
    finally:
        d.close()


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_the_configured_ca_is_used_whatever_the_environment_says(tls_engine, tmp_path, variable):
    d, pki, kamal = tls_engine
    other = make_pki(tmp_path / "other", "another-ca")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"docker_hosts": [{"url": "tcp://127.0.0.1:2376", "name": "tls", "host_root": "",
                                                 "tls": {"ca_file": str(pki / "ca.pem"),
                                                         "cert_file": str(pki / "client.pem"),
                                                         "key_file": str(pki / "client.key")}}]}))
    done = subprocess.run(d.in_netns([sys.executable, "-m", "buildkit_cache.exporter", "--config", str(cfg), "--once",
                                      "--format", "prometheus"]), capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, variable: str(other / "ca.pem")})
    assert done.returncode == 0, done.stderr[-2000:]
    got = samples(done.stdout)
    assert got[("buildkit_cache_docker_host_up", frozenset({"host": "tls"}.items()))] == 1
    # buildctl du through docker exec over TLS: BuildKit's own records, whole.
    du = kamal.du()
    L = {"host": "tls", "builder": "kamal"}
    assert got[("buildkit_cache_measurement_success", frozenset({**L, "measurement": "records"}.items()))] == 1
    count = sum(v for (n, ls), v in got.items() if n == "buildkit_cache_records" and ("builder", "kamal") in ls)
    size = sum(v for (n, ls), v in got.items() if n == "buildkit_cache_size_bytes" and ("builder", "kamal") in ls)
    assert (count, size) == (len(du), sum(r["size"] for r in du))
