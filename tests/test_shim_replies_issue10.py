"""Issue 10, C4 C5 C8 C10 C11: the shim's reply comparison and protocol edge cases, against real servers."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.phases import Phase
from migrator.shim import list_dirty, resp
from tests.test_shim_e2e import wait_for


@pytest.fixture
def env7(server_factory, make_env):
    """Redis 7.0 (source) and Valkey 9.1 (target): both have FUNCTION."""
    return make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))



def dirty(env):
    env.flush()
    return {(d.db, d.key, d.reason) for d in list_dirty(env.pb.state_path)}


def dirty_keys(env):
    return {(db, key) for db, key, _reason in dirty(env)}


def replies(sock: socket.socket, n: int, timeout: float = 5.0) -> list[bytes]:
    """Read ``n`` complete raw replies from ``sock``."""
    framer = resp.Framer()
    got: list[bytes] = []
    sock.settimeout(timeout)
    while len(got) < n:
        data = sock.recv(1 << 20)
        if not data:
            raise AssertionError(f"connection closed after {got!r}")
        got += framer.feed(data)
    return got


# --- C11: inline commands at any command boundary ----------------------------------------------

_inline_arg = st.binary(min_size=1, max_size=8).filter(lambda b: not any(c in b" \t\r\n\x0b\x0c\"'" for c in b))


@st.composite
def _mixed_stream(draw):
    """Commands, each encoded as RESP or inline, and their concatenation."""
    commands = draw(st.lists(st.tuples(st.booleans(), st.lists(_inline_arg, min_size=1, max_size=4)),
                             min_size=1, max_size=8))
    parts, expected = [], []
    for inline, args in commands:
        if inline and args[0][:1] != b"*":  # a line starting with '*' is RESP to Redis too
            parts.append(b" ".join(args) + draw(st.sampled_from([b"\r\n", b"\n"])))
        else:
            parts.append(resp.encode(args))
        expected.append(args)
    return b"".join(parts), expected


@settings(max_examples=300, deadline=None)
@given(_mixed_stream(), st.data())
def test_request_parser_takes_inline_and_resp_commands_mixed_and_cut_anywhere(stream_expected, data):
    """Inline and RESP commands in any order, cut at any points, come back as the same argument lists."""
    stream, expected = stream_expected
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    parser = resp.RequestParser(1 << 20)
    out, prev = [], 0
    for cut in [*cuts, len(stream)]:
        if cut > prev:
            out += parser.feed(stream[prev:cut])
        prev = cut
    assert out == expected


def test_request_parser_still_refuses_garbage_after_resp():
    """After RESP commands, malformed RESP is still a protocol error; commands before it in the same
    chunk are returned first (Redis runs them) and the error is kept for the session."""
    p = resp.RequestParser(1024)
    assert p.feed(b"*1\r\n$4\r\nPING\r\n") == [[b"PING"]]
    with pytest.raises(resp.ProtocolError):
        p.feed(b"*1\r\n:5\r\n")
    p = resp.RequestParser(1024)
    assert p.feed(b"*1\r\n$4\r\nPING\r\n*1\r\n$x\r\n") == [[b"PING"]]
    assert p.error is not None
    with pytest.raises(resp.ProtocolError):
        p.feed(b"*1\r\n$4\r\nPING\r\n")


@pytest.mark.parametrize("phase", [Phase.PLANNED, Phase.MIRRORING])
def test_inline_commands_after_resp_and_pipelined_are_answered_in_order(env7, phase):
    """RESP, then three pipelined inline commands in one write, then RESP and inline mixed: all answered, in order."""
    if phase is not Phase.PLANNED:
        env7.walk_to(phase)
    s = socket.create_connection(("127.0.0.1", env7.port))
    try:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert replies(s, 1) == [b"+PONG\r\n"]
        s.sendall(b"PING\r\nSET a 1\r\nGET a\r\n")
        assert replies(s, 3) == [b"+PONG\r\n", b"+OK\r\n", b"$1\r\n1\r\n"]
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$1\r\n2\r\nINCR b\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\nEXISTS a b\n")
        assert replies(s, 4) == [b"+OK\r\n", b":3\r\n", b"$1\r\n3\r\n", b":2\r\n"]
    finally:
        s.close()
    assert env7.source.client().mget("a", "b") == [b"1", b"3"]
    if phase is Phase.MIRRORING:
        wait_for(lambda: env7.target.client().mget("a", "b") == [b"1", b"3"], what="inline writes mirrored")
        assert dirty(env7) == set()


# --- C8: a reply nested too deep to compare ----------------------------------------------------

# A table `depth` levels deep on Redis, 0 on Valkey; with a key, it writes that key first.
DEEP = """
if string.find(redis.call('INFO', 'server'), 'valkey') then return 0 end
if #KEYS > 0 then redis.call('SET', KEYS[1], 'x') end
local t = {1}
for i = 1, tonumber(ARGV[1]) do t = {t} end
return t
"""


def eval_raw(port: int, nkeys: int, *args: bytes, depth: int) -> bytes:
    """EVAL DEEP over a raw socket; the complete reply's bytes."""
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(resp.encode([b"EVAL", DEEP.encode(), b"%d" % nkeys, *args, b"%d" % depth]))
        return replies(s, 1, timeout=10)[0]
    finally:
        s.close()


