"""Unit tests of the shim's pure modules: RESP framing, classification, routing, effects, comparison."""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.phases import Phase
from migrator.shim import compare as cmp
from migrator.shim import effects, resp
from migrator.shim.commands import (
    SOURCE,
    TARGET,
    Cls,
    CommandTable,
    parse_command_entry,
    parse_command_reply,
)
from migrator.shim.routing import ROUTES, SHIM, publish_reaches, route

# --- RESP ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.binary(max_size=40).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: b":%d\r\n" % i),
    st.text(alphabet="abcdefgh OK", max_size=10).map(lambda s: b"+" + s.encode() + b"\r\n"),
    st.just(b"-ERR wrong\r\n"),
    st.just(b"$-1\r\n"),
    st.just(b"*-1\r\n"),
    st.just(b"_\r\n"),
    st.just(b"#t\r\n"),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: b",%r\r\n" % f),
    st.just(b"=8\r\ntxt:abcd\r\n"),
    st.just(b"(12345678901234567890\r\n"),
)


def _agg(children):
    return st.one_of(
        st.lists(children, max_size=4).map(lambda xs: b"*%d\r\n" % len(xs) + b"".join(xs)),
        st.lists(children, max_size=4).map(lambda xs: b"~%d\r\n" % len(xs) + b"".join(xs)),
        st.lists(st.tuples(scalars, children), max_size=3).map(
            lambda kv: b"%%%d\r\n" % len(kv) + b"".join(k + v for k, v in kv)),
        st.lists(children, min_size=1, max_size=3).map(lambda xs: b">%d\r\n" % len(xs) + b"".join(xs)),
    )


replies = st.recursive(scalars, _agg, max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.just(b"+OK\r\n"), replies), min_size=1, max_size=10), st.data())
def test_framer_splits_any_stream_into_the_replies_sent(msgs, data):
    """However a stream of RESP2/RESP3 replies is cut into chunks, the framer yields exactly the replies, byte for byte
    (streams of many +OK included: a chunk of nothing but +OK takes a shortcut)."""
    stream = b"".join(msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    framer = resp.Framer()
    out, prev = [], 0
    for cut in [*cuts, len(stream)]:
        out += framer.feed(stream[prev:cut])
        prev = cut
    assert out == msgs
    assert framer.pending_bytes() == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(replies, min_size=1, max_size=5))
def test_framed_replies_parse_like_hiredis_parses_the_stream(msgs):
    """Parsing each framed reply gives what hiredis gives for the whole stream (same boundaries)."""
    reader = hiredis.Reader()
    reader.feed(b"".join(msgs))
    whole = []
    while (v := reader.gets()) is not False:
        whole.append(v)
    each = [resp.parse(m) for m in resp.Framer().feed(b"".join(msgs))]
    assert repr(each) == repr(whole)


def test_frame_end_handles_attributes_and_reports_incomplete():
    """An attribute is framed together with the reply it annotates; a partial reply needs more bytes."""
    stream = b"|1\r\n+key\r\n+val\r\n:42\r\n"
    assert resp.frame_end(stream) == len(stream)
    assert resp.frame_end(b"*2\r\n:1\r\n") == -1
    assert resp.frame_end(b"$5\r\nab") == -1


def test_frame_end_rejects_garbage():
    """Bytes that are not RESP raise ProtocolError instead of desynchronising silently."""
    with pytest.raises(resp.ProtocolError):
        resp.frame_end(b"?what\r\n")
    with pytest.raises(resp.ProtocolError):
        resp.frame_end(b"$abc\r\n")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=30), min_size=1, max_size=5), min_size=1, max_size=6), st.data())
def test_request_parser_round_trips_encoded_commands(commands, data):
    """Commands encoded as RESP arrays and cut anywhere come back as the same argument lists."""
    stream = b"".join(resp.encode(c) for c in commands)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    parser = resp.RequestParser(1 << 20)
    out, prev = [], 0
    for cut in [*cuts, len(stream)]:
        if cut > prev:
            out += parser.feed(stream[prev:cut])
        prev = cut
    assert out == commands


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.one_of(st.binary(max_size=30), st.binary(min_size=9, max_size=12).map(lambda b: b * 6000)),
                         min_size=1, max_size=12), min_size=1, max_size=6))
