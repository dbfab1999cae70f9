"""The shim as a cluster facade: real local clusters on either side (tests/topologies.py)."""

from __future__ import annotations

import threading
import time
from typing import Self

import pytest
import redis

from migrator.cluster import key_slot
from migrator.phases import Phase

pytestmark = pytest.mark.timeout(300)


def _cluster_client(env, **kw) -> redis.RedisCluster:
    c = redis.RedisCluster(host="127.0.0.1", port=env.port, socket_timeout=10, **kw)
    env.clients.append(c)
    return c


@pytest.fixture(scope="module")
def small_pair():
    """A Redis 7.0 cluster and a Valkey 8.1 cluster (3 primaries each, no replicas) shared by the
    tests that write keys of their own and need no particular layout (starting clusters is most
    of a test's time); each test has a shim of its own."""
    from migrator import servers
    from tests import topologies

    for label in ("redis-7.0", "valkey-8.1"):
        if servers.find(label) is None:
            pytest.skip(f"no {label} binary here")
    source = topologies.start_cluster("redis-7.0", primaries=3, replicas=0)
    try:
        target = topologies.start_cluster("valkey-8.1", primaries=3, replicas=0)
    except BaseException:
        source.stop()
        raise
    yield source, target
    target.stop()
    source.stop()


def test_redis_cluster_client_works_through_the_shim_in_every_phase(cluster_factory, make_env):
    """redis-py's RedisCluster sees the shim as a one-node cluster and its SET/GET/MGET/pipeline/transaction in one slot reach both clusters in every two-sided phase."""
    source = cluster_factory("redis-7.0", primaries=3, replicas=1)
    target = cluster_factory("valkey-9.1", primaries=4, replicas=1)
    env = make_env(source, target)
    rc = _cluster_client(env)
    assert [(n.host, n.port) for n in rc.get_nodes()] == [("127.0.0.1", env.port)]
    # planned: the source alone, on the shim's shared connections to its router
    assert rc.set("planned:k", "p") and rc.get("planned:k") == b"p"
    with source.cluster_client() as c:
        assert c.get("planned:k") == b"p"
    env.set_phase(Phase.MIRRORING)
    for phase in (Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET):
        if phase is not Phase.MIRRORING:
            env.set_phase(phase)
        p = phase.value
        for i in range(200):
            assert rc.set(f"{p}:k{i}", i)
        assert rc.get(f"{p}:k7") == b"7"
        assert rc.mset({f"{{{p}}}:a": 1, f"{{{p}}}:b": 2})
        assert rc.mget(f"{{{p}}}:a", f"{{{p}}}:b") == [b"1", b"2"]
        pipe = rc.pipeline(transaction=False)
        for i in range(50):
            pipe.incr(f"{p}:ctr{i}")
        assert pipe.execute() == [1] * 50
        tx = rc.pipeline(transaction=True)
        tx.set(f"{{{p}}}:t1", "x").incr(f"{{{p}}}:t2").get(f"{{{p}}}:t1")
        assert tx.execute() in ([True, 1, b"x"], [b"OK", 1, b"x"])  # redis-py's cluster transaction leaves SET raw
        for cl in (source, target):
            with cl.cluster_client() as c:
                assert c.get(f"{p}:k199") == b"199"
                assert c.get(f"{p}:ctr49") == b"1"
                assert c.mget(f"{{{p}}}:t1", f"{{{p}}}:t2") == [b"x", b"1"]
    env.set_phase(Phase.COMPLETED)
    assert rc.set("completed:k", "c") and rc.get("completed:k") == b"c"
    with target.cluster_client() as c:
        assert c.get("completed:k") == b"c"
    assert env.stats().topology_changes == {} or sum(env.stats().topology_changes.values()) == 0


def test_crossslot_is_answered_as_a_cluster_node_answers_it(small_pair, make_env):
    """A multi-key command or script across slots gets exactly the error a real node gives, and changes neither side."""
    source, target = small_pair
    env = make_env(source, target)
    env.set_phase(Phase.MIRRORING)
    assert key_slot("a") != key_slot("b")
    shim = env.client()
    node = source.node_client(source.primaries()[0])
    try:
        for cmd in (("MSET", "a", "1", "b", "2"), ("MGET", "a", "b"), ("EVAL", "return 1", "2", "a", "b")):
            with pytest.raises(redis.ResponseError) as direct:
                node.execute_command(*cmd)
            with pytest.raises(redis.ResponseError) as through:
                shim.execute_command(*cmd)
            assert str(through.value) == str(direct.value) == "Keys in request don't hash to the same slot"
        with pytest.raises(redis.ResponseError, match="SELECT is not allowed in cluster mode"):
            shim.execute_command("SELECT", "1")
    finally:
        node.close()
    for cl in (source, target):
        with cl.cluster_client() as c:
            assert c.exists("a", "b") == 0
    assert env.stats().crossslot["source"] >= 3


