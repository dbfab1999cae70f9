"""The shim in the replication strategy, against real servers: the target (Valkey) replicates the
source (Redis), set up here as the replication control would; the shim routes by (phase,
state.mirror)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import threading
import time
import urllib.request

import pytest
import redis

from migrator import registry, servers
from migrator.phases import Phase
from migrator.shim import list_dirty
from migrator.shim.commands import SOURCE, TARGET, Cls
from migrator.shim.divergence import read_counters, read_log
from migrator.shim.lag import DIVERGENT, LAG, RETRY, OffsetTracker, judge
from migrator.shim.routing import (
    DUAL_WRITE,
    REPLICATION,
    REVERSE_REPLICATION,
    ROUTES_BY_MODE,
    mode_of,
    publish_reaches,
    replica_side,
)
from migrator.state import MirrorMode, StateStore, now
from tests.helpers import DelayingForwarder, start_cli
from tests.test_shim_core import resp
from tests.test_shim_e2e import wait_for

MIRROR_REPLICATION = {"strategy": "replication"}


def replicate(replica, primary_port: int, timeout: float = 20.0) -> None:
    """Make ``replica`` a replica of the server on ``primary_port`` and wait until it is in sync."""
    r = replica.client()
    with contextlib.suppress(redis.exceptions.RedisError):  # (no primary there: a forwarder, or down on purpose)
        redis.Redis(port=primary_port, socket_timeout=5).config_set("repl-diskless-sync-delay", 0)
    r.execute_command("REPLICAOF", "127.0.0.1", primary_port)

    def synced() -> bool:
        info = r.info("replication")
        return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")

    wait_for(synced, timeout, what="replica in sync")


def in_step(primary, replica, timeout: float = 10.0) -> None:
    """Wait until the replica's offset equals the primary's."""
    p, r = primary.client(), replica.client()
    wait_for(lambda: r.info("replication").get("slave_repl_offset") == p.info("replication")["master_repl_offset"],
             timeout, what="replica at the primary's offset")


def readonly_errors(server) -> int:
    """READONLY errors the server itself has answered (INFO errorstats)."""
    stat = server.client().info("errorstats").get("errorstat_READONLY")
    return int(stat["count"]) if stat else 0


def set_phase(env, phase: Phase, reverse: str | None = None, strategy: str = "replication") -> int:
    """Record ``phase`` and ``state.mirror`` as advance would, and wait for the shims' acknowledgement."""
    store = StateStore(env.pb.state_path, env.pb.name)
    st = store.load()
    st.phase = phase
    st.generation += 1
    st.phase_since = now().isoformat()
    st.mirror = MirrorMode(strategy, why="set by the test", reverse=reverse)
    store.save(st)
    ack = registry.await_ack(env.pb.state_path, st.generation, 10)
    assert ack.ok, ack.evidence()
    if strategy == "replication" and phase in (Phase.MIRRORING, Phase.READS_ON_TARGET):
        wait_for(lambda: env.thread.call(lambda: env.thread.shim.tracker.ready), what="the shim sees the replica ready")
    return st.generation


def shim_stats(env):
    return env.thread.call(lambda: env.thread.shim.stats)


def wait_confirmed(env, timeout: float = 10.0) -> None:
    """Every compared read's two replies are in, and every differing one has been confirmed or not."""
    shim = env.thread.shim
    wait_for(lambda: env.thread.call(lambda: shim.mirror_depth == 0 and not shim.watch.queue), timeout,
             what="comparisons and confirmations settled")


@pytest.fixture
def servers_pair(server_factory):
    return server_factory("redis-7.0"), server_factory("valkey-9.1")


@pytest.fixture
def mirroring(servers_pair, make_env):
    """Target replicating the source directly; a shim in mirroring with the replication strategy."""
    source, target = servers_pair
    replicate(target, source.port)
    env = make_env(source, target, mirror=MIRROR_REPLICATION)
    set_phase(env, Phase.MIRRORING)
    return env


