"""The dry run's plan against real prunes of a real BuildKit v0.32.2.

Random layered caches, each made by real builds in a standalone buildkitd: chains of COPY and RUN
layers on a common base, cache mounts, builds run again (usage counts above 1) and builds that
share their first layers. For each, the plan (prune_plan.plan_prune over what `buildctl du` says,
as the actuator's dry run reads it) is compared with what `buildctl prune --keep-storage` then
really deletes: the bytes lie in the plan's range, the records are the plan's, and the plan ends at
or under the budget whenever BuildKit's prune does. Shared records (image layers) exist only with an
image store, which a standalone buildkitd's OCI worker has not: the engine's builder, whose records
are shared with the images it tags, is checked in test_actuator_docker.py's dry-run test.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import pytest

from buildkit_cache import decode
from buildkit_cache.models import PruneRequest
from buildkit_cache.prune_plan import plan_prune
from tests.support import buildkit

pytestmark = pytest.mark.integration
CASES = 24


@pytest.fixture(scope="module")
def bkd(tmp_path_factory):
    b = buildkit.Buildkitd(tmp_path_factory.mktemp("plan") / "buildkitd")
    yield b
    b.stop()


def random_cache(b: buildkit.Buildkitd, rng: random.Random, root, case: int) -> None:
    contexts = []
    for i in range(rng.randint(3, 7)):
        if contexts and rng.random() < 0.25:
            b.build(rng.choice(contexts))  # the same build again: its records used once more
            continue
        layers = [(rng.choice(["copy", "run"]), rng.choice([0.1, 0.3, 0.5, 1, 2, 3])) for _ in range(rng.randint(1, 4))]
        ctx = buildkit.write_context(root / f"case{case}-{i}", f"c{case}b{i}", layers,
                                     cache_mb=rng.choice([0, 0, 1, 2]))
        b.build(ctx)
        contexts.append(ctx)


def settled(b: buildkit.Buildkitd) -> list:
    """The records once BuildKit is done with the last build: it marks a build's cache mounts used
    a moment after the build returns (releasing them in the background). An alert comes long after."""
    seen: list[set] = []
    while True:
        records = decode.buildctl_records(b.buildctl("du", "--format", "json").stdout)
        seen.append(set(records))
        if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
            return records
        time.sleep(0.5)


@pytest.mark.parametrize("case", range(CASES))
def test_a_prune_to_budget_frees_what_the_plan_says(bkd, tmp_path, case):
    rng = random.Random(case)
    bkd.buildctl("prune", "--all")
    assert bkd.du() == []
    random_cache(bkd, rng, tmp_path, case)
    records = settled(bkd)
    total = sum(r.size for r in records if not r.shared)
    budget_mb = max(1, int(total * rng.uniform(0.15, 0.85) / 1_000_000))
    plan = plan_prune(records, PruneRequest(keep_storage=budget_mb * 1_000_000), datetime.now(UTC))
    real = decode.buildctl_prune_records(bkd.buildctl("prune", "--keep-storage", str(budget_mb), "--format",
                                                      "json").stdout.decode())
    freed = sum(r.size for r in real)
    left = sum(r.size for r in decode.buildctl_records(bkd.buildctl("du", "--format", "json").stdout)
               if not r.shared)
    print(f"case {case}: {len(records)} records, {total} bytes, budget {budget_mb} MB: plan {len(plan)} records "
          f"{plan.low}-{plan.high} bytes{' (ties)' if plan.ties else ''}, real {len(real)} records {freed} bytes, "
          f"{left} left")
    assert plan.low <= freed <= plan.high, (plan.low, freed, plan.high)
    if not plan.ties:
        assert [r.id for r in plan] == [r.id for r in real]
    # Never over the budget where BuildKit is not.
    assert (total - plan.high >= budget_mb * 1_000_000) == (left >= budget_mb * 1_000_000)