def test_parse_and_compare_refuse_a_too_deep_reply_and_stay_usable():
    """hiredis' nesting error is a ProtocolError that leaves later parses working; compare refuses past MAX_DEPTH."""
    from migrator.shim import compare as cmp

    with pytest.raises(resp.ProtocolError):
        resp.parse(b"*1\r\n" * 5000 + b":1\r\n")
    assert resp.parse(b"+OK\r\n") == b"OK"
    deep = resp.parse(b"*1\r\n" * (cmp.MAX_DEPTH + 1) + b":1\r\n")
    with pytest.raises(cmp.Uncomparable):
        cmp.compare(b"eval", deep, 0)
    assert cmp.compare(b"eval", resp.parse(b"*1\r\n" * cmp.MAX_DEPTH + b":1\r\n"), 0) is not None


@pytest.mark.parametrize("depth", [500, 5000])
def test_a_deep_reply_on_one_side_ends_that_command_and_frees_its_key(env7, depth):
    """A script returning a table nested `depth` deep on the source only: the client gets the source's
    reply, another client's write to the same key completes at once, and the key is marked dirty."""
    env = env7
    env.set_phase(Phase.MIRRORING)
    got = eval_raw(env.port, 1, b"deep", depth=depth)
    assert got == b"*1\r\n" * (depth + 1) + b":1\r\n"
    other = env.client()
    t0 = time.monotonic()
    assert other.set("deep", "after")
    assert time.monotonic() - t0 < 2.0
    assert (0, b"deep", "reply-not-compared") in dirty(env)
    # The shim still compares: a later read of another key is compared without a divergence.
    other.set("plain", "1")
    before = env.stats().compared
    assert other.get("plain") == b"1"
    env.flush()
    assert env.stats().compared > before and sum(env.stats().divergences.values()) == 0


def test_a_deep_reply_of_a_keyless_script_does_not_hold_every_clients_writes(env7):
    """A keyless script (a barrier for the sequencer) with a 5,000-deep reply on one side: other
    clients' writes still complete, and the whole database is marked dirty."""
    env = env7
    env.set_phase(Phase.MIRRORING)
    assert eval_raw(env.port, 0, depth=5000) == b"*1\r\n" * 5001 + b":1\r\n"
    done: list[bool] = []

    def writer(i: int) -> None:
        c = redis.Redis(port=env.port, socket_timeout=5)
        try:
            done.append(bool(c.set(f"w{i}", i)))
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(6)
    assert done == [True] * 4 and time.monotonic() - t0 < 3.0
    assert (0, None, "reply-not-compared") in dirty(env)
    wait_for(lambda: env.target.client().mget("w0", "w1", "w2", "w3") == [b"0", b"1", b"2", b"3"],
             what="writes after the deep reply mirrored")


# --- C4: SCRIPT FLUSH is not undone ------------------------------------------------------------

BODY = "return redis.call('INCR', KEYS[1])"


def test_script_flush_through_the_shim_makes_evalsha_answer_noscript_on_every_connection(env7):
    """After SCRIPT FLUSH through the shim, EVALSHA gets NOSCRIPT on this and another connection, and
    neither side has the script again (the shim forgot the body it remembered)."""
    env = env7
    env.set_phase(Phase.MIRRORING)
    a, b = env.client(), env.client()
    sha = a.script_load(BODY)
    assert a.evalsha(sha, 1, "n") == 1 and b.evalsha(sha, 1, "n") == 2
    assert a.script_flush()
    with pytest.raises(redis.exceptions.NoScriptError):
        a.evalsha(sha, 1, "n")
    with pytest.raises(redis.exceptions.NoScriptError):
        b.evalsha(sha, 1, "n")
    assert env.source.client().script_exists(sha) == [False]
    assert env.target.client().script_exists(sha) == [False]
    assert env.source.client().get("n") == b"2"
    wait_for(lambda: env.target.client().get("n") == b"2", what="INCRs mirrored")
    assert dirty(env) == set() and sum(env.stats().divergences.values()) == 0


