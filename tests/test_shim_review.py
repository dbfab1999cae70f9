"""Regressions found in review, against real Redis (source) and Valkey (target) servers."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
import redis

from migrator.phases import Phase
from migrator.shim import list_dirty


@pytest.fixture
def review_env(server_factory, make_env):
    return make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))


def raw(env):
    conn = redis.Connection(port=env.port, socket_timeout=5)
    conn.connect()
    return conn


def cmd(conn, *args):
    conn.send_command(*args)
    try:
        return conn.read_response()
    except redis.ResponseError as e:
        return e


def enter(env, phase):
    order = [Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET]
    for p in order[: order.index(phase) + 1]:
        env.set_phase(p)


def dirty(env):
    return [(d.db, d.key, d.reason) for d in list_dirty(env.pb.state_path)]


def test_blmpop_direction_is_read_after_the_keys_even_for_a_key_named_left(review_env):
    """BLMPOP 0 1 left RIGHT pops the right end; the target must lose the same element."""
    env = review_env
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    c.rpush("left", "a", "b", "c")
    assert c.execute_command("BLMPOP", 0, 1, "left", "RIGHT") == [b"left", [b"c"]]
    time.sleep(0.3)
    assert env.source.client().lrange("left", 0, -1) == [b"a", b"b"]
    assert env.target.client().lrange("left", 0, -1) == [b"a", b"b"]


def test_select_inside_multi_then_discard_moves_neither_side(review_env):
    """MULTI; SELECT 1; DISCARD: SELECT never ran, on either side."""
    env = review_env
    env.set_phase(Phase.MIRRORING)
    conn = raw(env)
    assert cmd(conn, "MULTI") == b"OK"
    assert cmd(conn, "SELECT", 1) == b"QUEUED"
    assert cmd(conn, "DISCARD") == b"OK"
    assert cmd(conn, "SET", "k", "v") == b"OK"
    time.sleep(0.3)
    assert env.source.client(0).get("k") == b"v"
    assert env.target.client(0).get("k") == b"v", f"target db1 has {env.target.client(1).get('k')!r}"


def test_select_inside_multi_applies_the_whole_tx_in_the_new_db_on_the_shadow(review_env):
    env = review_env
    env.set_phase(Phase.MIRRORING)
    conn = raw(env)
    cmd(conn, "MULTI")
    cmd(conn, "SET", "a", "1")
    cmd(conn, "SELECT", 1)
    cmd(conn, "INCRBYFLOAT", "f", "1.5")
    assert cmd(conn, "EXEC") == [b"OK", b"OK", b"1.5"]
    assert cmd(conn, "SET", "after", "x") == b"OK"
    time.sleep(0.3)
    src0, tgt0 = env.source.client(0), env.target.client(0)
    src1, tgt1 = env.source.client(1), env.target.client(1)
    assert (src0.get("a"), src1.get("f"), src1.get("after")) == (b"1", b"1.5", b"x")
    assert (tgt0.get("a"), tgt1.get("f"), tgt1.get("after")) == (b"1", b"1.5", b"x")
    env.flush()
    assert dict(env.stats().divergences) == {}


def test_auth_inside_multi_aborts_the_transaction(review_env):
    env = review_env
    env.set_phase(Phase.MIRRORING)
    conn = raw(env)
    assert cmd(conn, "MULTI") == b"OK"
    assert cmd(conn, "SET", "a", "1") == b"QUEUED"
    assert isinstance(cmd(conn, "AUTH", "pw"), redis.ResponseError)
    r = cmd(conn, "EXEC")
    assert isinstance(r, redis.ResponseError) and str(r).startswith("Transaction discarded")
    assert cmd(conn, "GET", "a") is None  # the connection is out of MULTI, and nothing ran
    assert env.source.client().get("a") is None and env.target.client().get("a") is None


@pytest.mark.parametrize("refused", [["SELECT", 99], ["CLIENT", "SETNAME", "has space"]], ids=["select", "setname"])
def test_refused_connection_state_is_not_replayed_on_later_connections(review_env, refused):
    """SELECT 99 / CLIENT SETNAME with a space fail on the server: the shim must not replay them on
    the target's connection once mirroring starts (the target would refuse it and go down)."""
    env = review_env
    c = env.client(single_connection_client=True)
    with pytest.raises(redis.ResponseError):
        c.execute_command(*refused)
    c.set("a", "1")  # planned: source db0
    env.set_phase(Phase.MIRRORING)
    time.sleep(0.3)
    c.set("b", "2")
    time.sleep(0.3)
    env.flush()
    assert (dirty(env), dict(env.stats().shadow_failures)) == ([], {})
    assert env.target.client().get("b") == b"2"


