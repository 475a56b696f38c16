"""Memory a big answer leaves behind goes back to the system (buildkit_cache/memory.py). What it
gives back is measured by `bench/run --only bigcache` (docs/benchmarks.md, "Big caches"), not here."""

from __future__ import annotations

import dataclasses

import pytest

from buildkit_cache import memory
from buildkit_cache.config import parse_config
from buildkit_cache.exporter.measurements.records import MEASUREMENT
from tests.support.recorded import RecordedBuilder


def test_this_c_library_can_give_memory_back():
    assert memory.give_back() is True  # glibc, as on Debian and in the image (python:3.12-slim)


@pytest.mark.parametrize(("records", "given_back"), [(memory.BIG_ANSWER - 1, 0), (memory.BIG_ANSWER, 1)])
def test_a_records_measurement_gives_back_what_a_big_answer_took(monkeypatch, records, given_back):
    calls = []
    monkeypatch.setattr("buildkit_cache.exporter.measurements.records.give_back", lambda: calls.append(1) or True)
    b = RecordedBuilder("kamal")
    recorded = b.current
    b.current = [dataclasses.replace(recorded[i % len(recorded)], id=f"r{i}") for i in range(records)]
    summary = MEASUREMENT.run(b, parse_config({}))
    assert summary.total_records == records
    assert len(calls) == given_back
