"""`state_volume`: the on-disk size and inode count of a buildx builder's state volume."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from buildkit_cache.config import Config
from buildkit_cache.models import STATE_VOLUME, TreeUsage

from .base import Families, Measurement, gauge

if TYPE_CHECKING:  # the Docker SDK is imported once the config said whether ssh:// is needed
    from buildkit_cache.builders import Builder


log = logging.getLogger("exporter")


class StateVolume(Measurement[TreeUsage]):
    name = STATE_VOLUME
    interval = 300.0

    def __init__(self) -> None:
        self._short: set[tuple[str, str]] = set()  # builders whose walk was said to leave directories out

    def run(self, builder: Builder, cfg: Config) -> TreeUsage:
        usage = builder.state_usage(cfg.exporter.timeout)
        key = builder.ref.key
        if usage.unreadable and key not in self._short:
            self._short.add(key)
            log.warning("builder %s: %d directories of its state volume may not be read by this process (such as %s, "
                        "of another user with mode 0700, as a rootless buildkitd's snapshots hold): their contents "
                        "are left out of its size (buildkit_cache_state_volume_unreadable_directories). To measure "
                        "them, give the exporter CAP_DAC_READ_SEARCH (docs/how-it-works.md, \"Rootless buildkitd\")",
                        builder.ref, usage.unreadable, usage.unreadable_example)
        elif not usage.unreadable and key in self._short:
            self._short.discard(key)
            log.info("builder %s: its whole state volume is read again", builder.ref)
        return usage

    def families(self) -> Families:
        return {
            "size": gauge("state_volume_size_bytes", "On-disk size of the builder's state volume (allocated blocks, like du)."),
            "files": gauge("state_volume_files",
                           "Files, directories and links in the builder's state volume (inodes it uses)."),
            "databases": gauge("state_databases_bytes",
                               "Bytes of BuildKit's own metadata databases (bolt *.db) in the state volume: part of "
                               "its size that buildctl du and the records leave out."),
            "unreadable": gauge("state_volume_unreadable_directories",
                                "Directories of the state volume this exporter may not read (a rootless buildkitd's "
                                "snapshots hold other users' 0700 directories): their contents are not in the size "
                                "and file count. 0 when the walk saw everything."),
        }

    def render(self, families: Families, labels: list[str], value: TreeUsage, as_of: float, cfg: Config) -> None:
        families["size"].add_metric(labels, value.bytes)
        families["files"].add_metric(labels, value.files)
        if value.databases_bytes is not None:
            families["databases"].add_metric(labels, value.databases_bytes)
        families["unreadable"].add_metric(labels, value.unreadable)


MEASUREMENT = StateVolume()
