"""Issue 10, C2/C3/C6/C9: commands the shim must route or rewrite deliberately, on real servers.

RESTORE of a payload one side cannot read, pub/sub counts after the read cutover, server-level
commands (CLIENT KILL, CONFIG SET...) and SCRIPT KILL of a script running on both sides.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import redis

from migrator.phases import Phase
from migrator.shim import list_dirty
from tests.test_shim_e2e import wait_for

DOCS = Path(__file__).resolve().parent.parent / "docs" / "shim.md"



def dirty(env):
    env.flush()
    return [(d.db, d.key, d.reason) for d in list_dirty(env.pb.state_path)]


def divergences(env):
    return sum(env.stats().divergences.values())


def rdb_version(payload: bytes) -> int:
    return int.from_bytes(payload[-10:-8], "little")


def fill(c):
    """One key of each copied type, two with a TTL."""
    c.set("s", "string value", ex=1000)
    c.hset("h", mapping={"f1": "v1", "f2": "v2"})
    c.rpush("l", "a", "b", "a")
    c.sadd("set", "x", "y", "z")
    c.zadd("z", {"m1": 1.5, "m2": -2.25, "m3": 1e300})
    c.pexpire("z", 500_000)


def snapshot(c, key):
    t = c.type(key).decode()
    value = {"string": lambda: c.get(key), "hash": lambda: c.hgetall(key), "list": lambda: c.lrange(key, 0, -1),
             "set": lambda: sorted(c.smembers(key)), "zset": lambda: c.zrange(key, 0, -1, withscores=True),
             "none": lambda: None}[t]()
    return t, value


@pytest.mark.parametrize("phase", [Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET])
def test_restore_of_a_dump_taken_through_the_shim_succeeds_and_reaches_both_sides(pair, make_env, phase):
    """After the read cutover DUMP is answered by Valkey; RESTOREing it through the shim succeeds and both sides end with the key, TTL included."""
    env = make_env(*pair)
    env.walk_to(phase)
    c = env.client()
    fill(c)
    time.sleep(0.2)
    src, tgt = env.source.client(), env.target.client()
    for key in ("s", "h", "l", "set", "z"):
        payload = c.dump(key)
        assert rdb_version(payload) >= 11, "the DUMP was answered by the target (Valkey)"
        with pytest.raises(redis.ResponseError, match="payload version"):
            src.restore("probe", 0, payload)  # what the source itself says to this payload
        assert c.restore(f"copy:{key}", 0, payload)
        assert c.restore(f"ttl:{key}", 300_000, payload, replace=True)
        for k in (f"copy:{key}", f"ttl:{key}"):
            assert snapshot(src, k) == snapshot(tgt, k) == snapshot(c, key), k
            assert snapshot(src, k)[0] != "none"
        assert src.pttl(f"copy:{key}") == -1 and tgt.pttl(f"copy:{key}") == -1
        assert abs(src.pttl(f"ttl:{key}") - tgt.pttl(f"ttl:{key}")) < 1000 and src.pttl(f"ttl:{key}") > 290_000
    # RESTORE over an existing key without REPLACE: the same BUSYKEY as the server, nothing copied.
    with pytest.raises(redis.ResponseError, match="BUSYKEY"):
        c.restore("copy:h", 0, c.dump("s"))
    assert src.type("copy:h") == tgt.type("copy:h") == b"hash"
    assert dirty(env) == [] and divergences(env) == 0


def test_restore_by_copy_works_for_a_resp3_client(server_factory, make_env):
    """A RESP3 client's RESTORE of a Valkey payload in reads-on-target succeeds, reaches the source, and the connection goes on."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    env.walk_to(Phase.READS_ON_TARGET)
    c = env.client(protocol=3)
    c.zadd("z", {"a": 1, "b": 2})
    payload = c.dump("z")
    assert rdb_version(payload) == 80
    assert c.restore("z2", 0, payload)
    assert [tuple(x) for x in c.zrange("z2", 0, -1, withscores=True)] == [(b"a", 1.0), (b"b", 2.0)]
    assert env.source.client().zrange("z2", 0, -1, withscores=True) == [(b"a", 1.0), (b"b", 2.0)]
    assert c.incr("after") == 1
    assert dirty(env) == [] and divergences(env) == 0


