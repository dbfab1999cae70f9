"""The deployment files in deploy/: the systemd unit and the Kubernetes manifests.

Static checks (systemd-analyze verify, a Kubernetes schema, the fields the shim depends on) and
runtime checks: the shim is started exactly as the unit's ExecStart / the container's command
says, with the playbook the ConfigMap ships (servers swapped for real local ones), and must
answer the probes' path on the admin port, serve clients, and drain on SIGTERM well within the
stop timeout the file grants it.
"""

from __future__ import annotations

import configparser
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from ruamel.yaml import YAML

from migrator import playbook as playbook_mod
from migrator import registry, servers
from migrator.shim.server import DRAIN_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "migrator-shim.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "migrator-shim.env.example"
K8S = {"deployment": ROOT / "deploy" / "k8s" / "shim-deployment.yaml",
       "sidecar": ROOT / "deploy" / "k8s" / "shim-sidecar.yaml",
       "daemonset": ROOT / "deploy" / "k8s" / "shim-daemonset.yaml"}
PASSWORD_VARS = {"REDIS_PASSWORD", "VALKEY_PASSWORD", "SHIM_PASSWORD"}


# --- helpers ---------------------------------------------------------------------------------

def migrator_bin() -> str:
    """The `migrator` console script of the Python running the tests (the .venv's in CI)."""
    local = Path(sys.executable).parent / "migrator"
    found = str(local) if local.exists() else shutil.which("migrator")
    if not found:
        pytest.skip("no `migrator` console script installed next to this Python or on PATH")
    return found


def read_unit(path: Path = UNIT) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(path.read_text())
    return cp


def seconds(value: str) -> float:
    """A systemd time span as the unit uses it ("30s", "5min", "2")."""
    for suffix, factor in (("min", 60), ("ms", 0.001), ("s", 1)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in YAML(typ="safe", pure=True).load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_owner(docs: list[dict]) -> dict:
    """The one Deployment or DaemonSet of a manifest."""
    (owner,) = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    return owner


def shim_container(pod_spec: dict) -> dict:
    """The container running `migrator shim` (a regular container or a native sidecar)."""
    found = [c for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
             if c.get("command", [])[:2] == ["migrator", "shim"]]
    assert len(found) == 1, f"expected one container running `migrator shim`, found {len(found)}"
    return found[0]


def named_port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name!r} (has {sorted(ports)})"
    return ports[name]


def configmap_playbook(docs: list[dict], container: dict, pod_spec: dict) -> tuple[str, str]:
    """(the playbook text the container's `-p` path resolves to, that path)."""
    cmd = container["command"]
    assert "-p" in cmd, "the shim's command names its playbook with -p"
    pb_path = cmd[cmd.index("-p") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    mount = str(Path(pb_path).parent)
    assert mount in mounts, f"{pb_path}: no volume is mounted at {mount}"
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mounts[mount])
    cm_name = volume["configMap"]["name"]
    cms = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == cm_name]
    assert cms, f"the ConfigMap {cm_name} mounted at {mount} is not in the file"
    key = Path(pb_path).name
    assert key in cms[0]["data"], f"ConfigMap {cm_name} has no key {key}"
    return cms[0]["data"][key], pb_path


def pre_stop_seconds(container: dict) -> float:
    """How long the container's preStop hook waits before the kubelet sends SIGTERM."""
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    assert not pre_stop, f"a preStop hook whose duration the test cannot tell: {pre_stop}"
    return 0.0