def test_evalsha_is_never_loaded_on_the_answering_side(env7):
    """A body the shim remembers is not loaded on the side whose reply the client gets: the source
    lost its script cache, so the client sees the source's NOSCRIPT; the target that ran it is dirty."""
    env = env7
    c = env.client()
    sha = c.script_load(BODY)  # compatible: the source only, and the shim remembers the body
    env.source.client().script_flush()  # e.g. a restart of the source
    env.set_phase(Phase.MIRRORING)
    with pytest.raises(redis.exceptions.NoScriptError):
        c.evalsha(sha, 1, "n")
    assert env.source.client().script_exists(sha) == [False]
    assert env.source.client().get("n") is None
    # The shadow side is still healed, so it ran the script: that difference is on record.
    wait_for(lambda: env.target.client().get("n") == b"1", what="the target healed and ran it")
    assert (0, b"n") in dirty_keys(env)


# --- C5: a write both sides refuse alike ------------------------------------------------------

LIB = "#!lua name=issue10lib\nredis.register_function('issue10f', function(keys, args) return 1 end)"


@pytest.mark.parametrize("phase", [Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET])
def test_a_write_both_sides_refuse_alike_is_neither_a_divergence_nor_dirty(env7, phase):
    """FUNCTION LOAD of an existing library, FUNCTION FLUSH BOGUS, WRONGTYPE, NOSCRIPT and a
    non-integer INCR, refused by both sides with the same error: no divergence, no dirty mark."""
    env = env7
    env.walk_to(phase)
    c = env.client()
    assert c.execute_command("FUNCTION", "LOAD", "REPLACE", LIB) == b"issue10lib"
    refused = [
        ("FUNCTION", "LOAD", LIB),
        ("FUNCTION", "FLUSH", "BOGUS"),
        ("LPUSH", "str", "x"),
        ("INCR", "str"),
        ("EVALSHA", "0" * 40, 1, "str"),
        ("EVAL", "return redis.call('LPUSH', KEYS[1], 'x')", 1, "str"),
    ]
    c.set("str", "text")
    for args in refused:
        with pytest.raises(redis.exceptions.ResponseError):
            c.execute_command(*args)
    assert c.get("str") == b"text"
    assert dirty(env) == set()
    assert sum(env.stats().divergences.values()) == 0, dict(env.stats().divergences)


# --- C10: chained blocking moves ----------------------------------------------------------------


def blocked_clients(server) -> int:
    return int(server.client().info("clients")["blocked_clients"])


def lists(server, *keys):
    c = server.client()
    return {k: c.lrange(k, 0, -1) for k in keys}


def test_chained_blocking_moves_end_equal_on_both_sides_or_dirty(env7):
    """A: BLMOVE l1 l2, B: BLMOVE l2 l3, C: RPUSH l1 foo, ten times: every list that differs between
    the sides is marked dirty (never a silent difference), and in fact none differs: the shadow
    gets the two moves in the order the server ran them."""
    env = env7
    env.set_phase(Phase.MIRRORING)
    a, b, c = env.client(), env.client(), env.client()
    differed = 0
    for i in range(10):
        l1, l2, l3 = f"l1:{i}", f"l2:{i}", f"l3:{i}"
        got: dict[str, object] = {}
        ta = threading.Thread(target=lambda: got.setdefault("a", a.blmove(l1, l2, 5, "RIGHT", "LEFT")))
        tb = threading.Thread(target=lambda: got.setdefault("b", b.blmove(l2, l3, 5, "RIGHT", "LEFT")))
        ta.start()
        wait_for(lambda: blocked_clients(env.source) == 1, what="A blocked")
        tb.start()
        wait_for(lambda: blocked_clients(env.source) == 2, what="B blocked")
        assert c.rpush(l1, "foo") == 1
        ta.join(6)
        tb.join(6)
        assert got == {"a": b"foo", "b": b"foo"}
        env.flush()
        src, tgt = lists(env.source, l1, l2, l3), lists(env.target, l1, l2, l3)
        assert src == {l1: [], l2: [], l3: [b"foo"]}
        diff = {k for k in src if src[k] != tgt[k]}
        if diff:
            differed += 1
            marked = dirty_keys(env)
            assert {(0, k.encode()) for k in diff} <= marked, (src, tgt, marked)
    # The shim holds the second move's effect until the first one's is mirrored: same order.
    assert differed == 0, f"chained moves mirrored in another order {differed} time(s) of 10 (each marked dirty)"