def test_restore_of_a_target_payload_in_mirroring_is_refused_like_the_source_would(server_factory, make_env):
    """While the source answers reads and writes, a Valkey payload gets Redis's own refusal, and the target stays untouched."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    tgt = env.target.client()
    tgt.set("orig", "v")
    payload = tgt.dump("orig")
    env.walk_to(Phase.MIRRORING)
    c = env.client()
    with pytest.raises(redis.ResponseError, match="payload version"):
        c.restore("k", 0, payload)
    time.sleep(0.2)
    assert tgt.exists("k") == 0 and env.source.client().exists("k") == 0
    assert dirty(env) == [] and divergences(env) == 0


def test_restore_of_a_source_payload_in_mirroring_is_mirrored_as_sent(server_factory, make_env):
    """A payload both sides read (Redis 7.0 → Valkey 9.1) is RESTOREd on both as sent, with an absolute TTL."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    env.walk_to(Phase.MIRRORING)
    c = env.client()
    c.hset("h", mapping={"a": "1"})
    assert c.restore("h2", 100_000, c.dump("h"))
    time.sleep(0.2)
    src, tgt = env.source.client(), env.target.client()
    assert src.hgetall("h2") == tgt.hgetall("h2") == {b"a": b"1"}
    assert abs(src.pttl("h2") - tgt.pttl("h2")) < 1000
    assert dirty(env) == [] and divergences(env) == 0


# --- C3: pub/sub after the read cutover ---------------------------------------------------------


def test_publish_and_pubsub_counts_report_the_subscribers_on_either_side(pair, make_env):
    """In reads-on-target PUBLISH and PUBSUB NUMSUB/NUMPAT/CHANNELS report the subscribers the clients see, wherever they sit."""
    env = make_env(*pair)
    env.walk_to(Phase.MIRRORING)
    old = env.client().pubsub()
    old.subscribe("news")  # lands on the source (reads are on the source while mirroring)
    wait_for(lambda: env.source.client().pubsub_numsub("news") == [(b"news", 1)], what="subscriber on the source")
    env.set_phase(Phase.READS_ON_TARGET)
    new = env.client().pubsub()
    new.subscribe("news")
    new.psubscribe("n*")
    wait_for(lambda: env.target.client().pubsub_numsub("news") == [(b"news", 1)], what="subscriber on the target")
    c = env.client()
    assert c.publish("news", "hello") == 3  # two channel subscribers (one per side) and one pattern
    assert c.pubsub_numsub("news", "other") == [(b"news", 2), (b"other", 0)]
    assert c.pubsub_numpat() == 1
    assert sorted(c.pubsub_channels()) == [b"news"]
    r3 = env.client(protocol=3)
    assert r3.execute_command("PUBSUB", "NUMSUB", "news") in ({b"news": 2}, [b"news", 2])
    msgs = []
    for p in (old, new):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            m = p.get_message(timeout=0.2)
            if m and m["type"] in ("message", "pmessage"):
                msgs.append(m["type"])
            if len(msgs) == 3:
                break
    assert sorted(msgs) == ["message", "message", "pmessage"]
    old.close()
    new.close()


def test_client_kill_of_a_subscriber_on_the_target_ends_that_subscriber(pair, make_env):
    """CLIENT KILL ID of a subscriber found in CLIENT LIST through the shim ends the subscriber even though it streams from the target."""
    env = make_env(*pair)
    env.walk_to(Phase.READS_ON_TARGET)
    sub = env.client(client_name="victim").pubsub()
    sub.subscribe("ch")
    wait_for(lambda: env.target.client().pubsub_numsub("ch") == [(b"ch", 1)], what="subscriber on the target")
    c = env.client()
    ids = [x["id"] for x in c.client_list() if x["name"] == "victim"]
    assert len(ids) == 1
    assert c.client_kill_filter(_id=ids[0]) == 1
    wait_for(lambda: env.target.client().pubsub_numsub("ch") == [(b"ch", 0)], what="subscriber gone from the target")
    assert c.publish("ch", "m") == 0
    sub.close()


# --- C6: commands about the server -----------------------------------------------------------


