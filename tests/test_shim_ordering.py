"""Writes from different client connections to one key reach both sides in the same order."""

from __future__ import annotations

import random
import threading

import pytest
import redis

from migrator.phases import Phase
from migrator.shim.commands import SOURCE, TARGET, parse_command_reply
from tests.test_shim_e2e import wait_for
from tests.test_shim_session import cmds, fake_shim

HOT = [f"hot:{i}" for i in range(3)]
TWO_SIDED = [Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET]


@pytest.fixture
def ordered_env(server_factory, make_env):
    return make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))


def enter(env, phase: Phase) -> None:
    for p in TWO_SIDED[: TWO_SIDED.index(phase) + 1]:
        env.set_phase(p)


def snapshot(r: redis.Redis) -> dict[bytes, object]:
    """Every key's value, by type (lists in order, sets and hashes as such)."""
    out: dict[bytes, object] = {}
    for k in r.scan_iter(count=1000):
        t = r.type(k)
        if t == b"string":
            out[k] = r.get(k)
        elif t == b"list":
            out[k] = r.lrange(k, 0, -1)
        elif t == b"hash":
            out[k] = r.hgetall(k)
        elif t == b"set":
            out[k] = r.smembers(k)
        elif t == b"zset":
            out[k] = r.zrange(k, 0, -1, withscores=True)
        else:
            out[k] = t
    return out


def run_clients(env, n: int, work) -> None:
    """``work(client, index)`` on ``n`` threads at once, each with its own connection; re-raises failures."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            c = redis.Redis(port=env.port, socket_timeout=10)
            start.wait(5)
            work(c, i)
            c.close()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]


def assert_same_everywhere(env) -> None:
    """Both servers hold the same data; nothing diverged and nothing is dirty."""
    env.flush()
    src, tgt = snapshot(env.source.client()), snapshot(env.target.client())
    assert src.keys() == tgt.keys()
    differing = {k: (src[k], tgt[k]) for k in src if src[k] != tgt[k]}
    assert not differing
    st = env.stats()
    assert st.compared > 0
    assert sum(st.divergences.values()) == 0, dict(st.divergences)
    assert env.thread.call(lambda: len(env.thread.shim.dirty.keys)) == 0
    seq = env.thread.call(lambda: env.thread.shim.seq.stats())
    assert seq["held"] == 0 and seq["waiting"] == 0 and seq["keys"] == 0, seq


def mixed_writes(c: redis.Redis, i: int, ops: int = 150) -> None:
    rng = random.Random(i)
    for n in range(ops):
        k = rng.choice(HOT)
        op = rng.randrange(6)
        if op == 0:
            c.set(f"s:{k}", f"{i}-{n}")
        elif op == 1:
            c.incr(f"c:{k}")
        elif op == 2:
            c.hset(f"h:{k}", "f", f"{i}-{n}")
        elif op == 3:
            c.lpush(f"l:{k}", f"{i}-{n}")
        elif op == 4:
            c.get(f"s:{k}")  # a compared read racing the writes
        else:
            c.lrange(f"l:{k}", 0, 2)


@pytest.mark.parametrize("phase", TWO_SIDED, ids=lambda p: p.value)
def test_clients_racing_on_hot_keys_leave_both_sides_identical(ordered_env, phase):
    """Eight clients racing SET/INCR/HSET/LPUSH and compared reads on three hot keys end with identical sides."""
    enter(ordered_env, phase)
    run_clients(ordered_env, 8, mixed_writes)
    assert ordered_env.source.client().get(f"c:{HOT[0]}") is not None
    assert_same_everywhere(ordered_env)


def test_a_pipelining_client_racing_plain_clients_keeps_one_order(ordered_env):
    """Pipelined chunks (forwarded whole) and single commands on the same keys are applied alike on both sides."""
    enter(ordered_env, Phase.MIRRORING)

    def work(c: redis.Redis, i: int) -> None:
        k = HOT[0]
        if i < 4:
            for n in range(80):
                p = c.pipeline(transaction=False)
                for m in range(4):
                    p.set(f"s:{k}", f"p{i}-{n}-{m}")
                    p.rpush(f"l:{k}", f"p{i}-{n}-{m}")
                p.execute()
        else:
            for n in range(150):
                c.set(f"s:{k}", f"{i}-{n}")
                c.lpush(f"l:{k}", f"{i}-{n}")

    run_clients(ordered_env, 8, work)
    assert_same_everywhere(ordered_env)


def test_transactions_racing_plain_writes_on_the_same_keys_apply_in_one_order(ordered_env):
    """MULTI/EXEC over two hot keys racing plain writes to them leaves both sides identical."""
    enter(ordered_env, Phase.READS_ON_TARGET)

    def work(c: redis.Redis, i: int) -> None:
        rng = random.Random(i)
        for n in range(100):
            if i % 2:
                p = c.pipeline(transaction=True)
                p.set(f"s:{HOT[0]}", f"tx{i}-{n}")
                p.incr(f"c:{HOT[0]}")
                p.rpush(f"l:{HOT[1]}", f"tx{i}-{n}")
                p.execute()
            else:
                k = rng.choice(HOT[:2])
                c.set(f"s:{k}", f"{i}-{n}")
                c.incr(f"c:{k}")
                c.lpush(f"l:{k}", f"{i}-{n}")

    run_clients(ordered_env, 6, work)
    assert_same_everywhere(ordered_env)


def test_flushdb_racing_keyed_writes_is_ordered_against_all_of_them(ordered_env):
    """A keyless write (FLUSHDB) racing writes to many keys is applied at the same point of every key's history on both sides."""
    enter(ordered_env, Phase.MIRRORING)

    def work(c: redis.Redis, i: int) -> None:
        rng = random.Random(i)
        for n in range(150):
            if i < 2 and n % 10 == 5:
                c.flushdb()
            else:
                k = rng.choice(HOT)
                c.rpush(f"l:{k}", f"{i}-{n}")
                c.set(f"s:{k}", f"{i}-{n}")

    run_clients(ordered_env, 6, work)
    assert ordered_env.thread.call(lambda: ordered_env.thread.shim.seq.barriers) >= 30
    assert_same_everywhere(ordered_env)


