"""The lab (docker-compose.yml, Dockerfile, deploy/lab/, docs/lab.md), checked without a Docker engine.

There is no Docker engine in CI, so these tests check what can be checked without one: that
`docker-compose config` accepts the file, that every service's command, ports and mounted files
exist in the repository and agree with the lab's playbook, that the playbook passes validation
and walks its first step against real servers, and that the sample application runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from ruamel.yaml import YAML

from migrator import playbook, registry, servers
from migrator.cli import cli
from migrator.workload import main as workload_main
from tests.helpers import run_cli, start_cli, wait_for

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
LAB_PLAYBOOK = ROOT / "deploy" / "lab" / "migrator.yaml"
# The services that run the project's image, and the image's entrypoint.
MIGRATOR_IMAGE_SERVICES = {"shim", "app", "migrator"}
ENTRYPOINT = ["migrator"]


def compose() -> dict:
    return YAML(typ="safe").load(COMPOSE.read_text())


def lab_env() -> dict[str, str]:
    """The environment compose gives the project's containers, with its defaults applied."""
    env = {}
    for name, value in compose()["x-migrator"]["environment"].items():
        m = re.fullmatch(r"\$\{(\w+):-([^}]*)\}", str(value))
        env[name] = m.group(2) if m else str(value)
    return env


def mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount; named volumes are ("volume:NAME", path)."""
    out = []
    for spec in service.get("volumes", []):
        src, dst = spec.split(":")[:2]
        out.append((src if src.startswith((".", "/")) else f"volume:{src}", dst))
    return out


def container_path(service: dict, host_path: Path) -> str:
    """Where ``host_path`` (a file in the repo) appears inside ``service``'s container."""
    for src, dst in mounts(service):
        if src.startswith("."):
            base = (ROOT / src).resolve()
            if host_path == base or base in host_path.parents:
                return dst + "/" + str(host_path.relative_to(base)) if host_path != base else dst
    raise AssertionError(f"{host_path} is not mounted")


def argv(service: dict) -> list[str]:
    entry = service.get("entrypoint", ENTRYPOINT)
    cmd = service.get("command", [])
    return list(entry) + (shlex.split(cmd) if isinstance(cmd, str) else list(cmd))


