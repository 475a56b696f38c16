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
from tests.support import builder_container

pytestmark = pytest.mark.integration


@pytest.fixture
def colliding(dockerd, builder_image):
    """buildx_buildkit_ci1 (builder ci, node 1) and buildx_buildkit_ci10 (builder ci1, node 0)."""
    made = [builder_container.start_builder(dockerd, node) for node in ("ci1", "ci10")]
    yield [c for c, _ in made]
    for container, volume in made:
        dockerd.cli("rm", "-f", container, check=False)
        dockerd.cli("volume", "rm", volume, check=False)


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
    act = Actuator(dockerd, tmp_path, 1)
    try:
        assert act.post(notification("prune-all", "ci1")) == 200
        wait_for("the prune", lambda: act.events("pruned"), timeout=60)
    finally:
        act.stop()
    calls = {c: dockerd.cli("exec", c, "cat", "/var/log/buildctl-calls", check=False).stdout.decode()
             for c in colliding}
    assert "prune --all" in calls["buildx_buildkit_ci1"]
    assert "prune" not in calls["buildx_buildkit_ci10"]
    # The audit line names the container it acted on.
    assert act.events("pruned")[0]["container"] == "buildx_buildkit_ci1"


def test_a_container_named_like_a_remote_builder_of_the_config_is_told_apart(dockerd, builder_image):
    container, volume = builder_container.start_builder(dockerd, "alpha0")
    try:
        cfg = parse_config({"docker_hosts": [{"url": dockerd.url, "name": "test"}],
                            "builders": {"test/alpha": {"address": "tcp://buildkitd.test:1234"}}})
        found = Inventory(cfg).discover("test")
        by_key = {b.ref.key: b for b in found.builders}
        # test/alpha stays the remote buildkitd's; the container is named after its node.
        assert ("test", "alpha") not in by_key and by_key[("test", "alpha0")].ref.container == container
        assert any("buildx_buildkit_alpha0" in line and "named 'alpha0'" in line for line in found.renamed)
    finally:
        dockerd.cli("rm", "-f", container, check=False)
        dockerd.cli("volume", "rm", volume, check=False)