def test_blocking_pops_racing_pushes_mirror_each_pop_where_it_happened(ordered_env):
    """BRPOP consumers racing LPUSH/RPUSH producers on one list leave the same list on both sides."""
    enter(ordered_env, Phase.MIRRORING)
    done = threading.Event()

    def work(c: redis.Redis, i: int) -> None:
        if i < 2:
            while not done.is_set():
                c.brpop(["q"], timeout=0.2)
        else:
            for n in range(150):
                (c.lpush if n % 2 else c.rpush)("q", f"{i}-{n}")
            if i == 2:
                done.set()

    run_clients(ordered_env, 5, work)
    wait_for(lambda: ordered_env.thread.call(lambda: not ordered_env.thread.shim.seq.blocked), what="pops returned")
    assert_same_everywhere(ordered_env)


# --- the same, without sockets: what is held back, and what is sent when ------------------------

RANGE1 = [{b"begin_search": {b"type": b"index", b"spec": {b"index": 1}},
           b"find_keys": {b"type": b"range", b"spec": {b"lastkey": 0, b"keystep": 1, b"limit": 0}}}]
LAST_BUT_ONE = [{b"begin_search": {b"type": b"index", b"spec": {b"index": 1}},
                 b"find_keys": {b"type": b"range", b"spec": {b"lastkey": -2, b"keystep": 1, b"limit": 0}}}]
TABLE = parse_command_reply([
    [b"get", 2, [b"readonly"], 1, 1, 1, [], [], RANGE1, []],
    [b"set", -3, [b"write"], 1, 1, 1, [], [], RANGE1, []],
    [b"rpush", -3, [b"write"], 1, 1, 1, [], [], RANGE1, []],
    [b"rpop", -2, [b"write"], 1, 1, 1, [], [], RANGE1, []],
    [b"brpop", -3, [b"write", b"blocking"], 1, -2, 1, [], [], LAST_BUT_ONE, []],
])


