"""Once per incident across restarts and replicas: the claims in the state file."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time

import pytest

from buildkit_cache.actuator import decide as D
from buildkit_cache.actuator.state import StateFile
from tests.test_actuator import alert, decide, notification

HOLD = 660.0  # prune_timeout 600 + margin


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def claims(path, clock, cooldown=3600.0, kernel_offset=0.0) -> D.Claims:
    """One actuator process: its own claims object over the shared file. Its wall clock is `clock`;
    the machine's kernel clock and its monotonic clock move with it, `kernel_offset` apart (a clock
    set ahead of the kernel's by that much)."""
    return D.Claims(cooldown, clock, StateFile(str(path), clock, lambda: ("test-boot", clock() - kernel_offset)),
                    HOLD, monotonic=clock)


def test_a_redelivery_after_a_restart_within_the_cooldown_prunes_nothing(tmp_path):
    clock = Clock()
    first = claims(tmp_path / "state.json", clock)
    d = first.settle(decide())
    assert d.accepted
    first.release(d, ran=True)
    clock.t += 600  # the actuator restarts; Alertmanager re-sends
    again = claims(tmp_path / "state.json", clock).settle(decide())
    assert again.decision == D.COOLDOWN and "cooldown ends in 3000s" in again.reason
    clock.t += 3000
    assert claims(tmp_path / "state.json", clock).settle(decide()).accepted


def test_a_prune_that_pruned_nothing_leaves_no_cooldown_across_a_restart(tmp_path):
    clock = Clock()
    first = claims(tmp_path / "state.json", clock)
    d = first.settle(decide())
    first.release(d, ran=False)
    assert claims(tmp_path / "state.json", clock).settle(decide()).accepted


def test_a_restart_during_a_prune_starts_no_second_one_while_it_may_still_run(tmp_path):
    clock = Clock()
    dead = claims(tmp_path / "state.json", clock, cooldown=0.0)
    assert dead.settle(decide()).accepted  # ... and the process is killed: no release
    clock.t += 30
    restarted = claims(tmp_path / "state.json", clock, cooldown=0.0)
    busy = restarted.settle(decide())
    assert busy.decision == D.BUSY
    clock.t += HOLD  # past the longest the first prune may take
    assert restarted.settle(decide()).accepted
    # The dead process's late release (it was not dead after all) does not drop the new claim.
    dead.release(decide(), ran=True)
    assert restarted.settle(decide()).decision == D.BUSY


def test_with_a_cooldown_a_dead_processes_prune_counts_as_run(tmp_path):
    clock = Clock()
    claims(tmp_path / "state.json", clock).settle(decide())
    clock.t += HOLD + 1
    assert claims(tmp_path / "state.json", clock).settle(decide()).decision == D.COOLDOWN


def _replica(path: str, start, results) -> None:
    c = D.Claims(3600.0, lambda: 1_000_000.0, StateFile(path, lambda: 1_000_000.0), HOLD)
    start.wait()
    results.put(c.settle(decide()).decision)