def test_encoded_length_is_the_length_of_the_encoded_command(commands):
    """The fast path's byte count of a chunk equals the canonical encoding's, small and large arguments alike."""
    assert sum(map(resp.encoded_length, commands)) == len(b"".join(resp.encode(c) for c in commands))


def test_request_parser_accepts_inline_commands():
    """Inline commands (redis-cli, telnet) are split on whitespace, even across chunks."""
    p = resp.RequestParser(1024)
    assert p.feed(b"PING\r\nSET a ") == [[b"PING"]]
    assert p.feed(b"1\r\n") == [[b"SET", b"a", b"1"]]


def test_request_parser_rejects_malformed_and_oversized_requests():
    """Malformed RESP and a request over max_request_bytes both raise ProtocolError."""
    with pytest.raises(resp.ProtocolError):
        resp.RequestParser(1024).feed(b"*1\r\n:5\r\n")
    with pytest.raises(resp.ProtocolError):
        resp.RequestParser(1024).feed(b"*1\r\n$x\r\n")
    p = resp.RequestParser(100)
    with pytest.raises(resp.ProtocolError, match="max_request_bytes"):
        p.feed(b"*2\r\n$3\r\nSET\r\n$500\r\n" + b"x" * 200)


def test_error_reply_cannot_break_the_stream():
    """A newline in a shim error message is flattened so the reply stays one line."""
    assert resp.error_reply("ERR a\r\nb") == b"-ERR a  b\r\n"


# --- command classification ----------------------------------------------------------------

def _entry(name, flags, first=1, last=1, step=1, cats=(), specs=None, subs=None):
    return [name, -2, flags, first, last, step, list(cats), [], specs or [], subs or []]


RANGE1 = [{b"flags": [b"RW"], b"begin_search": {b"type": b"index", b"spec": {b"index": 1}},
           b"find_keys": {b"type": b"range", b"spec": {b"lastkey": 0, b"keystep": 1, b"limit": 0}}}]


def _table():
    src = parse_command_reply([
        _entry(b"get", [b"readonly"]), _entry(b"set", [b"write"]),
        [b"blpop", -3, [b"write", b"noscript"], 1, -2, 1, [b"@blocking"]],  # Redis 6.2: no blocking flag
        _entry(b"eval", [b"noscript", b"movablekeys"], 0, 0, 0),
        _entry(b"xread", [b"readonly", b"blocking", b"movablekeys"], 0, 0, 0),
        _entry(b"client", [], 0, 0, 0, subs=[_entry(b"client|setname", [], 0, 0, 0), _entry(b"client|list", [b"admin"], 0, 0, 0)]),
        _entry(b"info", [b"loading"], 0, 0, 0),
        _entry(b"onlysource", [b"write"]),
    ])
    tgt = parse_command_reply([
        _entry(b"get", [b"readonly"], specs=RANGE1), _entry(b"set", [b"write"], specs=RANGE1),
        _entry(b"blpop", [b"write", b"blocking"], 1, -2, 1),
        _entry(b"eval", [b"noscript", b"movablekeys"], 0, 0, 0, specs=[
            {b"begin_search": {b"type": b"index", b"spec": {b"index": 2}},
             b"find_keys": {b"type": b"keynum", b"spec": {b"keynumidx": 0, b"firstkey": 1, b"keystep": 1}}}]),
        _entry(b"xread", [b"readonly", b"blocking", b"movablekeys"], 0, 0, 0, specs=[
            {b"begin_search": {b"type": b"keyword", b"spec": {b"keyword": b"STREAMS", b"startfrom": 1}},
             b"find_keys": {b"type": b"range", b"spec": {b"lastkey": -1, b"keystep": 1, b"limit": 2}}}]),
        _entry(b"client", [], 0, 0, 0, subs=[_entry(b"client|setname", [], 0, 0, 0)]),
        _entry(b"info", [b"loading"], 0, 0, 0),
        _entry(b"onlytarget", [b"readonly"]),
    ])
    return CommandTable(src, tgt)


