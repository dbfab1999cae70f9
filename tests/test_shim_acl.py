"""ACL users through the shim (``shim.auth: passthrough``): the client's own login on both servers.

Real servers with ACL users; the playbook's own credentials are an admin password on the
default user, which the shim uses only for its own reads (COMMAND, INFO).
"""

from __future__ import annotations

import socket

import hiredis
import pytest
import redis

from migrator.phases import Phase
from tests.helpers import wait_for

ADMIN = "adm1n-Zq7-secret"
APP_PW = "app-pw-Kx93-unique"
RO_PW = "ro-pw-Lm28-unique"
APP_RULES = ("on", f">{APP_PW}", "~app:*", "&*", "+@all", "-@dangerous", "+acl|whoami")
RO_RULES = ("on", f">{RO_PW}", "~*", "+@read", "+@connection", "+acl|whoami")
PHASES = [Phase.PLANNED, Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET, Phase.COMPLETED]


def add_users(*servers_, only=None) -> None:
    for s in servers_:
        c = s.client()
        try:
            for name, rules in (only or {"app": APP_RULES, "ro": RO_RULES}).items():
                c.execute_command("ACL", "SETUSER", name, "reset", *rules)
        finally:
            c.close()


@pytest.fixture
def acl_env(server_factory, make_env):
    """A passthrough shim between a source and a target that both have the users ``app`` and ``ro``."""

    def make(source_label="redis-7.0", target_label="valkey-9.1", users=True):
        src = server_factory(source_label, password=ADMIN)
        tgt = server_factory(target_label, password=ADMIN)
        if users:
            add_users(src, tgt)
        return make_env(src, tgt, shim={"auth": "passthrough"})

    return make


def shim_client(env, user, password, **kw) -> redis.Redis:
    return env.client(username=user, password=password, **kw)


def raw(port: int, *commands: bytes) -> bytes:
    """Send RESP commands on one fresh socket; return the bytes of their replies (fewer if it closes)."""
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(commands))
        out, n = b"", 0
        while n < len(commands):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
            reader.feed(chunk)
            while reader.gets() is not False:
                n += 1
        return out


def resp(*args: str) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)


def error_of(fn, *args) -> str:
    with pytest.raises(redis.exceptions.ResponseError) as info:
        fn(*args)
    return str(info.value)


def serving(env, phase: Phase):
    """The server that answers writes in ``phase``."""
    return env.source if phase in (Phase.PLANNED, Phase.MIRRORING, Phase.READS_ON_TARGET) else env.target


def direct(server, user, password) -> redis.Redis:
    return redis.Redis(port=server.port, username=user, password=password, socket_timeout=5)


@pytest.mark.parametrize("labels", [("redis-7.0", "valkey-9.1"), ("redis-6.2", "valkey-8.1")],
                         ids=lambda p: f"{p[0]}->{p[1]}")
