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
from tests.test_shim_e2e import make_env, wait_for  # noqa: F401 - make_env is a fixture


@pytest.fixture
def env7(server_factory, make_env):  # noqa: F811 - make_env is the imported fixture
    """Redis 7.0 (source) and Valkey 9.1 (target): both have FUNCTION."""
    return make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))


def enter(env, phase):
    order = [Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET]
    for p in order[: order.index(phase) + 1]:
        env.set_phase(p)


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
    """After RESP commands, malformed RESP (a non-bulk element) is still a protocol error."""
    p = resp.RequestParser(1024)
    assert p.feed(b"*1\r\n$4\r\nPING\r\n") == [[b"PING"]]
    with pytest.raises(resp.ProtocolError):
        p.feed(b"*1\r\n:5\r\n")
    with pytest.raises(resp.ProtocolError):
        resp.RequestParser(1024).feed(b"*1\r\n$4\r\nPING\r\n*1\r\n$x\r\n")


@pytest.mark.parametrize("phase", [Phase.PLANNED, Phase.MIRRORING])
def test_inline_commands_after_resp_and_pipelined_are_answered_in_order(env7, phase):
    """RESP, then three pipelined inline commands in one write, then RESP and inline mixed: all answered, in order."""
    if phase is not Phase.PLANNED:
        enter(env7, phase)
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
