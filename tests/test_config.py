"""The shared config: defaults, every key, and errors that name the key and what is allowed."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from buildkit_cache.config import ConfigError, load, parse_config
from buildkit_cache.units import format_duration, parse_duration, parse_human_size, parse_size

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5_000_000_000), ("512MiB", 512 * 1024**2), ("1.5G", 1_500_000_000), (1024, 1024),
    ("10 kB", 10_000), ("0", 0),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "5XB", "-1GB", True, ""])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize("text,expected", [("10m", 600), ("1h30m", 5400), ("7d", 604800), ("500ms", 0.5), (30, 30)])
def test_durations(text, expected):
    assert parse_duration(text) == expected
    assert format_duration(86400 * 7) == "7d" and format_duration(5400) == "90m"


@pytest.mark.parametrize("bad", ["soon", "10", "m10", "1y"])
def test_bad_durations(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_human_sizes_as_buildctl_prints_them():
    assert parse_human_size("708.61kB") == 708610
    assert parse_human_size("44.96MB") == 44_960_000
    assert parse_human_size("0B") == 0


def test_defaults_watch_the_local_docker_socket(monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    cfg = parse_config({})
    (host,) = cfg.docker_hosts
    assert host.url == "unix:///var/run/docker.sock"
    assert host.name == "local" and host.host_root == "/"
    assert cfg.exporter.listen == ("127.0.0.1", 9862)
    assert cfg.actuator.listen == ("127.0.0.1", 9863)


def test_docker_host_env_is_the_default(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://build.example:2376")
    (host,) = parse_config({}).docker_hosts
    assert host.url == "tcp://build.example:2376"
    assert host.name == "build.example"
    assert host.visible_root is None  # a remote host's files are not visible here


def test_full_example_config_loads():
    cfg = load(str(ROOT / "deploy" / "config.example.yml"))
    assert cfg.budget_for("local", "kamal-remote-ssh---root-10-0-0-5") == 20_000_000_000
    assert cfg.exporter.intervals["state_volume"] == 300 and cfg.exporter.intervals["refresh"] == 3600
    assert cfg.actuator.actions["prune-idle"].idle_for == 7 * 86400


def test_remote_builder_gets_its_host_label_from_the_address():
    cfg = parse_config({"builders": {"ci": {"address": "tcp://buildkitd.internal:1234", "budget": "50GB"}}})
    ((host, name, _ci),) = cfg.remote_builders()
    assert (host, name) == ("buildkitd.internal", "ci")
    assert cfg.budget_for("buildkitd.internal", "ci") == 50_000_000_000


@pytest.mark.parametrize("data,message", [
    ({"exporter": {"listn": ":9862"}}, r"exporter.listn: unknown key \(did you mean 'listen'\?\)"),
    ({"exporter": {"intervals": {"records": "fast"}}}, r"exporter.intervals.records: expected a duration like 30s"),
    ({"exporter": {"intervals": {"records": "0s"}}}, r"exporter.intervals.records: expected a duration above zero"),
    ({"exporter": {"intervals": {"recrods": "30s"}}}, r"exporter.intervals.recrods: unknown key \(did you mean 'records'\?\)"),
    ({"builders": {"kamal": {"budget": "lots"}}}, r"builders.kamal.budget: expected a size like 5GB or 512MiB, got 'lots'"),
    ({"builders": {"kamal": {"budget": "5GB", "actions": ["prune-everything"]}}},
     r"builders.kamal.actions\[0\]: unknown action 'prune-everything'; actions are: prune-all, prune-idle, prune-to-budget"),
    ({"builders": {"kamal": {"container": "kamal0"}}}, r"builders.kamal.container: expected a buildx builder container"),
    ({"builders": {"ci": {"address": "http://x"}}}, r"builders.ci.address: expected a buildkitd address"),
    ({"docker_hosts": [{"url": "ftp://x"}]}, r"docker_hosts\[0\].url: expected a unix://, tcp:// or ssh:// URL"),
    ({"docker_hosts": "unix:///var/run/docker.sock"}, r"docker_hosts: expected a list"),
    ({"docker_hosts": [{"name": "a"}]}, r"docker_hosts\[0\].url: is required"),
    ({"docker_hosts": ["unix:///a.sock", "unix:///b.sock"]}, r"two hosts are named 'local'"),
    ({"exporter": {"listen": "9862"}}, r"exporter.listen: expected host:port"),
    ({"exporter": {"idle_windows": ["1h", "often"]}}, r"exporter.idle_windows\[1\]: expected a duration"),
    ({"actuator": {"dry_run": "yes"}}, r"actuator.dry_run: expected true or false, got 'yes'"),
    ({"docker_hosts": [{"url": "tcp://h:2376", "tls": {"ca_file": "/nonexistent/ca.pem"}}]},
     r"docker_hosts\[0\].tls.ca_file: no such file: /nonexistent/ca.pem"),
    ({"actuator": {"auth": {"basic_auth": {"username": "am"}}}}, r"actuator.auth.basic_auth.password_file: is required"),
    ({"actuator": {"actions": {"nightly": {"idle_for": "1d"}}}}, r"actuator.actions.nightly.kind: is required for a new action"),
    ({"actuator": {"actions": {"prune-all": {"idle_for": "1d"}}}}, r"actuator.actions.prune-all.idle_for: applies to prune-idle"),
    ({"exporterr": {}}, r"exporterr: unknown key \(did you mean 'exporter'\?\)"),
    (["a", "b"], r"\(top level\): expected a mapping"),
])
def test_errors_name_the_key_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "cfg.yml")


def test_custom_and_disabled_actions():
    cfg = parse_config({"actuator": {"actions": {"nightly": {"kind": "prune-idle", "idle_for": "1d"},
                                                 "prune-all": {"enabled": False}}}})
    assert set(cfg.actuator.enabled_actions) == {"prune-to-budget", "prune-idle", "nightly"}
    assert cfg.actuator.actions["nightly"].idle_for == 86400


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("builders:\n  kamal:\n    budget: [5GB\n")
    with pytest.raises(ConfigError, match=r"c.yml: not valid YAML at line \d+"):
        load(str(p))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "buildkit_cache.exporter", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


@pytest.mark.slow  # starts the program
def test_check_config_prints_the_effective_config_and_exits_0(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text(textwrap.dedent("""
        docker_hosts: [unix:///run/docker.sock]
        builders:
          kamal: {budget: 10GB}
        exporter:
          intervals: {records: 15s}
    """))
    done = run_cli("--config", str(p), "--check-config")
    assert done.returncode == 0, done.stderr
    effective = yaml.safe_load(done.stdout)
    assert effective["builders"]["kamal"]["budget"] == 10_000_000_000
    assert effective["exporter"]["intervals"]["records"] == "15s"
    assert effective["exporter"]["intervals"]["state_volume"] == "5m"
    assert effective["docker_hosts"][0]["url"] == "unix:///run/docker.sock"


@pytest.mark.slow  # starts the program
def test_a_bad_config_is_one_line_on_stderr_and_exit_2(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("builders:\n  kamal:\n    bugdet: 10GB\n")
    done = run_cli("--config", str(p), "--check-config")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0
    assert "builders.kamal.bugdet: unknown key (did you mean 'budget'?)" in done.stderr


@pytest.mark.slow  # starts the program
def test_docker_host_flags_replace_the_config_hosts(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("docker_hosts: [unix:///run/docker.sock]\n")
    done = run_cli("--config", str(p), "--docker-host", "tcp://a.example:2375", "--docker-host",
                   "ssh://deploy@b.example", "--check-config")
    hosts = yaml.safe_load(done.stdout)["docker_hosts"]
    assert [(h["name"], h["url"]) for h in hosts] == [("a.example", "tcp://a.example:2375"),
                                                        ("b.example", "ssh://deploy@b.example")]


@pytest.mark.slow  # starts the program
def test_missing_config_file_is_a_clear_error():
    done = run_cli("--config", "/nonexistent/bkce.yml", "--check-config")
    assert done.returncode == 2
    assert "/nonexistent/bkce.yml: cannot read: No such file or directory" in done.stderr


def test_builder_settings_can_name_their_host():
    hosts = [{"url": "unix:///a.sock", "name": "a"}, {"url": "tcp://b.example:2376", "name": "b"}]
    cfg = parse_config({"docker_hosts": hosts, "builders": {"a/default": {"budget": "5GB"}, "b/default": {"budget": "9GB"},
                                                            "ci": {"address": "tcp://buildkitd:1234", "budget": "1GB"}}})
    assert cfg.budget_for("a", "default") == 5e9 and cfg.budget_for("b", "default") == 9e9
    assert cfg.budget_for("buildkitd", "ci") == 1e9
    # With one host, the name alone says it.
    assert parse_config({"builders": {"default": {"budget": "5GB"}}}).budget_for("local", "default") == 5e9


@pytest.mark.parametrize("builders,message", [
    ({"default": {"budget": "5GB"}}, r"builders.default: 2 Docker hosts are configured \(a, b\): key it as <host>/default"),
    ({"c/default": {"budget": "5GB"}}, r"builders.c/default: no Docker host is named 'c'; hosts are: a, b"),
])
def test_a_builder_entry_that_could_mean_several_hosts_is_an_error(builders, message):
    hosts = [{"url": "unix:///a.sock", "name": "a"}, {"url": "tcp://b.example:2376", "name": "b"}]
    with pytest.raises(ConfigError, match=message):
        parse_config({"docker_hosts": hosts, "builders": builders}, "cfg.yml")


@pytest.mark.slow  # starts the program
@pytest.mark.parametrize("prog", ["buildkit_cache.exporter", "buildkit_cache.actuator"])
def test_the_printed_effective_config_loads_back_unchanged(tmp_path, prog):
    token = tmp_path / "token"
    token.write_text("t\n")
    p = tmp_path / "c.yml"
    p.write_text(textwrap.dedent(f"""
        docker_hosts: [unix:///run/docker.sock, {{url: "tcp://b.example:2376", name: b, host_root: ""}}]
        builders:
          local/kamal: {{budget: 10GB, actions: [prune-idle]}}
          ci: {{address: "tcp://buildkitd:1234"}}
        exporter: {{intervals: {{records: 15s}}, idle_windows: [1d, 1h]}}
        actuator:
          auth: {{basic_auth: {{username: am, password_file: {token}}}}}
          actions: {{nightly: {{kind: prune-idle, idle_for: 1d}}, prune-all: {{enabled: false}}}}
    """))
    first = subprocess.run([sys.executable, "-m", prog, "--config", str(p), "--check-config"], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
    assert first.returncode == 0, first.stderr
    printed = tmp_path / "printed.yml"
    printed.write_text(first.stdout)
    again = subprocess.run([sys.executable, "-m", prog, "--config", str(printed), "--check-config"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert load(str(printed)) == load(str(p)) or prog.endswith("exporter")  # the exporter fills its intervals


def test_settings_for_a_builder_no_host_has_are_named_with_what_was_found():
    from buildkit_cache.checks import unmatched_builder_settings

    cfg = parse_config({"builders": {"kamal-remote-ssh---root-10-0-0-50": {"budget": "20GB"},
                                     "ci": {"address": "tcp://buildkitd:1234"}}})
    (line,) = unmatched_builder_settings(cfg, {"local": ["default", "kamal-remote-ssh---root-10-0-0-5"]})
    assert "no builder 'kamal-remote-ssh---root-10-0-0-50' on Docker host 'local'" in line
    assert "did you mean 'kamal-remote-ssh---root-10-0-0-5'?" in line
    assert "Builders found there: default, kamal-remote-ssh---root-10-0-0-5" in line
    assert unmatched_builder_settings(cfg, {}) == []  # a host that was not reached says nothing


@pytest.mark.slow  # root: gives a socket away and runs a child as another user
def test_a_socket_this_process_may_not_use_is_explained(tmp_path):
    import os
    import shutil
    import socket as sk
    import tempfile

    from buildkit_cache.checks import socket_problem

    # A folder an unprivileged user may enter (pytest's are private to root).
    d = Path(tempfile.mkdtemp(prefix="bkce-sock-", dir="/dev/shm"))
    d.chmod(0o755)
    path = d / "docker.sock"
    s = sk.socket(sk.AF_UNIX)
    s.bind(str(path))
    try:
        assert socket_problem(f"unix://{path}") is None  # root may
        assert socket_problem(f"unix://{tmp_path}/missing.sock") is None  # not there yet: it may come
        os.chmod(path, 0o660)
        os.chown(path, 0, 4242)
        pid = os.fork()
        if pid == 0:  # as an unprivileged user without group 4242
            os.setgroups([])
            os.setgid(10001)
            os.setuid(10001)
            problem = socket_problem(f"unix://{path}") or ""
            os._exit(0 if "group id 4242" in problem and "--group-add 4242" in problem else 1)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("data,message", [
    ({"actuator": {"actions": {"quick": {"kind": "prune-idle", "idle_for": "500ms"}}}},
     r"actuator.actions.quick.idle_for: expected at least 1s, got '500ms'"),
    ({"actuator": {"auth": {"basic_auth": {"username": "a:b", "password_file": "/x"}}}},
     r"actuator.auth.basic_auth.username: a basic auth username cannot be empty or contain ':'"),
])
def test_settings_that_could_never_do_what_they_say_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "cfg.yml")


def test_an_alias_bomb_or_a_huge_file_is_refused_quickly(tmp_path):
    import time

    bomb = tmp_path / "bomb.yml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nbuilders: {}\n")
    big = tmp_path / "big.yml"
    big.write_text("# padding\n" * 200_000)
    for path, message in ((bomb, "more than 100000 values"), (big, "larger than 1024 KiB")):
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=message):
            load(str(path))
        assert time.monotonic() - t0 < 5


@pytest.mark.slow  # starts the programs
def test_both_programs_refuse_the_same_interval_typo(tmp_path):
    """One config, one verdict: exporter.intervals is checked where the file is read, not by the
    exporter alone."""
    import subprocess
    import sys

    cfg = tmp_path / "c.yml"
    cfg.write_text("exporter: {intervals: {state_volme: 5m}}\nactuator: {state_file: ''}\n")
    for module in ("buildkit_cache.exporter", "buildkit_cache.actuator"):
        done = subprocess.run([sys.executable, "-m", module, "--config", str(cfg), "--check-config"],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 2, (module, done.stderr)
        assert "exporter.intervals.state_volme: unknown key (did you mean 'state_volume'?)" in done.stderr, module


def test_the_interval_names_the_config_admits_are_the_exporters():
    from buildkit_cache.config import INTERVAL_NAMES
    from buildkit_cache.exporter.measurements import BY_NAME, DISCOVERY, REFRESH

    assert set(INTERVAL_NAMES) == {DISCOVERY, REFRESH, *BY_NAME}