@pytest.fixture
def lagging(servers_pair, make_env):
    """The target replicating the source through a forwarder that delays its stream by 60 ms each way."""
    source, target = servers_pair
    fwd = DelayingForwarder(source.port, delay=0.06)
    replicate(target, fwd.port)
    env = make_env(source, target, mirror=MIRROR_REPLICATION)
    yield env, fwd
    env.close()
    fwd.close()


def test_mirroring_sends_writes_to_the_source_only_and_the_replica_gets_them(mirroring):
    """Writes of every kind (plain, effects, transactions, scripts, blocking, pub/sub) reach the source only; the target has them by replication; no READONLY."""
    env = mirroring
    src, tgt = env.source, env.target
    c = env.client()
    p = c.pipeline(transaction=False)
    for i in range(100):
        p.set(f"s:{i}", i)
        p.incr("counter")
    p.execute()
    c.sadd("set", *range(10))
    c.spop("set")
    c.rpush("list", "a", "b")
    assert c.blpop(["list"], timeout=1) == (b"list", b"a")
    with c.pipeline(transaction=True) as tx:
        tx.incr("tx").hset("h", "f", "v")
        tx.execute()
    c.eval("return redis.call('set', KEYS[1], ARGV[1])", 1, "script", "x")
    c.incrbyfloat("float", 1.5)
    c.expire("s:0", 100)
    c.publish("chan", "m")
    sha = c.script_load("return 7")  # not replicated by the servers: the shim loads it on both
    assert c.get("counter") == b"100" and c.get("s:1") == b"1"
    in_step(src, tgt)
    assert tgt.client().script_exists(sha) == [True]
    t = tgt.client()
    assert t.get("counter") == b"100" and t.scard("set") == 9 and t.lrange("list", 0, -1) == [b"b"]
    assert t.get("script") == b"x" and t.get("tx") == b"1" and t.hget("h", "f") == b"v" and 99 <= t.ttl("s:0") <= 100
    assert readonly_errors(tgt) == 0
    wait_confirmed(env)
    st = shim_stats(env)
    sent_to_target = {cls for (cls, side), n in st.commands.items() if side == "target" and n}
    assert sent_to_target <= {"read", "connection", "server-both", "pubsub-count", "script-admin"}, sent_to_target
    assert st.compared > 0 and sum(st.divergences.values()) == 0
    status = json.loads(env.admin("/status"))["replication"]
    assert status["mode"] == "replication" and status["replica"] == "target" and status["replica_ready"]
    assert status["sequenced"] is False  # the servers order the writes: no per-key sequencing
    assert status["lag_bytes"] is not None


def test_replication_lag_never_counts_as_a_divergence(lagging):
    """Reads of keys just written, compared against a replica 120 ms behind, are confirmed as lag: 0 divergences."""
    env, _fwd = lagging
    set_phase(env, Phase.MIRRORING)
    writer, reader = env.client(), env.client()
    for i in range(40):
        writer.set(f"k:{i}", f"v{i}")
        assert reader.get(f"k:{i}") == f"v{i}".encode()  # answered by the source
    wait_confirmed(env)
    st = shim_stats(env)
    assert st.compared >= 40, json.dumps(json.loads(env.admin("/status"))["replication"])
    assert sum(st.divergences.values()) == 0, dict(st.divergences)
    assert st.lag_resolved >= 10, (st.lag_resolved, dict(st.lag_unconfirmed))
    assert not list_dirty(env.pb.state_path)


def test_a_stopped_replica_makes_no_divergence_and_loses_no_write(mirroring):
    """The replica SIGSTOPped for 0.8 s under a writer and a reader: every write acknowledged is on both sides after, 0 divergences, 0 dirty keys."""
    import os

    env = mirroring
    writer, reader = env.client(), env.client()
    stop = threading.Event()
    acked: list[int] = []

    def write() -> None:
        i = 0
        while not stop.is_set():
            writer.rpush("log", i)
            acked.append(i)
            reader.lrange("log", -3, -1)
            i += 1

    t = threading.Thread(target=write)
    t.start()
    try:
        time.sleep(0.2)
        os.kill(env.target.proc.pid, signal.SIGSTOP)
        time.sleep(0.8)
    finally:
        os.kill(env.target.proc.pid, signal.SIGCONT)
    time.sleep(0.3)
    stop.set()
    t.join(10)
    in_step(env.source, env.target)
    assert [int(x) for x in env.target.client().lrange("log", 0, -1)] == acked
    wait_confirmed(env)
    st = shim_stats(env)
    assert sum(st.divergences.values()) == 0, dict(st.divergences)
    assert not list_dirty(env.pb.state_path) and readonly_errors(env.target) == 0


