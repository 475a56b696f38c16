"""Parsers against outputs recorded from real dockerd 20.10 and a real standalone buildkitd."""

import json
from pathlib import Path

import pytest

from buildkit_cache import decode, parse
from buildkit_cache.models import CacheRecord

F = Path(__file__).parent / "fixtures"
BUILDCTL = F / "buildctl"
ENGINE = F / "docker-engine-20.10"


def read(path: Path) -> str:
    return path.read_text()


def test_engine_system_df_records_match_the_raw_build_cache():
    raw = json.loads(read(ENGINE / "system-df.json"))
    records = parse.parse_engine_build_cache(raw)
    assert len(records) == len(raw["BuildCache"]) == 7
    assert sum(r.size for r in records) == sum(r["Size"] for r in raw["BuildCache"])
    by_id = {r.id: r for r in records}
    # API 1.41 has Parent (a string); it becomes a one-element parents tuple.
    assert by_id["1ogm8w10zenqy7ug4bfsseyvm"].parents == ("8quzsuhmt55nh4xlmrdkl6cej",)
    assert by_id["wjk8rqdky45zipkos2ny1ns35"].parents == ()
    assert by_id["wjk8rqdky45zipkos2ny1ns35"].record_type == "exec.cachemount"
    assert by_id["8quzsuhmt55nh4xlmrdkl6cej"].shared is True
    assert by_id["wjk8rqdky45zipkos2ny1ns35"].last_used_at.isoformat() == "2026-11-22T15:33:49.845316+00:00"


def test_engine_build_cache_query_on_api_1_41_has_the_same_records():
    full = parse.parse_engine_build_cache(json.loads(read(ENGINE / "system-df.json")))
    typed = parse.parse_engine_build_cache(json.loads(read(ENGINE / "system-df-build-cache.json")))
    assert sorted(full, key=lambda r: r.id) == sorted(typed, key=lambda r: r.id)


def test_engine_records_in_the_api_1_42_shape_use_parents_list_and_null_last_used():
    df = {"BuildCache": [{"ID": "a", "Parents": ["p1", "p2"], "Type": "regular", "Description": "x",
                          "InUse": True, "Shared": False, "Size": 10, "CreatedAt": "2026-01-01T00:00:00Z",
                          "LastUsedAt": None, "UsageCount": 0}]}
    (rec,) = parse.parse_engine_build_cache(df)
    assert rec.parents == ("p1", "p2")
    assert rec.last_used_at is None
    assert (rec.last_used_at or rec.created_at).year == 2026
    assert rec.state == "in_use"


def test_engine_28_5_parents_under_the_key_with_a_leading_space_are_read():
    raw = json.loads(read(F / "docker-engine-28.5" / "system-df-build-cache.json"))["BuildCache"]
    with_parents = {r["ID"]: tuple(r[" Parents"]) for r in raw if r.get(" Parents")}
    assert with_parents, "the recording has records with parents"
    records = {r.id: r for r in parse.parse_engine_build_cache({"BuildCache": raw})}
    assert {i: records[i].parents for i in with_parents} == with_parents
    assert all(records[r["ID"]].parents == () for r in raw if not r.get(" Parents"))


# API 1.52+ (Docker 29): recorded from a real 29.7.2 with each image store (lab/record_fixtures.py).
D29 = F / "docker-engine-29.7"
STORES = ("containerd", "overlay2")


@pytest.mark.parametrize("store", STORES)
def test_docker_29_records_come_from_build_cache_usage_items_as_from_the_legacy_list(store):
    verbose = json.loads(read(D29 / store / "system-df-verbose.json"))
    records = parse.parse_engine_build_cache(verbose)
    usage = verbose["BuildCacheUsage"]
    assert "BuildCache" not in verbose  # asked with verbose, only the new shape
    assert len(records) == usage["TotalCount"] > 0
    assert sum(r.size for r in records) == usage["TotalSize"]
    assert any(r.shared for r in records) and any(r.parents for r in records)
    # Without verbose the engine sends both; API 1.51 the legacy list only: the same records (but
    # for the cache mounts' last use: the engine marks them used at every /system/df it answers).
    def same(rs):
        return sorted((r.id, r.record_type, r.size, r.in_use, r.shared, r.parents, r.created_at) for r in rs)

    for name in ("system-df.json", "system-df-v1.51.json"):
        assert same(parse.parse_engine_build_cache(json.loads(read(D29 / store / name)))) == same(records), name


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("when", ["empty", "after-prune-all"])
def test_an_empty_docker_29_cache_is_no_records_not_an_error(store, when):
    """Docker 29 omits every zero field of BuildCacheUsage: a fresh engine, or one after
    `docker builder prune -af`, answers `{"BuildCacheUsage":{}}` when asked with verbose."""
    for name in ("system-df-verbose", "system-df", "system-df-v1.51"):
        answer = json.loads(read(D29 / store / f"{name}-{when}.json"))
        assert parse.parse_engine_build_cache(answer) == [], name
        assert decode.engine_rows(read(D29 / store / f"{name}-{when}.json").encode()) == [], name
    assert json.loads(read(D29 / store / f"system-df-verbose-{when}.json")) == {"BuildCacheUsage": {}}