def test_standalone_source_to_cluster_target_counts_what_would_fail(server_factory, cluster_factory, make_env):
    """A standalone source with a cluster target: plain clients keep working, every single-slot write reaches the target, and commands the target refuses with CROSSSLOT are counted and their keys dirty."""
    source = server_factory("redis-7.0")
    target = cluster_factory("valkey-9.1", primaries=3, replicas=0)
    env = make_env(source, target)
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    for i in range(300):
        c.set(f"k{i}", i)
    assert c.mset({"a": 1, "b": 2})  # the source takes it; the target would refuse it
    assert c.get("a") == b"1"
    assert c.dbsize() == 302
    env.flush()
    with target.cluster_client() as tc:
        assert all(tc.get(f"k{i}") == str(i).encode() for i in range(300))
    assert env.stats().crossslot["target"] == 1
    dirty = env.thread.call(lambda: env.thread.shim.dirty.is_dirty(0, [b"a"]))
    assert dirty
    env.set_phase(Phase.READS_ON_TARGET)
    assert c.get("k5") == b"5"
    env.set_phase(Phase.WRITES_ON_TARGET)
    assert c.dbsize() == 300  # the target answers: DBSIZE summed over its primaries (MSET a b never reached it)
    # SCAN walks every primary of the target with one composite cursor: each key once.
    scanned = list(c.scan_iter("k1*", count=7))
    assert sorted(scanned) == sorted(f"k{i}".encode() for i in range(300) if str(i).startswith("1"))
    assert sorted(c.keys("k2?")) == sorted(f"k{i}".encode() for i in range(20, 30))  # merged over the primaries
    assert c.flushall()  # every primary of the target, and the source
    assert c.dbsize() == 0
    with target.cluster_client() as tc:
        assert tc.dbsize() == 0  # (redis-py sums it over the primaries)


class Ledger:
    """A writer through the shim's facade (RedisCluster): every acknowledged write recorded."""

    def __init__(self, env, prefix: str) -> None:
        self.rc = _cluster_client(env)
        self.prefix = prefix
        self.acked: dict[str, int] = {}
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            key = f"{self.prefix}:{i % 400}"
            try:
                self.rc.set(key, i)
                self.acked[key] = i
            except redis.RedisError:
                self.errors += 1
            i += 1

    def __enter__(self) -> Self:
        self.thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)

    def lost_on(self, cluster, dirty) -> list[str]:
        """Acknowledged writes whose last value the cluster lacks (dirty keys excepted: repaired by sync)."""
        with cluster.cluster_client() as c:
            values = dict(zip(self.acked, c.mget_nonatomic(list(self.acked))))
        return [k for k, v in self.acked.items()
                if values[k] != str(v).encode() and not dirty(k)]


def _dirty(env):
    return lambda k: env.thread.call(lambda: env.thread.shim.dirty.is_dirty(0, [k.encode()]))


@pytest.mark.parametrize("target_label", ["valkey-9.1", "valkey-8.1"])
def test_a_slot_migrated_on_the_target_during_mirroring_loses_no_write(cluster_factory, make_env, target_label):
    """A slot moved between target primaries while a writer runs through the shim: every acknowledged write is on both sides (or its key dirty) and the change is recorded."""
    source = cluster_factory("redis-7.0", primaries=3, replicas=0)  # (replicas play no part here: quicker)
    target = cluster_factory(target_label, primaries=4, replicas=0)
    env = make_env(source, target)
    env.set_phase(Phase.MIRRORING)
    slot = key_slot("mig:1")
    counter = "{mig:1}:counter"  # in the slot that moves (twice): pipelined INCRs, none lost, none applied twice
    incrs = {"acked": 0}
    stop = threading.Event()

    def incr() -> None:
        rc = _cluster_client(env)
        while not stop.is_set():
            pipe = rc.pipeline(transaction=False)
            for _ in range(10):
                pipe.incr(counter)
            try:
                pipe.execute()
                incrs["acked"] += 10
            except redis.RedisError:
                pass

    t = threading.Thread(target=incr, daemon=True)
    with Ledger(env, "mig") as ledger:
        t.start()
        owner = target.owner(slot)
        dest = next(n for n in target.primaries() if n is not owner)
        target.migrate_slot(slot, dest, batch=5)
        # ... and on to a third primary (not back: the slot map must end different).
        target.migrate_slot(slot, next(n for n in target.primaries() if n is not owner and n is not dest))
        time.sleep(1.5)
        stop.set()
        t.join(30)
    env.flush()
    assert len(ledger.acked) >= 400 and incrs["acked"] >= 100
    assert ledger.lost_on(source, lambda k: False) == []
    assert ledger.lost_on(target, _dirty(env)) == []
    with source.cluster_client() as sc, target.cluster_client() as tc:
        assert int(sc.get(counter)) == incrs["acked"]
        assert int(tc.get(counter)) == incrs["acked"] or _dirty(env)(counter)
    status = env.thread.call(env.thread.shim.status)
    assert status["topology_changes"]["target"] >= 1 and status["topology_changes"]["last"]
    assert status["cluster"]["target"]["redirects"]["moved"] + status["cluster"]["target"]["redirects"]["ask"] >= 1