def test_two_users_in_every_phase(acl_env, labels):
    """Two ACL users log in through the shim in every phase; each server enforces their rules: a write the
    read-only user may not make, or a key outside app's pattern, gets the serving server's own NOPERM error,
    writes reach both servers in the two-sided phases, and nothing is counted as a divergence."""
    env = acl_env(*labels)
    # Logged in while only the source is used: its login is replayed on the target when a phase needs it.
    carried_app = shim_client(env, "app", APP_PW)
    carried_ro = shim_client(env, "ro", RO_PW)
    assert carried_app.ping() and carried_ro.ping()
    for i, phase in enumerate(PHASES):
        if phase is not Phase.PLANNED:
            env.set_phase(phase)
        assert carried_app.set(f"app:carried{i}", phase.value) is True
        with pytest.raises(redis.exceptions.NoPermissionError):
            carried_ro.set(f"app:carried{i}", "x")
        app = shim_client(env, "app", APP_PW)
        ro = shim_client(env, "ro", RO_PW)
        assert app.execute_command("ACL", "WHOAMI") == b"app"
        assert ro.execute_command("ACL", "WHOAMI") == b"ro"
        assert app.set(f"app:k{i}", phase.value) is True
        assert ro.get(f"app:k{i}") == phase.value.encode()
        want = direct(serving(env, phase), "ro", RO_PW)
        try:
            assert error_of(ro.set, "app:k", "x") == error_of(want.set, "app:k", "x")
            assert "NOPERM" in raw(env.port, resp("AUTH", "ro", RO_PW), resp("SET", "app:k", "x")).decode()
            want_app = direct(serving(env, phase), "app", APP_PW)
            assert error_of(app.set, "other:k", "x") == error_of(want_app.set, "other:k", "x")
            assert error_of(app.flushall) == error_of(want_app.flushall)  # -@dangerous
            want_app.close()
        finally:
            want.close()
        # Not logged in: the server's own NOAUTH (the default user has a password); a wrong password: WRONGPASS.
        assert raw(env.port, resp("GET", "app:k")).startswith(b"-NOAUTH")
        assert raw(env.port, resp("AUTH", "app", "wrong-one")).startswith(b"-WRONGPASS")
        h3 = raw(env.port, resp("HELLO", "3", "AUTH", "app", APP_PW), resp("ACL", "WHOAMI"))
        assert h3.startswith(b"%") and h3.endswith(b"app\r\n"), h3[-80:]
        # AUTH with a password only: the default user, as a server takes it.
        assert raw(env.port, resp("AUTH", ADMIN), resp("ACL", "WHOAMI")) == b"+OK\r\n$7\r\ndefault\r\n"
        app.close()
        ro.close()
    for i, phase in enumerate(PHASES):
        want = phase.value.encode()
        on_source = phase is not Phase.COMPLETED  # mirrored in every two-sided phase, not after completed
        on_target = phase is not Phase.PLANNED
        for key in (f"app:k{i}", f"app:carried{i}"):
            assert (env.source.client().get(key) == want) == on_source, (phase, key)
            assert (env.target.client().get(key) == want) == on_target, (phase, key)
    stats = env.stats()
    assert env.thread.call(lambda: dict(stats.divergences)) == {}
    assert env.thread.call(lambda: stats.dirty_keys) == 0


def test_user_missing_on_target_refused_where_the_target_is_used(acl_env):
    """A user only the source has logs in through the shim while only the source is used; from mirroring on
    its login is refused with an error naming the user and the target, its connection already logged in is
    closed when the phase starts using the target, and a user whose password differs is refused likewise."""
    env = acl_env()
    add_users(env.source, only={"legacy": ("on", ">legacy-pw-Uu55", "~*", "+@all")})
    add_users(env.source, only={"drift": ("on", ">drift-pw-src-Aa11", "~*", "+@all")})
    add_users(env.target, only={"drift": ("on", ">drift-pw-tgt-Bb22", "~*", "+@all")})
    legacy = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    try:
        legacy.sendall(resp("AUTH", "legacy", "legacy-pw-Uu55") + resp("SET", "legacy:k", "1"))
        got = b""
        while got.count(b"\r\n") < 2:
            got += legacy.recv(100)
        assert got == b"+OK\r\n+OK\r\n"  # planned: the source alone decides
        env.set_phase(Phase.MIRRORING)
        assert legacy.recv(100) == b""  # closed once the phase needs its login on the target, which refuses it
    finally:
        legacy.close()
    for user, pw in (("legacy", "legacy-pw-Uu55"), ("drift", "drift-pw-src-Aa11")):
        for login in (resp("AUTH", user, pw), resp("HELLO", "3", "AUTH", user, pw)):
            reply = raw(env.port, login, resp("PING"))
            assert reply.startswith(b"-WRONGPASS migrator shim: user '%s' was refused by the target" % user.encode()), reply
            assert b"PONG" not in reply  # closed after the refusal
    # A write pipelined behind the refused login ran on the side that accepted it: its key is dirty.
    reply = raw(env.port, resp("AUTH", "drift", "drift-pw-src-Aa11"), resp("SET", "drift:k", "1"))
    assert reply.startswith(b"-WRONGPASS migrator shim:") and b"+OK" not in reply
    wait_for(lambda: env.thread.call(lambda: env.thread.shim.dirty.is_dirty(0, [b"drift:k"])), what="drift:k dirty")
    # The app user (on both) is unaffected; nothing was mirrored as the refused users.
    assert shim_client(env, "app", APP_PW).set("app:after", "1") is True
    assert env.target.client().get("legacy:k") is None
    assert env.thread.call(lambda: env.thread.shim.stats.refused["login-one-side"]) == 6


