"""Property-based tests (hypothesis): hostile input against `/alerts` and the config reader.

`/alerts` runs on a real socket in a thread of its own, with builders that answer with recorded
outputs; each generated request goes over HTTP. For every one: never a 5xx; a prune only for an
authenticated request naming a configured action on a builder the host has; and a good request is
still answered at once afterwards.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildkit_cache.config import as_dict, parse_config
from buildkit_cache.config_reader import ConfigError
from tests.support.live_actuator import LiveActuator

TOKEN = "s3cret-token"
CFG = {
    "docker_hosts": [{"url": "unix:///nonexistent/docker.sock", "name": "h1"}],
    "builders": {"kamal": {"budget": "20MB"}, "limited": {"budget": "1GB", "actions": ["prune-idle"]}},
    # No cooldown: every accepted alert prunes, so a prune that should not happen shows at once.
    "actuator": {"cooldown": "0s", "settle_delay": "0s", "prune_timeout": "5s", "max_body": "64KiB"},
}
BUILDERS = ("kamal", "limited", "other")
ACTIONS = ("prune-to-budget", "prune-idle", "prune-all")

pytestmark = pytest.mark.slow  # thousands of generated requests and configs


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    a = LiveActuator(tmp_path_factory.mktemp("live"), CFG, BUILDERS, TOKEN)
    yield a
    a.close()


# -- what hostile senders send ----------------------------------------------------------------------

ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec=None, categories=("Cs", "Co", "Cn", "Zs", "Cc", "So")), max_size=20),
    st.sampled_from(["../../etc/passwd", "$(rm -rf /)", "`reboot`", "a;b", "kamal\x00", "kamal\n", " kamal",
                     "KAMAL", "h1/kamal", "*", "%2e%2e", "\u202ekamal", "kamal" * 300, "x" * 5000, "\ud800"]),
    st.sampled_from(BUILDERS + ACTIONS + ("h1", "h2", "")),
)
LABELS = st.fixed_dictionaries(
    {}, optional={"host": ODD_TEXT, "builder": ODD_TEXT, "buildkit_action": ODD_TEXT, "alertname": ODD_TEXT},
).flatmap(lambda d: st.dictionaries(ODD_TEXT, ODD_TEXT, max_size=3).map(lambda extra: {**extra, **d}))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ODD_TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
                    max_leaves=20)


@st.composite
def alert(draw) -> dict[str, Any]:
    a: dict[str, Any] = {"status": draw(st.sampled_from(["firing", "resolved", "Firing", "", None, 1])),
                         "labels": draw(LABELS | JSON), "fingerprint": draw(ODD_TEXT | JSON)}
    if draw(st.booleans()):
        a["annotations"] = draw(st.dictionaries(ODD_TEXT, ODD_TEXT, max_size=3) | JSON)
    return a


@st.composite
def notification(draw) -> Any:
    n: dict[str, Any] = {"version": draw(st.sampled_from(["4", "3", 4, None])),
                         "status": draw(st.sampled_from(["firing", "resolved", "bogus"])),
                         "receiver": draw(ODD_TEXT), "groupKey": draw(ODD_TEXT),
                         "alerts": draw(st.lists(alert(), max_size=4) | JSON)}
    if draw(st.booleans()):
        n["truncatedAlerts"] = draw(JSON)
    return n


NEAR_MISS = st.builds(
    lambda alerts, status: {"version": "4", "status": status, "alerts": alerts},
    st.lists(st.builds(lambda h, b, a, s: {"status": s, "labels": {"host": h, "builder": b, "buildkit_action": a}},
                       st.sampled_from(["h1", "h2", "H1", "h1 "]), st.sampled_from(BUILDERS + ("Kamal", "kamal/..")),
                       st.sampled_from(ACTIONS + ("prune", "nightly")), st.sampled_from(["firing", "resolved"])),
             min_size=1, max_size=3),
    st.sampled_from(["firing", "resolved"]),
)


def deep(depth: int) -> bytes:
    return b'{"alerts":' + b"[" * depth + b"]" * depth + b"}"


BODIES = st.one_of(
    NEAR_MISS.map(lambda n: json.dumps(n).encode()),
    notification().map(lambda n: json.dumps(n).encode("utf-8", "surrogatepass")),
    JSON.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.integers(1, 200_000).map(deep),
    st.just(json.dumps({"status": "firing", "alerts": [{"status": "firing", "labels": {"builder": "x" * 70_000}}]})
            .encode()),
)
AUTH = st.sampled_from([f"Bearer {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", "", "Basic " +
                        base64.b64encode(f"u:{TOKEN}".encode()).decode(), f"bearer {TOKEN}", "Bearer \udcff"])
METHODS = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH"])
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x"])
ENCODINGS = st.sampled_from(["", "", "gzip", "gzip-bomb", "deflate", "br", "gzip-garbage"])


def encode(body: bytes, encoding: str) -> tuple[bytes, dict[str, str]]:
    if encoding == "gzip":
        return gzip.compress(body), {"Content-Encoding": "gzip"}
    if encoding == "gzip-bomb":  # 20 MB of zeros in about 20 kB
        return gzip.compress(b"\0" * 20_000_000, 9), {"Content-Encoding": "gzip"}
    if encoding == "gzip-garbage":
        return body, {"Content-Encoding": "gzip"}
    if encoding:
        return body, {"Content-Encoding": encoding}
    return body, {}


def is_good(method: str, auth: str, body: bytes, encoding: str) -> list[tuple[str, str, str]]:
    """The prunes a request may cause: (builder, action) of its firing, well-formed alerts, if it is
    an authenticated POST of a notification this actuator reads. Empty: it may cause none."""
    scheme, _, credential = auth.partition(" ")
    authenticated = scheme.lower() == "bearer" and credential == TOKEN  # the scheme is case-insensitive (RFC 9110)
    if method != "POST" or not authenticated or encoding in ("gzip-bomb", "gzip-garbage", "deflate", "br"):
        return []
    try:
        n = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(n, dict) or not isinstance(n.get("alerts"), list):
        return []
    out = []
    for a in n["alerts"]:
        if isinstance(a, dict) and a.get("status") == "firing" and isinstance(a.get("labels"), dict):
            labels = a["labels"]
            allowed = {("kamal", x) for x in ACTIONS} | {("limited", "prune-idle"), ("other", "prune-idle"),
                                                         ("other", "prune-all")}
            key = (labels.get("builder"), labels.get("buildkit_action"))
            if labels.get("host") == "h1" and key in allowed:
                out.append((str(key[0]), str(key[1])))
    return out


@settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(method=METHODS, auth=AUTH, body=BODIES, ctype=CONTENT_TYPES, encoding=ENCODINGS,
       path=st.sampled_from(["/alerts", "/alerts", "/alerts/", "/ALERTS", "/alerts?x=1", "//alerts"]))
def test_hostile_requests_never_get_a_5xx_nor_an_unearned_prune(live, method, auth, body, ctype, encoding, path):
    data, headers = encode(body, encoding)
    if auth:
        headers["Authorization"] = auth
    if ctype:
        headers["Content-Type"] = ctype
    before = live.prunes()
    try:
        status = live.request(method, path, data, {k: v.encode("utf-8", "surrogateescape").decode("latin-1")
                                                    for k, v in headers.items()})
    except UnicodeEncodeError:
        return  # http.client cannot send that header at all
    assert status < 500, (status, method, path, headers, data[:200])
    live.idle()
    earned = is_good(method, auth, body, encoding) if path in ("/alerts", "/alerts?x=1") else []
    assert live.prunes() - before <= len(earned), (method, path, headers, data[:300])
    # And the service answers a good request at once.
    started = time.monotonic()
    ok = live.request("POST", "/alerts", json.dumps({"status": "resolved", "alerts": []}).encode(),
                      {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert ok == 200 and time.monotonic() - started < 1.0


def test_a_good_request_prunes_so_the_batterys_check_has_teeth(tmp_path):
    """The battery's check (no more prunes than good requests earned) means something only if a good
    request does prune: a fresh actuator, as the battery's may have cooldowns by now."""
    fresh = LiveActuator(tmp_path, CFG, BUILDERS, TOKEN)
    try:
        good = json.dumps({"status": "firing", "alerts": [{"status": "firing", "fingerprint": "teeth", "labels": {
            "host": "h1", "builder": "other", "buildkit_action": "prune-all"}}]}).encode()
        assert is_good("POST", f"Bearer {TOKEN}", good, "") == [("other", "prune-all")]
        assert fresh.request("POST", "/alerts", good, {"Authorization": f"Bearer {TOKEN}",
                                                       "Content-Type": "application/json"}) == 200
        fresh.idle()
        assert fresh.prunes() == 1
    finally:
        fresh.close()


