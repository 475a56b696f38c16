"""Every command block of the README, as written, on a fresh Debian 12 and a fresh Debian 13.

Each machine is the release's own packages (scripts/engine-tree machine-bookworm|machine-trixie:
python3, pipx, sudo, curl, prometheus-alertmanager) booted with systemd as its first process in a
container of a private dockerd, whose socket it has at /run/docker.sock and whose data root at its
own path, as a Docker host has them. Real build cache is in that engine. What the test adds is what
a site's machine would have and no README line can: a package index (a wheelhouse made here, in
/etc/pip.conf, as none is reachable), a `docker` group of the socket's gid (what docker.io's package
makes), and the budget a reader sets where the README says "set your budgets". A line that starts a
server in the foreground runs in the background, with its output in a log.

The blocks run in the README's order: the Quick start (and its pipx line as a user), the actuator's
set-up, the hand-made notification with --dry-run and then for real (the cache ends at the budget,
with exactly one prune), Alertmanager on Debian with `amtool alert add` reaching the actuator, and
systemd's units. The compose block runs in test_image.py, on Debian 13's and sid's compose."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from lab.engines import PrivateDockerd
from lab.procs import wait_for
from tests.conftest import ENGINES, engine_get
from tests.support.image import MACHINES, ROOT, copy_context, import_tree, make_wheelhouse

# One engine is enough: what is tested is the README on each Debian, not the engine. Debian 12's:
# there systemd boots in a container with the cgroup hierarchy read-only (on 28.5 it cannot).
ENGINE = [e for e in ENGINES if e.release == "bookworm"]
pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.parametrize("engine", ENGINE, ids=[e.id for e in ENGINE], indirect=True)]

BUDGET = 12_000_000
SERVERS = re.compile(r"^(sudo )?(buildkit-cache-exporter|buildkit-cache-actuator)\b(?!.*--(once|check-config|cooldowns|clear-cooldown|help|version))")


def readme_blocks() -> list[tuple[str, list[str]]]:
    """(the heading it is under, its lines) for every ```sh block of the README, in order."""
    heading, blocks, block = "", [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if block is not None:
            if line.startswith("```"):
                blocks.append((heading, block))
                block = None
            else:
                block.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.strip() == "```sh":
            block = []
    # Continuation lines (a trailing backslash) make one command.
    joined: list[tuple[str, list[str]]] = []
    for heading, lines in blocks:
        commands: list[str] = []
        for line in lines:
            if commands and commands[-1].endswith("\\"):
                commands[-1] += "\n" + line
            else:
                commands.append(line)
        joined.append((heading, commands))
    return joined


def inline(pattern: str) -> str:
    """A command the README gives in its prose, in backquotes."""
    (found,) = re.findall(pattern, (ROOT / "README.md").read_text())
    return found


