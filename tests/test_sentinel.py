"""Sentinel-managed endpoints against real sentinels (tests/topologies.py): resolution, following a
failover in every component (clients, shim, sync, check), the pre-flight's report, and the
playbook's validation of the ``sentinel:`` fields."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from migrator import playbook, sentinel, servers
from migrator.connect import connect, make_client
from migrator.errors import PlaybookError, UnreachableError
from migrator.phases import Phase
from tests.helpers import run_cli, wait_for

PASSWORD = "s3ntinel-data-pw"
SENTINEL_PASSWORD = "s3ntinel-own-pw"


def _endpoint(group, monkeypatch, *, sentinel_password: bool = False) -> playbook.Endpoint:
    """The group's playbook endpoint, loaded as a playbook would load it (passwords from the environment)."""
    doc = group.endpoint(password_env="S14_DATA_PW" if group.password else None,
                         sentinel_password_env="S14_SENTINEL_PW" if sentinel_password else None)
    if group.password:
        monkeypatch.setenv("S14_DATA_PW", group.password)
    if sentinel_password:
        monkeypatch.setenv("S14_SENTINEL_PW", group.sentinel_password)
    ep = playbook.Endpoint.model_validate(doc)
    ep.sentinel._password = group.password
    ep.sentinel._sentinel_password = group.sentinel_password if sentinel_password else None
    return ep


def _start_rogue_sentinel(binary_label: str, master_name: str, host: str, port: int, tmp_path: Path,
                          password: str | None = None):
    """A sentinel of its own that monitors ``host:port`` (a replica) under ``master_name``: it names a
    server whose ROLE is not master."""
    from tests import topologies

    d = tmp_path / "rogue-sentinel"
    d.mkdir()
    conf = d / "sentinel.conf"
    lines = [f"sentinel monitor {master_name} {host} {port} 1", f"sentinel down-after-milliseconds {master_name} 60000"]
    if password:
        lines.append(f"sentinel auth-pass {master_name} {password}")
    conf.write_text("\n".join(lines) + "\n")
    return topologies._start_sentinel(servers.find(binary_label), d, conf, None)


# --- resolution -------------------------------------------------------------------------------


def test_resolve_names_the_primary_with_auth_on_both_levels(sentinel_factory, monkeypatch):
    """The sentinels (with their own password) name the primary (with the data nodes' password), recorded on the endpoint."""
    g = sentinel_factory("redis-7.0", password=PASSWORD, sentinel_password=SENTINEL_PASSWORD)
    ep = _endpoint(g, monkeypatch, sentinel_password=True)
    assert sentinel.resolve(ep) == g.primary_address()
    assert (ep.host, ep.port) == g.primary_address()
    c = connect(ep, "source")
    try:
        assert c.set("k", "v") and c.get("k") == b"v"
        assert c.execute_command("ROLE")[0] == b"master"
    finally:
        c.close()


def test_a_sentinel_naming_a_replica_is_not_trusted(sentinel_factory, monkeypatch, tmp_path):
    """A sentinel (asked first) that names a server whose ROLE is slave is skipped: the next sentinel's primary is used."""
    g = sentinel_factory("redis-7.0", sentinels=1)
    replica = g.replicas()[0]
    rogue = _start_rogue_sentinel("redis-7.0", g.master_name, replica.host, replica.port, tmp_path)
    try:
        wait_for(lambda: rogue.client(socket_timeout=1).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                                                                        g.master_name), what="rogue sentinel ready")
        doc = {"sentinel": {"addresses": [f"{rogue.host}:{rogue.port}", *g.addresses], "master_name": g.master_name}}
        ep = playbook.Endpoint.model_validate(doc)
        assert sentinel.resolve(ep) == g.primary_address()
        # Only the rogue sentinel: no primary, and the error says why.
        only = playbook.Endpoint.model_validate({"sentinel": {"addresses": [f"{rogue.host}:{rogue.port}"],
                                                              "master_name": g.master_name}})
        with pytest.raises(UnreachableError) as e:
            sentinel.resolve(only, "source")
        assert f"{replica.host}:{replica.port}, whose ROLE is slave" in str(e.value)
        assert g.master_name in str(e.value)
    finally:
        rogue.stop()