@pytest.mark.parametrize("args, cls", [
    ([b"GET", b"k"], Cls.READ),
    ([b"set", b"k", b"v"], Cls.WRITE),
    ([b"BLPOP", b"a", b"0"], Cls.BLOCKING),
    ([b"EVAL", b"return 1", b"0"], Cls.SCRIPT),
    ([b"XREAD", b"STREAMS", b"s", b"0"], Cls.READ),
    ([b"XREAD", b"BLOCK", b"10", b"STREAMS", b"s", b"0"], Cls.BLOCKING_READ),
    ([b"CLIENT", b"SETNAME", b"x"], Cls.CONNECTION),
    ([b"CLIENT", b"TRACKING", b"on"], Cls.UNSUPPORTED),
    ([b"MONITOR"], Cls.UNSUPPORTED),
    ([b"INFO"], Cls.ADMIN),
    ([b"MULTI"], Cls.TX),
    ([b"AUTH", b"pw"], Cls.LOCAL),
    ([b"PUBLISH", b"c", b"m"], Cls.PUBLISH),
    ([b"SUBSCRIBE", b"c"], Cls.SUBSCRIBE),
    ([b"NOSUCH"], Cls.UNKNOWN),
])
def test_classification(args, cls):
    """Commands are classified from the merged tables, by name where the shim must treat them specially."""
    assert _table().classify(args).cls is cls


def test_a_container_command_alone_does_not_shadow_its_subcommands():
    """CLIENT on its own and CLIENT SETNAME are classified separately (no stale cache entry)."""
    t = _table()
    assert t.classify([b"CLIENT"]).cls is Cls.ADMIN
    assert t.classify([b"CLIENT", b"SETNAME", b"x"]).cls is Cls.CONNECTION
    assert t.classify([b"get", b"k"]) is t.classify([b"GET", b"k"])


def test_blocking_from_either_side_and_unknown_sides_are_reported():
    """A blocking flag on one side only still makes the command blocking; each side's ignorance is reported."""
    t = _table()
    assert t.classify([b"blpop", b"a", b"0"]).known == (True, True)
    assert t.classify([b"onlysource", b"k"]).known == (True, False)
    assert t.classify([b"onlytarget", b"k"]).known == (False, True)
    assert t.classify([b"CLIENT", b"LIST"]).known == (True, False)
    assert t.unknown_to(TARGET) == {b"onlysource"}


def test_a_side_whose_table_is_missing_is_assumed_to_know_everything():
    """While a side's COMMAND table could not be read, commands are not reported unknown there."""
    t = CommandTable(_table().tables[0], None)
    assert t.classify([b"onlysource", b"k"]).known == (True, True)


@pytest.mark.parametrize("args, keys", [
    ([b"GET", b"k"], [b"k"]),
    ([b"EVAL", b"s", b"2", b"a", b"b", b"arg"], [b"a", b"b"]),
    ([b"XREAD", b"COUNT", b"2", b"STREAMS", b"s1", b"s2", b"0", b"0"], [b"s1", b"s2"]),
    ([b"BLPOP", b"a", b"b", b"0"], [b"a", b"b"]),
    ([b"INFO"], []),
])
def test_keys_from_key_specs_and_legacy_triples(args, keys):
    """Key names follow the servers' key specs (keynum, keyword) or the legacy first/last/step."""
    assert _table().classify(args).keys(args) == keys


def test_parse_command_entry_reads_resp2_flat_key_specs():
    """Key specs rendered as RESP2 flat lists parse like RESP3 maps."""
    flat = [b"begin_search", [b"type", b"index", b"spec", [b"index", 1]],
            b"find_keys", [b"type", b"range", b"spec", [b"lastkey", 0, b"keystep", 1, b"limit", 0]]]
    info = parse_command_entry([b"get", 2, [b"readonly"], 1, 1, 1, [], [], [flat], []])
    assert info.keys([b"get", b"x"]) == [b"x"]