def test_after_the_battery_metrics_and_health_still_answer(live):
    # Under xdist `live` may be fresh here (a worker can tear a module's fixture down between two of
    # its tests): a hostile request of the battery's kind first, so that there is one to count.
    assert live.request("POST", "/alerts", b"{}", {"Authorization": "Bearer wrong"}) == 401
    assert live.request("GET", "/metrics") == 200
    assert live.request("GET", "/healthz") in (200, 503)  # 503: the recorded hosts' Docker is not there
    text = live.metrics.registry
    assert text.get_sample_value("buildkit_cache_actuator_notifications_total", {"code": "401"}) > 0


# -- the config reader ------------------------------------------------------------------------------

KEYS = st.sampled_from(["docker_hosts", "builders", "exporter", "actuator", "url", "name", "budget", "timeout",
                        "listen", "intervals", "records", "cooldown", "actions", "kind", "idle_for", "auth",
                        "bearer_token_file", "address", "container", "tls", "state_file", "prune-idle",
                        "default", "kamal", "h1/kamal", "enabled", "max_body", "host_root", "idle_windows"])
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**15) | st.floats(allow_nan=True) | ODD_TEXT
    | st.sampled_from(["5GB", "1h", "30s", "0s", "-1s", "127.0.0.1:9862", "unix:///var/run/docker.sock",
                       "tcp://h:2376", "ssh://root@10.0.0.5", "prune-idle", "1.5G", "1e400", "0x10", "nan"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS | ODD_TEXT, inner, max_size=4),
    max_leaves=25,
)
CONFIGS = st.dictionaries(KEYS, VALUES, max_size=5)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=CONFIGS | VALUES)
def test_any_config_loads_or_says_which_key_is_wrong_and_what_loads_prints_back_the_same(data):
    try:
        cfg = parse_config(data, "c.yml")
    except ConfigError as exc:
        text = str(exc)
        assert text.startswith("c.yml") and "\n" not in text.strip() and len(text) < 2000, text
        return
    printed = yaml.safe_dump(as_dict(cfg), sort_keys=False)
    assert as_dict(parse_config(yaml.safe_load(printed), "printed")) == as_dict(cfg)