def test_a_real_divergence_on_the_replica_is_found(mirroring):
    """A value changed on the replica behind the primary's back is confirmed (offsets equal) and counted as a divergence."""
    env = mirroring
    c = env.client()
    c.set("d:1", "right")
    c.set("d:2", "same")
    in_step(env.source, env.target)
    t = env.target.client()
    t.config_set("replica-read-only", "no")
    t.set("d:1", "wrong")
    assert c.get("d:1") == b"right" and c.get("d:2") == b"same"
    wait_confirmed(env)
    st = shim_stats(env)
    assert sum(st.divergences.values()) == 1, dict(st.divergences)
    env.flush()
    log = read_log(env.pb.state_path)
    assert [e["keys"] for e in log] == [["d:1"]]
    assert read_counters(env.pb.state_path, env.store.load().generation)["divergent"] == 1  # what the gate reads


def test_a_replica_whose_link_is_down_is_not_compared(servers_pair, make_env):
    """While the target's link to its primary is down, reads are not compared: counted as skipped, never divergent."""
    source, target = servers_pair
    replicate(target, source.port)
    env = make_env(source, target, mirror=MIRROR_REPLICATION)
    set_phase(env, Phase.MIRRORING)
    c = env.client()
    c.set("x", "1")
    target.client().execute_command("REPLICAOF", "127.0.0.1", servers.free_port())  # nothing listens there
    wait_for(lambda: not json.loads(env.admin("/status"))["replication"]["replica_ready"], what="replica not ready")
    before = shim_stats(env).compared
    for i in range(20):
        c.set(f"y:{i}", i)
        assert c.get(f"y:{i}") == str(i).encode()
    st = shim_stats(env)
    assert st.compared == before and st.lag_skipped >= 20 and sum(st.divergences.values()) == 0


def test_read_your_writes_with_a_lagging_replica(lagging):
    """In reads-on-target, a connection's read after its own write sees it (the source answers until the replica has it); other connections read the replica."""
    env, _fwd = lagging
    set_phase(env, Phase.MIRRORING)
    set_phase(env, Phase.READS_ON_TARGET)
    writer, other = env.client(), env.client()
    other_stale = 0
    for i in range(30):
        writer.set(f"r:{i}", f"v{i}")
        assert writer.get(f"r:{i}") == f"v{i}".encode()
        other_stale += other.get(f"r:{i}") is None  # the replica, 120 ms behind
    st = shim_stats(env)
    assert st.ryw_redirects >= 30
    assert other_stale > 0  # the other connection was answered by the replica
    assert st.commands[("read", "target")] >= 30
    # Once the replica has caught up, the writer's reads go to the replica again.
    before = st.commands[("read", "target")]
    in_step(env.source, env.target)
    wait_for(lambda: writer.get("r:0") == b"v0" and shim_stats(env).commands[("read", "target")] > before,
             what="the writer's reads back on the replica")
    assert readonly_errors(env.target) == 0


def test_without_read_your_writes_a_lagging_replica_answers_stale(servers_pair, make_env):
    """With shim.read_your_writes false the replica answers every read: a read right after a write can miss it (what the setting prevents)."""
    source, target = servers_pair
    fwd = DelayingForwarder(source.port, delay=0.06)
    try:
        replicate(target, fwd.port)
        env = make_env(source, target, mirror=MIRROR_REPLICATION, shim={"read_your_writes": False})
        set_phase(env, Phase.MIRRORING)
        set_phase(env, Phase.READS_ON_TARGET)
        c = env.client()
        stale = 0
        for i in range(10):
            c.set(f"r:{i}", i)
            stale += c.get(f"r:{i}") is None
        assert stale > 0 and shim_stats(env).ryw_redirects == 0
    finally:
        fwd.close()