def test_client_kill_by_type_is_refused_and_other_clients_keep_their_connections(pair, make_env):
    """CLIENT KILL TYPE normal (and USER/LADDR/MAXAGE) is refused with a clear error; no shim upstream connection dies, nothing is dirty."""
    env = make_env(*pair)
    c = env.client()
    with pytest.raises(redis.ResponseError, match="would also kill"):
        c.execute_command("CLIENT", "KILL", "TYPE", "normal")  # refused in passthrough phases too
    env.walk_to(Phase.MIRRORING)
    other = env.client()
    other.set("k", 0)
    for args in (("TYPE", "normal"), ("TYPE", "pubsub"), ("USER", "default"), ("SKIPME", "yes"),
                 ("ID", "1", "TYPE", "normal")):
        with pytest.raises(redis.ResponseError, match="would also kill the shim's own connections"):
            c.execute_command("CLIENT", "KILL", *args)
    for _ in range(50):
        other.incr("k")
    time.sleep(0.2)
    assert env.source.client().get("k") == env.target.client().get("k") == b"50"
    assert env.stats().connections == 2  # neither client was disconnected
    assert dirty(env) == [] and divergences(env) == 0


def test_config_set_through_the_shim_holds_after_the_read_cutover(pair, make_env):
    """CONFIG SET notify-keyspace-events reaches both sides, so keyspace events still come after the read cutover."""
    env = make_env(*pair)
    env.walk_to(Phase.MIRRORING)
    c = env.client()
    assert c.config_set("notify-keyspace-events", "KEA")
    assert env.source.client().config_get("notify-keyspace-events")["notify-keyspace-events"] in ("AKE", "KEA")
    assert env.target.client().config_get("notify-keyspace-events")["notify-keyspace-events"] in ("AKE", "KEA")
    env.set_phase(Phase.READS_ON_TARGET)
    p = env.client().pubsub()
    p.psubscribe("__keyspace@0__:*")  # lands on the target now
    wait_for(lambda: env.target.client().pubsub_numpat() == 1, what="pattern subscriber on the target")
    c.set("watched", "1")
    got = None
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and got is None:
        m = p.get_message(timeout=0.2)
        if m and m["type"] == "pmessage":
            got = m
    assert got is not None and got["channel"] == b"__keyspace@0__:watched"
    p.close()


def test_config_set_one_side_refuses_is_counted_not_silent(server_factory, make_env):
    """A CONFIG SET the other side refuses is answered by the write side and counted as a shadow refusal."""
    env = make_env(server_factory("redis-6.2"), server_factory("valkey-8.1"))
    env.walk_to(Phase.WRITES_ON_TARGET)  # the write side is Valkey, which knows the parameter
    c = env.client()
    assert c.config_set("busy-reply-threshold", "4000")
    assert env.target.client().config_get("busy-reply-threshold")["busy-reply-threshold"] == "4000"
    assert env.stats().shadow_failures[("source", "refused")] == 1


@pytest.mark.parametrize("args", [("SHUTDOWN",), ("DEBUG", "SLEEP", "0"), ("CLIENT", "PAUSE", "100"),
                                  ("ACL", "SETUSER", "bob", "on"), ("MODULE", "LOAD", "/nope.so"),
                                  ("REPLICAOF", "127.0.0.1", "1"), ("FAILOVER",)])