def test_no_sentinel_answers_names_master_and_sentinels(tmp_path):
    """With every sentinel down, resolution fails with UnreachableError naming the master name and each sentinel tried."""
    ports = [servers.free_port(), servers.free_port()]
    ep = playbook.Endpoint.model_validate({"sentinel": {"addresses": [f"127.0.0.1:{p}" for p in ports],
                                                        "master_name": "orders"}})
    t = time.monotonic()
    with pytest.raises(UnreachableError) as e:
        sentinel.resolve(ep, "source")
    assert time.monotonic() - t < 10
    msg = str(e.value)
    assert "'orders'" in msg and all(f"127.0.0.1:{p}" in msg for p in ports) and msg.startswith("source sentinel://")
    assert e.value.exit_code == 3


def test_a_client_made_before_a_failover_reaches_the_new_primary(sentinel_factory, monkeypatch):
    """A client from connect() keeps working across SENTINEL FAILOVER and writes to the new primary, not the demoted one."""
    g = sentinel_factory("redis-7.0", password=PASSWORD)
    ep = _endpoint(g, monkeypatch)
    c = connect(ep, "source")
    try:
        c.set("before", "1")
        old = g.primary_address()
        new = g.failover()
        time.sleep(sentinel.RECHECK + 0.1)  # the client re-asks the sentinels at most every RECHECK
        t = time.monotonic()
        c.set("after", "2")
        took = time.monotonic() - t
        assert (ep.host, ep.port) == new != old
        with contextlib.closing(g.node(new).client()) as nc:
            assert nc.get("after") == b"2" and nc.get("before") == b"1"
        assert took < 5
    finally:
        c.close()


def test_make_client_is_lazy_and_fails_as_unreachable(tmp_path):
    """make_client() for a Sentinel endpoint with no sentinel up raises a redis ConnectionError on use (as a down server does)."""
    ep = playbook.Endpoint.model_validate({"sentinel": {"addresses": [f"127.0.0.1:{servers.free_port()}"],
                                                        "master_name": "m"}})
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    c = make_client(ep, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.ConnectionError):
        c.ping()
    c.close()


# --- the shim ---------------------------------------------------------------------------------


@pytest.fixture
def shim_env(make_playbook):
    """Like ``make_env``, but the source/target endpoint mappings may be given (Sentinel endpoints with passwords)."""
    from tests.test_shim_e2e import ShimEnv

    made: list = []

    def make(source, target, /, **sections):
        env = ShimEnv(source, target, make_playbook(source, target, **sections))
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


def test_shim_follows_a_source_failover_during_mirroring(sentinel_factory, server_factory, shim_env, monkeypatch):
    """Through the shim in mirroring, SENTINEL FAILOVER of the source: writes go to the new primary, connections to the old one are closed, never a wrong answer."""
    g = sentinel_factory("redis-7.0", password=PASSWORD, config={"min-replicas-to-write": "1", "min-replicas-max-lag": "10"})
    tgt = server_factory("valkey-9.1")
    monkeypatch.setenv("S14_DATA_PW", PASSWORD)
    env = shim_env(g, tgt, source=g.endpoint(password_env="S14_DATA_PW"))
    env.walk_to(Phase.MIRRORING)
    c = env.client(retry=None)
    assert c.set("pre", "x")
    old = g.primary_address()
    acked: list[int] = []
    wrong: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        w = env.client()
        i = 0
        while not stop.is_set():
            i += 1
            try:
                w.set(f"w:{i}", i)
                got = w.get(f"w:{i}")
                if got != str(i).encode():
                    wrong.append(f"w:{i} read back {got!r}")
                acked.append(i)
            except redis.exceptions.RedisError as e:
                errors.append(type(e).__name__ + ": " + str(e)[:60])
            time.sleep(0.005)

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        new = g.failover()
        switched = wait_for(lambda: env.thread.call(lambda: env.thread.shim.sentinels.status())["source"]["switches"],
                            timeout=15, what="the shim to see the switch")
        followed = time.monotonic() - started
        n = len(acked)
        wait_for(lambda: len(acked) > n + 20, timeout=30, what="writes through the shim after the failover")
    finally:
        stop.set()
        t.join(30)
    assert new != old and switched[0]["new"] == f"{new[0]}:{new[1]}"
    assert wrong == []
    # Every error is one a client of a failing-over Redis sees itself (no primary with a replica, closed connection).
    assert all("NOREPLICAS" in e or "ConnectionError" in e or "READONLY" in e for e in errors), errors[:5]
    with contextlib.closing(g.node(new).client()) as nc, contextlib.closing(tgt.client()) as tc:
        missing_src = [i for i in acked if nc.get(f"w:{i}") != str(i).encode()]
        missing_tgt = [i for i in acked if tc.get(f"w:{i}") != str(i).encode()]
    assert missing_src == [] and missing_tgt == [], (missing_src[:5], missing_tgt[:5])
    st = env.thread.call(lambda: env.thread.shim.status())
    assert st["sentinel"]["source"]["primary"] == f"{new[0]}:{new[1]}"
    # What could differ is on record: the new primary's run_id marks the source's databases dirty
    # (a full sync is due), and writes the source refused while the target applied them are divergences.
    assert st["dirty_marked"].get("source-restarted", 0) >= 1, st["dirty_marked"]
    assert st["sides"]["source"]["restarts"], st["sides"]["source"]
    assert followed < 15
    print(f"acked={len(acked)} errors={len(errors)} followed_in={followed:.2f}s")