def test_writes_on_target_with_reverse_replication_routes_to_the_target_only(mirroring):
    """After the role swap (source replicating the target), writes and reads go to the target only; the source gets them by replication; no READONLY."""
    env = mirroring
    src, tgt = env.source, env.target
    env.client().set("before", "1")
    set_phase(env, Phase.READS_ON_TARGET)
    in_step(src, tgt)
    tgt.client().execute_command("REPLICAOF", "NO", "ONE")
    replicate(src, tgt.port)  # Redis 7.0 resumes from Valkey by partial resync after the swap
    set_phase(env, Phase.WRITES_ON_TARGET, reverse="replication")
    before = shim_stats(env).commands.copy()
    c = env.client()
    for i in range(50):
        c.set(f"w:{i}", i)
        assert c.get(f"w:{i}") == str(i).encode()
    c.publish("chan", "m")
    st = shim_stats(env)
    new = {k: n - before.get(k, 0) for k, n in st.commands.items() if n - before.get(k, 0)}
    assert all(side == "target" for (_cls, side) in new), new
    sha = c.script_load("return 9")  # not replicated: loaded on the source too, for a rollback
    assert src.client().script_exists(sha) == [True]
    assert readonly_errors(src) == 0
    status = json.loads(env.admin("/status"))["replication"]
    assert (status["mode"], status["primary"], status["replica"]) == ("reverse-replication", "target", "source")
    in_step(tgt, src)
    assert src.client().get("w:49") == b"49" and src.client().get("before") == b"1"
    # With the dual-write fallback for the rollback window, writes reach both again (today's routing).
    src.client().execute_command("REPLICAOF", "NO", "ONE")
    set_phase(env, Phase.WRITES_ON_TARGET, reverse="dual-write")
    c.set("fallback", "1")
    wait_for(lambda: src.client().get("fallback") == b"1", what="the write applied to the source too")


# --- many shims -----------------------------------------------------------------------------


def _admin_json(port: int, path: str = "/status") -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def test_many_shims_and_a_direct_writer_share_keys_without_divergence(servers_pair, make_playbook):
    """Two shim processes (one with --workers 2) and a writer straight to the source push to shared keys while mirroring: 0 divergences, 0 dirty keys, every acknowledged write on both sides."""
    source, target = servers_pair
    replicate(target, source.port)
    pb_path = make_playbook(source, target, mirror=MIRROR_REPLICATION)
    from migrator import playbook

    pb = playbook.load(pb_path)
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    st.phase, st.generation, st.mirror = Phase.MIRRORING, st.generation + 1, MirrorMode("replication", why="test")
    store.save(st)
    ports = [(servers.free_port(), servers.free_port()) for _ in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for i, (port, admin) in enumerate(ports):
            extra = ["--workers", "2"] if i == 1 else []
            procs.append(start_cli("shim", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", *extra,
                                   playbook=pb_path))
        for port, _admin in ports:
            wait_for(lambda p=port: _pings(p), 30, what=f"shim on {port}")
        acked: dict[str, list[bytes]] = {}
        errors: list[BaseException] = []
        writers = [("a", ports[0][0]), ("b", ports[1][0]), ("c", ports[1][0]), ("direct", source.port)]
        start = threading.Barrier(len(writers))

        def work(name: str, port: int) -> None:
            try:
                r = redis.Redis(port=port, socket_timeout=10)
                start.wait(10)
                mine = acked.setdefault(name, [])
                for i in range(300):
                    item = f"{name}:{i}".encode()
                    r.rpush(f"shared:{i % 5}", item)
                    r.incr("shared:counter")
                    r.hset("shared:h", name, i)
                    mine.append(item)
                    if i % 10 == 0:
                        r.get("shared:counter")
                        r.hgetall("shared:h")
                        r.lrange(f"shared:{i % 5}", 0, -1)
                r.close()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=work, args=w) for w in writers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, [str(e) for e in errors]
        in_step(source, target)
        s, t = source.client(), target.client()
        for i in range(5):
            assert s.lrange(f"shared:{i}", 0, -1) == t.lrange(f"shared:{i}", 0, -1)
        both = set()
        for i in range(5):
            both.update(t.lrange(f"shared:{i}", 0, -1))
        assert all(item in both for items in acked.values() for item in items)
        assert int(t.get("shared:counter")) == 4 * 300 == int(s.get("shared:counter"))
        # Confirmations of the reads compared while the writes went on settle; the workers report
        # their figures to their supervisor every heartbeat.
        wait_for(lambda: all(x["replication"]["pending"] == 0 for x in (_admin_json(a) for _p, a in ports)),
                 what="confirmations settled")
        time.sleep(3 * registry.HEARTBEAT)
        stats = [_admin_json(admin) for _port, admin in ports]
        assert stats[1]["compared"] > 0, "reads through the --workers shim were compared"
        assert stats[0]["replication"]["mode"] == "replication" and stats[1]["replication"]["modes"] == ["replication"]
        assert sum(x["compared"] for x in stats) > 0
        assert sum(sum(x["divergences"].values()) for x in stats) == 0, [x["divergences"] for x in stats]
        assert all(x["dirty_keys"] == 0 for x in stats) and not list_dirty(pb.state_path)
        assert readonly_errors(target) == 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _pings(port: int) -> bool:
    try:
        return redis.Redis(port=port, socket_timeout=1).ping()
    except redis.exceptions.RedisError:
        return False