def test_server_commands_that_would_bypass_the_migration_are_refused(server_factory, make_env, args):
    """SHUTDOWN, DEBUG, CLIENT PAUSE, ACL SETUSER, MODULE LOAD, REPLICAOF, FAILOVER get a one-line refusal and reach no server."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    env.walk_to(Phase.MIRRORING)
    with pytest.raises(redis.ResponseError, match=r"migrator shim: .* is not supported through the shim"):
        env.client().execute_command(*args)
    assert env.source.client().ping() and env.target.client().ping()
    assert b"bob" not in env.source.client().acl_users() + env.target.client().acl_users()


def test_every_server_command_decision_is_in_the_docs_table():
    """docs/shim.md lists each row of commands.SERVER_COMMANDS with the same decision."""
    from migrator.shim.commands import SERVER_COMMANDS

    text = DOCS.read_text()
    words = {"server-both": "both sides", "pubsub-count": "both sides, added up", "admin": "write side only",
             "unsupported": "refused", "write": "both sides (data)"}
    for (name, sub), (cls, _why) in SERVER_COMMANDS.items():
        label = (name + (b" " + sub if sub else b"")).decode().upper()
        row = re.search(rf"^\| `{re.escape(label)}` \| ([^|]+) \|", text, re.M)
        assert row is not None, f"{label} missing from the docs table"
        assert row.group(1).strip() == words[cls.value], label


# --- C9: SCRIPT KILL of a script that runs on both sides -------------------------------------

BUSY = {"lua-time-limit": "100"}


@pytest.mark.parametrize("phase", [Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET])
def test_script_kill_stops_the_script_on_every_side_and_others_get_busy_not_a_wait(server_factory, make_env, phase):
    """A keyless busy script killed through the shim stops on both servers; meanwhile other clients get -BUSY within a bound, and dirty/divergence counts stay small."""
    env = make_env(server_factory("redis-7.0", config=BUSY), server_factory("valkey-9.1", config=BUSY),
                   shim={"shadow_timeout": "300ms"})
    env.walk_to(phase)
    runner = client(env, 30)
    result = {}

    def run():
        try:
            result["reply"] = runner.eval("local i = 0 while true do i = i + 1 end", 0)
        except redis.ResponseError as e:
            result["reply"] = e

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    other = client(env, 10)
    started = time.monotonic()
    with pytest.raises(redis.ResponseError, match="BUSY"):
        p = other.pipeline(transaction=True)
        p.incr("counter")
        p.execute()
    assert time.monotonic() - started < 3, "the transaction waited inside the shim instead of getting -BUSY"
    killer = env.client()
    assert killer.script_kill()
    t.join(10)
    assert not t.is_alive() and "killed" in str(result["reply"]).lower()
    wait_for(lambda: _pings(env.source) and _pings(env.target), timeout=5, what="both servers answer again")
    # Both servers are free again: a transaction through the shim works and is mirrored.
    wait_for(lambda: _try_incr(other), timeout=5, what="writes through the shim work again")
    time.sleep(0.3)
    assert env.source.client().get("counter") == env.target.client().get("counter")
    # At most one mark: the other side's run of the keyless script outlived shadow_timeout
    # (mirroring, writes-on-target), which marks its database; no divergence, no refusal.
    marks = dirty(env)
    assert len(marks) <= 1 and all(reason == "timeout" for _db, _key, reason in marks), marks
    assert divergences(env) == 0
    assert not any(reason == "refused" for _side, reason in env.stats().shadow_failures)


def client(env, timeout: float) -> redis.Redis:
    c = redis.Redis(port=env.port, socket_timeout=timeout)
    env.clients.append(c)
    return c


def _pings(server) -> bool:
    try:
        return server.client().ping()
    except redis.ResponseError:
        return False


def _try_incr(c) -> bool:
    try:
        c.incr("counter")
        return True
    except redis.ResponseError:
        return False


# --- the pure parts ------------------------------------------------------------------------


def test_combined_replies_add_up_both_sides_in_resp2_and_resp3():
    """PUBLISH/NUMPAT add up, NUMSUB adds per channel (array or map), CHANNELS is a union, KILL is OK if either killed."""
    from migrator.shim.server_cmds import combine

    assert combine([b"PUBLISH", b"c", b"m"], b":1\r\n", b":2\r\n") == b":3\r\n"
    assert combine([b"PUBSUB", b"NUMPAT"], b":0\r\n", b":4\r\n") == b":4\r\n"
    assert combine([b"PUBSUB", b"NUMSUB", b"a", b"b"], b"*4\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n:0\r\n",
                   b"*4\r\n$1\r\na\r\n:2\r\n$1\r\nb\r\n:5\r\n") == b"*4\r\n$1\r\na\r\n:3\r\n$1\r\nb\r\n:5\r\n"
    assert combine([b"PUBSUB", b"NUMSUB", b"a"], b"%1\r\n$1\r\na\r\n:1\r\n", b"%1\r\n$1\r\na\r\n:1\r\n") == \
        b"%1\r\n$1\r\na\r\n:2\r\n"
    assert combine([b"PUBSUB", b"CHANNELS"], b"*2\r\n$1\r\na\r\n$1\r\nb\r\n", b"*2\r\n$1\r\nb\r\n$1\r\nc\r\n") == \
        b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"
    assert combine([b"SCRIPT", b"KILL"], b"-NOTBUSY No scripts\r\n", b"+OK\r\n") == b"+OK\r\n"
    assert combine([b"FUNCTION", b"KILL"], b"-NOTBUSY a\r\n", b"-NOTBUSY b\r\n") == b"-NOTBUSY a\r\n"
    assert combine([b"CONFIG", b"SET", b"x", b"y"], b"+OK\r\n", b"-ERR Unknown option\r\n") == b"+OK\r\n"
    assert combine([b"PUBLISH", b"c", b"m"], b"-ERR x\r\n", b":2\r\n") == b"-ERR x\r\n"


@pytest.mark.parametrize("args, refused", [
    ([b"CLIENT", b"KILL", b"127.0.0.1:5000"], False),
    ([b"CLIENT", b"KILL", b"ID", b"7"], False),
    ([b"CLIENT", b"KILL", b"ADDR", b"127.0.0.1:5000", b"SKIPME", b"no"], False),
    ([b"CLIENT", b"KILL", b"TYPE", b"normal"], True),
    ([b"CLIENT", b"KILL", b"ID", b"7", b"LADDR", b"127.0.0.1:6379"], True),
    ([b"CLIENT", b"KILL", b"MAXAGE", b"10"], True),
    ([b"CLIENT", b"KILL", b"SKIPME", b"yes"], True),
])
def test_client_kill_is_accepted_only_when_it_names_one_connection(args, refused):
    """CLIENT KILL by ID, ADDR or the old ip:port form goes on; filters that match many connections are refused."""
    from migrator.shim.server_cmds import client_kill_refusal

    assert (client_kill_refusal(args) is not None) == refused


def test_rdb_versions_and_what_each_server_reads():
    """The RDB version comes from INFO server; Redis reads only up to its own, Valkey 9 reads Redis's older formats."""
    from migrator.shim.restore import can_read, rdb_version_of

    assert rdb_version_of({"redis_version": "6.2.14"}) == 9
    assert rdb_version_of({"redis_version": "7.0.15"}) == 10
    assert rdb_version_of({"redis_version": "7.4.1"}) == 12
    assert rdb_version_of({"redis_version": "7.2.4", "server_name": "valkey", "valkey_version": "8.1.1"}) == 11
    assert rdb_version_of({"redis_version": "7.2.4", "server_name": "valkey", "valkey_version": "9.1.2"}) == 80
    assert rdb_version_of({"redis_version": "4.0.0"}) is None
    assert can_read(10, 9) and not can_read(10, 11) and not can_read(9, 80)
    assert can_read(80, 10) and can_read(11, 11) and can_read(None, 80)