# --- routing -------------------------------------------------------------------------------

EXPECTED_ANSWER = {
    # phase: (reads answered by, writes answered by, writes also applied to, reads compared on)
    Phase.PLANNED: (SOURCE, SOURCE, None, None),
    Phase.COMPATIBLE: (SOURCE, SOURCE, None, None),
    Phase.MIRRORING: (SOURCE, SOURCE, TARGET, TARGET),
    Phase.READS_ON_TARGET: (TARGET, SOURCE, TARGET, SOURCE),
    Phase.WRITES_ON_TARGET: (TARGET, TARGET, SOURCE, None),
    Phase.COMPLETED: (TARGET, TARGET, None, None),
}


@given(st.sampled_from(list(Phase)), st.sampled_from(list(Cls)))
def test_routing_table_is_total_and_consistent(phase, cls):
    """Every (phase, class) has a plan; the shadow is never the answering side; nothing mirrors outside the migration."""
    plan = route(phase, cls)
    assert ROUTES[phase][cls] == plan
    assert plan.shadow is None or plan.shadow != plan.answer
    if phase in (Phase.PLANNED, Phase.COMPATIBLE):
        assert plan.sides() in ((SOURCE,), (SHIM,))
    if phase is Phase.COMPLETED:
        assert plan.sides() in ((TARGET,), (SHIM,))
    if plan.wait_shadow:
        assert phase is Phase.READS_ON_TARGET and plan.sequential
    if cls in (Cls.BLOCKING, Cls.BLOCKING_READ, Cls.SUBSCRIBE):
        assert plan.shadow is None or plan.effect  # blocks on one side only


@pytest.mark.parametrize("phase", list(Phase))
def test_routing_matches_the_specification(phase):
    """Reads, writes and their shadows go where issue 3 says for each phase."""
    reads, writes, write_shadow, read_shadow = EXPECTED_ANSWER[phase]
    r, w = ROUTES[phase][Cls.READ], ROUTES[phase][Cls.WRITE]
    assert (r.answer, r.shadow, w.answer, w.shadow) == (reads, read_shadow, writes, write_shadow)
    assert r.sampled == (read_shadow is not None)
    assert r.fallback == (phase is Phase.READS_ON_TARGET)  # the source's failure is never masked
    assert w.compare == (write_shadow is not None)
    assert w.wait_shadow == (phase is Phase.READS_ON_TARGET)
    assert ROUTES[phase][Cls.BLOCKING].answer == writes and not ROUTES[phase][Cls.BLOCKING].compare
    assert ROUTES[phase][Cls.TX].answer == writes
    assert ROUTES[phase][Cls.SUBSCRIBE].answer == reads and ROUTES[phase][Cls.SUBSCRIBE].shadow is None
    assert ROUTES[phase][Cls.LOCAL].answer == SHIM


def test_publish_reaches_both_sides_only_during_the_migration():
    """PUBLISH goes to both sides from mirroring to writes-on-target, else to the one side in use."""
    assert publish_reaches(Phase.COMPATIBLE) == {SOURCE}
    assert publish_reaches(Phase.MIRRORING) == {SOURCE, TARGET}
    assert publish_reaches(Phase.WRITES_ON_TARGET) == {SOURCE, TARGET}
    assert publish_reaches(Phase.COMPLETED) == {TARGET}


