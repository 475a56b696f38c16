"""Record what a real Docker Engine 29 answers, as test fixtures: `python -m lab.record_fixtures DIR`.

Starts a fresh private Docker 29.7.2 (lab/engines.py) with each image store, and saves its answers
of `GET /system/df` for the build cache, with and without `verbose`: on a fresh engine, after real
builds with the engine's own BuildKit (COPY, RUN, a cache mount, and an image kept, so some records
are shared with it), and after `docker builder prune -af`. Plus `/version` and `/info`, and the
legacy shape (`/v1.51/...`). Every file is the engine's answer as it came, pretty-printed.
Run as root, like the tests; nothing of it stays but the files written.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from lab.engines import PrivateDockerd, engine, write_build_context

API = "1.55"
ASKED = {
    "system-df.json": f"/v{API}/system/df?type=build-cache",
    "system-df-verbose.json": f"/v{API}/system/df?type=build-cache&verbose=1",
    "system-df-v1.51.json": "/v1.51/system/df?type=build-cache",
}


def save(path: Path, answer: object) -> None:
    path.write_text(json.dumps(answer, indent=1, sort_keys=False) + "\n")


def record(store: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bkce-record-") as work:
        d = PrivateDockerd(Path(work) / "engine", engine("docker29", store == "containerd"))
        try:
            d.start()
            save(dest / "version.json", d.api(f"/v{API}/version"))
            save(dest / "info.json", d.api(f"/v{API}/info"))
            for name, path in ASKED.items():
                save(dest / name.replace(".json", "-empty.json"), d.api(path))
            for i, (data, cache) in enumerate([(2, 1), (1, 1)]):
                ctx = Path(work) / f"ctx{i}"
                write_build_context(ctx, f"app{i}", data, cache)
                d.build(ctx, f"app{i}:latest")
            for name, path in ASKED.items():
                save(dest / name, d.api(path))
            d.cli("builder", "prune", "-af")
            for name, path in ASKED.items():
                save(dest / name.replace(".json", "-after-prune-all.json"), d.api(path))
        finally:
            d.close()


def main() -> None:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/docker-engine-29.7")
    for store in ("containerd", "overlay2"):
        record(store, dest / store)
        print(f"recorded Docker 29.7.2 ({store}) into {dest / store}")


if __name__ == "__main__":
    main()