def test_a_source_failover_during_reads_on_target_loses_no_write(cluster_factory, make_env):
    """A source primary failed over (CLUSTER FAILOVER) while a writer runs in reads-on-target: 0 acknowledged writes lost on either side."""
    source = cluster_factory("redis-7.0", primaries=3, replicas=1)
    target = cluster_factory("valkey-9.1", primaries=4, replicas=0)
    env = make_env(source, target)
    env.walk_to(Phase.READS_ON_TARGET)
    with Ledger(env, "fo") as ledger:
        source.failover(source.owner(key_slot("fo:1")))
        time.sleep(1.5)
    env.flush()
    assert len(ledger.acked) >= 400
    assert ledger.lost_on(source, _dirty(env)) == []
    assert ledger.lost_on(target, _dirty(env)) == []
    assert env.thread.call(env.thread.shim.status)["topology_changes"]["source"] >= 1


def test_the_core_answers_cluster_and_readonly_itself_when_a_side_is_a_cluster(tmp_path):
    """With a cluster side, CLUSTER SLOTS/MYID/KEYSLOT and READONLY are answered by the shim (one node owning every slot) and sent to no side; COUNTKEYSINSLOT is forwarded."""
    from migrator.shim.commands import SOURCE, TARGET
    from migrator.shim.facade import Facade
    from tests.test_shim_core import Core, resp

    c = Core(tmp_path, Phase.MIRRORING)
    c.host.facade = Facade("shim-1", ("127.0.0.1", 6380))
    c.send(["CLUSTER", "SLOTS"], ["READONLY"], ["CLUSTER", "KEYSLOT", "foo"], ["CLUSTER", "MYID"])
    out = c.answered()
    node_id = c.host.facade.node_id
    assert out == (b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:6380\r\n$40\r\n" + node_id + b"\r\n"
                   + b"+OK\r\n" + b":%d\r\n" % key_slot("foo") + b"$40\r\n" + node_id + b"\r\n")
    assert c.sent(SOURCE) == c.sent(TARGET) == b""
    c.send(["CLUSTER", "COUNTKEYSINSLOT", "12182"])
    assert c.sent(SOURCE) == resp(["CLUSTER", "COUNTKEYSINSLOT", "12182"])
    c.send(["CLUSTER", "RESET"])
    c.reply(SOURCE, b":0\r\n")
    assert b"CLUSTER RESET is not supported through the shim" in c.answered()


def test_blocking_pubsub_watch_and_scripts_in_one_slot_work_through_the_facade(small_pair, make_env):
    """BLPOP woken by a push, WATCH/MULTI/EXEC, EVAL with keys in one slot, SCRIPT LOAD + EVALSHA and SUBSCRIBE/PUBLISH work through the shim with clusters on both sides."""
    source, target = small_pair
    env = make_env(source, target)
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    popped: list = []
    t = threading.Thread(target=lambda: popped.append(env.client().blpop(["{q}:list"], timeout=10)))
    t.start()
    time.sleep(0.3)
    c.rpush("{q}:list", "job")
    t.join(15)
    assert popped == [(b"{q}:list", b"job")]
    w = env.client()
    with w.pipeline() as p:
        p.watch("{w}:a")
        p.multi()
        p.set("{w}:a", "1").incr("{w}:b")
        assert p.execute() == [True, 1]
    assert c.eval("redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[2])", 2, "{s}:x", "{s}:y", "v") is None
    sha = c.script_load("return redis.call('INCR', KEYS[1])")
    assert c.evalsha(sha, 1, "{s}:n") == 1
    sub = env.client().pubsub()
    sub.subscribe("news")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    assert c.publish("news", "hello") >= 1
    msg = sub.get_message(timeout=5)
    assert msg is not None and msg["data"] == b"hello"
    sub.close()
    # The same connection subscribes, unsubscribes, then reads and writes keys in every slot.
    conn = env.client(protocol=2).connection_pool.get_connection()
    conn.send_command("SUBSCRIBE", "news")
    assert conn.read_response()[0] == b"subscribe"
    conn.send_command("UNSUBSCRIBE", "news")
    assert conn.read_response() == [b"unsubscribe", b"news", 0]
    for i in range(30):
        conn.send_command("SET", f"after-sub:{i}", i)
        assert conn.read_response() == b"OK"
    conn.disconnect()
    env.flush()
    for cl in (source, target):
        with cl.cluster_client() as cc:
            assert cc.llen("{q}:list") == 0
            assert cc.mget("{w}:a", "{w}:b") == [b"1", b"1"]
            assert cc.mget("{s}:x", "{s}:n") == [b"v", b"1"]
            assert cc.get("after-sub:29") == b"29"