def test_shim_moves_to_another_sentinel_when_its_sentinel_dies(sentinel_factory, server_factory, shim_env):
    """The sentinel the shim listens to dies: it subscribes on another within seconds and still follows the next failover."""
    g = sentinel_factory("redis-7.0")
    tgt = server_factory("valkey-9.1")
    env = shim_env(g, tgt)
    status = lambda: env.thread.call(lambda: env.thread.shim.sentinels.status())["source"]
    first = wait_for(lambda: status()["subscribed_to"], what="the shim's subscription")
    c = env.client()
    assert c.set("k", "before")
    dead = g.sentinels[g.addresses.index(first)]
    dead.stop()
    g.sentinels.remove(dead)  # (stopped; the group's failover() asks the others)
    t = time.monotonic()
    second = wait_for(lambda: (status()["subscribed_to"] or first) != first and status()["subscribed_to"], timeout=15,
                      what="a subscription on another sentinel")
    moved_in = time.monotonic() - t
    assert second in g.addresses
    new = g.failover()
    wait_for(lambda: status()["switches"], timeout=15, what="the shim to follow the failover")
    assert status()["primary"] == f"{new[0]}:{new[1]}"
    c2 = env.client()
    assert c2.set("k", "after") and c2.get("k") == b"after"
    with contextlib.closing(g.node(new).client()) as nc:
        assert nc.get("k") == b"after"
    assert moved_in < 10


def test_shim_leaves_a_frozen_sentinel(sentinel_factory, server_factory, shim_env):
    """A sentinel that stops answering (SIGSTOP) without closing its socket is left after DEAD_AFTER seconds for another."""
    import signal

    from migrator.shim import sentinelwatch

    g = sentinel_factory("redis-7.0")
    tgt = server_factory("valkey-9.1")
    env = shim_env(g, tgt)
    status = lambda: env.thread.call(lambda: env.thread.shim.sentinels.status())["source"]
    first = wait_for(lambda: status()["subscribed_to"], what="the shim's subscription")
    frozen = g.sentinels[g.addresses.index(first)]
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        t = time.monotonic()
        wait_for(lambda: status()["subscribed_to"] not in (None, first), timeout=20,
                 what="a subscription on another sentinel")
        moved_in = time.monotonic() - t
        c = env.client()
        assert c.set("k", "v") and c.get("k") == b"v"  # new connections still find the primary
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    assert sentinelwatch.DEAD_AFTER <= moved_in < sentinelwatch.DEAD_AFTER + 5


# --- sync and check ---------------------------------------------------------------------------


def _seed(client: redis.Redis, n: int, prefix: str = "seed:") -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.hset(f"{prefix}{i}", mapping={"a": i, "b": "x" * 64})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def _failover_during(g, cmd_args: list[str], path: Path, env: dict, after: float = 0.4):
    """Run a CLI command, fail the group over ``after`` seconds in; (its result, the new primary)."""
    from tests.helpers import start_cli

    proc = start_cli(*cmd_args, playbook=path, env=env)
    time.sleep(after)
    assert proc.poll() is None, "finished before the failover: seed more keys"
    new = g.failover()
    switched_at = time.time()
    assert proc.poll() is None, "finished before the failover completed: seed more keys or lower the rate"
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), new, switched_at


