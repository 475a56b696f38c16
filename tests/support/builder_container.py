"""A buildx docker-container builder as buildx sets one up, but with a stand-in `buildctl`.

Everything is real (the container named `buildx_buildkit_<node>`, its `_state` volume at
/var/lib/buildkit, `docker exec`, busybox `du`/`df`/`find`) except buildkitd itself, which cannot
run here: its `buildctl` answers with outputs recorded from a real one (tests/fixtures/buildctl).
"""

from __future__ import annotations

from pathlib import Path

from lab.engines import PrivateDockerd, busybox_files

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "buildctl"
IMAGE = "bkce-test-builder:latest"

# Behaviour switches: files under /fixtures that tests create with `docker exec ... touch`.
#   old   -> behave like a buildctl without --format (only -v / --verbose output)
#   gc    -> report the default GC policy (debug-workers-gc.json) instead of GC off
#   hang  -> `du` never answers (a hung buildkitd)
#   slowprune -> `prune` takes as many seconds as the file says
#   garbage -> `du` prints what is not JSON;  huge -> `du` prints 70 MB
BUILDCTL = r"""#!/bin/sh
F=/fixtures
echo "$*" >> /var/log/buildctl-calls 2>/dev/null
# Global options before the command (a remote or sidecar builder's --addr and TLS files) are taken.
while :; do case "$1" in --addr|--tlscacert|--tlscert|--tlskey|--tlsservername) shift 2 ;; *) break ;; esac; done
old() { if [ -e $F/old ]; then echo 'flag provided but not defined: -format' >&2; exit 1; fi; }
GC=""; [ -e $F/gc ] && GC="-gc"
case "$*" in
  "du --format json") old; if [ -e $F/hang ]; then exec sleep 100000; fi
    if [ -e $F/garbage ]; then echo '{"not": [json'; exit 0; fi
    if [ -e $F/huge ]; then yes '{"ID":"x","Size":1}' | head -c 70000000; exit 0; fi
    cat $F/du.json ;;
  "du -v") cat $F/du-verbose.txt ;;
  "debug workers --format json") old; cat $F/debug-workers$GC.json ;;
  "debug workers --verbose") cat $F/debug-workers-verbose$GC.txt ;;
  "prune "*"--format json"*) [ -e $F/slowprune ] && sleep "$(cat $F/slowprune)"; cat $F/prune-keep-storage-20MB.json ;;
  "prune "*) cat $F/prune-keep-storage-30MB.txt ;;
  *) echo "buildctl stand-in: unsupported arguments: $*" >&2; exit 2 ;;
esac
"""


def build_image(dockerd: PrivateDockerd) -> None:
    files, links = busybox_files()
    files["usr/bin/buildctl"] = (BUILDCTL.encode(), 0o755)
    for f in FIXTURES.iterdir():
        files[f"fixtures/{f.name}"] = f.read_bytes()
    files["var/log/.keep"] = b""
    dockerd.import_rootfs(IMAGE, files, links)


def start_builder(dockerd: PrivateDockerd, node: str) -> tuple[str, str]:
    """Start `buildx_buildkit_<node>` with volume `buildx_buildkit_<node>_state`; return both names."""
    container = f"buildx_buildkit_{node}"
    volume = f"{container}_state"
    dockerd.cli("run", "-d", "--name", container, "--network", "none",
                "-v", f"{volume}:/var/lib/buildkit", IMAGE, "/bin/sleep", "2147483647")
    return container, volume


def fill_state(dockerd: PrivateDockerd, container: str, files: int = 40, kib: int = 64) -> None:
    """Put some real files into the state volume, as buildkitd's snapshots would be."""
    script = (
        'mkdir -p /var/lib/buildkit/runc-overlayfs/snapshots/1/fs /var/lib/buildkit/cache; '
        f'i=0; while [ $i -lt {files} ]; do '
        f'dd if=/dev/zero of=/var/lib/buildkit/runc-overlayfs/snapshots/1/fs/f$i bs=1024 count={kib} 2>/dev/null; '
        'i=$((i+1)); done; '
        'echo meta > /var/lib/buildkit/cache.db'
    )
    dockerd.cli("exec", container, "sh", "-c", script)
