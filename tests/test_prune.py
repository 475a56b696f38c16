"""Prune selection (dry runs) and the arguments each API gets. Pure; no Docker here."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from buildkit_cache import parse
from buildkit_cache.errors import BuilderError
from buildkit_cache.models import CacheRecord, PruneRequest
from buildkit_cache.prune_api import buildctl_prune_args, engine_prune_params, parse_engine_prune_result
from buildkit_cache.prune_plan import delete_order, plan_prune

F = Path(__file__).parent / "fixtures"
NOW = datetime(2026, 11, 22, 16, 0, tzinfo=UTC)


def rec(id, size, age_h=1.0, uses=1, rtype="regular", in_use=False, shared=False, parents=(), mutable=None):
    t = NOW - timedelta(hours=age_h)
    return CacheRecord(id=id, record_type=rtype, size=size, in_use=in_use, shared=shared, mutable=mutable,
                       created_at=t, last_used_at=t, usage_count=uses, parents=tuple(parents))


def test_keep_storage_estimate_matches_the_recorded_real_prune():
    """A recording of a BuildKit master of 2026-11 (tests/fixtures/buildctl). There its prune held
    back the parent of a deleted mutable record, which BuildKit v0.32.2 does not (it frees it in the
    same prune, as its code says): tests/integration/test_prune_plan.py plays 24 real prunes of
    v0.32.2. The first choices and the bytes agree."""
    records = parse.parse_buildctl_du_json((F / "buildctl/du.json").read_text())
    real_ids, real_total = parse.parse_buildctl_prune_table((F / "buildctl/prune-keep-storage-30MB.txt").read_text())
    plan = plan_prune(records, PruneRequest(keep_storage=30_000_000), NOW)
    assert [r.id for r in plan][:2] == real_ids[:2]
    # ...and the bytes within 10% of what buildkitd reported (16.84MB).
    assert abs(plan.bytes - real_total) / real_total < 0.10
    # It stops as soon as the non-shared total is under the target.
    total = sum(r.size for r in records)
    assert total - plan.bytes < 30_000_000 <= total - plan.bytes + plan.records[-1].size


def test_least_recently_and_least_often_used_go_first():
    a = rec("old-rare", 10, age_h=10, uses=1)
    b = rec("old-often", 10, age_h=9, uses=50)
    c = rec("new-rare", 10, age_h=1, uses=1)
    d = rec("new-often", 10, age_h=0.5, uses=50)
    assert [r.id for r in delete_order([d, c, b, a])] == ["old-rare", "new-rare", "old-often", "new-often"]


def test_never_in_use_and_shared_internal_frontend_only_with_all():
    records = [rec("busy", 100, in_use=True), rec("img", 100, shared=True), rec("fe", 100, rtype="frontend"),
               rec("int", 100, rtype="internal"), rec("plain", 100)]
    assert [r.id for r in plan_prune(records, PruneRequest(keep_storage=1), NOW)] == ["plain"]
    everything = plan_prune(records, PruneRequest(all=True), NOW)
    assert {r.id for r in everything} == {"img", "fe", "int", "plain"}


def test_shared_records_do_not_count_toward_the_keep_target():
    records = [rec("img", 1000, shared=True), rec("a", 100, age_h=5), rec("b", 100, age_h=4)]
    # Non-shared total is 200: a target of 150 takes one record, though the grand total is 1200.
    assert [r.id for r in plan_prune(records, PruneRequest(keep_storage=150), NOW)] == ["a"]
    assert plan_prune(records, PruneRequest(keep_storage=201), NOW).records == ()


def test_children_go_before_parents_and_free_them():
    parent = rec("parent", 100, age_h=10)
    child = rec("child", 100, age_h=1, parents=["parent"])
    plan = plan_prune([parent, child], PruneRequest(keep_storage=1), NOW)
    assert [r.id for r in plan] == ["child", "parent"]


def test_a_deleted_mutable_record_frees_its_parent_in_the_same_prune():
    parent = rec("parent", 100, age_h=10, mutable=False)
    child = rec("child", 100, age_h=1, parents=["parent"], mutable=True)
    assert [r.id for r in plan_prune([parent, child], PruneRequest(keep_storage=1), NOW)] == ["child", "parent"]


def test_keep_duration_keeps_recently_used_records():
    records = [rec("old", 100, age_h=200), rec("recent", 100, age_h=2), rec("never-used", 5)]
    records[2] = CacheRecord(id="never-used", record_type="regular", size=5, in_use=False, shared=False,
                             created_at=NOW, last_used_at=None)
    plan = plan_prune(records, PruneRequest(keep_duration_seconds=7 * 86400), NOW)
    # BuildKit keeps only records whose last use is known and recent.
    assert {r.id for r in plan} == {"old", "never-used"}


def test_dockerds_cache_mounts_count_as_just_used_when_it_prunes():
    records = [rec("mount", 100, age_h=10, rtype="exec.cachemount"), rec("ctx", 50, age_h=1, rtype="source.local"),
               rec("old", 70, age_h=5, rtype="source.local")]
    fresh = {"fresh_cache_mounts": True}
    # keep-storage: the oldest goes first, but the engine's cache mounts go last.
    assert [r.id for r in plan_prune(records, PruneRequest(keep_storage=101), NOW)] == ["mount", "old"]
    assert [r.id for r in plan_prune(records, PruneRequest(keep_storage=101), NOW, **fresh)] == ["old", "ctx"]
    # until: never older than the cut-off; without either, or with all, they are taken.
    idle = PruneRequest(keep_duration_seconds=3600 * 2)
    assert [r.id for r in plan_prune(records, idle, NOW, **fresh)] == ["old"]
    assert {r.id for r in plan_prune(records, PruneRequest(all=True), NOW, **fresh)} == {"mount", "ctx", "old"}


def test_engine_params_follow_the_api_version():
    req = PruneRequest(keep_storage=5_000_000_000)
    old = engine_prune_params(req, "1.41")
    assert old["keep-storage"] == "5000000000" and "max-used-space" not in old
    new = engine_prune_params(req, "1.48")
    # From 1.48 keep-storage means reserved space, a floor: the cap must be max-used-space.
    assert new["max-used-space"] == "5000000000" and "keep-storage" not in new
    with pytest.raises(BuilderError, match="too old"):
        engine_prune_params(req, "1.38")


def test_engine_filters_are_json_with_bare_keys():
    p = engine_prune_params(PruneRequest(keep_duration_seconds=7 * 86400), "1.41")
    assert json.loads(p["filters"]) == {"until": {"604800s": True}, "private": {}}
    assert "all" not in p
    a = engine_prune_params(PruneRequest(all=True), "1.41")
    assert a == {"all": "true"}


def test_engine_prune_result_recorded():
    data = json.loads((F / "docker-engine-20.10/build-prune-keep-storage-10MB.json").read_text())
    r = parse_engine_prune_result(data)
    assert r.records_deleted == 4 and r.bytes_reclaimed == 23971716
    assert parse_engine_prune_result({"CachesDeleted": None, "SpaceReclaimed": 0}).records_deleted == 0


def test_buildctl_args_use_decimal_megabytes_to_the_byte_and_go_durations():
    assert buildctl_prune_args(PruneRequest(keep_storage=20_000_000_000)) == ["prune", "--keep-storage", "20000"]
    assert buildctl_prune_args(PruneRequest(keep_storage=1_999_999)) == ["prune", "--keep-storage", "1.999999"]
    assert buildctl_prune_args(PruneRequest(keep_storage=999_999)) == ["prune", "--keep-storage", "0.999999"]
    # buildctl multiplies the number by 1e6 in float64: the byte comes back.
    for budget in (1, 999_999, 12_345_678, 40_000_000_001):
        (mb,) = buildctl_prune_args(PruneRequest(keep_storage=budget))[2:]
        assert abs(int(float(mb) * 1e6) - budget) <= 1
    assert buildctl_prune_args(PruneRequest(keep_duration_seconds=86400)) == ["prune", "--keep-duration", "86400s"]
    assert buildctl_prune_args(PruneRequest(all=True)) == ["prune", "--all"]