# --- the routing table and the lag decisions, pure ------------------------------------------

_WRITES = (Cls.WRITE, Cls.SCRIPT, Cls.SCRIPT_ADMIN, Cls.BLOCKING, Cls.TX, Cls.ADMIN, Cls.UNKNOWN, Cls.PUBLISH)


@pytest.mark.parametrize("mode", [REPLICATION, REVERSE_REPLICATION])
@pytest.mark.parametrize("phase", list(Phase))
def test_no_write_is_ever_routed_to_a_replica(mode, phase):
    """In the replication modes, no class that may write reaches the side that is a replica, as answer or shadow."""
    replica = replica_side(phase, mode)
    for cls in _WRITES:
        plan = ROUTES_BY_MODE[mode][phase][cls]
        assert plan.shadow is None or plan.shadow != replica, (cls, plan)
        assert plan.answer != replica or replica is None, (cls, plan)
        if replica is not None:
            assert plan.shadow is None, (cls, plan)  # the server copies writes: the shim never does


def test_replication_routes_per_phase():
    """Mirroring: source answers, reads compared on the target; reads-on-target: target answers reads (compared on the source), writes source only; reverse: target only."""
    m = ROUTES_BY_MODE[REPLICATION][Phase.MIRRORING]
    assert (m[Cls.READ].answer, m[Cls.READ].shadow, m[Cls.READ].compare) == (SOURCE, TARGET, True)
    assert m[Cls.CONNECTION].sides() == (SOURCE, TARGET)  # SELECT/HELLO for the compared reads
    r = ROUTES_BY_MODE[REPLICATION][Phase.READS_ON_TARGET]
    assert (r[Cls.READ].answer, r[Cls.READ].shadow, r[Cls.READ].fallback) == (TARGET, SOURCE, True)
    assert (r[Cls.WRITE].answer, r[Cls.WRITE].shadow, r[Cls.WRITE].sequential) == (SOURCE, None, False)
    w = ROUTES_BY_MODE[REVERSE_REPLICATION][Phase.WRITES_ON_TARGET]
    assert all(w[c].sides() == (TARGET,) for c in Cls if c not in (Cls.LOCAL, Cls.UNSUPPORTED))
    assert ROUTES_BY_MODE[DUAL_WRITE][Phase.WRITES_ON_TARGET][Cls.WRITE].shadow == SOURCE


