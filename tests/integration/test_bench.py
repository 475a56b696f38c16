"""The benchmarks run, at tiny sizes (`bench/run --small`), and their checks of correctness hold:
the state volume figures equal du's, the stand-in's records are all counted, one prune for 100
copies of a notification, every distinct one audited, a real BuildKit's and Docker 29's records all
counted, planned and pruned. Timings are the benchmarks' business
(docs/benchmarks.md), never asserted here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lab.procs import ROOT
from tests.conftest import work_dir

pytestmark = pytest.mark.integration


def test_every_benchmark_runs_at_tiny_sizes():
    # A short folder (containerd's socket paths must stay under 104 bytes), as bench/run gives it.
    work = work_dir("b-")
    done = subprocess.run([sys.executable, "-m", "bench", "--small"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TMPDIR": str(work)})
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    areas = {line.split("|")[1].strip() for line in table}
    assert areas == {"cost", "scrape", "cycle", "memory", "walk", "builders", "actuator", "big caches"}, done.stdout
    # At rest, after the first collection, the real builder is asked nothing; the peer is measured.
    (rest,) = [line for line in table if line.startswith("| cost | exporter at rest, between refreshes")]
    assert "docker execs into the builder: 0 |" in rest, rest
    assert any(line.startswith("| cost | a peer asking buildkitd's DiskUsage every 15 s") and "200 records" in line
               for line in table), table
    assert any(line.startswith("| cost | exporter at rest over a whole refresh period") for line in table), table
    walk = [line for line in table if line.startswith("| walk |")]
    assert len(walk) == 2 and "figures equal to du's: yes" in walk[0] and "0.00% apart" in walk[1], walk
    actuator = [line for line in table if line.startswith("| actuator |")]
    assert "; 1 prune |" in actuator[0] and "answers {200: 100}" in actuator[0], actuator
    assert "audit 'received' 200 of 200 sent; notifications_total 200, alerts_total 200" in actuator[1], actuator
    # Big caches: a real buildkitd's and a real Docker 29's records all counted by the exporter, a plan
    # and a real prune of half of them, a dry run on record.
    big = {line.split("|")[2].strip(): line.split("|")[3].strip() for line in table if line.startswith("| big caches |")}
    assert big["exporter: first records measurement (in parts past the limit)"].endswith("for 3,000 records"), big
    planned = big["dry run: planning a prune to half the cache"]
    pruned = big["a real prune to half the cache, through the actuator"]
    assert pruned.endswith(" records") and pruned.split(", ")[1].split()[0] != "0", big
    assert "of CPU" in planned, big
    (dry,) = [v for k, v in big.items() if k.startswith("dry run of 500 records")]
    assert "would prune" in dry, big
    assert any(k.startswith("exporter on Docker 29") for k in big), big
    assert list(work.iterdir()) == []  # the benchmarks' temporary folder is gone
    work.rmdir()
