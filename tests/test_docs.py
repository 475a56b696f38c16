"""The docs name what the code does: every decision and every result the actuator counts."""

from __future__ import annotations

import re
from pathlib import Path

from buildkit_cache.actuator.decide import DECISIONS
from buildkit_cache.actuator.executor import RESULTS

ACTUATOR_DOC = (Path(__file__).resolve().parents[1] / "docs" / "actuator.md").read_text()


def listed(metric: str) -> set[str]:
    """The back-quoted values in the docs' table row of a metric."""
    (line,) = [line for line in ACTUATOR_DOC.splitlines() if line.startswith(f"| `{metric}`")]
    return set(re.findall(r"`([a-z_]+)`", line.split("|")[3]))


def test_every_decision_the_actuator_counts_is_in_the_docs():
    assert set(DECISIONS) <= listed("buildkit_cache_actuator_alerts_total")


def test_every_prune_result_the_actuator_counts_is_in_the_docs():
    assert set(RESULTS) <= listed("buildkit_cache_actuator_prunes_total")
