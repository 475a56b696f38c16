"""`state_volume`: the on-disk size and inode count of a buildx builder's state volume."""

from __future__ import annotations

from typing import TYPE_CHECKING

from buildkit_cache.config import Config
from buildkit_cache.models import STATE_VOLUME, TreeUsage

from .base import Families, Measurement, gauge

if TYPE_CHECKING:  # the Docker SDK is imported once the config said whether ssh:// is needed
    from buildkit_cache.builders import Builder


class StateVolume(Measurement[TreeUsage]):
    name = STATE_VOLUME
    interval = 300.0

    def run(self, builder: Builder, cfg: Config) -> TreeUsage:
        return builder.state_usage(cfg.exporter.timeout)

    def families(self) -> Families:
        return {
            "size": gauge("state_volume_size_bytes", "On-disk size of the builder's state volume (allocated blocks, like du)."),
            "files": gauge("state_volume_files",
                           "Files, directories and links in the builder's state volume (inodes it uses)."),
            "databases": gauge("state_databases_bytes",
                               "Bytes of BuildKit's own metadata databases (bolt *.db) in the state volume: part of "
                               "its size that buildctl du and the records leave out."),
        }

    def render(self, families: Families, labels: list[str], value: TreeUsage, as_of: float, cfg: Config) -> None:
        families["size"].add_metric(labels, value.bytes)
        families["files"].add_metric(labels, value.files)
        if value.databases_bytes is not None:
            families["databases"].add_metric(labels, value.databases_bytes)


MEASUREMENT = StateVolume()
