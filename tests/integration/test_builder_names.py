"""Builder identity end to end: names that would collide are told apart, never guessed, and the
actuator acts on the builder the exporter's labels name."""

from __future__ import annotations

import pytest

from buildkit_cache.config import parse_config
from buildkit_cache.exporter.collect import collect_once as collect_snapshot
from buildkit_cache.exporter.metrics import registry_for
from buildkit_cache.inventory import Inventory
from lab.procs import wait_for
from tests.integration.test_actuator_docker import Actuator, notification

pytestmark = pytest.mark.integration


@pytest.fixture
def colliding(make_builder, layer_contexts):
    """buildx_buildkit_ci1 (builder ci, its node named ci1) and buildx_buildkit_ci10 (builder ci1,
    node 0), each with real build cache."""
    made = [make_builder("ci", node="ci1"), make_builder("ci1")]
    for b, ctx in zip(made, layer_contexts, strict=True):
        b.build(ctx)
        b.settle()
    return made


async def test_colliding_names_are_told_apart_by_their_nodes(dockerd, colliding):
    cfg = parse_config({"docker_hosts": [{"url": dockerd.url, "name": "test"}]})
    store = await collect_snapshot(cfg, Inventory(cfg))
    reg = registry_for(store, cfg)
    for name, container in (("ci1", "buildx_buildkit_ci1"), ("ci10", "buildx_buildkit_ci10")):
        assert store.builders[("test", name)].ref.container == container
        assert reg.get_sample_value("buildkit_cache_measurement_success",
                                    {"host": "test", "builder": name, "measurement": "records"}) == 1
    assert reg.get_sample_value("buildkit_cache_builder_name_conflicts", {"host": "test"}) == 0


def test_a_prune_all_for_one_leaves_the_other_untouched(dockerd, colliding, tmp_path):
    ci1, ci10 = colliding
    assert (ci1.container, ci10.container) == ("buildx_buildkit_ci1", "buildx_buildkit_ci10")
    untouched = sorted(r["id"] for r in ci10.du())
    act = Actuator(dockerd, tmp_path, 1)
    try:
        assert act.post(notification("prune-all", "ci1")) == 200
        wait_for("the prune", lambda: act.events("pruned"), timeout=60)
    finally:
        act.stop()
    assert [r for r in ci1.du() if not r["inUse"]] == []
    assert sorted(r["id"] for r in ci10.du()) == untouched != []
    # The audit line names the container it acted on.
    assert act.events("pruned")[0]["container"] == "buildx_buildkit_ci1"


def test_a_container_named_like_a_remote_builder_of_the_config_is_told_apart(dockerd, make_builder):
    container = make_builder("alpha").container
    cfg = parse_config({"docker_hosts": [{"url": dockerd.url, "name": "test"}],
                        "builders": {"test/alpha": {"address": "tcp://buildkitd.test:1234"}}})
    found = Inventory(cfg).discover("test")
    by_key = {b.ref.key: b for b in found.builders}
    # test/alpha stays the remote buildkitd's; the container is named after its node.
    assert ("test", "alpha") not in by_key and by_key[("test", "alpha0")].ref.container == container
    assert any("buildx_buildkit_alpha0" in line and "named 'alpha0'" in line for line in found.renamed)
