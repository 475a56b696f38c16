"""`filesystem`: bytes and inodes of the filesystem holding the builder's cache (node_exporter's names)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from buildkit_cache.config import Config
from buildkit_cache.models import FILESYSTEM, FilesystemUsage

from .base import Families, Measurement, gauge

if TYPE_CHECKING:  # the Docker SDK is imported once the config said whether ssh:// is needed
    from buildkit_cache.builders import Builder


class Filesystem(Measurement[FilesystemUsage]):
    name = FILESYSTEM
    interval = 30.0

    def run(self, builder: Builder, cfg: Config) -> FilesystemUsage:
        return builder.filesystem()

    def families(self) -> Families:
        return {
            "size": gauge("filesystem_size_bytes", "Size of the filesystem holding the builder's state."),
            "avail": gauge("filesystem_avail_bytes",
                           "Bytes available to unprivileged users on the filesystem holding the builder's state."),
            "free": gauge("filesystem_free_bytes",
                          "Free bytes of the filesystem holding the builder's state, the blocks reserved for root "
                          "included: used as df says it is (size - free) / (size - free + avail)."),
            "files": gauge("filesystem_files", "Inodes of the filesystem holding the builder's state."),
            "files_free": gauge("filesystem_files_free", "Free inodes of the filesystem holding the builder's state."),
        }

    def render(self, families: Families, labels: list[str], value: FilesystemUsage, as_of: float, cfg: Config) -> None:
        families["size"].add_metric(labels, value.size_bytes)
        families["avail"].add_metric(labels, value.avail_bytes)
        families["free"].add_metric(labels, value.free_bytes)
        families["files"].add_metric(labels, value.files)
        families["files_free"].add_metric(labels, value.files_free)


MEASUREMENT = Filesystem()
