"""The exporter's quick decoders (decode.py) give usage.summarize exactly what the full parsers give it,
on every recorded engine and buildctl answer and on generated records, and refuse what they refuse."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from buildkit_cache import decode, parse
from buildkit_cache.usage import summarize

F = Path(__file__).resolve().parent / "fixtures"
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
WINDOWS = (60.0, 3600.0, 86400.0, 10 * 365 * 86400.0)
ENGINE_FILES = sorted(F.glob("docker-engine-*/**/system-df*.json"))


def outcome(fn):
    try:
        return fn()
    except parse.ParseError as exc:
        return ("error", type(exc))


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(F)))
@pytest.mark.parametrize("fresh", [False, True])
def test_engine_answers_summarise_the_same(path, fresh):
    raw = path.read_bytes()
    full = outcome(lambda: summarize(parse.parse_engine_build_cache(json.loads(raw)), fresh))
    quick = outcome(lambda: summarize(decode.engine_rows(raw), fresh))
    assert quick == full


def test_the_recorded_engine_answers_include_records_and_empty_caches():
    """So that the test above compares summaries with records in them, and of empty caches."""
    results = [outcome(lambda p=p: decode.engine_rows(p.read_bytes())) for p in ENGINE_FILES]
    assert any(isinstance(r, list) and len(r) > 5 for r in results)
    assert any(r == [] for r in results)


def test_both_decoders_refuse_a_reply_that_counts_records_but_lists_none():
    # What an engine that dropped the legacy list (announced for API 1.53) would send without verbose:
    # a recorded 29.7.2 answer's summary, without its list.
    usage = json.loads((F / "docker-engine-29.7/containerd/system-df.json").read_text())["BuildCacheUsage"]
    raw = json.dumps({"BuildCacheUsage": {k: v for k, v in usage.items() if k != "Items"}}).encode()
    assert outcome(lambda: decode.engine_rows(raw)) == ("error", parse.ParseError)
    assert outcome(lambda: parse.parse_engine_build_cache(json.loads(raw))) == ("error", parse.ParseError)


@pytest.mark.parametrize("name", ["du.json", "du.go-template-json.txt"])
def test_buildctl_answers_summarise_the_same(name):
    raw = (F / "buildctl" / name).read_bytes()
    full = summarize(parse.parse_buildctl_du_json(raw.decode()))
    assert summarize(decode.buildctl_rows(raw)) == full
    assert full.total_records > 5


def test_generated_records_summarise_the_same():
    rnd = random.Random(7)
    types = ["regular", "source.local", "exec.cachemount", "frontend", "internal", "source.git.checkout", "", None,
             "new.kind"]
    items = []
    for i in range(5000):
        item = {"ID": f"r{i}", "Size": rnd.randrange(0, 10**9), "InUse": rnd.random() < 0.1,
                "Shared": rnd.random() < 0.2, "Type": rnd.choice(types)}
        when = rnd.choice([None, "0001-01-01T00:00:00Z",
                           (NOW - timedelta(seconds=int(10 ** rnd.uniform(0, 8)))).isoformat().replace("+00:00", "Z")])
        if when is not None:
            item["LastUsedAt"] = when
        items.append(item)
    raw = json.dumps({"BuildCache": items}).encode()
    full = summarize(parse.parse_engine_build_cache(json.loads(raw)))
    assert summarize(decode.engine_rows(raw)) == full
    idle = full.idle_bytes(NOW, WINDOWS)
    assert idle[60.0] > idle[86400.0] > 0


@pytest.mark.parametrize("item, where", [
    ({"ID": "a", "Size": "12"}, "Size"),
    ({"ID": "a", "InUse": 1}, "InUse"),
    ({"Size": 1}, "ID"),
    ({"ID": "a", "LastUsedAt": "yesterday"}, "LastUsedAt"),
])
def test_wrong_types_are_errors_that_name_the_field(item, where):
    with pytest.raises(parse.ParseError, match=rf"BuildCache\[1\].*{where}|{where}.*BuildCache\[1\]"):
        decode.engine_rows(json.dumps({"BuildCache": [{"ID": "ok"}, item]}).encode())
    with pytest.raises(parse.ParseError):
        parse.parse_engine_build_cache({"BuildCache": [{"ID": "ok"}, item]})