@pytest.fixture
def shim_sessions(tmp_path):
    """A shim in ``phase`` (no sockets) and a function opening sessions on it with fake upstreams."""
    return lambda phase: fake_shim(tmp_path, phase, TABLE)


def test_a_second_connections_write_to_a_held_key_waits_for_both_replies_of_the_first(shim_sessions):
    """B's SET k is sent to neither side until A's SET k has been answered by both; B's write to another key is not held."""
    _shim, session = shim_sessions(Phase.MIRRORING)
    a, _ca, ta = session()
    b, cb, tb = session()
    c, _cc, tc = session()
    a.on_client_data(cmds(["SET", "k", "a"]))
    b.on_client_data(cmds(["SET", "k", "b"], ["GET", "x"]))
    c.on_client_data(cmds(["SET", "other", "c"]))
    assert ta[SOURCE].data == ta[TARGET].data == cmds(["SET", "k", "a"])
    assert tb[SOURCE].data == tb[TARGET].data == b""  # held back, and the GET behind it too
    assert tc[SOURCE].data == tc[TARGET].data == cmds(["SET", "other", "c"])
    a.on_upstream_data(SOURCE, b"+OK\r\n")
    assert tb[SOURCE].data == b""  # the target has not applied A's write yet
    a.on_upstream_data(TARGET, b"+OK\r\n")
    assert tb[SOURCE].data == tb[TARGET].data == cmds(["SET", "k", "b"], ["GET", "x"])
    b.on_upstream_data(SOURCE, b"+OK\r\n$-1\r\n")
    assert cb.data == b"+OK\r\n$-1\r\n"


def test_a_blocking_pop_is_tried_without_blocking_first_and_answered_once_from_a_split_reply(shim_sessions):
    """BRPOP goes inside MULTI/EXEC holding its key; EXEC's reply, however split, answers the client with the pop, and the target gets RPOP."""
    _shim, session = shim_sessions(Phase.MIRRORING)
    s, client, t = session()
    s.on_client_data(cmds(["BRPOP", "q", "0"]))
    assert t[SOURCE].data == cmds(["MULTI"], ["BRPOP", "q", "0"], ["EXEC"]) and t[TARGET].data == b""
    stream = b"+OK\r\n+QUEUED\r\n*1\r\n*2\r\n$1\r\nq\r\n$1\r\nx\r\n"
    for i in range(len(stream)):
        s.on_upstream_data(SOURCE, stream[i:i + 1])
    assert client.data == b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n"
    assert t[TARGET].data == cmds(["RPOP", "q"])


def test_a_blocking_pop_with_nothing_to_pop_blocks_for_real_holding_nothing(shim_sessions):
    """When the try finds nothing, BRPOP is sent as itself and its key is free: another connection's push goes at once."""
    shim, session = shim_sessions(Phase.MIRRORING)
    s, client, t = session()
    p, _cp, tp = session()
    s.on_client_data(cmds(["BRPOP", "q", "0"], ["SET", "after", "1"]))
    s.on_upstream_data(SOURCE, b"+OK\r\n+QUEUED\r\n*1\r\n*-1\r\n")
    assert t[SOURCE].data.endswith(cmds(["BRPOP", "q", "0"]))
    assert cmds(["SET", "after", "1"]) not in t[SOURCE].data  # waits until the pop returns, as on a server
    p.on_client_data(cmds(["RPUSH", "q", "x"]))
    assert tp[SOURCE].data == tp[TARGET].data == cmds(["RPUSH", "q", "x"])
    p.on_upstream_data(SOURCE, b":1\r\n")
    p.on_upstream_data(TARGET, b":1\r\n")
    s.on_upstream_data(SOURCE, b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n")  # woken by the push
    assert t[TARGET].data == cmds(["RPOP", "q"], ["SET", "after", "1"])  # the pop's effect first
    assert t[SOURCE].data.endswith(cmds(["SET", "after", "1"]))
    assert client.data == b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n"
    assert not shim.seq.blocked
