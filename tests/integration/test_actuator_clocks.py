"""Two actuators sharing one state file, one of them with its clock 400 days ahead or behind
(Debian's libfaketime, `faketime -f`), both real processes against a real engine: a builder pruned by
one is in its cooldown for the other, and the skewed one's clean-up drops nothing."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from lab.procs import Process, wait_for
from tests.conftest import ENGINES
from tests.integration.test_actuator_docker import Actuator, non_shared_bytes, notification

D29 = [e for e in ENGINES if e.release == "docker29" and e.containerd_store]
pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine", D29, ids=[e.id for e in D29], indirect=True)]


LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"), Path("/usr/lib/faketime/libfaketimeMT.so.1"))


class SkewedActuator(Actuator):
    """The same actuator with its clocks moved by libfaketime (`faketime -f OFFSET`'s library,
    preloaded into the actuator's own process, so that signals reach it)."""

    def __init__(self, dockerd, tmp_path: Path, budget: int, state: Path, offset: str, extra: str = ""):
        self.offset = offset
        super().__init__(dockerd, tmp_path, budget, state=state, extra=extra)

    def _start(self, args: list[str]) -> Process:  # see Actuator._start
        return Process([sys.executable, "-m", "buildkit_cache.actuator", *args], self.log,
                       env={"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": self.offset})


IDLE = "  actions:\n    quick-idle: {kind: prune-idle, idle_for: 1s}"


@pytest.mark.parametrize("offset", ["+400d", "-400d"], ids=["ahead", "behind"])
def test_a_replica_whose_clock_is_off_prunes_nothing_in_anothers_cooldown(big_cache, tmp_path, offset):
    dockerd = big_cache
    state = tmp_path / "state.json"
    budget = non_shared_bytes(dockerd) // 2
    real = Actuator(dockerd, tmp_path, budget, state=state, extra=IDLE)
    try:
        assert real.post(notification("prune-to-budget", "default", fp="real")) == 200
        wait_for("the first prune", lambda: real.events("pruned"), timeout=60)
    finally:
        real.stop()
    entry = next(iter(json.loads(state.read_text())["claims"].values()))
    assert entry["host"] and entry["pid"] and entry["boot"]  # who wrote it, on which clock
    skewed = SkewedActuator(dockerd, tmp_path, budget, state, offset, extra=IDLE)
    try:
        # Its clean-up runs when it claims something: another action on the same builder.
        assert skewed.post(notification("quick-idle", "default", fp="other")) == 200
        wait_for("its own prune", lambda: skewed.events("pruned") or skewed.events("skipped"), timeout=60)
        assert json.dumps(["test", "default", "prune-to-budget"]) in json.loads(state.read_text())["claims"]
        assert skewed.post(notification("prune-to-budget", "default", fp="again")) == 200
        wait_for("its decision", lambda: [e for e in skewed.events("skipped") if e.get("action") == "prune-to-budget"],
                 timeout=30)
        time.sleep(1)
        (skip,) = [e for e in skewed.events("skipped") if e.get("action") == "prune-to-budget"]
        assert skip["decision"] == "cooldown", skip
        assert [e for e in skewed.events("started") if e["action"] == "prune-to-budget"] == []
    finally:
        skewed.stop()