def test_sync_and_check_follow_a_source_failover_mid_copy(sentinel_factory, server_factory, make_playbook):
    """sync and check running while the source fails over finish against the new primary (no crash), and the target then equals the source."""
    g = sentinel_factory("redis-7.0", password=PASSWORD)
    tgt = server_factory("valkey-9.1")
    with contextlib.closing(g.client()) as c:
        _seed(c, 15000)
    env = {"S14_DATA_PW": PASSWORD}
    # 6000 keys/s: the copy takes about 2.5 s, and the failover (about 1 s) happens in its middle.
    path = make_playbook(g, tgt, source=g.endpoint(password_env="S14_DATA_PW"), sync={"rate": 6000})
    old = g.primary_address()
    t = time.monotonic()
    res, new, _ = _failover_during(g, ["sync", "--output", "json"], path, env, after=1.0)
    sync_s = time.monotonic() - t
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["complete"] is True and new != old
    assert "sync.source_changed" in res.stderr
    assert PASSWORD not in res.stdout + res.stderr
    with contextlib.closing(tgt.client()) as tc:
        assert tc.dbsize() == 15000
    res, newer, _ = _failover_during(g, ["check", "--full", "--rate", "6000", "--output", "json"], path, env, after=1.0)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert PASSWORD not in res.stdout + res.stderr
    assert newer != new
    checked = json.loads(res.stdout)
    # Every key walked on the primary of now (a SCAN cursor is not carried to another server).
    assert checked["checked"] == 15000 and checked["mismatches"] == [], {k: checked[k] for k in ("checked", "summary")}
    assert "check.source_changed" in res.stderr
    print(f"sync across a failover: {sync_s:.1f}s", {k: v for k, v in out.items() if "at" in k or k in ("keys", "resumed", "duration_s")})


# --- the playbook -----------------------------------------------------------------------------


def _problems(tmp_path, text: str, env: dict | None = None) -> list[str]:
    p = tmp_path / "pb.yaml"
    p.write_text(text)
    with pytest.raises(PlaybookError) as e:
        playbook.load(p, env=env or {})
    assert e.value.exit_code == 2
    return e.value.problems


HEAD = "version: 1\nname: x\ntarget: {url: 'redis://t:1'}\n"


def test_playbook_sentinel_endpoint_loads_with_passwords_from_the_environment(tmp_path):
    """A sentinel: endpoint loads with db, tls and both passwords from the environment, and its display names no secret."""
    p = tmp_path / "pb.yaml"
    p.write_text(HEAD + "source:\n  sentinel:\n    addresses: ['10.0.0.1:26379', '[::1]:26380']\n"
                 "    master_name: orders\n    password_env: DATA_PW\n    sentinel_password_env: SEN_PW\n"
                 "  db: 3\n")
    pb = playbook.load(p, env={"DATA_PW": "data-secret-1", "SEN_PW": "sentinel-secret-2"})
    ep = pb.source
    assert ep.kind == "sentinel" and ep.db == 3 and ep.password == "data-secret-1"
    assert ep.sentinel.sentinel_password == "sentinel-secret-2"
    assert ep.display == "sentinel://10.0.0.1:26379,[::1]:26380/orders/3"
    from migrator.redact import redact

    assert redact("x data-secret-1 y sentinel-secret-2") == "x *** y ***"


