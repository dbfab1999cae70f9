"""Stateless clients on shared upstream connections (migrator.shim.mux), against real servers.

In the one-sided phases a client with no connection state rides on the shim's shared upstream
connection; the moment it needs state it gets a session of its own. What is pinned down here:
the sharing is real (one upstream connection for many clients), replies keep each client's order,
every kind of connection state pins the client with nothing lost or reordered, AUTH carries over,
a phase change moves clients to mirroring without losing a write, a lost shared connection closes
only the clients that had commands on it, and a connection per request leaks nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import redis

from migrator.phases import Phase
from migrator.shim import list_dirty, resp
from tests.helpers import restart_empty
from tests.test_shim_e2e import wait_for


@pytest.fixture
def env(server_factory, make_env):
    return make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))


def shared_conns(server) -> list[dict]:
    return [c for c in server.client().client_list() if c.get("name") == "migrator-shim-shared"]


def mux(env):
    return env.thread.call(lambda: env.thread.shim.mux.status())


def raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(5)
    return s


def read_replies(s: socket.socket, n: int) -> list[bytes]:
    framer, got = resp.Framer(), []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        data = s.recv(65536)
        if not data:
            break
        got += framer.feed(data)
    return got


def direct(server, *args) -> bytes:
    """The raw reply ``server`` itself gives to a command on a fresh connection."""
    s = raw(server.port)
    try:
        s.sendall(cmd(*args))
        return read_replies(s, 1)[0]
    finally:
        s.close()


def cmd(*args) -> bytes:
    return resp.encode([a if isinstance(a, bytes) else str(a).encode() for a in args])


def test_many_stateless_clients_share_one_upstream_connection_and_keep_their_order(env):
    """20 clients pipelining INCRs and GETs of their own keys, concurrently, through one shared
    connection to the source: every reply is its own command's, in order, and the source sees one
    shared connection from the shim (no connection per client)."""
    errors: list[str] = []

    def worker(i: int) -> None:
        c = redis.Redis(port=env.port, socket_timeout=10)
        try:
            for rnd in range(20):
                p = c.pipeline(transaction=False)
                for _ in range(5):
                    p.incr(f"ctr:{i}")
                p.get(f"ctr:{i}")
                got = p.execute()
                base = rnd * 5
                if got != [base + 1, base + 2, base + 3, base + 4, base + 5, str(base + 5).encode()]:
                    errors.append(f"client {i} round {rnd}: {got}")
                    return
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    src = env.source.client()
    assert [int(src.get(f"ctr:{i}")) for i in range(20)] == [100] * 20
    assert len(shared_conns(env.source)) == 1
    assert env.target.client().dbsize() == 0  # planned: the source only
    st = mux(env)
    assert st["pinned"] == 0, st["pinned_by"]
    assert [state for name, links in st["links"].items() for state in links if state == "up"] == ["up"]


@pytest.mark.parametrize("state_cmd, expect", [
    ((b"SELECT", b"1"), b"+OK\r\n"),
    ((b"CLIENT", b"SETNAME", b"app"), b"+OK\r\n"),
    ((b"HELLO", b"2"), None),
    ((b"WATCH", b"a"), b"+OK\r\n"),
    ((b"MULTI",), b"+OK\r\n"),
])
def test_connection_state_pins_the_client_after_its_replies_in_flight_in_order(env, state_cmd, expect):
    """A chunk 'SET a, SET b, <state command>, SET c, GET a' from a multiplexed client: the first
    writes go out shared, the client becomes a session of its own at the state command, and every
    reply comes back in command order with the data where a direct connection would put it."""
    s = raw(env.port)
    try:
        s.sendall(cmd("SET", "warm", "1"))  # multiplexed first
        assert read_replies(s, 1) == [b"+OK\r\n"]
        s.sendall(cmd("SET", "a", "1") + cmd("SET", "b", "2") + resp.encode(list(state_cmd)) + cmd("SET", "c", "3")
                  + cmd("GET", "a"))
        got = read_replies(s, 5)
    finally:
        s.close()
    assert got[:2] == [b"+OK\r\n", b"+OK\r\n"]
    if expect is not None:
        assert got[2] == expect
    src = env.source.client()
    if state_cmd[0] == b"SELECT":
        assert got[3:] == [b"+OK\r\n", b"$-1\r\n"]  # GET a in database 1
        assert src.get("a") == b"1" and src.get("b") == b"2" and src.get("c") is None
        assert env.source.client(db=1).get("c") == b"3"
    elif state_cmd[0] == b"MULTI":
        assert got[3:] == [b"+QUEUED\r\n", b"+QUEUED\r\n"]
        assert src.get("c") is None  # not executed: the transaction was never EXECed
    else:
        assert got[3:] == [b"+OK\r\n", b"$1\r\n1\r\n"]
        assert src.get("c") == b"3"
    assert mux(env)["pinned"] == 1


def test_blocking_and_subscribing_clients_are_pinned_and_served(env):
    """BLPOP and SUBSCRIBE need a connection of their own: the client is pinned, the BLPOP is woken
    by another (multiplexed) client's push, and the subscriber gets a message published through a
    multiplexed client."""
    c = env.client()
    assert c.set("x", "1")
    blocker = redis.Redis(port=env.port, socket_timeout=10)
    out: list = []
    t = threading.Thread(target=lambda: out.append(blocker.blpop(["q"], timeout=5)))
    t.start()
    time.sleep(0.3)
    ps = env.client().pubsub()
    ps.subscribe("news")
    assert ps.get_message(timeout=5)["type"] == "subscribe"
    pusher = env.client()
    assert pusher.rpush("q", "job") == 1
    t.join(10)
    blocker.close()
    assert out == [(b"q", b"job")]
    assert pusher.publish("news", "hello") == 1
    msg = ps.get_message(timeout=5)
    assert msg is not None and msg["data"] == b"hello"
    ps.close()
    assert mux(env)["pinned"] >= 2


def test_auth_is_answered_by_the_shim_and_carried_into_a_pinned_session(server_factory, make_env):
    """With a shim password: no AUTH gets NOAUTH, a wrong one WRONGPASS, the right one is answered
    by the shim and lets the client be multiplexed; when it later pins (SELECT 2) its session is
    already authenticated."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"), shim={"password": "s3cret"})
    s = raw(env.port)
    try:
        s.sendall(cmd("GET", "k"))
        assert read_replies(s, 1)[0].startswith(b"-NOAUTH")
    finally:
        s.close()
    s = raw(env.port)
    try:
        s.sendall(cmd("AUTH", "nope"))
        assert read_replies(s, 1)[0].startswith(b"-WRONGPASS")
    finally:
        s.close()
    assert mux(env)["pinned_by"] == {"noauth": 1, "auth": 1}  # (the session answered those two)
    s = raw(env.port)
    try:
        s.sendall(cmd("AUTH", "s3cret") + cmd("CLIENT", "SETINFO", "LIB-NAME", "x") + cmd("SET", "k", "v"))
        setinfo = direct(env.source, "CLIENT", "SETINFO", "LIB-NAME", "x")  # Redis 7.0: unknown subcommand
        assert read_replies(s, 3) == [b"+OK\r\n", setinfo, b"+OK\r\n"]
        assert mux(env)["pinned"] == 2, mux(env)["pinned_by"]
        s.sendall(cmd("SELECT", "2") + cmd("SET", "k2", "v2"))
        assert read_replies(s, 2) == [b"+OK\r\n", b"+OK\r\n"]
    finally:
        s.close()
    assert env.source.client().get("k") == b"v" and env.source.client(db=2).get("k2") == b"v2"