# --- effects -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, reply, expected", [
    ([b"SPOP", b"s", b"2"], [b"a", b"b"], [[b"SREM", b"s", b"a", b"b"]]),
    ([b"SPOP", b"s"], b"a", [[b"SREM", b"s", b"a"]]),
    ([b"SPOP", b"s"], None, []),
    ([b"BLPOP", b"a", b"b", b"0"], [b"b", b"x"], [[b"LPOP", b"b"]]),
    ([b"BRPOP", b"a", b"0"], [b"a", b"x"], [[b"RPOP", b"a"]]),
    ([b"BLPOP", b"a", b"1"], None, []),
    ([b"BLMOVE", b"a", b"b", b"LEFT", b"RIGHT", b"0"], b"x", [[b"LMOVE", b"a", b"b", b"LEFT", b"RIGHT"]]),
    ([b"BRPOPLPUSH", b"a", b"b", b"0"], b"x", [[b"RPOPLPUSH", b"a", b"b"]]),
    ([b"BZPOPMIN", b"z", b"0"], [b"z", b"m", b"1"], [[b"ZREM", b"z", b"m"]]),
    ([b"BLMPOP", b"0", b"1", b"l", b"RIGHT", b"COUNT", b"2"], [b"l", [b"x", b"y"]], [[b"RPOP", b"l", b"2"]]),
    # The direction is the argument after the keys, even with a key named "left" or "right".
    ([b"BLMPOP", b"0", b"1", b"left", b"RIGHT"], [b"left", [b"c"]], [[b"RPOP", b"left", b"1"]]),
    ([b"BLMPOP", b"0", b"2", b"right", b"left", b"LEFT"], [b"left", [b"a"]], [[b"LPOP", b"left", b"1"]]),
    ([b"BZMPOP", b"0", b"1", b"z", b"MIN"], [b"z", [[b"m", b"1"]]], [[b"ZREM", b"z", b"m"]]),
    ([b"INCRBYFLOAT", b"f", b"0.1"], b"1.1", [[b"SET", b"f", b"1.1", b"KEEPTTL"]]),
    ([b"HINCRBYFLOAT", b"h", b"f", b"1"], b"2.5", [[b"HSET", b"h", b"f", b"2.5"]]),
    ([b"XADD", b"s", b"MAXLEN", b"~", b"10", b"*", b"f", b"v"], b"1-0",
     [[b"XADD", b"s", b"MAXLEN", b"~", b"10", b"1-0", b"f", b"v"]]),
    ([b"XREADGROUP", b"GROUP", b"g", b"c", b"BLOCK", b"5", b"STREAMS", b"s", b">"], [[b"s", []]],
     [[b"XREADGROUP", b"GROUP", b"g", b"c", b"STREAMS", b"s", b">"]]),
    ([b"SPOP", b"s"], hiredis.ReplyError("WRONGTYPE x"), []),
])
def test_effects_replace_non_deterministic_writes(args, reply, expected):
    """The shadow gets exactly what the authoritative side did, computed from its reply."""
    assert effects.needs_reply(args)
    assert effects.effect(args, reply) == expected


@pytest.mark.parametrize("args, expected", [
    ([b"EXPIRE", b"k", b"10"], [b"PEXPIREAT", b"k", b"1010000"]),
    ([b"PEXPIRE", b"k", b"5", b"NX"], [b"PEXPIREAT", b"k", b"1000005", b"NX"]),
    ([b"SETEX", b"k", b"2", b"v"], [b"SET", b"k", b"v", b"PXAT", b"1002000"]),
    ([b"SET", b"k", b"v", b"NX", b"EX", b"3"], [b"SET", b"k", b"v", b"NX", b"PXAT", b"1003000"]),
    ([b"GETEX", b"k", b"PX", b"7"], [b"GETEX", b"k", b"PXAT", b"1000007"]),
    ([b"RESTORE", b"k", b"100", b"payload"], [b"RESTORE", b"k", b"1000100", b"payload", b"ABSTTL"]),
    ([b"SET", b"k", b"v"], None),
    ([b"SETEX", b"k", b"notanumber", b"v"], None),
    ([b"XADD", b"s", b"5-1", b"f", b"v"], None),
])
def test_relative_expiries_become_absolute(args, expected):
    """Relative expiries are rewritten with the shim's clock so both sides expire together."""
    assert effects.rewrite_now(args, 1_000_000) == expected