def test_publish_reaches_the_replicas_subscribers_through_replication():
    """PUBLISH goes to the primary once; subscribers on the replica still get it (it replicates), so none is moved."""
    assert ROUTES_BY_MODE[REPLICATION][Phase.MIRRORING][Cls.PUBLISH].sides() == (SOURCE,)
    assert publish_reaches(Phase.MIRRORING, REPLICATION) == {SOURCE, TARGET}
    assert publish_reaches(Phase.READS_ON_TARGET, REPLICATION) == {SOURCE, TARGET}
    assert publish_reaches(Phase.WRITES_ON_TARGET, REVERSE_REPLICATION) == {SOURCE, TARGET}
    assert publish_reaches(Phase.COMPLETED, REPLICATION) == {TARGET}


def test_mode_of_the_state():
    """The mode follows state.mirror: none or dual-write → dual-write; replication → replication, and in writes-on-target by reverse."""
    assert mode_of(Phase.MIRRORING, None) == DUAL_WRITE
    assert mode_of(Phase.MIRRORING, MirrorMode("dual-write")) == DUAL_WRITE
    assert mode_of(Phase.MIRRORING, MirrorMode("replication")) == REPLICATION
    assert mode_of(Phase.READS_ON_TARGET, MirrorMode("replication")) == REPLICATION
    assert mode_of(Phase.WRITES_ON_TARGET, MirrorMode("replication", reverse="replication")) == REVERSE_REPLICATION
    assert mode_of(Phase.WRITES_ON_TARGET, MirrorMode("replication", reverse="dual-write")) == DUAL_WRITE
    assert mode_of(Phase.WRITES_ON_TARGET, MirrorMode("replication")) == DUAL_WRITE
    assert mode_of(Phase.COMPLETED, MirrorMode("replication", reverse="replication")) == DUAL_WRITE


def test_judge_and_tracker():
    """Agreeing values are lag; differing ones a divergence only with equal offsets; a replica is compared only in sync with this primary."""
    assert judge(True, 100, 50) == LAG
    assert judge(False, 100, 100) == DIVERGENT
    assert judge(False, 100, 50) == RETRY and judge(False, 100, 150) == RETRY
    t = OffsetTracker()
    t.reset(SOURCE, TARGET)
    t.set_primary(500, "abc", at=10.0)
    t.set_replica(400, "abc", link_up=True, loading=False, is_replica=True, at=10.1)
    assert t.ready and t.lag_bytes == 100 and not t.caught_up(500) and t.caught_up(400)
    assert t.primary_offset_since(9.0) == 500 and t.primary_offset_since(10.0) is None
    t.set_replica(500, "other", link_up=True, loading=False, is_replica=True, at=10.2)
    assert not t.ready and "history" in t.why_unready
    t.set_replica(0, "abc", link_up=False, loading=True, is_replica=True, at=10.3)
    assert not t.ready and "loading" in t.why_unready


# --- the core in the replication modes (sans-IO: a recording host, no server) ---------------


def _repl_core(tmp_path, phase: Phase, mode: str, ready: bool = True):
    from tests.test_shim_core import Core

    c = Core(tmp_path, Phase.PLANNED)
    h = c.host
    h.routes = ROUTES_BY_MODE[mode][phase]
    h.mode, h.lag_aware, h.sequence_keys = mode, mode == REPLICATION, False
    h.ryw = mode == REPLICATION and phase == Phase.READS_ON_TARGET
    replica = replica_side(phase, mode)
    h.tracker.reset(1 - replica, replica)
    if ready:
        h.tracker.set_primary(100, "id", at=time.monotonic())
        h.tracker.set_replica(100, "id", link_up=True, loading=False, is_replica=True, at=time.monotonic())
    c.session.on_phase(phase)
    c.accept()
    return c