@pytest.mark.parametrize("source", ["redis-7.0", "valkey-8.1"])
def test_local_replies_keep_their_place_behind_replies_in_flight(server_factory, make_env, source):
    """'SET, CLIENT SETINFO, CLIENT MAINT_NOTIFICATIONS, GET, PING' in one chunk: the shim answers the
    CLIENT commands itself with what the source would say (OK where it has SETINFO, its own
    unknown-subcommand error where not), yet the replies come in command order, and the client
    stays multiplexed."""
    env = make_env(server_factory(source), server_factory("valkey-9.1"))
    expected = [b"+OK\r\n", direct(env.source, "CLIENT", "SETINFO", "LIB-VER", "1"),
                direct(env.source, "CLIENT", "MAINT_NOTIFICATIONS", "on"), b"$1\r\nv\r\n", b"+PONG\r\n"]
    assert expected[1] == (b"+OK\r\n" if source.startswith("valkey") else
                           b"-ERR unknown subcommand 'SETINFO'. Try CLIENT HELP.\r\n")
    s = raw(env.port)
    try:
        s.sendall(cmd("SET", "k", "v") + cmd("CLIENT", "SETINFO", "LIB-VER", "1")
                  + cmd("CLIENT", "MAINT_NOTIFICATIONS", "on") + cmd("GET", "k") + cmd("PING"))
        assert read_replies(s, 5) == expected
    finally:
        s.close()
    assert mux(env)["pinned"] == 0, mux(env)["pinned_by"]