def test_xadd_with_explicit_id_needs_no_reply():
    """Only XADD with * depends on the reply; an explicit ID is mirrored as it is."""
    assert not effects.needs_reply([b"XADD", b"s", b"1-1", b"f", b"v"])
    assert effects.needs_reply([b"XADD", b"s", b"NOMKSTREAM", b"*", b"f", b"v"])
    assert not effects.needs_reply([b"XREADGROUP", b"GROUP", b"g", b"c", b"STREAMS", b"s", b">"])


# --- comparison ----------------------------------------------------------------------------

E = hiredis.ReplyError


@pytest.mark.parametrize("name, a, b, kind", [
    (b"get", b"x", b"x", None),
    (b"get", b"x", b"y", cmp.DIFFERENT_VALUE),
    (b"get", b"x", None, cmp.MISSING_ON_TARGET),
    (b"get", None, b"x", cmp.MISSING_ON_SOURCE),
    (b"exists", 1, 0, cmp.MISSING_ON_TARGET),
    (b"smembers", [b"a", b"b", b"c"], [b"c", b"a", b"b"], None),
    (b"smembers", [b"a", b"b"], [b"a", b"a"], cmp.DIFFERENT_VALUE),
    (b"hgetall", [b"f1", b"v1", b"f2", b"v2"], [b"f2", b"v2", b"f1", b"v1"], None),
    (b"hgetall", {b"f1": b"v1", b"f2": b"v2"}, {b"f2": b"v2", b"f1": b"v1"}, None),
    (b"lrange", [b"a", b"b"], [b"b", b"a"], cmp.DIFFERENT_VALUE),
    (b"incrbyfloat", b"3.0000000000000004", b"3", None),
    (b"zscore", b"1.5", 1.5, None),
    (b"zrange", [[b"m", 1.0]], [[b"m", 1.0000000000001]], None),
    (b"ttl", 100, 99, None),
    (b"ttl", 100, 90, cmp.DIFFERENT_VALUE),
    (b"pttl", -1, 5000, cmp.DIFFERENT_VALUE),
    (b"pttl", 5000, -2, cmp.MISSING_ON_TARGET),
    (b"get", E("WRONGTYPE Operation"), b"x", cmp.TYPE),
    (b"incr", E("ERR value is not an integer"), 3, cmp.ERROR_ONLY_ON_ONE_SIDE),
    (b"incr", E("ERR value is not an integer or out of range"), E("ERR value is not an integer"), None),
    (b"lrange", [b"a"], b"a", cmp.TYPE),
    (b"sismember", True, 1, None),
])
def test_compare(name, a, b, kind):
    """Replies are compared as data: order-free where the server promises no order, floats by value, TTLs with tolerance."""
    assert cmp.compare(name, a, b, ttl_tolerance_ms=2000) == kind


def test_time_dependent_commands_are_not_compared():
    """INFO, TIME, RANDOMKEY, SCAN and CLIENT replies legitimately differ, so they are excluded."""
    for name in (b"info", b"time", b"randomkey", b"scan", b"client", b"object", b"srandmember"):
        assert not cmp.comparable(name)
    assert cmp.comparable(b"get")


def test_compare_exec_skips_replaced_commands():
    """EXEC replies are compared only where both sides ran the same command."""
    src = [1, [b"a"], b"OK"]
    tgt = [1, 1, b"OK"]  # SPOP was replaced by SREM on the target: its reply differs legitimately
    assert cmp.compare_exec([b"incr", b"set"], src, tgt, [(0, 0), (2, 2)]) is None
    assert cmp.compare_exec([b"incr"], [1], [2], [(0, 0)]) == cmp.DIFFERENT_VALUE


@given(st.lists(st.binary(max_size=5), max_size=8), st.randoms())
def test_multiset_comparison_ignores_order(members, rnd):
    """Any permutation of an unordered reply compares equal."""
    shuffled = members[:]
    rnd.shuffle(shuffled)
    assert cmp.compare(b"smembers", members, shuffled) is None