def test_users_never_share_upstream_connections(acl_env):
    """Two users' commands interleaved on many short-lived connections (so pooled upstream connections are
    reused) always run as their own user on both servers: ACL WHOAMI answers match, every app write lands on
    both, and both servers' ACL LOG hold refusals of the read-only user only, as many as it made."""
    env = acl_env()
    env.set_phase(Phase.MIRRORING)
    for s in (env.source, env.target):
        s.client().execute_command("ACL", "LOG", "RESET")
    refused = 0
    for round_ in range(12):
        conns = []
        for j in range(6):
            user, pw = ("app", APP_PW) if (round_ + j) % 2 else ("ro", RO_PW)
            conns.append((user, redis.Redis(port=env.port, username=user, password=pw, socket_timeout=5)))
        for j, (user, c) in enumerate(conns):
            assert c.execute_command("ACL", "WHOAMI") == user.encode()
            if user == "app":
                assert c.set(f"app:{round_}:{j}", "v") is True
            else:
                with pytest.raises(redis.exceptions.NoPermissionError):
                    c.set(f"app:{round_}:{j}", "v")
                refused += 1
        for _user, c in conns:
            c.close()
    pool = env.thread.call(lambda: env.thread.shim.pool.status())
    assert pool["reused"] > 0, pool  # the test did exercise reuse
    # A client not logged in, on one of those pooled connections, is nobody: NOAUTH, as from a server.
    assert raw(env.port, resp("GET", "app:0:1"), resp("ACL", "WHOAMI")).startswith(b"-NOAUTH")
    for s in (env.source, env.target):
        c = s.client()
        entries = c.acl_log(128)
        assert {str(e["username"]) for e in entries} == {"ro"}, (s.label, entries)
        assert sum(int(e["count"]) for e in entries) == refused, s.label
        app_keys = [k for k in c.scan_iter("app:*") if k.count(b":") == 2]
        assert len(app_keys) == 12 * 3, s.label
    stats = env.stats()
    assert env.thread.call(lambda: dict(stats.divergences)) == {}


def test_write_refused_by_acl_on_one_side_only_is_a_divergence(acl_env):
    """A user allowed to write a key on the source but not on the target: in mirroring its write succeeds
    for the client (the source answers) and is counted as a divergence, with the key marked dirty, never
    as a silent success."""
    env = acl_env()
    add_users(env.source, only={"narrow": ("on", ">narrow-pw-Cc33", "~*", "+@all")})
    add_users(env.target, only={"narrow": ("on", ">narrow-pw-Cc33", "~app:*", "+@all")})
    env.set_phase(Phase.MIRRORING)
    c = shim_client(env, "narrow", "narrow-pw-Cc33")
    assert c.set("data:x", "1") is True
    assert env.target.client().get("data:x") is None
    env.flush()
    stats = env.stats()
    assert sum(env.thread.call(lambda: dict(stats.divergences)).values()) == 1
    assert env.thread.call(lambda: env.thread.shim.dirty.is_dirty(0, [b"data:x"]))


SKIP_GATES = ("--override", "sync_complete", "--override", "divergence", "--override", "latency",
              "--override", "error_rate", "--override", "consistency", "--reason", "credential test")