def test_playbook_sentinel_validation_errors_have_file_and_line(tmp_path):
    """Bad sentinel addresses, url with sentinel, seeds with sentinel and unset password variables are each one file:line problem."""
    path = str(tmp_path / "pb.yaml")
    out = _problems(tmp_path, HEAD + "source:\n  sentinel:\n    addresses: ['nohost', 'h:99999']\n"
                                     "    master_name: m\n")
    assert any(p.startswith(f"{path}:6:17: source.sentinel.addresses[0]: ") and "'nohost' is not host:port" in p
               for p in out), out
    assert any(p.startswith(f"{path}:6:27: source.sentinel.addresses[1]: ") and "'h:99999' is not host:port" in p
               for p in out), out
    out = _problems(tmp_path, HEAD + "source:\n  url: redis://a:1\n  sentinel: {addresses: ['h:1'], master_name: m}\n")
    assert any(p.startswith(f"{path}:4:1: source: ") and "give url or sentinel, not both" in p for p in out), out
    out = _problems(tmp_path, HEAD + "source:\n  sentinel: {addresses: ['h:1'], master_name: m}\n  seeds: ['h:2']\n")
    assert any(p.startswith(f"{path}:4:1: source: ") and "seeds go with url" in p for p in out), out
    out = _problems(tmp_path, HEAD + "source:\n  sentinel:\n    addresses: ['h:1']\n    master_name: m\n"
                                     "    password_env: NOPE_DATA\n    sentinel_password_env: NOPE_SEN\n")
    assert f"{path}:8:19: source.sentinel.password_env: environment variable NOPE_DATA is not set" in out, out
    assert f"{path}:9:28: source.sentinel.sentinel_password_env: environment variable NOPE_SEN is not set" in out, out
    out = _problems(tmp_path, HEAD + "source:\n  sentinel: {addresses: ['h:1', 'h:1'], master_name: m}\n")
    assert any("source.sentinel.addresses: " in p and "listed twice" in p for p in out), out


# --- the pre-flight ---------------------------------------------------------------------------


def _compat(path: Path, env: dict) -> tuple[subprocess.CompletedProcess, dict]:
    out = run_cli("compat", "--output", "json", playbook=path, env=env, timeout=300)
    assert out.returncode in (0, 1), out.stdout[-2000:] + out.stderr[-2000:]
    return out, json.loads(out.stdout)


def _check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


def test_compat_reports_quorum_replicas_and_min_replicas(sentinel_factory, make_playbook, tmp_path):
    """The pre-flight of Sentinel source and target reports sentinels, quorum, replicas with lag and min-replicas-to-write, and passes identification."""
    src = sentinel_factory("redis-7.0", password=PASSWORD, config={"min-replicas-to-write": "1", "min-replicas-max-lag": "10"})
    tgt = sentinel_factory("valkey-9.1", master_name="valkeymaster", config={"min-replicas-to-write": "1"})
    env = {"S14_DATA_PW": PASSWORD}
    path = make_playbook(src, tgt, source=src.endpoint(password_env="S14_DATA_PW"))
    out, rep = _compat(path, env)
    assert PASSWORD not in out.stdout + out.stderr
    s = _check(rep, "sentinel")
    assert s["status"] == "pass", s
    assert s["data"]["source"]["quorum"] == 2 and len(s["data"]["source"]["reachable"]) == 3
    assert s["data"]["source"]["ckquorum"].startswith("OK")
    assert s["data"]["source"]["min_replicas"]["min-replicas-to-write"] == 1
    (replica,) = s["data"]["source"]["replicas"]
    assert replica["connected"] and replica["lag_s"] is not None and replica["lag_s"] <= 1
    assert "both sides are Sentinel-managed" in s["evidence"]
    assert _check(rep, "topology")["status"] == "pass" and _check(rep, "identity")["status"] == "pass"
    p = src.primary_address()
    assert s["data"]["source"]["primary"] == f"{p[0]}:{p[1]}"


def test_compat_warns_with_a_sentinel_down_and_a_standalone_target(sentinel_factory, server_factory, make_playbook):
    """One sentinel of three down, min-replicas-to-write 0 and a target without Sentinel: the check warns and says each."""
    src = sentinel_factory("redis-7.0")
    tgt = server_factory("valkey-9.1")
    src.sentinels[2].stop()
    path = make_playbook(src, tgt)
    _out, rep = _compat(path, {})
    s = _check(rep, "sentinel")
    assert s["status"] == "warn", s
    assert "1 of 3 sentinels do not answer" in s["evidence"] and src.addresses[2] in s["evidence"]
    assert "min-replicas-to-write is 0" in s["evidence"]
    assert "the target is not Sentinel-managed" in s["evidence"]
    assert "min-replicas-to-write 1" in s["remediation"] and "bring the sentinels back" in s["remediation"]
    assert s["data"]["source"]["ckquorum"].startswith("OK")  # 2 of 3 still reach the quorum and a majority