def test_a_target_node_killed_during_mirroring_leaves_the_application_served_and_its_writes_dirty(
        cluster_factory, make_env):
    """A target primary killed (no replica to take over) while a writer runs in mirroring: the application keeps getting the source's answers, and the writes the target could not take are dirty, not lost."""
    source = cluster_factory("redis-7.0", primaries=3, replicas=0, password="s3cret")
    target = cluster_factory("valkey-9.1", primaries=3, replicas=0, password="s3cret")
    env = make_env(source, target)
    env.set_phase(Phase.MIRRORING)
    victim = target.owner(key_slot("dead:1"))
    (lo, hi), = next(s["slots"] for s in target.shards() if s["primary"] is victim)
    with Ledger(env, "dead") as ledger:
        victim.proc.kill()
        victim.proc.wait(10)
        time.sleep(1.2)
    env.flush()
    assert ledger.errors == 0  # the source answers in mirroring
    assert ledger.lost_on(source, lambda k: False) == []
    dirty = _dirty(env)
    orphaned = [k for k in ledger.acked if lo <= key_slot(k) <= hi]
    assert orphaned and all(dirty(k) for k in orphaned)
    assert env.thread.call(env.thread.shim.status)["sides"]["source"]["up"]



def test_a_transaction_whose_slot_moves_fails_without_revealing_a_node(small_pair, make_env):
    """WATCH, then the key's slot migrates on the answering side, then MULTI/SET/EXEC: the client gets TRYAGAIN and EXECABORT (as a cluster client expects, to retry), never a MOVED naming a real node, and nothing is applied."""
    source, target = small_pair
    env = make_env(source, target)
    env.set_phase(Phase.MIRRORING)
    conn = env.client(protocol=2).connection_pool.get_connection()
    conn.send_command("WATCH", "{t}k")
    assert conn.read_response() == b"OK"
    slot = key_slot("{t}k")
    source.migrate_slot(slot, next(n for n in source.primaries() if n is not source.owner(slot)))
    replies = []
    for cmd in (("MULTI",), ("SET", "{t}k", "1"), ("EXEC",)):
        conn.send_command(*cmd)
        try:
            replies.append(conn.read_response())
        except redis.ResponseError as e:
            replies.append((type(e).__name__, str(e)))
    conn.disconnect()
    assert replies[0] == b"OK"
    assert replies[1][0] == "TryAgainError" and "migrator shim: the slot is moving" in replies[1][1], replies
    assert replies[2][0] == "ExecAbortError", replies
    assert not any("127.0.0.1" in str(r) for r in replies), replies
    for cl in (source, target):
        with cl.cluster_client() as c:
            assert c.get("{t}k") is None


def test_a_cluster_side_none_of_whose_nodes_answers_stops_the_start_up(small_pair, make_playbook):
    """A cluster endpoint (seeds given) none of whose nodes answers stops the shim's start-up with an error (exit code 3) naming every seed tried, and leaves no thread behind."""
    from migrator import playbook, servers
    from migrator.errors import UnreachableError
    from migrator.shim import ShimThread

    source, _target = small_pair
    dead = [servers.free_port(), servers.free_port()]
    pb = playbook.load(make_playbook(source, "", target={"url": f"redis://127.0.0.1:{dead[0]}/0",
                                                          "seeds": [f"127.0.0.1:{dead[1]}"]}))
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(UnreachableError, match=f"127.0.0.1:{dead[0]}.*127.0.0.1:{dead[1]}"):
        ShimThread(pb).start()
    time.sleep(0.2)
    assert {t.name for t in threading.enumerate()} - before == set()