def test_restore_effect_rebuilds_each_type_with_an_absolute_expiry():
    """The other side's commands for a restored key: DEL, the type's writes in chunks, PEXPIREAT; None for a stream."""
    from migrator.shim import restore

    assert restore.effect(b"k", [b"string", 1000, 500, [b"v"]]) == [[b"DEL", b"k"], [b"SET", b"k", b"v"],
                                                                   [b"PEXPIREAT", b"k", b"1500"]]
    assert restore.effect(b"z", [b"zset", 1, -1, [b"m", b"1.5"]]) == [[b"DEL", b"z"], [b"ZADD", b"z", b"1.5", b"m"]]
    assert restore.effect(b"h", [b"hash", 1, -1, [b"f", b"v"]]) == [[b"DEL", b"h"], [b"HSET", b"h", b"f", b"v"]]
    big = restore.effect(b"l", [b"list", 1, -1, [b"%d" % i for i in range(1200)]])
    assert [c[0] for c in big] == [b"DEL", b"RPUSH", b"RPUSH", b"RPUSH"]
    assert sum(len(c) - 2 for c in big[1:]) == 1200
    assert restore.effect(b"s", [b"stream", 1, -1, []]) is None
    assert restore.effect(b"s", [b"none", 1, -2, []]) == [[b"DEL", b"s"]]