def test_compat_fails_a_url_that_points_at_a_sentinel(sentinel_factory, server_factory, make_playbook):
    """A url naming a sentinel process (not sentinel:) fails the topology check, which says to use sentinel: in the playbook."""
    src = sentinel_factory("redis-7.0", sentinels=1)
    tgt = server_factory("valkey-9.1")
    s0 = src.sentinels[0]
    path = make_playbook(f"redis://{s0.host}:{s0.port}/0", tgt)
    out = run_cli("compat", "--output", "json", playbook=path, timeout=300)
    rep = json.loads(out.stdout) if out.stdout.strip().startswith("{") else None
    text = out.stdout + out.stderr
    if rep is not None:
        topo = _check(rep, "topology")
        assert topo["status"] == "fail" and "use `sentinel:` in the playbook" in topo["remediation"], topo
    else:
        assert "sentinel" in text, text
    assert out.returncode != 0


# --- the whole walk, with a ledger ----------------------------------------------------------------


FAILOVER_ERRORS = ("NOREPLICAS", "ConnectionError", "READONLY", "Connection closed", "Error while reading")


def _shim_status(pb) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://{pb.shim.admin}/status", timeout=5) as r:
        return json.loads(r.read())


def _step(path, env, *args) -> dict:
    out = run_cli(*args, playbook=path, env=env, timeout=300)
    assert out.returncode == 0, f"migrator {' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert PASSWORD not in out.stdout + out.stderr and SENTINEL_PASSWORD not in out.stdout + out.stderr
    return json.loads(out.stdout) if "--output" in args else {}


def _fail_over_under_the_shim(group, pb, side: str, workload) -> dict:
    """SENTINEL FAILOVER of ``group`` with the ledger running; wait until the shim switched and writes flow again."""
    before = group.primary_address()
    new = group.failover()
    switch = wait_for(lambda: _shim_status(pb)["sentinel"][side]["switches"], timeout=20,
                      what=f"the shim to follow the {side}'s failover")[-1]
    assert switch["old"] == f"{before[0]}:{before[1]}" and switch["new"] == f"{new[0]}:{new[1]}"
    ops = workload.ops
    # The new primary refuses writes (NOREPLICAS) until the old one rejoined as its replica.
    wait_for(lambda: workload.ops > ops + 100, timeout=60, interval=0.2, what="the ledger writing again")
    return switch