def test_a_reply_that_counts_records_but_lists_none_is_an_error_never_zero_records():
    # What an engine that has dropped the legacy list (announced for API 1.53) would send when asked
    # without verbose: the recorded 29.7.2 answer's summary, without its list. Not zero records.
    usage = {k: v for k, v in json.loads(read(D29 / "containerd" / "system-df.json"))["BuildCacheUsage"].items()
             if k != "Items"}
    with pytest.raises(parse.ParseError, match=f"counts {usage['TotalCount']} records but lists none"):
        parse.parse_engine_build_cache({"BuildCacheUsage": usage})
    with pytest.raises(parse.ParseError, match="neither BuildCache nor BuildCacheUsage"):
        parse.parse_engine_build_cache({"Images": []})


def test_engine_df_without_build_cache_is_empty_and_garbage_is_an_error():
    assert parse.parse_engine_build_cache({"BuildCache": None}) == []
    assert parse.parse_engine_build_cache({"BuildCache": []}) == []
    with pytest.raises(parse.ParseError, match="BuildCache"):
        parse.parse_engine_build_cache({"BuildCache": {"oops": 1}})
    with pytest.raises(parse.ParseError, match=r"BuildCache\[0\].Size"):
        parse.parse_engine_build_cache({"BuildCache": [{"ID": "x", "Size": "big"}]})


def test_buildctl_du_json_and_go_template_json_are_the_same_records():
    a = parse.parse_buildctl_du_json(read(BUILDCTL / "du.json"))
    b = parse.parse_buildctl_du_json(read(BUILDCTL / "du.go-template-json.txt"))
    assert a == b
    assert len(a) == 19
    # buildctl du prints "Total: 44.96MB" for the same records.
    assert round(sum(r.size for r in a) / 1e6, 2) == 44.96
    types = {r.record_type for r in a}
    assert types == {"regular", "source.local", "exec.cachemount"}
    assert not any(r.in_use or r.shared for r in a)