def test_a_lifted_barrier_lets_later_requests_through_and_is_still_released_cleanly():
    """A keyless script's barrier stops fencing after lift_after; later requests and barriers are granted, and releasing it leaves nothing held."""
    from migrator.shim.sequencer import GRANTED, Request, Sequencer

    timers = []
    seq = Sequencer(call_later=lambda delay, fn: timers.append((delay, fn)))
    granted = []
    barrier = Request("script", [], granted.append)
    barrier.lift_after = 0.5
    assert seq.acquire(barrier)
    write = Request("other", [(b"k", True)], granted.append)
    assert not seq.acquire(write)
    other_barrier = Request("flush", [], granted.append)
    assert not seq.acquire(other_barrier)
    assert [d for d, _ in timers] == [0.5]
    timers[0][1]()  # the script has run for lift_after
    assert write.state == GRANTED and write in granted
    seq.release(write)
    assert other_barrier.state == GRANTED  # waits for no lifted barrier
    seq.release(other_barrier)
    seq.release(barrier)
    assert seq.stats()["held"] == 0 and seq.stats()["waiting"] == 0 and not seq.barrier_held


@pytest.mark.parametrize("phase", list(Phase))
def test_server_commands_and_pubsub_counts_reach_every_side_the_phase_uses(phase):
    """PUBLISH, PUBSUB counts and both-sides server commands go to both sides (replies combined) exactly when the phase uses both."""
    from migrator.shim.commands import Cls
    from migrator.shim.routing import ROUTES

    both = ROUTES[phase][Cls.WRITE].shadow is not None
    for cls in (Cls.PUBLISH, Cls.PUBSUB_COUNT, Cls.SERVER_BOTH):
        plan = ROUTES[phase][cls]
        assert plan.answer == ROUTES[phase][Cls.WRITE].answer
        assert (plan.shadow is not None) == both and plan.combine == both


def test_spublish_reports_shard_subscribers_on_the_target_when_the_source_lacks_sharded_pubsub(server_factory, make_env):
    """Redis 6.2 has no SPUBLISH: in reads-on-target the shard subscriber on Valkey is counted instead of the source's error."""
    env = make_env(server_factory("redis-6.2"), server_factory("valkey-8.1"))
    env.walk_to(Phase.READS_ON_TARGET)
    sub = env.client().pubsub()
    sub.ssubscribe("sch")
    wait_for(lambda: env.target.client().execute_command("PUBSUB", "SHARDNUMSUB", "sch") == [b"sch", 1],
             what="shard subscriber on the target")
    c = env.client()
    assert c.execute_command("SPUBLISH", "sch", "m") == 1
    assert c.execute_command("PUBSUB", "SHARDNUMSUB", "sch") == [b"sch", 1]
    sub.close()


def test_a_subscriber_stays_subscribed_when_the_other_side_goes_down(server_factory, make_env):
    """While mirroring, a subscriber on the source is not disconnected when the target dies; PUBLISH still reaches it and counts it."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    env.walk_to(Phase.MIRRORING)
    sub = env.client().pubsub()
    sub.subscribe("ch")
    wait_for(lambda: env.source.client().pubsub_numsub("ch") == [(b"ch", 1)], what="subscriber on the source")
    env.target.stop()
    time.sleep(0.3)
    assert env.client().publish("ch", "after") == 1
    got = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not got:
        m = sub.get_message(timeout=0.2)
        if m and m["type"] == "message":
            got.append(m["data"])
    assert got == [b"after"]
    sub.close()


def test_restore_of_a_stream_the_source_cannot_read_is_marked_dirty_not_lost(server_factory, make_env):
    """A stream is not copied by type: RESTORE succeeds on the target and the key is marked dirty on the source (restore-not-copied)."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    env.walk_to(Phase.READS_ON_TARGET)
    c = env.client()
    c.xadd("st", {"f": "v"}, id="1-1")
    assert c.restore("st2", 0, c.dump("st"))
    assert env.target.client().xrange("st2") == [(b"1-1", {b"f": b"v"})]
    assert (0, b"st2", "restore-not-copied") in dirty(env)