@pytest.mark.slow
def test_ledger_survives_source_and_target_failovers_through_the_whole_walk(sentinel_factory, make_playbook,
                                                                             monkeypatch, tmp_path):
    """Redis 7.0 → Valkey 9.1, both Sentinel-managed: the source fails over in mirroring and the target in writes-on-target while a ledger writes through the shim; the walk completes and no acknowledged write is lost."""
    from migrator import demo
    from migrator.workload import Workload

    mrw = {"min-replicas-to-write": "1", "min-replicas-max-lag": "10"}
    src = sentinel_factory("redis-7.0", password=PASSWORD, config=mrw)
    tgt = sentinel_factory("valkey-9.1", master_name="valkeymaster", password=PASSWORD,
                           sentinel_password=SENTINEL_PASSWORD, config=mrw)
    with contextlib.closing(src.client()) as c:
        demo.seed(c, 600)
    monkeypatch.setenv("S14_DATA_PW", PASSWORD)
    monkeypatch.setenv("S14_SENTINEL_PW", SENTINEL_PASSWORD)
    env = {"S14_DATA_PW": PASSWORD, "S14_SENTINEL_PW": SENTINEL_PASSWORD}
    path = make_playbook(src, tgt, source=src.endpoint(password_env="S14_DATA_PW"),
                         target=tgt.endpoint(password_env="S14_DATA_PW", sentinel_password_env="S14_SENTINEL_PW"),
                         # While the target's new primary refuses writes (NOREPLICAS, a few seconds) the
                         # source applies them: hundreds of new ledger keys against a keyspace of ~1,000,
                         # far more than the 1% drift under which a repair from the target is trusted.
                         check={"max_key_count_drift": 0.6})
    pb = playbook.load(path)
    shim = demo.ShimProcess(path, tmp_path / "shim.log")
    workload = None
    try:
        shim.wait_registered(pb.state_path)
        workload = Workload(f"redis://{pb.shim.listen}/0", clients=3, rate=100.0, seed=14).start()
        _step(path, env, "advance", "--yes")  # → compatible (the real pre-flight, Sentinel check included)
        _step(path, env, "advance", "--yes")  # → mirroring
        assert _step(path, env, "sync", "--output", "json")["complete"] is True

        # The source fails over during mirroring.
        switch = _fail_over_under_the_shim(src, pb, "source", workload)
        # The new primary's run_id marked the source's databases dirty: a full sync is due, then the dirty keys.
        assert _shim_status(pb)["sides"]["source"]["restarts"]
        assert _step(path, env, "sync", "--output", "json")["complete"] is True
        _step(path, env, "sync", "--dirty")
        _step(path, env, "check", "--full")
        _step(path, env, "advance", "--yes")  # → reads-on-target
        _step(path, env, "check", "--full")
        cut = _step(path, env, "advance", "--yes", "--output", "json")  # → writes-on-target
        assert cut["to_phase"] == "writes-on-target"

        # The target fails over while it is authoritative.
        _fail_over_under_the_shim(tgt, pb, "target", workload)
        workload.stop()
        # The target is authoritative: what the source missed (or the failover lost) is repaired from it.
        _step(path, env, "check", "--full", "--repair")
        _step(path, env, "check", "--full")
        src_client = make_client(pb.source, decode_responses=True)
        audit_source = workload.audit(src_client)  # the source, kept in sync for a rollback
        src_client.close()
        _step(path, env, "advance", "--yes")  # → completed
        tgt_client = make_client(pb.target, decode_responses=True)
        audit = workload.audit(tgt_client)
        tgt_client.close()
        assert audit.ops > 300, audit.summary()
        unexpected = [e for e in audit.errors if not any(k in e for k in FAILOVER_ERRORS)]
        assert unexpected == [], unexpected[:5]
        assert audit.ok, audit.problems[:10]
        assert audit_source.ok, audit_source.problems[:10]
        log = (tmp_path / "shim.log").read_text()
        assert PASSWORD not in log and SENTINEL_PASSWORD not in log
        print(f"ledger: {audit.ops} acknowledged ops, {len(audit.errors)} errors during failovers, "
              f"{audit.checked} keys audited; source switch: {switch}")
    finally:
        if workload is not None:
            workload.stop()
        shim.stop()


def test_a_write_in_flight_on_a_closed_primary_connection_is_dirty(server_factory, shim_env):
    """A write whose source connection the shim closes (as on +switch-master) before the source answered, while the target applied it, is marked dirty."""
    import signal

    from migrator.shim import sentinelwatch
    from migrator.shim.commands import SOURCE

    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    env = shim_env(src, tgt)
    env.walk_to(Phase.MIRRORING)
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    c = env.client(retry=Retry(NoBackoff(), 0))  # the command is not sent again: its own outcome is seen
    assert c.set("warm", "1")
    result: list = []
    src.proc.send_signal(signal.SIGSTOP)  # the source holds the write unanswered
    try:
        t = threading.Thread(target=lambda: result.append(_try(lambda: c.set("inflight", "v"))))
        t.start()
        with contextlib.closing(tgt.client()) as tc:
            wait_for(lambda: tc.get("inflight") == b"v", what="the target to apply the mirrored write")
        closed = env.thread.call(lambda: sentinelwatch.close_upstreams(env.thread.shim, SOURCE, ("0.0.0.0", 0)))
        t.join(10)
    finally:
        src.proc.send_signal(signal.SIGCONT)
    assert closed >= 1
    assert result and isinstance(result[0], redis.exceptions.ConnectionError), result  # as a killed connection
    env.flush()
    from migrator.shim.dirty import list_dirty

    marks = [m for m in list_dirty(env.pb.state_path) if m.key == b"inflight"]
    assert marks and marks[0].reason == "answer-lost", marks


def _try(fn):
    try:
        return fn()
    except redis.exceptions.RedisError as e:
        return e