def test_buildctl_du_verbose_matches_json_to_two_decimals_of_its_unit():
    exact = {r.id: r for r in parse.parse_buildctl_du_json(read(BUILDCTL / "du.json"))}
    verbose = parse.parse_buildctl_du_verbose(read(BUILDCTL / "du-verbose.txt"))
    assert {r.id for r in verbose} == set(exact)
    for r in verbose:
        e = exact[r.id]
        assert r.record_type == e.record_type
        assert r.parents == e.parents
        assert r.in_use == e.in_use and r.shared == e.shared and r.mutable == e.mutable
        assert r.usage_count == e.usage_count
        assert r.description == e.description
        unit = 1000 ** max(0, (len(str(e.size)) - 1) // 3)  # the kB/MB/GB unit buildctl printed it in
        assert abs(r.size - e.size) <= 0.005 * unit
        assert r.last_used_at == e.last_used_at.replace(microsecond=e.last_used_at.microsecond)


def test_buildctl_du_rejects_output_that_is_not_a_record_list():
    with pytest.raises(parse.ParseError, match="not JSON"):
        parse.parse_buildctl_du_json("ID  RECLAIMABLE SIZE")
    with pytest.raises(parse.ParseError, match="array"):
        parse.parse_buildctl_du_json('{"id": "x"}')
    assert parse.parse_buildctl_du_json("null") == []


def test_debug_workers_with_gc_off_has_no_rules():
    info = parse.parse_debug_workers_json(read(BUILDCTL / "debug-workers.json"))
    assert info.gc_enabled is False
    assert info.gc_rules == ()
    assert info.buildkit_version == "v0.0.0+unknown"


def test_debug_workers_default_gc_policy():
    info = parse.parse_debug_workers_json(read(BUILDCTL / "debug-workers-gc.json"))
    assert info.gc_enabled
    assert len(info.gc_rules) == 4
    r0, r1, r2, r3 = info.gc_rules
    assert r0.filters == ("type==source.local", "type==exec.cachemount", "type==source.git.checkout")
    assert r0.keep_duration_seconds == 48 * 3600
    assert r0.max_used_bytes == 512_000_000 and r0.reserved_bytes == 0
    assert r1.keep_duration_seconds == 1440 * 3600
    assert (r1.reserved_bytes, r1.max_used_bytes, r1.min_free_bytes) == (10e9, 100e9, 51e9)
    assert r3.all is True and r2.all is False


def test_debug_workers_verbose_gives_the_same_policy_as_json():
    for suffix in ("", "-gc"):
        j = parse.parse_debug_workers_json(read(BUILDCTL / f"debug-workers{suffix}.json"))
        v = parse.parse_debug_workers_verbose(read(BUILDCTL / f"debug-workers-verbose{suffix}.txt"))
        assert v == j


def test_debug_workers_from_older_buildkit_reads_keep_bytes_as_max_used():
    text = json.dumps([{"gcPolicy": [{"all": True, "keepDuration": 0, "keepBytes": 5_000_000}],
                        "buildkitVersion": {"version": "v0.12.5"}}])
    info = parse.parse_debug_workers_json(text)
    assert info.gc_rules[0].max_used_bytes == 5_000_000
    assert info.buildkit_version == "v0.12.5"


def test_df_columns_are_read_by_position_not_by_mount_name():
    fsu = parse.parse_df(read(BUILDCTL / "df-k.txt"), read(BUILDCTL / "df-i.txt"))
    assert fsu.size_bytes == 264212084 * 1024
    assert fsu.avail_bytes == 80663580 * 1024
    assert fsu.files == 16777216
    assert fsu.files_free == 16336060


def test_df_with_a_wrapped_device_name():
    df_k = ("Filesystem     1K-blocks    Used Available Use% Mounted on\n"
            "/dev/mapper/very-long-volume-group-name\n"
            "                 1000000  400000    600000  40% /var/lib/buildkit\n")
    df_i = "Filesystem Inodes IUsed IFree IUse% Mounted on\n/dev/x 5000 1000 4000 20% /\n"
    fsu = parse.parse_df(df_k, df_i)
    assert (fsu.size_bytes, fsu.avail_bytes, fsu.files, fsu.files_free) == (1024e6, 600000 * 1024, 5000, 4000)


def test_df_garbage_is_an_error():
    with pytest.raises(parse.ParseError, match="df -k"):
        parse.parse_df("df: /var/lib/buildkit: No such file or directory", "")


def test_du_sk():
    assert parse.parse_du_sk(read(BUILDCTL / "du-sk.txt")) == 45272 * 1024
    with pytest.raises(parse.ParseError):
        parse.parse_du_sk("du: cannot access")


def test_prune_json_lines_have_empty_record_type():
    deleted = parse.parse_buildctl_prune_json(read(BUILDCTL / "prune-keep-storage-20MB.json"))
    assert [r.id for r in deleted] == ["s1fwgzezq6gz5kmwdz46wmjnl", "kf95gxe3qmm1evr4jghvjdixd",
                                       "tyqj1qi6sjs3nwyqhq3wijdcy"]
    assert all(r.record_type == "" for r in deleted)
    assert sum(r.size for r in deleted) == 9441280 + 708608 + 2109440
    go = parse.parse_buildctl_prune_json(read(BUILDCTL / "prune-keep-storage-10MB.go-template-json.txt"))
    assert len(go) == 7


def test_prune_table_and_verbose():
    ids, total = parse.parse_buildctl_prune_table(read(BUILDCTL / "prune-keep-storage-30MB.txt"))
    assert len(ids) == 7 and ids[0] == "8f98dxeo8j05vyyi6812xa2zn"
    assert total == 16_840_000
    verbose = parse.parse_buildctl_du_verbose(read(BUILDCTL / "prune-verbose-keep-storage-5MB.txt"))
    assert [r.id for r in verbose] == ["tmgtxshoilbaainue7ra1fem7", "n9hloovl1hb94h0s6q6lf83jj"]


@pytest.mark.parametrize("text,expected", [
    ("2026-11-22T15:37:00.710569901Z", "2026-11-22T15:37:00.710570+00:00"),  # rounded, as msgspec does
    ("2026-11-22 15:37:00.710569901 +0000 UTC", "2026-11-22T15:37:00.710570+00:00"),
    ("2026-11-22T16:37:00+01:00", "2026-11-22T16:37:00+01:00"),
])
def test_timestamps(text, expected):
    assert parse.parse_timestamp(text).isoformat() == expected


def test_go_zero_time_and_null_are_unknown():
    assert parse.parse_timestamp("0001-01-01T00:00:00Z") is None
    assert parse.parse_timestamp(None) is None
    with pytest.raises(parse.ParseError):
        parse.parse_timestamp("yesterday")


def test_state_partition_order():
    base = dict(id="x", record_type="regular", size=1)
    assert CacheRecord(**base, in_use=True, shared=True).state == "in_use"
    assert CacheRecord(**base, in_use=False, shared=True).state == "shared"
    assert CacheRecord(**base, in_use=False, shared=False).state == "reclaimable"