def test_docker_compose_config_validates_the_file(tmp_path):
    """`docker-compose config` (Debian's docker-compose, as CI installs it) accepts docker-compose.yml."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; CI installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAB_")}
    no_env_file = tmp_path / "empty.env"  # not a developer's .env next to the file: the defaults
    no_env_file.write_text("")
    r = subprocess.run([exe, "--env-file", str(no_env_file), "-f", str(COMPOSE), "config"], capture_output=True,
                       text=True, env=env, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    resolved = YAML(typ="safe").load(r.stdout)
    assert set(resolved["services"]) == {"redis", "valkey", "shim", "app", "prometheus", "grafana", "migrator"}
    assert resolved["services"]["migrator"]["profiles"] == ["tools"]  # not started by `docker compose up`
    # The shim's password reaches the containers from compose's default, not from the image.
    assert resolved["services"]["shim"]["environment"]["SHIM_PASSWORD"] == lab_env()["SHIM_PASSWORD"]


def test_every_image_is_pinned_and_every_mounted_file_exists():
    """Every pulled image is pinned to a version (no `latest`) and every bind-mounted path is in the repo."""
    doc = compose()
    missing = []
    for name, svc in doc["services"].items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and ("build" in svc or re.search(r"\d+\.\d+", tag)), f"{name}: image {image} is not pinned to a version"
        for src, _dst in mounts(svc):
            if src.startswith("volume:"):
                assert src[7:] in doc["volumes"], f"{name}: named volume {src[7:]} is not declared"
                continue
            rel = os.path.normpath(src)
            if not (ROOT / rel).exists():
                missing.append(f"{name}: {src}")
        if "build" in svc:
            assert (ROOT / svc["build"] / "Dockerfile").is_file(), f"{name}: no Dockerfile to build"
    assert not missing, f"mounted paths missing from the repo: {missing}"


def shim_argv(tmp_path: Path) -> list[str]:
    """What the shim service's entrypoint runs: its shell script, executed with a stand-in `migrator`."""
    svc = compose()["services"]["shim"]
    entry = [a.replace("$$", "$") for a in argv(svc)]  # compose's escape for a literal $
    assert entry[:2] == ["sh", "-c"]
    fake = tmp_path / "fakebin" / "migrator"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    r = subprocess.run(entry, capture_output=True, text=True, timeout=30,
                       env={"PATH": f"{fake.parent}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_the_shim_registers_under_a_new_id_at_every_start(tmp_path):
    """Each start of the shim container runs `migrator shim --id lab-shim-<time>-<random>`, never the same id twice."""
    ids = {shim_argv(tmp_path)[2] for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"lab-shim-\d{8}T\d{6}-[0-9a-f]{6}", i) for i in ids), ids


def test_services_agree_with_the_lab_playbook(tmp_path):
    """The shim's command, ports, playbook path, password variable and state volume match the lab playbook."""
    doc = compose()
    services = doc["services"]
    pb = playbook.load(LAB_PLAYBOOK, env=lab_env())
    listen_port = playbook.split_hostport(pb.shim.listen)[1]
    admin_port = playbook.split_hostport(pb.shim.admin)[1]

    # Source and target are the compose services of those names, on the port their images listen on.
    assert (pb.source.host, pb.source.port) == ("redis", 6379) and services["redis"]["image"].startswith("redis:")
    assert (pb.target.host, pb.target.port) == ("valkey", 6379) and services["valkey"]["image"].startswith("valkey/")
    for side in ("redis", "valkey"):
        assert "--port" not in argv(services[side]), f"{side} must keep its image's port 6379"

    for name in MIGRATOR_IMAGE_SERVICES:
        svc = services[name]
        env = svc["environment"]
        # The playbook every migrator command reads is the repo's lab playbook, as mounted.
        assert env["MIGRATOR_PLAYBOOK"] == container_path(svc, LAB_PLAYBOOK.resolve()), name
        assert pb.shim.password_env in env, f"{name}: {pb.shim.password_env} is not set"
        # state.json is shared: the shim follows what `migrator advance` writes there.
        assert ("volume:migrator-state", str(pb.state_dir)) in mounts(svc), name

    shim = services["shim"]
    cmd = shim_argv(tmp_path)
    assert cmd[:2] == ["shim", "--id"] and "--listen" not in cmd and "--admin" not in cmd
    _parses(cmd)
    published = {int(p.rsplit(":", 1)[1]) for p in shim["ports"]}
    assert published == {listen_port, admin_port}
    assert all(p.startswith("127.0.0.1:") for p in shim["ports"]), "the lab publishes on loopback only"

    # The image's healthcheck reads the admin endpoint's /status on the playbook's admin port.
    health = re.search(r"^ENV MIGRATOR_HEALTH_URL=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert health == f"http://127.0.0.1:{admin_port}/status"
    assert services["app"]["healthcheck"] == {"disable": True}
    assert services["migrator"]["healthcheck"] == {"disable": True}

    # The sample application talks to the shim's listen port with the shim's password variable.
    app = argv(services["app"])
    assert app[:3] == ["python", "-m", "migrator.workload"]
    with pytest.raises(SystemExit) as parsed:
        workload_main(app[3:] + ["--help"])  # parses every option (click stops at --help)
    assert parsed.value.code == 0
    url = app[app.index("--url") + 1]
    assert url == f"redis://shim:{listen_port}/0"
    assert app[app.index("--password-env") + 1] == pb.shim.password_env

    # `docker compose run migrator` runs a real migrator command.
    assert argv(services["migrator"])[0] == "migrator"
    _parses(argv(services["migrator"])[1:])

    # The compatibility step's test suite is mounted where the playbook runs it.
    test_cmd = pb.steps.compatibility.test_command
    assert test_cmd[0] == "python"
    assert test_cmd[1] == container_path(services["migrator"], (ROOT / "deploy/lab/app_test.py").resolve())

    # Prometheus scrapes the shim's admin port, with the shipped rules mounted where it loads them.
    prom_cfg = ROOT / "deploy/prometheus/prometheus.yml"
    text = prom_cfg.read_text()
    assert f"shim:{admin_port}" in text, f"{prom_cfg} does not scrape shim:{admin_port}"
    rules = YAML(typ="safe").load(text).get("rule_files", [])
    assert rules, f"{prom_cfg} loads no alert rules"
    mounted = {dst for _src, dst in mounts(services["prometheus"])}
    for rule in rules:
        assert (rule if rule.startswith("/") else "/etc/prometheus/" + rule) in mounted, rule

    # Grafana's provisioning reads the dashboards where they are mounted, from the lab's Prometheus.
    grafana = services["grafana"]
    prov = ROOT / "deploy/grafana/provisioning"
    assert sorted(prov.glob("dashboards/*.y*ml")) and sorted(prov.glob("datasources/*.y*ml")), prov
    for f in sorted(prov.glob("dashboards/*.y*ml")):
        for provider in YAML(typ="safe").load(f.read_text()).get("providers", []):
            path = provider["options"]["path"]
            assert any(path == dst or path.startswith(dst + "/") for _src, dst in mounts(grafana)), f"{f}: {path}"
    for f in sorted(prov.glob("datasources/*.y*ml")):
        for ds in YAML(typ="safe").load(f.read_text()).get("datasources", []):
            if ds.get("type") == "prometheus":
                published = services["prometheus"]["ports"][0].rsplit(":", 1)[1]
                assert ds["url"] == f"http://prometheus:{published}", f"{f}: {ds['url']}"


def _parses(args: list[str]) -> None:
    """``args`` is a valid migrator command line: the subcommand exists and its options parse."""
    ctx = click.Context(cli, info_name="migrator")
    sub = cli.get_command(ctx, args[0])
    assert sub is not None, f"no migrator command {args[0]!r}"
    sub.make_context(args[0], list(args[1:]), parent=ctx)


def test_dockerfile_is_slim_non_root_with_a_healthcheck_and_no_secrets():
    """The Dockerfile uses a pinned slim Python, installs the project, runs as non-root and bakes in no secret."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11[\d.]*-slim", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*CMD .*urllib.request.urlopen", text, re.M | re.S)
    for line in re.findall(r"^(?:ENV|ARG) .*$", text, re.M):
        assert not re.search(r"PASSWORD|SECRET|TOKEN|KEY", line, re.I), line
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored


def test_lab_playbook_passes_validation_and_requires_the_shim_password():
    """The lab playbook loads clean with the compose environment; without the shim's password it is refused."""
    pb = playbook.load(LAB_PLAYBOOK, env=lab_env())
    assert pb.name == "lab" and not pb.shim.listen_is_loopback and pb.shim.client_password
    assert str(pb.state_dir) == "/var/lib/migrator/state"
    with pytest.raises(playbook.PlaybookError) as e:
        playbook.load(LAB_PLAYBOOK, env={})
    assert any("shim.password_env: environment variable SHIM_PASSWORD is not set" in p for p in e.value.problems)


def _local_lab_playbook(tmp_path: Path, src, tgt) -> tuple[Path, int, int]:
    """The lab playbook with only what the compose network provides replaced by local equivalents.

    Returns the copy's path and the shim's client and admin ports (free loopback ports).
    """
    listen, admin = servers.free_port(), servers.free_port()
    text = LAB_PLAYBOOK.read_text()
    replaced = {
        '"redis://redis:6379/0"': f'"redis://127.0.0.1:{src.port}/0"',
        '"redis://valkey:6379/0"': f'"redis://127.0.0.1:{tgt.port}/0"',
        '"0.0.0.0:6380"': f'"127.0.0.1:{listen}"',
        '"0.0.0.0:9121"': f'"127.0.0.1:{admin}"',
        "/var/lib/migrator/state": str(tmp_path / "state"),
        '["python", "/lab/app_test.py"]': f'["{sys.executable}", "{ROOT / "deploy/lab/app_test.py"}"]',
    }
    for old, new in replaced.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "migrator.yaml"
    path.write_text(text)
    return path, listen, admin


def test_lab_walks_plan_compat_mirroring_sync_and_check_with_its_app_on_real_servers(tmp_path, server_factory):
    """On a real Redis 7 and Valkey 8.1 the lab's playbook, shim, healthcheck and app command take the first steps."""
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-8.1")
    path, listen, admin = _local_lab_playbook(tmp_path, src, tgt)
    state = tmp_path / "state"
    password = lab_env()["SHIM_PASSWORD"]
    env = {"SHIM_PASSWORD": password}  # not MIGRATOR_PLAYBOOK: the local copy is given with -p
    plan = run_cli("plan", playbook=path, env=env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "compatib" in plan.stdout
    adv = run_cli("advance", "--yes", playbook=path, env=env, timeout=240)
    assert adv.returncode == 0, adv.stdout + adv.stderr
    # The app's test suite ran against the target (its output is in the report) and left no key behind.
    reports = list((state / "reports").glob("compat-*.json"))
    assert len(reports) == 1 and "6 of 6 checks passed against valkey 8.1" in reports[0].read_text()
    assert tgt.client().dbsize() == 0

    # The shim service's command line and the app service's, as compose runs them.
    shim = start_cli(*shim_argv(tmp_path), playbook=path, env={**env, "PYTHONPATH": str(ROOT)})
    app = None
    try:
        wait_for(lambda: registry.active(state), timeout=30, what="the shim's registration")
        # The image's HEALTHCHECK command, pointed at this shim's admin endpoint.
        health = re.search(r'CMD \["python", "-c", "(.*)"\]\s*$', DOCKERFILE.read_text(), re.M).group(1)
        hc = subprocess.run([sys.executable, "-c", health], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "MIGRATOR_HEALTH_URL": f"http://127.0.0.1:{admin}/status"})
        assert hc.returncode == 0, hc.stderr
        dead = subprocess.run([sys.executable, "-c", health], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "MIGRATOR_HEALTH_URL": f"http://127.0.0.1:{servers.free_port()}/status"})
        assert dead.returncode != 0  # the healthcheck can fail
        app_args = argv(compose()["services"]["app"])
        app_args = [a.replace(f"shim:{listen_port_in_compose()}", f"127.0.0.1:{listen}") for a in app_args]
        assert app_args[:3] == ["python", "-m", "migrator.workload"]
        app = subprocess.Popen([sys.executable, *app_args[1:], "--report-every", "0.5"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: src.client().dbsize() > 20, timeout=30, what="the app's writes on the source")
        for step in (["advance", "--yes"], ["sync"], ["sync", "--dirty"], ["check", "--full"]):
            r = run_cli(*step, playbook=path, env=env, timeout=240)
            assert r.returncode == 0, f"{step}: {r.stdout}{r.stderr}"
        status = run_cli("status", "--output", "json", playbook=path, env=env)
        assert '"mirroring"' in status.stdout
        assert tgt.client().dbsize() > 20  # the target now holds the app's data
        app.send_signal(signal.SIGTERM)
        out, _ = app.communicate(timeout=120)
        assert app.returncode == 0, out
        assert "every acknowledged write is present; 0 client error" in out, out
    finally:
        for proc in (app, shim):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert shim.returncode == 0


def listen_port_in_compose() -> int:
    """The shim's client port in the lab (the playbook's shim.listen, which compose publishes)."""
    return playbook.split_hostport(playbook.load(LAB_PLAYBOOK, env=lab_env()).shim.listen)[1]


def test_lab_app_test_suite_passes_on_valkey_and_cleans_up(server_factory):
    """deploy/lab/app_test.py, the lab's compatibility test command, passes on a real Valkey 8.1 and leaves no key."""
    tgt = server_factory("valkey-8.1")
    r = subprocess.run([sys.executable, str(ROOT / "deploy/lab/app_test.py")], capture_output=True, text=True,
                       env={**os.environ, "REDIS_URL": tgt.url}, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 of 6 checks passed against valkey 8.1" in r.stdout
    assert tgt.client().dbsize() == 0


def test_workload_application_runs_until_sigterm_then_audits(server_factory):
    """`python -m migrator.workload` writes with the password from --password-env until SIGTERM, then audits clean."""
    s = server_factory("redis-7.0", password="s3cret-lab")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "APP_PW": "s3cret-lab", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "migrator.workload", "--url", f"redis://127.0.0.1:{s.port}/0",
                             "--password-env", "APP_PW", "--clients", "3", "--rate", "200", "--report-every", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
            if "acknowledged operations (" in lines[-1] and not lines[-1].startswith("workload: 0 "):
                break
        assert any("acknowledged operations (" in x for x in lines), lines
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + out
    audit = re.search(r"audit through .*: (\d+) acknowledged operations, (\d+) keys audited: "
                      r"every acknowledged write is present; 0 client error", out)
    assert audit and int(audit.group(1)) > 50 and int(audit.group(2)) > 10, out
    assert "s3cret-lab" not in "".join(lines) + out
    keys = s.client().keys("ledger:*")
    assert keys and len({k.split(b":")[1] for k in keys}) == 1  # one run's random prefix


def test_workload_application_refuses_an_unset_password_variable_and_an_unreachable_server():
    """The workload exits 2 naming an unset --password-env variable, and 3 when the server never answers."""
    env = {k: v for k, v in os.environ.items() if k != "NOPE_PW"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "migrator.workload", "--url", "redis://127.0.0.1:1/0",
                        "--password-env", "NOPE_PW"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "NOPE_PW is not set" in r.stderr
    r = subprocess.run([sys.executable, "-m", "migrator.workload", "--url", "redis://127.0.0.1:1/0", "--wait", "1"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3 and "127.0.0.1:1/0: not reachable after 1s" in r.stderr


def test_an_explicit_playbook_flag_beats_the_labs_playbook_variable(tmp_path):
    """`migrator -p PATH <command>` reads PATH although $MIGRATOR_PLAYBOOK (set in every lab container) names another."""
    text = LAB_PLAYBOOK.read_text().replace("/var/lib/migrator/state", str(tmp_path / "state"))
    (tmp_path / "mine.yaml").write_text(text)
    env = {"MIGRATOR_PLAYBOOK": str(tmp_path / "other.yaml"), "SHIM_PASSWORD": lab_env()["SHIM_PASSWORD"]}
    for args in (["-p", str(tmp_path / "mine.yaml"), "history"], ["history", "-p", str(tmp_path / "mine.yaml")]):
        r = run_cli(*args, env=env)
        assert r.returncode == 0 and "no step has been attempted" in r.stdout, (args, r.stdout + r.stderr)
    r = run_cli("history", env=env)  # without a flag the variable still names the playbook
    assert r.returncode == 2 and "other.yaml: playbook not found" in r.stderr