def test_inline_commands_are_served_by_a_session(env):
    """A telnet-style inline command is not canonical RESP: the client is pinned and answered."""
    s = raw(env.port)
    try:
        s.sendall(b"SET inl yes\r\nGET inl\r\n")
        assert read_replies(s, 2) == [b"+OK\r\n", b"$3\r\nyes\r\n"]
    finally:
        s.close()
    assert mux(env)["pinned"] == 1


def test_phase_change_to_mirroring_moves_multiplexed_clients_without_losing_a_write(env):
    """Clients writing continuously while the phase moves planned -> mirroring: the phase is
    acknowledged, every acknowledged write is on the source, every write after the move is on the
    target too, and the shared connection is no longer used for new commands."""
    stop = threading.Event()
    acked: dict[int, list[int]] = {}
    errors: list[str] = []

    def writer(i: int) -> None:
        c = redis.Redis(port=env.port, socket_timeout=10)
        n = 0
        acked[i] = []
        try:
            while not stop.is_set():
                c.rpush(f"log:{i}", n)
                acked[i].append(n)
                n += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{i}: {e!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    env.set_phase(Phase.MIRRORING)  # asserts the acknowledgement
    before = {i: len(v) for i, v in acked.items()}
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert errors == []
    src, tgt = env.source.client(), env.target.client()
    for i in range(8):
        assert [int(x) for x in src.lrange(f"log:{i}", 0, -1)] == acked[i]
        mirrored = [int(x) for x in tgt.lrange(f"log:{i}", 0, -1)]
        assert mirrored == acked[i][len(acked[i]) - len(mirrored):]  # a suffix: from the move on
        assert len(mirrored) >= len(acked[i]) - before[i] > 0
    assert mux(env)["active"] is False


def test_lost_shared_connection_closes_only_clients_with_commands_on_it(env):
    """The source is killed (-9) while one multiplexed client waits on a 2-second script: that client's
    connection is closed (its command's outcome is unknown), an idle multiplexed client stays
    connected, and once the source is back the idle client's next command is answered."""
    busy, idle = raw(env.port), raw(env.port)
    try:
        idle.sendall(cmd("SET", "a", "1"))
        assert read_replies(idle, 1) == [b"+OK\r\n"]
        busy.sendall(cmd("EVAL", "local t = redis.call('TIME')[1] + 2 "
                             "while tonumber(redis.call('TIME')[1]) < t do end return 1", 0))
        time.sleep(0.3)
        restart_empty(env.source)
        assert busy.recv(100) == b""
        wait_for(lambda: env.thread.call(lambda: env.thread.shim.health[0].failures) >= 1, what="source seen down")
        idle.sendall(cmd("SET", "b", "2"))
        got = read_replies(idle, 1)
        assert got == [b"+OK\r\n"]
    finally:
        busy.close()
        idle.close()
    assert env.source.client().get("b") == b"2"


def test_a_connection_per_request_leaks_nothing(env):
    """2,000 clients that connect, SET and close (PHP without persistent connections): every write
    lands, the source sees one shared connection from the shim, and the shim's open file
    descriptors come back to where they were."""
    fds_before = len(os.listdir("/proc/self/fd"))
    for i in range(2000):
        s = raw(env.port)
        s.sendall(cmd("SET", f"k:{i}", i))
        assert read_replies(s, 1) == [b"+OK\r\n"]
        s.close()
    assert env.source.client().dbsize() == 2000
    assert len(shared_conns(env.source)) == 1
    wait_for(lambda: env.thread.call(lambda: len(env.thread.shim.sessions)) == 0, what="sessions closed")
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 5


def test_shared_connections_can_be_turned_off(server_factory, make_env):
    """shim.shared_connections: 0 gives every client connections of its own, as before."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"), shim={"shared_connections": 0})
    c = env.client()
    assert c.set("k", "v") and c.get("k") == b"v"
    assert shared_conns(env.source) == []
    assert mux(env)["per_side"] == 0


# --- the pool of reset upstream connections (migrator.shim.pool) ---------------------------


def pool(env):
    return env.thread.call(lambda: env.thread.shim.pool.status())


def one_request(port: int, *args) -> bytes:
    s = raw(port)
    try:
        s.sendall(cmd(*args))
        return read_replies(s, 1)[0]
    finally:
        s.close()


def test_a_connection_per_request_while_mirroring_rides_on_the_shared_connections(env):
    """Mirroring, 500 clients that each connect, write and close: every write is on both sides, and
    their sessions (no connection state) ran on shares of one shared connection per side, so
    neither server saw a connection per client."""
    env.set_phase(Phase.MIRRORING)
    for i in range(500):
        assert one_request(env.port, "SET", f"k:{i}", i) == b"+OK\r\n"
    wait_for(lambda: env.thread.call(lambda: len(env.thread.shim.sessions)) == 0, what="sessions closed")
    for server in (env.source, env.target):
        c = server.client()
        assert c.dbsize() == 500 and c.get("k:499") == b"499"
        assert len(shared_conns(server)) == 1
        assert c.info("stats")["total_connections_received"] < 20
    assert pool(env)["given_back"] == 0  # (nothing of its own to give back)


@pytest.fixture
def own_env(server_factory, make_env):
    """Sessions on connections of their own (no shared connections): what the pool serves."""
    return make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"), shim={"shared_connections": 0})


def test_a_connection_per_request_reuses_reset_upstream_connections(own_env):
    """Mirroring without shared connections, 500 clients that each connect, write and close: every
    write is on both sides, the sessions run on upstream connections given back and reset (not a
    connect per client), and neither server holds more connections from the shim than the pool
    allows."""
    env = own_env
    env.set_phase(Phase.MIRRORING)
    for i in range(500):
        assert one_request(env.port, "SET", f"k:{i}", i) == b"+OK\r\n"
    wait_for(lambda: env.thread.call(lambda: len(env.thread.shim.sessions)) == 0, what="sessions closed")
    st = pool(env)
    assert st["reused"] >= 900 and st["dropped"] == 0, st  # two sides, all but the first few
    for server in (env.source, env.target):
        c = server.client()
        assert c.dbsize() == 500 and c.get("k:499") == b"499"
        assert len(c.client_list()) <= 16 + 4  # the pool's bound per side, plus probes and this client


def test_a_pooled_connection_carries_no_state_into_the_next_session(own_env):
    """A client that SELECTs database 3 and names its connection, then closes: the next client,
    on the same (reset) upstream connections, writes to database 0, and no server connection keeps
    the old name."""
    env = own_env
    env.set_phase(Phase.MIRRORING)
    s = raw(env.port)
    try:
        s.sendall(cmd("SELECT", "3") + cmd("CLIENT", "SETNAME", "old-app") + cmd("SET", "in3", "x"))
        assert read_replies(s, 3) == [b"+OK\r\n"] * 3
    finally:
        s.close()
    wait_for(lambda: sum(pool(env)["idle"]) == 2, what="both connections reset and idle")
    assert one_request(env.port, "SET", "in0", "y") == b"+OK\r\n"
    assert pool(env)["reused"] == 2
    for server in (env.source, env.target):
        assert server.client().get("in0") == b"y" and server.client(db=3).get("in3") == b"x"
        assert server.client(db=3).get("in0") is None
        assert all(c.get("name") != "old-app" for c in server.client().client_list())


def test_a_connection_ending_in_a_transaction_is_not_pooled(own_env):
    """A client that closes inside MULTI: its upstream connections are closed, not given back."""
    env = own_env
    env.set_phase(Phase.MIRRORING)
    s = raw(env.port)
    try:
        s.sendall(cmd("MULTI") + cmd("SET", "t", "1"))
        assert read_replies(s, 2) == [b"+OK\r\n", b"+QUEUED\r\n"]
    finally:
        s.close()
    wait_for(lambda: env.thread.call(lambda: len(env.thread.shim.sessions)) == 0, what="session closed")
    assert pool(env)["given_back"] == 0
    assert env.source.client().get("t") is None


def test_a_pooled_connection_the_server_dropped_is_not_used(own_env):
    """The source restarts empty while the shim holds pooled connections to it: they are dropped,
    and the next client's write lands through a new connection."""
    env = own_env
    env.set_phase(Phase.MIRRORING)
    assert one_request(env.port, "SET", "a", "1") == b"+OK\r\n"
    wait_for(lambda: pool(env)["idle"][0] == 1, what="a pooled source connection")
    restart_empty(env.source)
    wait_for(lambda: pool(env)["idle"][0] == 0, what="the dead connection dropped")
    reply = b""
    for _ in range(50):  # (the shim backs off the side it saw go down)
        reply = one_request(env.port, "SET", "b", "2")
        if reply == b"+OK\r\n":
            break
        time.sleep(0.1)
    assert reply == b"+OK\r\n"
    assert env.source.client().get("b") == b"2"


# --- sessions on shares of the shared connections (two-sided phases) ----------------------


def test_mirroring_sessions_share_connections_and_move_to_their_own_at_connection_state(env):
    """Mirroring: a client's 'SET a, SELECT 1, SET c, GET a' in one chunk. The SET before the SELECT
    goes out on the shared connections; the SELECT moves the session to connections of its own,
    which start in database 0 (the SELECT runs there, not replayed ahead of it); every reply comes
    in order and both sides hold the same data where a direct connection would put it."""
    env.set_phase(Phase.MIRRORING)
    s = raw(env.port)
    try:
        s.sendall(cmd("SET", "a", "1") + cmd("SELECT", "1") + cmd("SET", "c", "3") + cmd("GET", "a"))
        assert read_replies(s, 4) == [b"+OK\r\n", b"+OK\r\n", b"+OK\r\n", b"$-1\r\n"]
        s.sendall(cmd("GET", "c"))
        assert read_replies(s, 1) == [b"$1\r\n3\r\n"]
    finally:
        s.close()
    for server in (env.source, env.target):
        assert server.client().get("a") == b"1" and server.client().get("c") is None
        assert server.client(db=1).get("c") == b"3"
        assert len(shared_conns(server)) == 1
    assert env.stats().divergences == {} or sum(env.stats().divergences.values()) == 0


def test_a_frozen_shadow_on_a_shared_connection_marks_dirty_and_the_stream_stays_in_step(env):
    """Mirroring with many clients on the shared connections; the target is frozen (SIGSTOP) past
    shadow_timeout: clients are still answered by the source, their writes are marked dirty; once
    the target is thawed, the late replies on the shared connection are read and dropped, and new
    writes reach both sides with their replies matched to the right commands (no divergence)."""
    import signal

    env.set_phase(Phase.MIRRORING)
    clients = [redis.Redis(port=env.port, socket_timeout=10) for _ in range(10)]
    try:
        for i, c in enumerate(clients):
            assert c.set(f"pre:{i}", i)
        os.kill(env.target.proc.pid, signal.SIGSTOP)
        try:
            for i, c in enumerate(clients):
                assert c.set(f"frozen:{i}", i)  # answered by the source; the target's share times out
            time.sleep(1.5)  # past shadow_timeout (500 ms)
        finally:
            os.kill(env.target.proc.pid, signal.SIGCONT)
        env.flush()
        dirty = {d.key for d in list_dirty(env.pb.state_path)}
        assert {f"frozen:{i}".encode() for i in range(10)} <= dirty
        time.sleep(0.5)  # (the shim's backoff from the side it saw fail)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for i, c in enumerate(clients):
                assert c.set(f"post:{i}", f"v{i}") and c.get(f"post:{i}") == f"v{i}".encode()
            if all(env.target.client().get(f"post:{i}") == f"v{i}".encode() for i in range(10)):
                break
            time.sleep(0.2)
        tgt = env.target.client()
        assert [tgt.get(f"post:{i}") for i in range(10)] == [f"v{i}".encode() for i in range(10)]
        assert [tgt.get(f"pre:{i}") for i in range(10)] == [str(i).encode() for i in range(10)]
    finally:
        for c in clients:
            c.close()
    assert sum(env.stats().divergences.values()) == 0
    # The same shared connection to the target throughout: its late replies were read and dropped.
    assert env.thread.call(lambda: env.thread.shim.mux.links[(1, 2)][0].attempt) == 1


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_multiplexed_clients_protocol_is_carried_into_its_session(env, protocol):
    """A redis-py client in RESP2 or RESP3 (HELLO 3), multiplexed in planned, keeps its protocol
    when the phase moves to mirroring and it becomes a session: HGETALL still parses to a dict
    and both sides get the write."""
    c = redis.Redis(port=env.port, socket_timeout=5, protocol=protocol)
    try:
        c.hset("h", mapping={"a": "1", "b": "2"})
        assert c.hgetall("h") == {b"a": b"1", b"b": b"2"}
        assert mux(env)["pinned"] == 0
        env.set_phase(Phase.MIRRORING)
        c.hset("h2", mapping={"x": "9"})
        assert c.hgetall("h2") == {b"x": b"9"}
        assert c.hgetall("h") == {b"a": b"1", b"b": b"2"}
    finally:
        c.close()
    assert env.target.client().hgetall("h2") == {b"x": b"9"}
    assert mux(env)["pinned_by"] == {"phase": 1}


def test_wait_is_not_sent_on_a_shared_connection(env):
    """WAIT blocks its connection until replicas acknowledge (here, none: for its whole timeout):
    the client that sends it is pinned, so another client on the shared connection is answered
    meanwhile, not stalled behind it."""
    waiter = raw(env.port)
    other = raw(env.port)
    try:
        other.sendall(cmd("SET", "x", "1"))
        assert read_replies(other, 1) == [b"+OK\r\n"]
        waiter.sendall(cmd("WAIT", "1", "1500"))
        time.sleep(0.2)
        t0 = time.monotonic()
        other.sendall(cmd("GET", "x"))
        assert read_replies(other, 1) == [b"$1\r\n1\r\n"]
        assert time.monotonic() - t0 < 1.0
        assert read_replies(waiter, 1) == [b":0\r\n"]
    finally:
        waiter.close()
        other.close()
    assert mux(env)["pinned_by"] == {"wait": 1}


def test_metrics_show_shared_clients_pins_and_pool_reuse(server_factory, make_env):
    """/metrics counts clients on the shared connections now, the clients pinned by the command
    that needed it, and connections reused from the pool."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    a, b = raw(env.port), raw(env.port)
    try:
        a.sendall(cmd("SET", "k", "1"))
        b.sendall(cmd("SET", "j", "2"))
        assert read_replies(a, 1) == read_replies(b, 1) == [b"+OK\r\n"]
        text = env.admin("/metrics").decode()
        assert "migrator_shim_shared_clients 2.0" in text
        b.sendall(cmd("SELECT", "1"))
        assert read_replies(b, 1) == [b"+OK\r\n"]
    finally:
        a.close()
        b.close()
    assert one_request(env.port, "SELECT", "2") == b"+OK\r\n"  # pinned, then ends cleanly: pooled
    wait_for(lambda: sum(pool(env)["idle"]) >= 1, what="a pooled connection")
    assert one_request(env.port, "SELECT", "3") == b"+OK\r\n"  # its session reuses it
    text = env.admin("/metrics").decode()
    assert 'migrator_shim_pinned_total{reason="select"} 3.0' in text
    reused = pool(env)["reused"]  # (the first pinned client's connection was pooled too)
    assert reused >= 1 and f"migrator_shim_pool_reused_total {float(reused)}" in text
