"""Where dockerd's embedded BuildKit keeps its bytes, from `GET /info` recorded on real engines
(tests/fixtures/docker-engine-*/info*.json: the private test engines, data roots under /tmp)."""

import json
from pathlib import Path

from buildkit_cache.builders import engine_storage

F = Path(__file__).parent / "fixtures"


def info(name: str) -> dict:
    return json.loads((F / name).read_text())


def test_classic_store_keeps_the_cache_in_the_graph_driver_under_the_data_root():
    for name in ("docker-engine-20.10/info.json", "docker-engine-26.1/info.json", "docker-engine-28.5/info.json"):
        i = info(name)
        s = engine_storage(i)
        assert s.image_store == "overlay2"
        assert s.path == i["DockerRootDir"] + "/overlay2" and s.fallback == i["DockerRootDir"]


def test_containerd_store_with_dockerds_own_containerd_keeps_the_cache_under_the_data_root():
    i = info("docker-engine-28.5/info-containerd-store.json")
    s = engine_storage(i)
    assert s.image_store == "containerd"
    assert s.path == i["DockerRootDir"] + "/containerd/daemon/io.containerd.snapshotter.v1.overlayfs"
    assert s.fallback == i["DockerRootDir"] + "/containerd/daemon"


def test_containerd_store_with_a_system_containerd_keeps_the_cache_in_var_lib_containerd():
    # Docker CE: dockerd uses the system containerd at /run/containerd/containerd.sock.
    i = {**info("docker-engine-28.5/info-containerd-store.json"), "DockerRootDir": "/var/lib/docker",
         "Containerd": {"Address": "/run/containerd/containerd.sock", "Namespaces": {"Containers": "moby"}}}
    s = engine_storage(i)
    assert s.path == "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs"
    assert s.fallback == "/var/lib/containerd"


def test_the_config_names_containerds_root_where_info_cannot_tell():
    i = info("docker-engine-28.5/info-containerd-store.json")
    s = engine_storage(i, "/srv/containerd/")
    assert s.path == "/srv/containerd/io.containerd.snapshotter.v1.overlayfs"
    # A classic-store engine ignores it: its cache is in the graph driver.
    assert engine_storage(info("docker-engine-28.5/info.json"), "/srv/containerd").image_store == "overlay2"


def test_builder_names_that_would_collide_are_told_apart_or_refused():
    from buildkit_cache.builders import resolve_names

    names, renamed, refused = resolve_names([("ci1", "ci1", False), ("ci10", "ci1", False), ("kamal0", "kamal", False)],
                                            {"default"})
    assert names == {"ci1": "ci1", "ci10": "ci10", "kamal0": "kamal"} and len(renamed) == 2 and refused == []
    # A container named like the engine's builder, or like a remote builder, is told apart by its node.
    names, _, _ = resolve_names([("default0", "default", False)], {"default"})
    assert names == {"default0": "default0"}
    # Names the config gave are never changed: two alike are refused, both.
    names, _, refused = resolve_names([("a0", "x", True), ("b0", "x", True)], {"default"})
    assert names == {} and len(refused) == 2
