"""The whole exposition for a fixed set of builders, pinned (as cAdvisor's testdata/prometheus_metrics):
names, HELP, types, label sets and values. A change to what the exporter serves shows here first, and
the dashboard and the alert rules may only use what this file holds. To accept a change on purpose:
BKCE_UPDATE_GOLDEN=1 pytest tests/test_golden_scrape.py, and review the diff with the dashboard and
rules beside it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from buildkit_cache.config import parse_config
from buildkit_cache.exporter.collect import Collection, HostState
from buildkit_cache.exporter.metrics import Exposition
from tests.support.recorded import RecordedBuilder, StaticInventory

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "scrape.prom"
CLOCK = 1795363200.0  # 2026-11-22 16:00 UTC, 22 minutes after the recorded cache was last used


async def exposition() -> str:
    cfg = parse_config({"docker_hosts": [{"url": "unix:///nonexistent/docker.sock", "name": "h1"}],
                        "builders": {"kamal": {"budget": "30MB"}}})
    builders = [RecordedBuilder("kamal"), RecordedBuilder("ci", broken={"records", "gc_policy"})]
    c = Collection(cfg, StaticInventory(builders), clock=lambda: CLOCK)
    try:
        snap = await c.collect_once()
    finally:
        c.close()
    c.snapshot = snap = type(snap)(snap.builders, {"h1": HostState(True, version="28.5.2", api_version="1.51")},
                                   threads=snap.threads)
    text = Exposition(lambda: snap, cfg).render().decode()
    # What differs from run to run: how long a measurement took, and the Python version.
    text = re.sub(r"^(buildkit_cache_measurement_duration_seconds\{.*\}) \S+$", r"\1 0.0", text, flags=re.M)
    text = re.sub(r'python_version="[^"]*"', 'python_version="3"', text)
    return normalized(text)


def normalized(text: str) -> str:
    """Values as Python writes floats: prometheus_client's own formatting differs between releases
    (1e+10 in 0.26, 1e+010 in 0.24, the floor), and the value is what is pinned, not its spelling."""
    return re.sub(r"^([^#\s]\S*(?:\{.*\})?) (\S+)$", lambda m: f"{m.group(1)} {float(m.group(2))!r}", text, flags=re.M)


async def test_the_exposition_is_the_pinned_one():
    text = await exposition()
    if os.environ.get("BKCE_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == normalized(GOLDEN.read_text()), "the exposition changed: see this file's docstring"


def test_the_dashboard_and_the_rules_use_only_series_the_exporter_serves():
    served = set(re.findall(r"^# TYPE (\S+) ", GOLDEN.read_text(), flags=re.M))
    served |= {f"{n}_info" for n in served}  # info families' samples
    used: set[str] = set()
    for path in [*ROOT.glob("deploy/grafana/*.json"), *ROOT.glob("deploy/alerts/*.yml"),
                 *ROOT.glob("deploy/alerts/tests/*.yml")]:
        used |= set(re.findall(r"(?<![:\w])buildkit_cache_[a-z_]+[a-z]", path.read_text()))  # not recorded ones
    used = {u for u in used if not u.startswith("buildkit_cache_actuator")}
    assert used and used <= served, sorted(used - served)
