"""The state partition and idle windows the exporter exports."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from buildkit_cache import parse
from buildkit_cache.models import RECORD_TYPES, STATES, CacheRecord, PruneRequest
from buildkit_cache.prune_plan import plan_prune
from buildkit_cache.usage import summarize

F = Path(__file__).parent / "fixtures"
NOW = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)


def rec(id, size, rtype="regular", in_use=False, shared=False, idle=timedelta(0), last_used=True):
    t = NOW - idle
    return CacheRecord(id=id, record_type=rtype, size=size, in_use=in_use, shared=shared,
                       created_at=t, last_used_at=t if last_used else None)


def test_states_partition_the_total_and_every_type_and_state_has_a_series():
    records = parse.parse_engine_build_cache(json.loads((F / "docker-engine-20.10/system-df.json").read_text()))
    s = summarize(records)
    for t in RECORD_TYPES:
        for st in STATES:
            assert (t, st) in s.by_type_state
    assert sum(size for _, size in s.by_type_state.values()) == s.total_bytes == sum(r.size for r in records)
    assert sum(n for n, _ in s.by_type_state.values()) == s.total_records == 7
    # Three regular records are shared with images in this recording; none in use.
    assert s.by_type_state[("regular", "shared")] == (3, 5242880 + 3000000 + 0)
    assert s.by_type_state[("exec.cachemount", "reclaimable")] == (1, 20971520)
    assert s.by_type_state[("internal", "in_use")] == (0, 0)


def test_in_use_wins_over_shared():
    s = summarize([rec("a", 5, in_use=True, shared=True), rec("b", 7, shared=True)])
    assert s.by_type_state[("regular", "in_use")] == (1, 5)
    assert s.by_type_state[("regular", "shared")] == (1, 7)


def test_an_unknown_record_type_is_kept_not_dropped():
    s = summarize([rec("a", 3, rtype="source.image")])
    assert s.by_type_state[("source.image", "reclaimable")] == (1, 3)
    assert s.total_bytes == 3


def test_idle_windows_count_what_a_prune_with_until_would_free():
    hour, day = 3600.0, 86400.0
    records = [
        rec("old", 100, idle=timedelta(days=3)),
        rec("hours", 10, idle=timedelta(hours=2)),
        rec("fresh", 1, idle=timedelta(minutes=5)),
        rec("old-in-use", 1000, in_use=True, idle=timedelta(days=3)),
        rec("old-shared", 2000, shared=True, idle=timedelta(days=3)),
        rec("old-internal", 4000, rtype="internal", idle=timedelta(days=3)),
        # Never used since it was made: BuildKit's keep-duration spares only records whose lastUsedAt
        # is set and recent, so a prune-idle takes it whatever its age.
        rec("never-used", 20, idle=timedelta(minutes=1), last_used=False),
    ]
    idle_bytes = summarize(records).idle_bytes(NOW, [hour, day, 7 * day])
    assert idle_bytes == {hour: 130, day: 120, 7 * day: 20}
    # The same figures as the prune-idle plan of each window (the dry run's, checked against the engine).
    for window, idle in idle_bytes.items():
        plan = plan_prune(records, PruneRequest(keep_duration_seconds=window), NOW)
        assert sum(r.size for r in plan) == idle


def test_cache_mounts_a_docker_driver_marks_used_at_each_prune_are_never_idle():
    records = [rec("mount", 50, rtype="exec.cachemount", idle=timedelta(days=9)), rec("old", 100, idle=timedelta(days=9))]
    assert summarize(records, fresh_cache_mounts=True).idle_bytes(NOW, [3600.0]) == {3600.0: 100}
    assert summarize(records).idle_bytes(NOW, [3600.0]) == {3600.0: 150}
    plan = plan_prune(records, PruneRequest(keep_duration_seconds=3600.0), NOW, fresh_cache_mounts=True)
    assert [r.id for r in plan] == ["old"]


def test_recorded_buildctl_cache_is_idle_after_an_hour_not_after_a_day():
    records = parse.parse_buildctl_du_json((F / "buildctl/du.json").read_text())
    total = sum(r.size for r in records)
    later = datetime(2026, 11, 22, 17, 0, tzinfo=UTC)  # 1h20m after the last use
    s = summarize(records)
    assert s.idle_bytes(later, [3600.0, 86400.0]) == {3600.0: total, 86400.0: 0}


def test_idle_bytes_age_with_the_clock_from_what_the_summary_kept():
    """The exporter keeps the summary, not the records: later idle figures come from it alone, and
    equal a summary made afresh from the records at that later time."""
    records = [rec(f"r{i}", 10 * i + 1, idle=timedelta(minutes=37 * i), last_used=i % 5 != 0) for i in range(200)]
    kept = summarize(records)
    windows = [60.0, 3600.0, 86400.0, 7 * 86400.0]
    for later in (NOW, NOW + timedelta(minutes=30), NOW + timedelta(days=2), NOW + timedelta(days=30)):
        expected = {w: sum(r.size for r in plan_prune(records, PruneRequest(keep_duration_seconds=w), later))
                    for w in windows}
        assert kept.idle_bytes(later, windows) == expected


def test_never_reused_is_results_built_and_never_hit_not_cache_mounts_or_internal_records():
    """Docker's embedded builder raises a cache mount's usage count whenever it measures it: counting
    cache mounts would make the figure move with the exporter's own asking (seen between two real
    runs on every engine). A cache mount is written, not hit; internal records are BuildKit's own."""
    from dataclasses import replace

    records = [replace(rec("once", 100), usage_count=1), replace(rec("hit", 1000), usage_count=3),
               replace(rec("busy", 10, in_use=True), usage_count=1),
               replace(rec("mount", 5000, rtype="exec.cachemount"), usage_count=1),
               replace(rec("fe", 7000, rtype="frontend"), usage_count=0)]
    assert summarize(records).never_reused_bytes == 100