def test_core_differing_read_against_a_replica_is_handed_over_not_counted(tmp_path):
    """Mirroring by replication: a write goes to the source only; a read whose replies differ becomes a Mismatch to confirm, not a divergence or a dirty key."""
    c = _repl_core(tmp_path, Phase.MIRRORING, REPLICATION)
    c.send(["SET", "a", "1"])
    assert c.sent(SOURCE) == resp(["SET", "a", "1"]) and c.sent(TARGET) == b""
    c.reply(SOURCE, b"+OK\r\n")
    c.send(["GET", "a"])
    c.accept()
    assert c.sent(SOURCE) == c.sent(TARGET) == resp(["GET", "a"])
    c.reply(SOURCE, b"$1\r\n1\r\n")
    c.reply(TARGET, b"$-1\r\n")  # the replica has not applied the SET yet
    assert c.answered() == b"+OK\r\n$1\r\n1\r\n"
    st = c.host.stats
    assert st.compared == 1 and not st.divergences and not c.dirty()
    (m,) = c.host.mismatches
    assert (m.name, m.keys, m.kind) == (b"get", [b"a"], "missing-on-target")


def test_core_replica_not_ready_is_not_compared(tmp_path):
    """While the tracker says the replica is not ready (loading, link down), reads go to the source alone and count as skipped."""
    c = _repl_core(tmp_path, Phase.MIRRORING, REPLICATION, ready=False)
    c.send(["GET", "a"])
    c.accept()
    assert c.sent(SOURCE) == resp(["GET", "a"]) and c.sent(TARGET) == b""
    assert c.host.stats.lag_skipped == 1


def test_core_read_your_writes_redirects_until_the_replica_has_the_write(tmp_path):
    """Reads-on-target: after the connection's write, its reads go to the source until the replica's offset reaches the source's offset read after the acknowledgement."""
    c = _repl_core(tmp_path, Phase.READS_ON_TARGET, REPLICATION)
    tr = c.host.tracker
    c.send(["GET", "a"])
    c.accept()
    assert c.sent(TARGET) == resp(["GET", "a"])  # no write yet: the replica answers
    assert c.sent(SOURCE) == resp(["GET", "a"])  # (compared against the source)
    c.reply(TARGET, b"$-1\r\n")
    c.reply(SOURCE, b"$-1\r\n")
    c.answered()
    c.send(["SET", "a", "1"], ["GET", "a"])  # the read pipelined behind the unacknowledged write
    assert c.sent(SOURCE) == resp(["SET", "a", "1"], ["GET", "a"]) and c.sent(TARGET) == b""
    c.reply(SOURCE, b"+OK\r\n$1\r\n1\r\n")
    assert c.answered() == b"+OK\r\n$1\r\n1\r\n"
    c.send(["GET", "a"])  # acknowledged, but no offset read since: still the source
    assert c.sent(SOURCE) == resp(["GET", "a"])
    c.reply(SOURCE, b"$1\r\n1\r\n")
    tr.set_primary(150, "id", at=time.monotonic())  # the source's offset, read after the write
    tr.set_replica(120, "id", link_up=True, loading=False, is_replica=True, at=time.monotonic())
    c.send(["GET", "a"])
    assert c.sent(SOURCE) == resp(["GET", "a"])  # the replica is behind it
    c.reply(SOURCE, b"$1\r\n1\r\n")
    tr.set_replica(150, "id", link_up=True, loading=False, is_replica=True, at=time.monotonic())
    c.send(["GET", "a"])
    assert c.sent(TARGET) == resp(["GET", "a"]) and c.sent(SOURCE) == resp(["GET", "a"])  # back on the replica
    assert c.host.stats.ryw_redirects == 3


def test_core_reverse_replication_sends_nothing_to_the_source(tmp_path):
    """Writes-on-target with the source replicating the target: writes, reads and connection state go to the target only."""
    c = _repl_core(tmp_path, Phase.WRITES_ON_TARGET, REVERSE_REPLICATION)
    c.send(["SELECT", "0"], ["SET", "a", "1"], ["GET", "a"], ["PUBLISH", "ch", "m"])
    c.accept()
    assert c.sent(SOURCE) == b""
    assert c.sent(TARGET) == resp(["SELECT", "0"], ["SET", "a", "1"], ["GET", "a"], ["PUBLISH", "ch", "m"])