def secret_env(container: dict) -> dict[str, str]:
    """Variables the container takes from a Secret, with a stand-in value each."""
    return {e["name"]: f"stand-in-{e['name'].lower()}" for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def get_status(admin: str, path: str = "/status") -> tuple[int, dict]:
    host, port = playbook_mod.split_hostport(admin)
    conn = http.client.HTTPConnection("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def one_pair(server_factory, password: str | None = None):
    pairs = servers.available_pairs()
    if not pairs:
        pytest.skip("no Redis/Valkey pair of binaries here")
    src, tgt = pairs[0]
    return (server_factory(src, password=f"{password}-src" if password else None),
            server_factory(tgt, password=f"{password}-tgt" if password else None))


def run_shim(argv: list[str], env: dict[str, str], tmp_path: Path, stop_within: float) -> dict:
    """Start the shim with ``argv``, wait for its ready line, hand back what the test needs,
    and make sure it is stopped (SIGTERM, then SIGKILL) whatever happens."""
    out = (tmp_path / "shim.out").open("w+")
    err = (tmp_path / "shim.err").open("w+")
    proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    return {"proc": proc, "out": out, "err": err, "stop_within": stop_within}


def wait_ready(run: dict, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run["out"].seek(0)
        if "shim listening on" in run["out"].read():
            return
        if run["proc"].poll() is not None:
            run["err"].seek(0)
            pytest.fail(f"the shim exited {run['proc'].returncode} before listening: {run['err'].read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("the shim did not print its ready line within 30 s")


def sigterm(run: dict) -> tuple[int, float]:
    proc = run["proc"]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=run["stop_within"])
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the shim did not stop within {run['stop_within']} s of SIGTERM")
    return rc, time.monotonic() - t0


@pytest.fixture
def shim_runs():
    runs: list[dict] = []
    yield runs
    for run in runs:
        if run["proc"].poll() is None:
            run["proc"].kill()
            run["proc"].wait()
        run["out"].close()
        run["err"].close()


# --- systemd ---------------------------------------------------------------------------------

def test_systemd_unit_fields():
    """The unit runs `migrator shim -p /etc/migrator/migrator.yaml` as a dedicated user, stops it with SIGTERM, allows longer than the drain, restarts on failure, and may write only /var/lib/migrator."""
    unit = read_unit()
    svc = unit["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[1:] == ["shim", "-p", "/etc/migrator/migrator.yaml"]
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name == "migrator"
    assert svc["KillSignal"] == "SIGTERM"
    assert seconds(svc["TimeoutStopSec"]) >= 2 * DRAIN_TIMEOUT, "SIGKILL must not come before the drain can finish"
    assert svc["Restart"] == "on-failure"
    # A playbook/--listen error (2) or a state that needs an operator (4) would loop forever.
    assert set(svc["RestartPreventExitStatus"].split()) == {"2", "4"}
    assert svc["User"] not in ("", "root", "0") and svc["User"] == svc["Group"]
    assert svc["ProtectSystem"] == "strict" and svc["StateDirectory"] == "migrator"
    assert svc["NoNewPrivileges"] == "yes" and svc["CapabilityBoundingSet"] == ""
    assert svc["EnvironmentFile"].lstrip("-") == "/etc/migrator/migrator-shim.env"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_env_example_holds_no_secret():
    """The environment file example names the password variables only in comments: it carries no secret."""
    lines = [ln.strip() for ln in ENV_EXAMPLE.read_text().splitlines() if ln.strip()]
    assigned = dict(ln.split("=", 1) for ln in lines if not ln.startswith("#"))
    assert not PASSWORD_VARS & set(assigned), f"a password is set in {ENV_EXAMPLE.name}: {sorted(PASSWORD_VARS & set(assigned))}"
    for var in PASSWORD_VARS:
        assert any(ln.lstrip("#").startswith(f"{var}=") for ln in lines), f"{var} is not documented"
    assert assigned.get("MIGRATOR_PLAYBOOK") == shlex.split(read_unit()["Service"]["ExecStart"])[-1]


def test_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` accepts the unit (ExecStart pointed at this machine's migrator) without a warning, and rejects it with a missing binary."""
    analyze = shutil.which("systemd-analyze") or ("/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None)
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd; .ci/run installs it)")
    text = UNIT.read_text()
    shipped = shlex.split(read_unit()["Service"]["ExecStart"])[0]
    local = tmp_path / "migrator-shim.service"
    local.write_text(text.replace(shipped, migrator_bin()))
    r = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    # Messages about other units of this machine are not ours; every message about this file is.
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if local.name in ln]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr
    # The check can fail: the same unit with a binary that does not exist is refused.
    broken = tmp_path / "broken" / "migrator-shim.service"
    broken.parent.mkdir()
    broken.write_text(text.replace(shipped, str(tmp_path / "no-such-migrator")))
    r = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no-such-migrator" in r.stdout + r.stderr


def test_systemd_execstart_serves_probes_and_drains(server_factory, tmp_path, shim_runs):
    """The unit's ExecStart, with the env file's variables, starts a shim that answers /status and exits 0 on the unit's KillSignal well within TimeoutStopSec."""
    src, tgt = one_pair(server_factory, password="pw")
    svc = read_unit()["Service"]
    pb = tmp_path / "migrator.yaml"
    admin = f"127.0.0.1:{servers.free_port()}"
    listen = f"127.0.0.1:{servers.free_port()}"
    pb.write_text(json.dumps({
        "version": 1, "name": "sessions-cache",
        "source": {"url": f"redis://127.0.0.1:{src.port}/0", "password_env": "REDIS_PASSWORD"},
        "target": {"url": f"redis://127.0.0.1:{tgt.port}/0", "password_env": "VALKEY_PASSWORD"},
        "shim": {"listen": listen, "admin": admin},
        "state_dir": str(tmp_path / "var-lib-migrator" / "sessions-cache"),
    }))
    argv = shlex.split(svc["ExecStart"])
    argv = [migrator_bin()] + [str(pb) if a == "/etc/migrator/migrator.yaml" else a for a in argv[1:]]
    env = {"REDIS_PASSWORD": src.password, "VALKEY_PASSWORD": tgt.password, "MIGRATOR_PLAYBOOK": str(pb)}
    run = run_shim(argv, env, tmp_path, stop_within=seconds(svc["TimeoutStopSec"]))
    shim_runs.append(run)
    wait_ready(run)
    status, body = get_status(admin)
    assert status == 200 and body["phase"] == "planned"
    c = redis.Redis.from_url(f"redis://{listen}/0", socket_timeout=5)
    assert c.set("deploy:k", "v") and src.client().get("deploy:k") == b"v"
    c.close()
    state_dir = tmp_path / "var-lib-migrator" / "sessions-cache"
    assert len(registry.read_all(state_dir)) == 1
    rc, took = sigterm(run)
    assert rc == 0, f"exit {rc} on {svc['KillSignal']}"
    assert took < DRAIN_TIMEOUT + 5 < seconds(svc["TimeoutStopSec"])
    assert registry.read_all(state_dir) == [], "a drained shim removes its registry record (not a lost shim)"


# --- Kubernetes ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(K8S))
def test_k8s_manifest_fields(name):
    """Every document has apiVersion/kind/metadata.name; the shim container's image, command, ports and /status probes on the admin port agree with the ConfigMap's playbook, which passes migrator's own validation."""
    docs = load_docs(K8S[name])
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
    dep = pod_owner(docs)
    pod = dep["spec"]["template"]["spec"]
    c = shim_container(pod)
    assert c["image"] and ":" in c["image"].rsplit("/", 1)[-1], "the image carries a version tag"
    text, pb_path = configmap_playbook(docs, c, pod)
    env = secret_env(c)
    # Every password the playbook reads from the environment comes from a Secret.
    pb = playbook_mod.loads(text, path=pb_path, env=env)
    for field in (pb.source.password_env, pb.target.password_env, pb.shim.password_env):
        if field:
            assert field in env, f"{field} is not taken from a Secret"
    raw = YAML(typ="safe", pure=True).load(text)
    assert "password" not in raw["shim"] and "@" not in pb.source.url + pb.target.url, "no password in the ConfigMap"
    listen_port = playbook_mod.split_hostport(pb.shim.listen)[1]
    admin_host, admin_port = playbook_mod.split_hostport(pb.shim.admin)
    assert named_port(c, "redis") == listen_port
    assert named_port(c, "admin") == admin_port
    assert admin_host in ("0.0.0.0", "::"), "the kubelet probes the pod's IP, not its loopback"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/status", probe
        port = get["port"]
        assert port == admin_port or named_port(c, port) == admin_port, f"{probe} is not on the admin port"
    # state_dir lives on a PersistentVolumeClaim mounted into the shim container.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    state_mount = next((m for m in mounts if Path(pb.state_dir).is_relative_to(m)), None)
    assert state_mount, f"state_dir {pb.state_dir} is not on a mounted volume"
    vol = next(v for v in pod["volumes"] if v["name"] == mounts[state_mount])
    claim = vol["persistentVolumeClaim"]["claimName"]
    (pvc,) = [d for d in by_kind(docs, "PersistentVolumeClaim") if d["metadata"]["name"] == claim]
    # SIGKILL must not come before the drain: a killed shim is a lost shim.
    pre_stop_s = pre_stop_seconds(c)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + 2 * DRAIN_TIMEOUT
    if name == "deployment":
        # One shim process: the write-ordering guarantee (docs/deploy.md); no overlap on update.
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
        (svc,) = by_kind(docs, "Service")
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"] and svc["spec"]["selector"].items() <= labels.items()
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        targets = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
        assert named_port(c, targets["redis"]) == listen_port and named_port(c, targets["admin"]) == admin_port
        assert not pb.shim.listen_is_loopback and pb.shim.password_env in env
    elif name == "daemonset":
        # A shim per node, each client sent to its own node's; many shims write the source at
        # once, which only the replication strategy orders; no rolling update under the clients.
        assert dep["kind"] == "DaemonSet" and dep["spec"]["updateStrategy"]["type"] == "OnDelete"
        assert pb.mirror.strategy == "replication"
        (svc,) = by_kind(docs, "Service")
        assert svc["spec"]["internalTrafficPolicy"] == "Local"
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"] and svc["spec"]["selector"].items() <= labels.items()
        targets = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
        assert named_port(c, targets["redis"]) == listen_port and named_port(c, targets["admin"]) == admin_port
        assert not pb.shim.listen_is_loopback and pb.shim.password_env in env
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    else:
        # A native sidecar: started (and probed) before the app, stopped after it.
        assert c in pod["initContainers"] and c["restartPolicy"] == "Always"
        assert pb.shim.listen_is_loopback
        app_urls = [e["value"] for a in pod["containers"] for e in a.get("env", []) if e["name"] == "REDIS_URL"]
        assert app_urls == [f"redis://127.0.0.1:{listen_port}/0"]
        # Every pod's shim and the operator share the state: the claim must be mountable by all.
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("name", sorted(K8S))
def test_k8s_manifest_schema(name):
    """Every document validates, strictly (no unknown field), against the Kubernetes 1.30 schema, and a misspelt field is caught."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra) is not installed")
    docs = load_docs(K8S[name])
    for d in docs:
        kv.validate(d, "1.30", strict=True)
    dep = pod_owner(docs)
    shim_container(dep["spec"]["template"]["spec"])["readinesProbe"] = {"httpGet": {"path": "/status", "port": "admin"}}
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, "1.30", strict=True)


@pytest.mark.parametrize("name", sorted(K8S))
def test_k8s_container_command_serves_probes_and_drains(name, server_factory, tmp_path, shim_runs):
    """The shim container's command, with the ConfigMap's playbook (servers and ports swapped for local ones) and its Secret variables, answers the probe path on the admin port, serves the address applications are given (AUTH required off loopback), and drains on SIGTERM within the grace period."""
    docs = load_docs(K8S[name])
    dep = pod_owner(docs)
    pod = dep["spec"]["template"]["spec"]
    c = shim_container(pod)
    text, pb_path = configmap_playbook(docs, c, pod)
    src, tgt = one_pair(server_factory, password="pw")
    doc = YAML(typ="safe", pure=True).load(text)
    # Only what this machine must differ in: the servers, the ports (free ones), the state_dir.
    doc["source"]["url"] = f"redis://127.0.0.1:{src.port}/0"
    doc["target"]["url"] = f"redis://127.0.0.1:{tgt.port}/0"
    listen_host, listen_manifest_port = playbook_mod.split_hostport(doc["shim"]["listen"])
    listen_port, admin_port = servers.free_port(), servers.free_port()
    doc["shim"]["listen"] = f"{listen_host}:{listen_port}"
    doc["shim"]["admin"] = f"{playbook_mod.split_hostport(doc['shim']['admin'])[0]}:{admin_port}"
    doc["state_dir"] = str(tmp_path / "state")
    pb = tmp_path / "migrator.yaml"
    pb.write_text(json.dumps(doc))
    # The Secret's values, as the container's secretKeyRef variables carry them.
    values = {doc["source"].get("password_env"): src.password, doc["target"].get("password_env"): tgt.password,
              doc["shim"].get("password_env"): "shim-secret"}
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    for var in secret_env(c):
        assert var in values, f"{var} comes from the Secret but the playbook does not use it"
        env[var] = values[var]
    env["MIGRATOR_PLAYBOOK"] = str(pb)
    argv = [migrator_bin()] + [str(pb) if a == pb_path else a for a in c["command"][1:]]
    run = run_shim(argv, env, tmp_path, stop_within=pod["terminationGracePeriodSeconds"] - pre_stop_seconds(c))
    shim_runs.append(run)
    wait_ready(run)
    status, body = get_status(f"127.0.0.1:{admin_port}", c["readinessProbe"]["httpGet"]["path"])
    assert status == 200 and body["phase"] == "planned"
    if name in ("deployment", "daemonset"):
        # Through the Service, without the shim password, every command is refused.
        with socket.create_connection(("127.0.0.1", listen_port), timeout=5) as anon:
            anon.sendall(b"*3\r\n$3\r\nSET\r\n$8\r\ndeploy:k\r\n$1\r\nv\r\n")
            assert anon.recv(256).startswith(b"-NOAUTH")
        app = redis.Redis(port=listen_port, password="shim-secret", socket_timeout=5)
    else:
        # The application's own REDIS_URL (the pod's loopback), on this test's port.
        (url,) = [e["value"] for a in pod["containers"] for e in a.get("env", []) if e["name"] == "REDIS_URL"]
        app = redis.Redis.from_url(url.replace(f":{listen_manifest_port}/", f":{listen_port}/"), socket_timeout=5)
    assert app.set("deploy:k", "v") and src.client().get("deploy:k") == b"v"
    app.close()
    rc, took = sigterm(run)
    assert rc == 0 and took < DRAIN_TIMEOUT + 5
    assert registry.read_all(tmp_path / "state") == []


# --- shell completion --------------------------------------------------------------------------

@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion(shell):
    """`_MIGRATOR_COMPLETE=<shell>_source migrator` prints a completion script, and completing `migrator adv` offers `advance`."""
    exe = migrator_bin()
    env = {k: v for k, v in os.environ.items() if not k.startswith("_MIGRATOR_COMPLETE")}
    r = subprocess.run([exe], env={**env, "_MIGRATOR_COMPLETE": f"{shell}_source"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "_migrator_completion" in r.stdout, r.stderr
    words = "migrator adv"
    r = subprocess.run([exe], env={**env, "_MIGRATOR_COMPLETE": f"{shell}_complete", "COMP_WORDS": words,
                                   "COMP_CWORD": "1" if shell != "fish" else "adv"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "advance" in r.stdout and "rollback" not in r.stdout, r.stdout + r.stderr


# --- a restarted container's shim ------------------------------------------------------------

def test_restarted_shim_keeps_killed_predecessors_record(server_factory, make_playbook):
    """A shim started with the same host name, port and pid as one killed before it (a container restarted in its pod runs as PID 1 again) registers under its own id, so the killed shim's record stays for no_lost_shims."""
    from migrator.shim.server import ShimThread

    src, tgt = one_pair(server_factory)
    pb = playbook_mod.load(make_playbook(src, tgt))
    shims = registry.shims_dir(pb.state_path)
    with ShimThread(pb) as first:  # same process: same host, pid and listen port for both
        first_id = first.shim.id
        left_behind = (shims / f"{first_id}.json").read_bytes()
    # A SIGKILL leaves the record where a drain removes it.
    (shims / f"{first_id}.json").write_bytes(left_behind)
    with ShimThread(pb) as second:
        assert second.shim.id != first_id, "the restarted shim took over the killed one's registration"
        assert (shims / f"{first_id}.json").read_bytes() == left_behind
        assert sorted(r.id for r in registry.read_all(pb.state_path)) == sorted([first_id, second.shim.id])