class Machine:
    def __init__(self, dockerd: PrivateDockerd, name: str, image: str, mounts: list[str], work: Path):
        self.dockerd, self.name = dockerd, name
        dockerd.cli("create", "--name", name, "--hostname", name, "--network", "none",
                    # What systemd needs as a container's first process here (no --privileged: FACTS).
                    "--cap-add=ALL", "--cap-drop=SYS_RESOURCE", "--security-opt", "seccomp=unconfined",
                    "--tmpfs", "/run", "--tmpfs", "/run/lock", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro",
                    "-e", "container=docker", *mounts, image, "/lib/systemd/systemd")
        # Debian 13 mounts a tmpfs on /tmp at boot, which would hide the engine's data root (a folder
        # under this machine's /tmp, where a host has /var/lib/docker): masked, as `systemctl mask` does.
        mask = work / "tmp.mount"
        mask.symlink_to("/dev/null")
        dockerd.cli("cp", str(mask), f"{name}:/etc/systemd/system/tmp.mount")
        dockerd.cli("start", name)
        wait_for(f"{name} booted", lambda: self.sh("systemctl is-system-running", check=False).stdout.strip()
                 in {"running", "degraded"}, timeout=60)

    def sh(self, script: str, check: bool = True, user: str = "root") -> subprocess.CompletedProcess[str]:
        argv = ["exec", "-u", user, "-w", "/srv/buildkit-cache-exporter" if user == "root" else "/",
                self.name, "bash", "-c", script]
        done = self.dockerd.cli(*argv, check=False, timeout=600)
        out = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())
        if check and out.returncode != 0:
            raise AssertionError(f"on {self.name}: {script}\nexit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def run_line(self, line: str) -> subprocess.CompletedProcess[str]:
        """One README line as written; a server started in the foreground goes to the background."""
        if SERVERS.match(line):
            command = line.split(" #", 1)[0].strip()
            program = re.search(r"buildkit-cache-\w+", command).group(0)  # type: ignore[union-attr]
            return self.sh(f"({command}) >>/var/log/readme-{program}.log 2>&1 </dev/null & disown")
        return self.sh(line)

    def log(self, program: str) -> str:
        return self.sh(f"cat /var/log/readme-{program}.log", check=False).stdout

    def get(self, url: str) -> str:
        return self.sh(f"curl -sS --max-time 10 {shlex.quote(url)}", check=False).stdout

    def close(self) -> None:
        self.dockerd.cli("rm", "-f", "-v", self.name, check=False)


def unshared(dockerd: PrivateDockerd) -> int:
    return sum(r["Size"] for r in engine_get(dockerd, "/system/df")["BuildCache"] if not r["Shared"])


@pytest.mark.parametrize("machine", ["debian12", "debian13"])
def test_every_readme_block_runs_as_written(big_cache, machine, tmp_path):
    dockerd = big_cache
    blocks = readme_blocks()
    # A block this test does not know is a block no test runs.
    assert [h for h, _ in blocks] == ["Quick start", "Alerts and the actuator", "Alerts and the actuator",
                                      "Alerts and the actuator", "With Docker Compose",
                                      "With systemd (a VPS without compose)"], [h for h, _ in blocks]
    quick, setup, notify, alertmanager, _compose, systemd = (lines for _, lines in blocks)
    assert unshared(dockerd) > BUDGET

    wheels, src = tmp_path / "wheels", tmp_path / "src"
    copy_context(src)
    tree, python = MACHINES[machine]
    make_wheelhouse(wheels, src, python=python)
    image = import_tree(dockerd, tree, f"bkce-machine-{machine}:test", tmp_path)
    m = Machine(dockerd, f"{machine}-host", image, [
        "-v", f"{src}:/srv/buildkit-cache-exporter", "-v", f"{wheels}:/wheels:ro",
        "-v", f"{dockerd.socket}:/run/docker.sock", "-v", f"{dockerd.data_root}:{dockerd.data_root}:ro"], tmp_path)
    try:
        # What the site has: an index for pip, and Docker's group.
        m.sh("printf '[global]\\nno-index = true\\nfind-links = /wheels\\n' > /etc/pip.conf")
        m.sh("groupadd -o -g $(stat -c %g /run/docker.sock) docker && chmod -R a+rX /srv")

        # -- Quick start: the venv as root, the exporter serving; pipx for a user ----------------------
        for line in quick:
            m.run_line(line)
        wait_for("the exporter's first figures", lambda: 'builder="default"' in m.sh(
            inline(r"Then `(curl -s 127\.0\.0\.1:9862/metrics \| grep [^`]*)`"), check=False).stdout, timeout=60)
        once = m.sh(inline(r"`(sudo buildkit-cache-exporter --once)`"))
        assert re.search(r"^  default +docker +\d+ ", once.stdout, re.M), once.stdout
        m.sh("useradd --create-home someone && cp -r /srv/buildkit-cache-exporter ~someone/src && chown -R someone ~someone/src")
        pipx = inline(r"\(`(pipx install \.)`")
        m.sh(f"su - someone -c 'cd src && {pipx}'")
        assert m.sh("su - someone -c 'command -v buildkit-cache-exporter'").stdout == \
            "/home/someone/.local/bin/buildkit-cache-exporter\n"

        # -- the actuator's set-up from nothing, a dry run, then the same notification for real ---------
        for line in setup:
            m.run_line(line)
            if "set your budgets" in line:
                m.sh("/opt/buildkit-cache/bin/python -c \"import yaml; p='/etc/buildkit-cache/config.yml'; "
                     f"c=yaml.safe_load(open(p)); c['builders']={{'default': {{'budget': {BUDGET}}}}}; "
                     "open(p,'w').write(yaml.safe_dump(c))\"")
        assert m.sh("stat -c %a /etc/buildkit-cache/actuator-token").stdout.strip() == "640"
        wait_for("the actuator", lambda: m.get("http://127.0.0.1:9863/healthz") == "ok\n", timeout=60)
        assert "readable by every user" not in m.log("buildkit-cache-actuator")
        before = unshared(dockerd)
        curl = "\n".join(notify)  # one command over several lines (a quoted body)
        answer = json.loads(m.sh(curl).stdout)
        assert answer["dry_run"] is True and answer["alerts"][0]["decision"] == "accepted", answer
        wait_for("the dry run's line", lambda: "DRY-RUN would prune" in m.log("buildkit-cache-actuator"), timeout=60)
        assert unshared(dockerd) == before

        actuator_line = next(line for line in setup if "--dry-run" in line)
        # ([b]: never the shell that runs this line)
        m.sh("pkill -f '[b]uildkit-cache-actuator --config' && while pgrep -f '[b]uildkit-cache-actuator --config'; do sleep 0.2; done")
        m.run_line(actuator_line.replace(" --dry-run", ""))
        wait_for("the actuator, for real", lambda: m.get("http://127.0.0.1:9863/healthz") == "ok\n", timeout=60)
        answer = json.loads(m.sh(curl).stdout)
        assert answer["dry_run"] is False and answer["alerts"][0]["decision"] == "accepted", answer
        wait_for("the cache at its budget", lambda: unshared(dockerd) <= BUDGET, timeout=90)

        def audit() -> list[dict]:
            text = m.sh("cat /var/log/buildkit-cache-actuator/audit.jsonl").stdout
            return [json.loads(line) for line in text.splitlines()]

        wait_for("the pruned line", lambda: any(e["event"] == "pruned" for e in audit()), timeout=30)
        assert [e["event"] for e in audit()].count("pruned") == 1
        assert [e["event"] for e in audit()].count("dry_run") == 1

        # -- Alertmanager on Debian, and an alert added by hand reaches the actuator ---------------------
        for line in alertmanager:
            if line.startswith("amtool"):
                wait_for("Alertmanager", lambda: m.get("http://127.0.0.1:9093/-/ready").startswith("OK"), timeout=60)
            m.run_line(line)
        # Within group_wait (30 s): the same incident's action on the same builder is in its cooldown.
        wait_for("the amtool alert's decision", lambda: any(
            e["event"] == "skipped" and e.get("decision") == "cooldown" for e in audit()), timeout=90)
        assert [e["event"] for e in audit()].count("pruned") == 1

        # -- systemd's units ----------------------------------------------------------------------------
        m.sh("pkill -f '[b]in/buildkit-cache-' ; while pgrep -f '[b]in/buildkit-cache-'; do sleep 0.2; done")
        for line in systemd:
            m.run_line(line)
        wait_for("both units active", lambda: m.sh("systemctl is-active buildkit-cache-exporter buildkit-cache-actuator",
                                                    check=False).returncode == 0, timeout=60)
        wait_for("the unit's exporter serving figures",
                 lambda: 'buildkit_cache_size_bytes{' in m.get("http://127.0.0.1:9862/metrics"), timeout=60)
        wait_for("the unit's actuator healthy", lambda: m.get("http://127.0.0.1:9863/healthz") == "ok\n", timeout=60)
        user = m.sh("systemctl show -p MainPID --value buildkit-cache-actuator | xargs ps -o user= -p").stdout.strip()
        assert user == "buildkit-cache", user
        time.sleep(2)
        assert m.sh("systemctl is-active buildkit-cache-exporter buildkit-cache-actuator").stdout.split() == ["active", "active"]
    except BaseException:
        print(m.sh("journalctl --no-pager -n 80", check=False).stdout)
        raise
    finally:
        m.close()
        dockerd.cli("rmi", image, check=False)