def test_replicas_sharing_the_state_path_accept_one_of_many_copies(tmp_path):
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_replica, args=(str(tmp_path / "state.json"), start, results)) for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    got = sorted(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    assert got.count(D.ACCEPTED) == 1 and got.count(D.BUSY) == 7, got


def test_the_file_is_small_json_written_whole_and_forgets_what_no_longer_holds(tmp_path):
    clock = Clock()
    c = claims(tmp_path / "state.json", clock)
    for builder in ("kamal", "limited"):
        d = c.settle(decide(builder=builder, action="prune-idle"))
        c.release(d, ran=True)
    data = json.loads((tmp_path / "state.json").read_text())
    assert data["version"] == 1 and len(data["claims"]) == 2
    assert [n for n in os.listdir(tmp_path) if n.startswith(".state-")] == []  # no temporary file left
    clock.t += 3601
    c.settle(decide())
    assert list(json.loads((tmp_path / "state.json").read_text())["claims"]) == ['["h1", "kamal", "prune-to-budget"]']


def test_a_damaged_file_is_said_and_replaced(tmp_path, caplog):
    (tmp_path / "state.json").write_text("{not json")
    assert claims(tmp_path / "state.json", Clock()).settle(decide()).accepted
    assert "state file" in caplog.text and "unreadable" in caplog.text
    assert json.loads((tmp_path / "state.json").read_text())["version"] == 1


def test_a_claim_that_cannot_be_recorded_is_no_prune(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    c = claims(folder / "state.json", Clock())
    folder.rmdir()
    d = c.settle(decide())
    assert d.decision == D.STATE_FAILED and not d.accepted and "cannot" in d.reason


async def test_the_service_answers_503_when_it_cannot_record_a_claim(harness, tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    h = await harness.start(state=StateFile(str(folder / "state.json"), Clock()))
    folder.rmdir()
    r = await h.post(notification(alert()))
    assert r.status == 503
    assert (await r.json())["alerts"][0]["decision"] == D.STATE_FAILED
    await h.settle()
    assert h.builders["kamal"].prunes == []


@pytest.fixture
def harness(aiohttp_client, tmp_path):
    from tests.test_actuator import Harness

    return Harness(aiohttp_client, tmp_path)


async def test_a_prune_cut_off_by_shutdown_is_recorded_and_its_claim_outlives_the_process(harness, tmp_path):
    harness.builders["kamal"].prune_seconds = 1.5
    state = StateFile(str(tmp_path / "state.json"), time.time)
    h = await harness.start(state=state)  # the service's clock: time.time
    await h.post(notification(alert()))
    await asyncio.sleep(0.2)
    await h.service.drain(grace=0.1)
    await h.service.close()
    failed = [e for e in h.audit_lines() if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["result"] == "interrupted", h.audit_lines()
    assert h.metric("buildkit_cache_actuator_prunes_total", host="h1", builder="kamal", action="prune-to-budget",
                    result="interrupted") == 1
    # A new process finds the claim and starts no second prune.
    assert claims(tmp_path / "state.json", time.time).settle(decide()).decision == D.BUSY


def test_a_claim_that_could_not_be_released_expires_at_its_busy_until(tmp_path):
    """M3: a release that failed (a read-only state disk for a moment) leaves the claim running; it
    blocks re-sends only until its hold ends, not for the life of the process."""
    clock = Clock()
    c = claims(tmp_path / "state.json", clock, cooldown=0.0)
    assert c.settle(decide()).accepted  # ...and its release never reaches the file
    clock.t += 30
    assert c.settle(decide()).decision == D.BUSY
    clock.t += HOLD
    assert c.settle(decide()).accepted


def write_state(path, started, busy_until, running=True):
    path.write_text(json.dumps({"version": 1, "claims": {json.dumps(["h1", "kamal", "prune-to-budget"]): {
        "started": started, "running": running, "busy_until": busy_until, "owner": "gone"}}}))


def test_a_start_in_the_future_blocks_for_one_cooldown_at_most(tmp_path, caplog):
    """M4: a clock that jumped back a year must not block the action for a year."""
    clock = Clock()
    write_state(tmp_path / "state.json", clock.t + 365 * 86400 - 10, clock.t + 365 * 86400 + 600, running=False)
    c = claims(tmp_path / "state.json", clock)
    d = c.settle(decide())
    assert d.decision == D.COOLDOWN and "cooldown ends in 3600s" in d.reason
    clock.t += 3600
    assert c.settle(decide()).accepted


@pytest.mark.parametrize("bad", ["nan", "inf", 1e300, -5])
def test_a_running_claim_with_impossible_times_holds_its_whole_time_not_less(tmp_path, caplog, bad):
    """A claim whose busy_until is NaN, infinite, absurd or before its start (a partial write,
    another version) is not obeyed, nor dropped: it holds for the longest a prune may take, from
    when this process first saw it. No second prune starts meanwhile."""
    clock = Clock()
    write_state(tmp_path / "state.json", clock.t - 10, float(bad))
    state = StateFile(str(tmp_path / "state.json"), clock)
    assert [k for k, _ in state.check()] == [("h1", "kamal", "prune-to-budget")]  # said at start, nothing raised
    c = claims(tmp_path / "state.json", clock, cooldown=0.0)  # the hold alone (a cooldown would follow it)
    assert c.settle(decide()).decision == D.BUSY
    assert any("cannot obey" in m for m in caplog.messages)
    clock.t += HOLD - 1
    assert c.settle(decide()).decision == D.BUSY
    clock.t += 2
    assert c.settle(decide()).accepted


def test_a_replica_with_its_clock_ahead_ends_no_cooldown_early_and_drops_nothing(tmp_path):
    """Two replicas share the state file; one's clock is 400 days ahead of the machine's (as
    libfaketime sets it; tests/integration/test_actuator_clocks.py runs real processes so). Its
    clean-up used to drop every entry its clock said was over, and it pruned again at once."""
    real, ahead = Clock(), Clock(1_000_000.0 + 400 * 86400)
    path = tmp_path / "state.json"
    first = claims(path, real)
    d = first.settle(decide())
    first.release(d, ran=True)
    skewed = claims(path, ahead, kernel_offset=400 * 86400)
    other = skewed.settle(decide(builder="limited", action="prune-idle"))  # its clean-up runs here
    assert other.accepted
    assert json.dumps(["h1", "kamal", "prune-to-budget"]) in json.loads(path.read_text())["claims"]
    again = skewed.settle(decide())
    assert again.decision == D.COOLDOWN
    real.t += 600
    ahead.t += 600
    assert skewed.settle(decide()).decision == D.COOLDOWN
    assert first.settle(decide()).decision == D.COOLDOWN  # the real clock's own view is unchanged
    real.t += 3000
    ahead.t += 3000
    assert first.settle(decide()).accepted


def test_a_replica_with_its_clock_behind_drops_nothing_and_waits_one_cooldown(tmp_path):
    real, behind = Clock(), Clock(1_000_000.0 - 400 * 86400)
    path = tmp_path / "state.json"
    first = claims(path, real)
    first.release(first.settle(decide()), ran=True)
    late = claims(path, behind, kernel_offset=-400 * 86400)
    assert late.settle(decide()).decision == D.COOLDOWN
    assert late.settle(decide(builder="limited", action="prune-idle")).accepted  # clean-up: drops nothing
    assert "kamal" in path.read_text()
    behind.t += 3600
    assert late.settle(decide()).accepted


def test_each_entry_says_which_process_and_host_wrote_it(tmp_path):
    import socket

    c = claims(tmp_path / "state.json", Clock())
    c.settle(decide())
    (entry,) = json.loads((tmp_path / "state.json").read_text())["claims"].values()
    assert entry["host"] == socket.gethostname() and entry["pid"] == os.getpid()
    assert entry["boot"] == "test-boot" and entry["owner"] == c.state.owner


def test_an_unparsable_state_file_is_moved_aside_and_started_afresh(tmp_path, caplog):
    (tmp_path / "state.json").write_text("{not json")
    clock = Clock()
    assert claims(tmp_path / "state.json", clock).settle(decide()).accepted
    aside = list(tmp_path.glob("state.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == "{not json"
    assert any("moved to" in m for m in caplog.messages)


def test_a_symlinked_state_file_is_followed_not_replaced(tmp_path):
    real = tmp_path / "data" / "state.json"
    real.parent.mkdir()
    (tmp_path / "state.json").symlink_to(real)
    c = claims(tmp_path / "state.json", Clock())
    assert c.settle(decide()).accepted
    assert (tmp_path / "state.json").is_symlink() and "kamal" in real.read_text()


def test_a_state_lock_held_elsewhere_is_an_error_within_a_second_not_a_hang(tmp_path):
    """M2: `flock state.json.lock sleep 25` in another process: the claim fails fast (503 upstream)."""
    import fcntl

    path = tmp_path / "state.json"
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: as another process's
    try:
        started = time.monotonic()
        d = claims(path, Clock()).settle(decide())
        assert d.decision == D.STATE_FAILED and "held by another process" in d.reason
        assert time.monotonic() - started < 1.0
    finally:
        os.close(fd)
    assert claims(path, Clock()).settle(decide()).accepted