def test_no_credential_in_any_output(server_factory, make_playbook, tmp_path):
    """A walk with ACL users through a passthrough shim (CLI shim, compat, sync, check, advance, report,
    status, /status and /metrics) writes none of the passwords anywhere: every CLI call's stdout and
    stderr, the shim's log, its admin endpoints and every file in the state folder have zero hits."""
    import hashlib
    import json
    import urllib.request

    from migrator import playbook
    from migrator.demo import ShimProcess
    from tests.helpers import run_cli

    src = server_factory("redis-7.0", password=ADMIN)
    tgt = server_factory("valkey-9.1", password=ADMIN)
    add_users(src, tgt)
    drift_src, drift_tgt, wrong = "drift-src-pw-Ee77", "drift-tgt-pw-Ff88", "wrong-pw-Gg99"
    add_users(src, only={"drift": ("on", f">{drift_src}", "~*", "+@all")})
    add_users(tgt, only={"drift": ("on", f">{drift_tgt}", "~*", "+@all")})
    add_users(src, only={"legacy": ("on", ">legacy-pw-Hh00", "~*", "+@all")})
    secrets = [ADMIN, APP_PW, RO_PW, drift_src, drift_tgt, wrong, "legacy-pw-Hh00"]
    secrets += [hashlib.sha256(s.encode()).hexdigest() for s in secrets]  # nor their hashes (ACL LIST shows those)
    path = make_playbook(src, tgt, shim={"auth": "passthrough"})
    pb = playbook.load(path)
    outputs: list[str] = []

    def cli(*args, ok=(0,)):
        out = run_cli(*args, playbook=path)
        outputs.extend([out.stdout, out.stderr])
        assert out.returncode in ok, (args, out.returncode, out.stdout[-2000:], out.stderr[-2000:])
        return out

    def clients(tag: str) -> None:
        app = redis.Redis(host="127.0.0.1", port=int(pb.shim.listen.rsplit(":", 1)[1]), username="app",
                          password=APP_PW, socket_timeout=5)
        ro = redis.Redis(host="127.0.0.1", port=app.connection_pool.connection_kwargs["port"], username="ro",
                         password=RO_PW, protocol=3, socket_timeout=5)
        try:
            for i in range(20):
                assert app.set(f"app:{tag}:{i}", i) is True
            assert ro.get(f"app:{tag}:0") == b"0"
            with pytest.raises(redis.exceptions.NoPermissionError):
                ro.set("app:no", "1")
        finally:
            app.close()
            ro.close()
        port = app.connection_pool.connection_kwargs["port"]
        assert raw(port, resp("AUTH", "app", wrong)).startswith(b"-WRONGPASS")
        raw(port, resp("AUTH", "drift", drift_src), resp("PING"))  # refused by the target from mirroring on

    shim = ShimProcess(path, tmp_path / "shim.log")
    try:
        shim.wait_registered(pb.state_path)
        out = cli("compat", ok=(1,))  # the acl check fails: names and what differs, never a password or hash
        assert "missing on the target: legacy" in out.stdout and "drift: passwords differ" in out.stdout, out.stdout
        clients("planned")
        cli("advance", "--yes", "--override", "compatibility", "--reason", "credential test")
        cli("sync")
        cli("advance", "--yes")  # → mirroring
        clients("mirroring")
        cli("sync", "--dirty")
        cli("check", "--full", ok=(0, 1))
        cli("advance", "--yes", *SKIP_GATES)  # → reads-on-target
        clients("reads")
        cli("status", "--output", "json")
        cli("history")
        cli("report")
        for route in ("/status", "/metrics"):
            with urllib.request.urlopen(f"http://{pb.shim.admin}{route}", timeout=5) as r:
                outputs.append(r.read().decode(errors="replace"))
    finally:
        shim.stop()
    outputs.append((tmp_path / "shim.log").read_text(errors="replace"))
    assert "drift" in outputs[-1]  # user names may appear: the refused login is logged by name
    files = [p for p in pb.state_path.rglob("*") if p.is_file()]
    assert any("reports" in p.parts for p in files) and json.loads((pb.state_path / "state.json").read_text())
    outputs += [p.read_bytes().decode(errors="replace") for p in files]
    hits = {s: sum(o.count(s) for o in outputs) for s in secrets}
    assert hits == dict.fromkeys(secrets, 0), hits


def test_passthrough_with_a_cluster_side_is_refused_at_start_up(server_factory, cluster_factory, make_playbook):
    """A passthrough shim whose target is a Redis Cluster does not start: one usage error naming the side
    and what to use instead (logins through the slot router are not per user)."""
    from migrator import playbook
    from migrator.errors import UsageError
    from migrator.shim.server import ShimThread

    src = server_factory("redis-7.0")
    tgt = cluster_factory("valkey-9.1", primaries=1, replicas=0)
    pb = playbook.load(make_playbook(src, tgt, shim={"auth": "passthrough"}))
    with pytest.raises(UsageError, match=r"shim.auth: passthrough is not supported with a cluster target .*shim.auth: password"):
        ShimThread(pb).start()