def test_a_script_that_fails_after_writing_is_mirrored_in_reads_on_target(review_env):
    """Lua does not roll back: the SET before the failing INCR stays on the source, and must reach
    the target that now answers reads."""
    env = review_env
    enter(env, Phase.READS_ON_TARGET)
    c = env.client()
    c.set("b", "not-a-number")
    script = "redis.call('SET', KEYS[1], 'x'); return redis.call('INCR', KEYS[2])"
    with pytest.raises(redis.ResponseError):
        c.eval(script, 2, "a", "b")
    time.sleep(0.3)
    env.flush()
    assert env.source.client().get("a") == b"x"
    assert c.get("a") == b"x", f"target has {env.target.client().get('a')!r}; dirty={dirty(env)}"
    assert dict(env.stats().divergences) == {}


def test_a_blpop_of_a_disconnected_client_does_not_pop_a_later_push(review_env):
    """A worker blocked in BLPOP disconnects; a job pushed a moment later must stay in the list."""
    env = review_env
    env.set_phase(Phase.MIRRORING)
    s = socket.create_connection(("127.0.0.1", env.port))
    s.sendall(b"*3\r\n$5\r\nBLPOP\r\n$4\r\njobs\r\n$1\r\n0\r\n")
    time.sleep(0.3)
    s.close()
    time.sleep(0.3)
    env.client().rpush("jobs", "job-1")
    time.sleep(0.5)
    assert env.source.client().lrange("jobs", 0, -1) == [b"job-1"]
    assert env.target.client().lrange("jobs", 0, -1) == [b"job-1"]


def test_pipelined_blpop_then_select_blocks_in_the_old_db(review_env):
    """BLPOP q 1; SELECT 1 pipelined: Redis blocks on db 0's empty q, times out, then selects."""
    env = review_env
    env.set_phase(Phase.MIRRORING)
    env.source.client(1).rpush("q", "from-db1")
    env.target.client(1).rpush("q", "from-db1")
    s = socket.create_connection(("127.0.0.1", env.port))
    s.settimeout(5)
    s.sendall(b"*3\r\n$5\r\nBLPOP\r\n$1\r\nq\r\n$1\r\n1\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n1\r\n")
    got = b""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not got.endswith(b"+OK\r\n"):
        got += s.recv(4096)
    assert got == b"*-1\r\n+OK\r\n", got
    assert env.source.client(1).lrange("q", 0, -1) == [b"from-db1"]
    assert env.target.client(1).lrange("q", 0, -1) == [b"from-db1"]