def test_a_move_that_moves_something_else_on_the_shadow_is_a_divergence_and_dirty(env7):
    """BLMOVE q dst pops 'a' on the source while the target's q holds 'b': the target's LMOVE moves
    'b', which is a divergence with both keys marked dirty, not a silent difference."""
    env = env7
    env.set_phase(Phase.MIRRORING)
    env.source.client().rpush("q", "a")
    env.target.client().rpush("q", "b")
    assert env.client().blmove("q", "dst", 1, "LEFT", "LEFT") == b"a"
    env.flush()
    assert env.target.client().lrange("dst", 0, -1) == [b"b"]
    assert {(0, b"q"), (0, b"dst")} <= dirty_keys(env)
    assert env.stats().divergences["different-value"] == 1


def test_a_pop_fed_by_another_write_does_not_wait_for_a_blocked_move_into_its_key(env7):
    """A: BLMOVE l1 l2 stays blocked; B: BLMOVE l2 l3 is woken by RPUSH l2 bar: its effect is mirrored
    at once (l1 is not being written), and A still moves what a later RPUSH l1 brings."""
    env = env7
    env.set_phase(Phase.MIRRORING)
    a, b, c = env.client(), env.client(), env.client()
    got: dict[str, object] = {}
    ta = threading.Thread(target=lambda: got.setdefault("a", a.blmove("l1", "l2", 5, "RIGHT", "LEFT")))
    tb = threading.Thread(target=lambda: got.setdefault("b", b.blmove("l2", "l3", 5, "RIGHT", "LEFT")))
    ta.start()
    wait_for(lambda: blocked_clients(env.source) == 1, what="A blocked")
    tb.start()
    wait_for(lambda: blocked_clients(env.source) == 2, what="B blocked")
    c.rpush("l2", "bar")
    tb.join(6)
    t0 = time.monotonic()
    wait_for(lambda: env.target.client().lrange("l3", 0, -1) == [b"bar"], what="B's move mirrored")
    assert time.monotonic() - t0 < 0.5 and got == {"b": b"bar"}
    c.rpush("l1", "foo")
    ta.join(6)
    assert got == {"a": b"foo", "b": b"bar"}
    env.flush()
    assert lists(env.source, "l1", "l2", "l3") == lists(env.target, "l1", "l2", "l3") == {
        "l1": [], "l2": [b"foo"], "l3": [b"bar"]}
    assert dirty(env) == set()


def test_sequencer_knows_a_blocked_move_may_feed_a_key_while_its_source_is_written():
    """fed_by_move: true while a blocked move's source is held by a write or has a pending wake; never for its own move."""
    from migrator.shim.sequencer import Request, Sequencer

    timers: list = []
    seq = Sequencer(call_later=lambda delay, fn: timers.append(fn))
    seq.blocking_started([b"l1", b"l2"])
    seq.move_started(b"l1", b"l2")
    assert not seq.fed_by_move([b"l2", b"l3"])  # nothing writes l1
    push = Request("c", [(b"l1", True)], lambda r: None)
    assert seq.acquire(push)
    assert seq.fed_by_move([b"l2", b"l3"])  # RPUSH l1 in flight
    assert not seq.fed_by_move([b"l1", b"l2"], own=(b"l1", b"l2"))  # the move itself
    seq.release(push)
    assert seq.fed_by_move([b"l2"])  # released with a pending wake
    for fn in timers:
        fn()
    assert not seq.fed_by_move([b"l2"])  # the wake expired
    seq.move_ended(b"l1", b"l2")
    assert seq.moves == {}


def _quote(arg: bytes) -> bytes:
    """``arg`` as a double-quoted inline argument, escaped the ways Redis reads."""
    out = bytearray(b'"')
    for c in arg:
        if c in b'"\\':
            out += b"\\" + bytes([c])
        elif c == 10:
            out += b"\\n"
        elif c < 32 or c > 126:
            out += b"\\x%02x" % c
        else:
            out.append(c)
    return bytes(out + b'"')


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=12), min_size=1, max_size=5))
def test_inline_arguments_in_double_quotes_come_back_as_they_were(args):
    """Quoted inline arguments (spaces, quotes, escapes, \\xHH, empty) are split as Redis's sdssplitargs splits them."""
    assert resp.split_inline(b" ".join(_quote(a) for a in args)) == args


def test_inline_quoting_matches_redis(env7):
    """The same quoted inline lines give the same replies through the shim and from Redis itself."""
    lines = [b"SET q1 \"hello world\"", b"GET q1", b"SET q2 'it\\'s'", b"GET q2", b"SET q3 \"a\\x41\\tb\"",
             b"GET q3", b"SET \"\" empty", b"GET \"\"", b"ECHO \"unbalanced"]
    env = env7

    def run(port: int) -> list[bytes]:
        s = socket.create_connection(("127.0.0.1", port))
        try:
            s.sendall(b"\r\n".join(lines) + b"\r\n")
            got = replies(s, len(lines))
            s.settimeout(2)
            assert s.recv(100) == b""  # unbalanced quotes: the server closes the connection
            return got
        finally:
            s.close()

    direct = run(env.source.port)
    assert direct[-1].startswith(b"-ERR Protocol error") and direct[1] == b"$11\r\nhello world\r\n"
    env.source.client().flushall()
    assert run(env.port) == direct


def test_a_reply_too_deep_to_count_in_passthrough_reaches_the_client_then_its_connection_closes(server_factory,
                                                                                                  make_env):
    """planned (passthrough) on a connection of its own: a 5,000-deep reply is delivered whole, that
    connection is then closed (the stream position is lost), and other clients go on."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"), shim={"shared_connections": 0})
    other = env.client()
    other.set("before", "1")
    s = socket.create_connection(("127.0.0.1", env.port))
    try:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")  # (the upstream connection is up: passthrough from here)
        assert replies(s, 1) == [b"+PONG\r\n"]
        s.sendall(resp.encode([b"EVAL", DEEP.encode(), b"0", b"5000"]))
        assert replies(s, 1, timeout=10) == [b"*1\r\n" * 5001 + b":1\r\n"]
        s.settimeout(5)
        assert s.recv(100) == b""
    finally:
        s.close()
    assert other.get("before") == b"1" and other.set("after", "2")


def test_a_reply_too_deep_to_count_on_a_shared_connection_is_framed_and_the_client_goes_on(env7):
    """planned, multiplexed (the default): the shared connection frames replies instead of counting
    them, so a 5,000-deep reply is delivered whole and the same client's next command is answered."""
    env = env7
    s = socket.create_connection(("127.0.0.1", env.port))
    try:
        s.sendall(resp.encode([b"EVAL", DEEP.encode(), b"0", b"5000"]) + b"*1\r\n$4\r\nPING\r\n")
        assert replies(s, 2, timeout=10) == [b"*1\r\n" * 5001 + b":1\r\n", b"+PONG\r\n"]
    finally:
        s.close()
    assert env.thread.call(lambda: env.thread.shim.mux.status()["pinned"]) == 0


@pytest.mark.parametrize(("args", "reply", "same", "other"), [
    ([b"BLPOP", b"q", b"0"], [b"q", b"a"], b"a", None),
    ([b"BLMOVE", b"a", b"b", b"LEFT", b"RIGHT", b"0"], b"x", b"x", b"y"),
    ([b"BRPOPLPUSH", b"a", b"b", b"0"], b"x", b"x", None),
    ([b"BLMPOP", b"0", b"1", b"q", b"LEFT", b"COUNT", b"2"], [b"q", [b"a", b"b"]], [b"a", b"b"], [b"a"]),
    ([b"BZPOPMIN", b"z", b"0"], [b"z", b"m", b"1"], 1, 0),
    ([b"BZMPOP", b"0", b"1", b"z", b"MIN", b"COUNT", b"2"], [b"z", [[b"m", b"1"], [b"n", b"2"]]], 2, 1),
    ([b"SPOP", b"s", b"2"], [b"a", b"b"], 2, 1),
])
def test_an_effect_is_confirmed_only_by_the_same_outcome_on_the_shadow(args, reply, same, other):
    """effects.confirms: the shadow's reply to a pop's effect must show the same element(s) removed."""
    from migrator.shim import effects

    assert effects.confirms(args, reply, same)
    assert not effects.confirms(args, reply, other)