def test_unsubscribe_of_two_channels_on_an_unsubscribed_connection_then_get(review_env):
    """UNSUBSCRIBE a b on a connection that never subscribed gets two replies from the server."""
    env = review_env
    env.source.client().set("k", "v")
    s = socket.create_connection(("127.0.0.1", env.port))
    s.settimeout(2)
    s.sendall(b"*3\r\n$11\r\nUNSUBSCRIBE\r\n$1\r\na\r\n$1\r\nb\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
    want = (b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n"
            b"$1\r\nv\r\n")
    got = b""
    with contextlib.suppress(socket.timeout):
        while len(got) < len(want):
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    assert got == want


def test_a_write_after_unsubscribing_reaches_the_source_in_reads_on_target(review_env):
    """After SUBSCRIBE + UNSUBSCRIBE the connection is an ordinary one again."""
    env = review_env
    enter(env, Phase.READS_ON_TARGET)
    s = socket.create_connection(("127.0.0.1", env.port))
    s.settimeout(2)

    def rt(b):
        s.sendall(b)
        time.sleep(0.2)
        return s.recv(65536)

    assert rt(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n") == b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    assert rt(b"*2\r\n$11\r\nUNSUBSCRIBE\r\n$2\r\nch\r\n") == b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n"
    assert rt(b"*3\r\n$3\r\nSET\r\n$1\r\nw\r\n$1\r\n1\r\n") == b"+OK\r\n"
    time.sleep(0.3)
    env.flush()
    assert env.source.client().get("w") == b"1", f"target={env.target.client().get('w')!r} dirty={dirty(env)}"
    assert env.target.client().get("w") == b"1"
    assert dirty(env) == []


def test_a_shadow_write_behind_a_read_on_a_stalled_target_does_not_hold_its_key(review_env):
    """reads-on-target: a shadow SET queued behind a target-answered GET on a stalled target must
    not keep another client's write to its key waiting much past shadow_timeout (500 ms)."""
    import os
    import signal
    import threading

    env = review_env
    enter(env, Phase.READS_ON_TARGET)
    env.client().set("k", "0")
    os.kill(env.target.proc.pid, signal.SIGSTOP)
    resume = threading.Timer(3.0, lambda: os.kill(env.target.proc.pid, signal.SIGCONT))
    resume.start()
    try:
        a = socket.create_connection(("127.0.0.1", env.port))
        a.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nx\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n")
        time.sleep(0.2)
        b = redis.Redis(port=env.port, socket_timeout=10)
        t0 = time.monotonic()
        b.set("k", "2")
        waited = time.monotonic() - t0
    finally:
        resume.join()
    assert waited < 1.5, (waited, dict(env.stats().shadow_failures))
    assert env.source.client().get("k") == b"2"
    assert (0, b"k") in {(d, k) for d, k, _r in dirty(env)} or env.thread.call(
        lambda: (0, b"k") in env.thread.shim.dirty.keys)


def test_an_evalsha_inside_multi_is_healed_on_the_shadow(review_env):
    """A script loaded before mirroring (on the source only) and run by EVALSHA in a transaction:
    the target gets it loaded before its copy of the transaction."""
    env = review_env
    c = env.client()
    sha = c.script_load("return redis.call('INCR', KEYS[1])")  # planned: the source only
    env.set_phase(Phase.MIRRORING)
    p = c.pipeline(transaction=True)
    p.evalsha(sha, 1, "tx")
    assert p.execute() == [1]
    time.sleep(0.3)
    env.flush()
    assert env.target.client().get("tx") == b"1", f"dirty={dirty(env)}"
    assert dict(env.stats().divergences) == {}


def test_evalsha_ro_is_healed_and_compared_without_a_false_divergence(review_env):
    env = review_env
    c = env.client()
    c.set("k", "v")
    sha = c.script_load("return redis.call('GET', KEYS[1])")  # planned: the source only
    env.set_phase(Phase.MIRRORING)
    env.target.client().set("k", "v")
    assert c.execute_command("EVALSHA_RO", sha, 1, "k") == b"v"
    env.flush()
    st = env.stats()
    assert dict(st.divergences) == {} and st.script_heals >= 1
    # After the read cutover the target answers it, as it is: a target that lost its scripts says
    # NOSCRIPT (the shim never loads a script on the answering side; see issue 10 C4).
    env.set_phase(Phase.READS_ON_TARGET)
    assert c.execute_command("EVALSHA_RO", sha, 1, "k") == b"v"
    env.target.client().script_flush()
    env.thread.call(lambda: env.thread.shim.scripts_loaded[1].clear())
    with pytest.raises(redis.exceptions.NoScriptError):
        c.execute_command("EVALSHA_RO", sha, 1, "k")


def test_a_watch_before_the_write_switch_aborts_an_exec_after_it(review_env):
    """WATCH k on the source, the write switch, another client changes k on the target: EXEC must
    not apply the transaction (a lost update)."""
    env = review_env
    enter(env, Phase.READS_ON_TARGET)
    c = env.client()
    other = env.client()
    c.set("k", "0")
    with c.pipeline() as p:
        p.watch("k")
        env.set_phase(Phase.WRITES_ON_TARGET)
        other.set("k", "changed")
        p.multi()
        p.set("k", "mine")
        with pytest.raises(redis.WatchError):
            p.execute()
    assert env.target.client().get("k") == b"changed"
    with c.pipeline() as p:  # the next one, watched on the new write side, goes through
        p.watch("k")
        p.multi()
        p.set("k", "mine")
        assert p.execute() == [True]
    time.sleep(0.3)
    assert env.target.client().get("k") == env.source.client().get("k") == b"mine"


def test_a_pop_blocked_across_the_write_switch_does_not_deliver_one_element_twice(review_env):
    import threading

    env = review_env
    enter(env, Phase.READS_ON_TARGET)
    got = {}

    def pop(name):
        c = redis.Redis(port=env.port, socket_timeout=10)
        try:
            got[name] = c.blpop("q", 4)
        except redis.ConnectionError:
            got[name] = "disconnected"

    a = threading.Thread(target=pop, args=("A",))
    a.start()
    time.sleep(0.5)  # A blocks on the source (the write side in reads-on-target)
    env.set_phase(Phase.WRITES_ON_TARGET)
    b = threading.Thread(target=pop, args=("B",))
    b.start()
    time.sleep(0.5)  # B blocks on the target
    env.client().rpush("q", "x")
    a.join()
    b.join()
    time.sleep(0.3)
    assert list(got.values()).count((b"q", b"x")) == 1, got
    assert env.source.client().llen("q") == env.target.client().llen("q") == 0
