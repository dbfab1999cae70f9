"""The session (one client connection) without sockets: bytes in, bytes out, in what order and where."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator import playbook
from migrator.phases import Phase
from migrator.shim.commands import (
    SOURCE,
    TARGET,
    Cls,
    CommandTable,
    parse_command_reply,
)
from migrator.shim.resp import RequestParser, encode
from migrator.shim.routing import ROUTES
from migrator.shim.server import Shim
from migrator.shim.session import Session
from tests.conftest import write_playbook

RANGE1 = [{b"begin_search": {b"type": b"index", b"spec": {b"index": 1}},
           b"find_keys": {b"type": b"range", b"spec": {b"lastkey": 0, b"keystep": 1, b"limit": 0}}}]
TABLE = parse_command_reply([
    [b"get", 2, [b"readonly"], 1, 1, 1, [], [], RANGE1, []],
    [b"set", -3, [b"write"], 1, 1, 1, [], [], RANGE1, []],
    [b"incr", 2, [b"write"], 1, 1, 1, [], [], RANGE1, []],
    [b"spop", -2, [b"write"], 1, 1, 1, [], [], RANGE1, []],
])


class FakeTransport:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.closed = True

    close = abort


class FakeClient:
    peer = "test"

    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def fake_shim(folder, phase: Phase, table=TABLE):
    """A shim in ``phase`` with no sockets: its sessions' upstream connections are fake transports.

    Returns the shim and ``open_session()`` -> (session, client, transports by side).
    """
    pb = playbook.load(write_playbook(folder / "m.yaml", "redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"))
    shim = Shim(pb)
    shim.table = CommandTable(table, table)
    shim.phase, shim.generation, shim.routes = phase, 1, ROUTES[phase]
    opened: list[tuple[int, int]] = []
    shim.open_upstream = lambda session, side, attempt: opened.append((side, attempt))

    def open_session():
        client = FakeClient()
        s = Session(shim, client)
        s.connect_sides()
        transports = {}
        for side, attempt in opened:
            transports[side] = FakeTransport()
            s.on_upstream_connected(side, transports[side], attempt)
        opened.clear()
        return s, client, transports

    return shim, open_session


@pytest.fixture
def make_session(tmp_path):
    def make(phase: Phase):
        shim, open_session = fake_shim(tmp_path, phase)
        return (shim, *open_session())

    return make


def cmds(*commands) -> bytes:
    return b"".join(encode([a.encode() if isinstance(a, str) else a for a in c]) for c in commands)


def test_mirroring_answers_from_the_source_without_waiting_for_the_target(make_session):
    """Both sides get the pipelined chunk; the client gets the source's bytes as soon as they arrive."""
    shim, s, client, t = make_session(Phase.MIRRORING)
    chunk = cmds(["SET", "a", "1"], ["GET", "a"])
    s.on_client_data(chunk)
    assert t[SOURCE].data == chunk and t[TARGET].data == chunk
    s.on_upstream_data(SOURCE, b"+OK\r\n$1\r\n1\r\n")
    assert client.data == b"+OK\r\n$1\r\n1\r\n"
    assert shim.mirror_depth == 2
    s.on_upstream_data(TARGET, b"+OK\r\n$1\r\n2\r\n")
    assert shim.mirror_depth == 0 and shim.stats.compared == 2
    assert shim.stats.divergences == {"different-value": 1}
    assert client.data == b"+OK\r\n$1\r\n1\r\n"  # the target's reply never reaches the client


def test_replies_split_anywhere_still_reach_the_client_whole_and_in_order(make_session):
    """Replies arriving a byte at a time are reassembled; the client sees exactly the source's stream."""
    _shim, s, client, _t = make_session(Phase.MIRRORING)
    s.on_client_data(cmds(["GET", "x"], ["GET", "y"]))
    stream = b"$5\r\nhello\r\n$-1\r\n"
    for i in range(len(stream)):
        s.on_upstream_data(SOURCE, stream[i:i + 1])
    assert client.data == stream


def test_reads_on_target_sends_writes_to_the_target_after_the_source_and_acks_after_both(make_session):
    """Source first, then target; the client's reply waits for both; a later read waits behind the write."""
    _shim, s, client, t = make_session(Phase.READS_ON_TARGET)
    s.on_client_data(cmds(["SET", "k", "v"]))
    s.on_client_data(cmds(["GET", "k"]))
    assert t[SOURCE].data.startswith(cmds(["SET", "k", "v"])) and b"SET" not in t[TARGET].data
    s.on_upstream_data(SOURCE, b"+OK\r\n")
    assert client.data == b""  # not acknowledged before the target applied it
    assert t[TARGET].data.startswith(cmds(["SET", "k", "v"]))
    assert t[TARGET].data.endswith(cmds(["GET", "k"]))  # the read follows the write on the target
    s.on_upstream_data(TARGET, b"+OK\r\n$1\r\nv\r\n")
    assert client.data == b"+OK\r\n$1\r\nv\r\n"


def test_a_write_the_source_rejects_is_not_sent_to_the_target_after_the_read_cutover(make_session):
    """After the read cutover the target applies only what the source accepted."""
    _shim, s, client, t = make_session(Phase.READS_ON_TARGET)
    s.on_client_data(cmds(["INCR", "s"]))
    s.on_upstream_data(SOURCE, b"-ERR value is not an integer or out of range\r\n")
    assert t[TARGET].data == b"" and client.data.startswith(b"-ERR value")


def test_spop_is_mirrored_as_srem_of_what_the_source_popped(make_session):
    """The target gets SREM of the members the source returned, after the source answered."""
    _shim, s, client, t = make_session(Phase.MIRRORING)
    s.on_client_data(cmds(["SPOP", "set", "2"]))
    assert t[TARGET].data == b""
    s.on_upstream_data(SOURCE, b"*2\r\n$1\r\na\r\n$1\r\nb\r\n")
    assert t[TARGET].data == cmds(["SREM", "set", "a", "b"])
    assert client.data == b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"


def test_a_lost_target_marks_pending_writes_dirty_and_spares_the_client(make_session):
    """If the target's connection drops, its unconfirmed writes become dirty; the client's replies are unaffected."""
    shim, s, client, t = make_session(Phase.MIRRORING)
    s.on_client_data(cmds(["SET", "k1", "v"], ["SET", "k2", "v"]))
    s.on_upstream_data(SOURCE, b"+OK\r\n+OK\r\n")
    s.on_upstream_lost(TARGET, t[TARGET], "connection reset")
    assert client.data == b"+OK\r\n+OK\r\n" and not client.closed
    assert {k for _db, k in shim.dirty.keys} == {b"k1", b"k2"}
    assert shim.mirror_depth == 0 and s.drained()


def test_a_lost_source_closes_the_client_as_the_server_would(make_session):
    """The authoritative side's loss closes the client connection (after what was already answered)."""
    _shim, s, client, t = make_session(Phase.MIRRORING)
    s.on_client_data(cmds(["GET", "a"]))
    s.on_upstream_lost(SOURCE, t[SOURCE], "connection reset")
    assert client.closed


def test_passthrough_forwards_chunks_and_replies_unchanged(make_session):
    """In a one-sided phase the chunk and the reply bytes pass through untouched, split or not."""
    _shim, s, client, t = make_session(Phase.PLANNED)
    chunk = cmds(["SET", "a", "1"], ["GET", "a"])
    s.on_client_data(chunk[:7])
    s.on_client_data(chunk[7:])
    assert t[SOURCE].data == chunk and TARGET not in t
    s.on_upstream_data(SOURCE, b"+OK\r\n$1")
    s.on_upstream_data(SOURCE, b"\r\n1\r\n")
    assert client.data == b"+OK\r\n$1\r\n1\r\n" and s.drained()


def test_an_effect_the_target_refuses_marks_the_key_dirty(make_session):
    """SREM (SPOP's effect) failing on the target is not compared, so it is recorded dirty rather than lost."""
    shim, s, _client, _t = make_session(Phase.MIRRORING)
    s.on_client_data(cmds(["SPOP", "set"]))
    s.on_upstream_data(SOURCE, b"$1\r\na\r\n")
    s.on_upstream_data(TARGET, b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n")
    assert set(shim.dirty.keys) == {(0, b"set")}
    assert shim.stats.shadow_failures[("target", "error")] == 1


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET]),
       st.lists(st.lists(st.tuples(st.sampled_from(["SET", "GET"]), st.sampled_from(["a", "b", "c"])), min_size=1,
                         max_size=6), min_size=1, max_size=5),
       st.randoms(use_true_random=False))
def test_pipelined_chunks_cut_anywhere_reach_both_sides_and_the_client_in_order(tmp_path_factory, phase, chunks, rnd):
    """Pipelined chunks of SET/GET, with client bytes and each side's replies cut and interleaved at
    random: each side gets the client's commands in order, the client gets the answering side's
    replies in order, every reply is compared once, and equal replies are no divergence."""
    shim, open_session = fake_shim(tmp_path_factory.mktemp("pb"), phase)
    s, client, t = open_session()
    commands = [[name.encode(), key.encode(), b"v"] if name == "SET" else [name.encode(), key.encode()]
                for chunk in chunks for name, key in chunk]
    reply = {b"SET": b"+OK\r\n", b"GET": b"$1\r\nv\r\n"}
    stream = cmds(*commands)
    cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1, rnd.randint(0, 6))))
    pieces = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)])]
    delivered = {SOURCE: 0, TARGET: 0}

    def available(side: int) -> bytes:
        sent = RequestParser(1 << 20).feed(t[side].data) if side in t else []
        return b"".join(reply[c[0]] for c in sent)[delivered[side]:]

    for _ in range(10_000):
        choices = [("client", None)] if pieces else []
        choices += [("reply", side) for side in t if available(side)]
        if not choices:
            break
        what, side = rnd.choice(choices)
        if what == "client":
            s.on_client_data(pieces.pop(0))
        else:
            data = available(side)
            n = rnd.randint(1, len(data))
            delivered[side] += n
            s.on_upstream_data(side, data[:n])
    routes = ROUTES[phase]
    plans = [routes[Cls.WRITE] if c[0] == b"SET" else routes[Cls.READ] for c in commands]
    for side in (SOURCE, TARGET):  # each side gets, in the client's order, the commands routed to it
        assert RequestParser(1 << 20).feed(t[side].data) == [c for c, p in zip(commands, plans) if side in p.sides()]
    assert client.data == b"".join(reply[c[0]] for c in commands)
    assert shim.stats.compared == sum(p.compare for p in plans) and not shim.stats.divergences
    assert s.drained() and shim.mirror_depth == 0


def test_settled_entries_are_freed_by_reference_counting_not_left_to_the_collector(make_session):
    """An entry and its sequencer request must not keep each other alive once settled: a busy shim
    would otherwise hand the cyclic collector every pipelined chunk (a sixth of its time, measured)."""
    import gc

    _shim, s, client, _t = make_session(Phase.MIRRORING)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(20):
            s.on_client_data(cmds(["SET", f"k{i}", "v"], ["GET", f"k{i}"], ["INCR", "n"]))
            s.on_upstream_data(SOURCE, b"+OK\r\n$1\r\nv\r\n:1\r\n")
            s.on_upstream_data(TARGET, b"+OK\r\n$1\r\nv\r\n:1\r\n")
        assert s.drained() and len(client.data) == 20 * len(b"+OK\r\n$1\r\nv\r\n:1\r\n")
        gc.collect()
        leaked = [type(o).__name__ for o in gc.garbage if type(o).__name__ in ("Entry", "Request")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == []


RANGE2 = [{b"begin_search": {b"type": b"index", b"spec": {b"index": 2}},
           b"find_keys": {b"type": b"range", b"spec": {b"lastkey": 0, b"keystep": 1, b"limit": 0}}}]
WITH_SUBCOMMANDS = parse_command_reply([
    [b"get", 2, [b"readonly"], 1, 1, 1, [], [], RANGE1, []],
    [b"object", -2, [], 0, 0, 0, [], [], [], [  # as Redis 7 and Valkey publish it
        [b"object|idletime", 3, [b"readonly"], 2, 2, 1, [], [], RANGE2, []]]],
])


def test_a_subcommand_of_a_never_compared_command_is_not_compared(tmp_path):
    """OBJECT IDLETIME (a READ subcommand on Redis 7/Valkey) differs by nature: a lone command, as
    clients send it, takes the chunk path, which must apply the command's exclusion too."""
    shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, table=WITH_SUBCOMMANDS)
    s, client, _t = open_session()
    s.on_client_data(cmds(["OBJECT", "IDLETIME", "k"]))
    s.on_upstream_data(SOURCE, b":10\r\n")
    s.on_upstream_data(TARGET, b":0\r\n")
    assert client.data == b":10\r\n"
    assert shim.stats.compared == 0 and not shim.stats.divergences


def test_a_read_falls_back_to_a_shadow_that_already_answered_without_counting_it_twice(make_session):
    """reads-on-target: the source answered the compared read first; the target is lost; the
    source's reply answers, and the mirror queue depth does not go below zero."""
    shim, s, client, t = make_session(Phase.READS_ON_TARGET)
    s.on_client_data(cmds(["GET", "a"]))
    s.on_upstream_data(SOURCE, b"$1\r\nv\r\n")
    s.on_upstream_lost(TARGET, t[TARGET], "connection reset")
    assert client.data == b"$1\r\nv\r\n"
    assert shim.mirror_depth == 0 and s.drained()


def test_a_read_whose_both_sides_are_lost_settles_and_releases_its_key(make_session):
    """reads-on-target: the source is lost, then the target: the read cannot be answered, so the
    client is disconnected and the read's hold on its key is released (writes to it from other
    connections would otherwise wait forever)."""
    shim, s, client, t = make_session(Phase.READS_ON_TARGET)
    s.on_client_data(cmds(["GET", "a"]))
    s.on_upstream_lost(SOURCE, t[SOURCE], "connection reset")
    s.on_upstream_lost(TARGET, t[TARGET], "connection reset")
    assert client.closed
    assert shim.seq.held == 0 and shim.mirror_depth == 0


# --- connection state (review) ----------------------------------------------------------------

BL = [{b"begin_search": {b"type": b"index", b"spec": {b"index": 1}},
       b"find_keys": {b"type": b"range", b"spec": {b"lastkey": -2, b"keystep": 1, b"limit": 0}}}]
CONN_TABLE = parse_command_reply([
    [b"get", 2, [b"readonly"], 1, 1, 1, [], [], RANGE1, []],
    [b"set", -3, [b"write"], 1, 1, 1, [], [], RANGE1, []],
    [b"blpop", -3, [b"write", b"blocking"], 1, -2, 1, [], [], BL, []],
    [b"select", 2, [b"loading", b"stale", b"fast"], 0, 0, 0, [], [], [], []],
    [b"publish", 3, [b"pubsub", b"loading", b"stale", b"fast"], 0, 0, 0, [], [], [], []],
    [b"multi", 1, [b"noscript", b"loading", b"stale", b"fast"], 0, 0, 0, [], [], [], []],
    [b"exec", 1, [b"noscript", b"loading", b"stale"], 0, 0, 0, [], [], [], []],
    [b"discard", 1, [b"noscript", b"loading", b"stale", b"fast"], 0, 0, 0, [], [], [], []],
    [b"monitor", 1, [b"admin", b"noscript", b"loading", b"stale"], 0, 0, 0, [], [], [], []],
    [b"auth", -2, [b"noscript", b"loading", b"stale", b"fast", b"no_auth"], 0, 0, 0, [], [], [], []],
    [b"subscribe", -2, [b"pubsub", b"noscript", b"loading", b"stale"], 0, 0, 0, [], [], [], []],
    [b"unsubscribe", -1, [b"pubsub", b"noscript", b"loading", b"stale"], 0, 0, 0, [], [], [], []],
    [b"ping", -1, [b"fast"], 0, 0, 0, [], [], [], []],
    [b"watch", -2, [b"noscript", b"loading", b"stale", b"fast"], 1, -1, 1, [], [], RANGE1, []],
    [b"unwatch", 1, [b"noscript", b"loading", b"stale", b"fast"], 0, 0, 0, [], [], [], []],
    [b"client", -2, [], 0, 0, 0, [], [], [], [
        [b"client|setname", 3, [b"noscript", b"loading", b"stale"], 0, 0, 0, [], [], [], []]]],
])


def test_select_dropped_for_a_full_mirror_queue_would_leave_the_target_in_the_old_db(tmp_path):
    """SELECT's shadow copy is never dropped for a full mirror queue: the target would apply
    everything after it in the old database."""
    shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    s, _client, t = open_session()
    shim.mirror_depth = shim.cfg.mirror_queue_size  # other connections fill the mirror queue
    s.on_client_data(cmds(["SELECT", "1"]))
    s.on_upstream_data(SOURCE, b"+OK\r\n")
    shim.mirror_depth -= shim.cfg.mirror_queue_size  # the burst is over
    s.on_client_data(cmds(["SET", "k", "v"]))
    assert t[SOURCE].data == cmds(["SELECT", "1"], ["SET", "k", "v"])
    assert t[TARGET].data == cmds(["SELECT", "1"], ["SET", "k", "v"])


def test_select_inside_multi_is_queued_on_both_sides_and_kept_only_after_exec(tmp_path):
    """MULTI; SELECT 1; DISCARD changes nothing; MULTI; SET; SELECT 1; EXEC moves both sides (the
    shadow inside its copy of the transaction) and the connection state once EXEC succeeded."""
    _shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    s, client, t = open_session()
    s.on_client_data(cmds(["MULTI"], ["SELECT", "1"], ["DISCARD"]))
    assert t[TARGET].data == b"" and s.db is None
    s.on_upstream_data(SOURCE, b"+OK\r\n+QUEUED\r\n+OK\r\n")
    assert s.db is None and client.data == b"+OK\r\n+QUEUED\r\n+OK\r\n"
    s.on_client_data(cmds(["MULTI"], ["SET", "a", "1"], ["SELECT", "1"], ["SET", "b", "2"], ["EXEC"]))
    assert t[TARGET].data == b""  # the shadow gets the transaction after EXEC answered
    s.on_upstream_data(SOURCE, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n+OK\r\n+OK\r\n+OK\r\n")
    assert t[TARGET].data == cmds(["MULTI"], ["SET", "a", "1"], ["SELECT", "1"], ["SET", "b", "2"], ["EXEC"])
    assert s.db == 1


def test_a_command_the_shim_refuses_inside_multi_aborts_exec_like_redis(tmp_path):
    """AUTH (answered by the shim) or MONITOR inside MULTI: refused, and EXEC runs nothing
    (EXECABORT, the server's queue discarded) instead of running the rest one reply short."""
    _shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    s, client, t = open_session()
    s.on_client_data(cmds(["MULTI"], ["SET", "a", "1"], ["AUTH", "pw"], ["EXEC"], ["GET", "a"]))
    assert t[SOURCE].data == cmds(["MULTI"], ["SET", "a", "1"], ["DISCARD"], ["GET", "a"])
    s.on_upstream_data(SOURCE, b"+OK\r\n+QUEUED\r\n+OK\r\n$-1\r\n")
    assert client.data.startswith(b"+OK\r\n+QUEUED\r\n-ERR migrator shim: AUTH inside MULTI")
    assert client.data.endswith(b"-EXECABORT Transaction discarded because of previous errors.\r\n$-1\r\n")
    assert t[TARGET].data == cmds(["GET", "a"])
    s.on_upstream_data(TARGET, b"$-1\r\n")
    assert s.drained()


def test_a_refused_select_or_setname_is_not_kept_as_connection_state(tmp_path):
    """SELECT 99 / CLIENT SETNAME refused by the server: later connections must not replay them;
    a pipelined SELECT after a refused one still counts."""
    _shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    s, _client, _t = open_session()
    s.on_client_data(cmds(["SELECT", "99"], ["SELECT", "98"], ["CLIENT", "SETNAME", "a b"], ["SELECT", "3"]))
    assert s.db == 3 and s.name == b"a b"
    err = b"-ERR DB index is out of range\r\n"
    s.on_upstream_data(SOURCE, err + err + b"-ERR Client names cannot contain spaces\r\n+OK\r\n")
    assert s.db == 3 and s.name is None
    s.on_client_data(cmds(["SELECT", "99"]))
    s.on_upstream_data(SOURCE, err)
    assert s.db == 3


def test_a_refused_select_in_planned_is_not_replayed_when_mirroring_starts(tmp_path):
    """The passthrough path too: SELECT 99 refused before mirroring is not replayed on the target."""
    _shim, open_session = fake_shim(tmp_path, Phase.PLANNED, CONN_TABLE)
    s, client, _t = open_session()
    s.on_client_data(cmds(["SELECT", "99"]))
    s.on_upstream_data(SOURCE, b"-ERR DB index is out of range\r\n")
    assert s.db is None and client.data == b"-ERR DB index is out of range\r\n"


def test_the_shadow_refusing_a_select_the_answer_took_resets_the_shadow(tmp_path):
    """The target has fewer databases: it refuses SELECT 20, which the source took. The target
    connection would otherwise apply everything after it in the old database."""
    _shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    s, _client, t = open_session()
    s.on_client_data(cmds(["SELECT", "20"]))
    s.on_upstream_data(SOURCE, b"+OK\r\n")
    s.on_upstream_data(TARGET, b"-ERR DB index is out of range\r\n")
    assert t[TARGET].closed and s.up[TARGET].state == "down"


def test_commands_received_during_the_hold_still_run_if_the_client_closes(tmp_path):
    """Redis runs what it received before the client's FIN; a command held for the write switch
    must not be forgotten because its client closed meanwhile (a fire-and-forget client)."""
    shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    s, _client, t = open_session()
    shim.holding = True
    s.on_client_data(cmds(["SET", "k", "v"]))
    s.on_client_lost()
    assert not s.closed
    s.check_timeouts(s.client_gone + 60)  # a hold longer than the grace: still kept
    assert not s.closed
    shim.holding = False
    s.release()
    assert t[SOURCE].data == cmds(["SET", "k", "v"]) and t[TARGET].data == cmds(["SET", "k", "v"])
    s.on_upstream_data(SOURCE, b"+OK\r\n")
    s.on_upstream_data(TARGET, b"+OK\r\n")
    assert s.closed and not shim.dirty.keys


def test_a_blocked_pop_of_a_client_that_closed_is_dropped_at_once(tmp_path):
    """The server drops a blocked client that disconnects; the shim must not keep its BLPOP
    blocking (it would pop a later push for nobody). With a write to its key in flight, a pop may
    have happened with its reply lost: the key is marked dirty on the shadow; otherwise not."""
    shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    for pushing in (False, True):
        s, _client, t = open_session()
        s.on_client_data(cmds(["BLPOP", "jobs", "0"]))
        s.on_upstream_data(SOURCE, b"+OK\r\n+QUEUED\r\n*1\r\n*-1\r\n")  # nothing to pop: sent for real
        assert t[SOURCE].data.endswith(cmds(["BLPOP", "jobs", "0"]))
        if pushing:
            p, _pc, _pt = open_session()
            p.on_client_data(cmds(["SET", "jobs", "x"]))  # (a write to the key: it may wake the pop)
        s.on_client_lost()
        assert s.closed and t[SOURCE].closed and s.drained()
        assert set(shim.dirty.keys) == ({(0, b"jobs")} if pushing else set())
    p.on_upstream_data(SOURCE, b"+OK\r\n")
    p.on_upstream_data(TARGET, b"+OK\r\n")
    assert shim.seq.held == 0 and not shim.seq.blocked and shim.mirror_depth == 0


@pytest.mark.parametrize("after", [["SELECT", "1"], ["PUBLISH", "done", "x"], ["GET", "k"]])
def test_nothing_pipelined_after_a_blocking_pop_reaches_the_server_before_it(tmp_path, after):
    """BLPOP q 0 then SELECT 1 / PUBLISH / an unsampled read, pipelined: the non-blocking try goes
    first; what follows waits, and goes after the BLPOP re-sent as itself (on the server it would
    otherwise pop in db 1, or publish before the pop)."""
    shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    shim.cfg.compare_reads = 0.0
    s, _client, t = open_session()
    s.on_client_data(cmds(["BLPOP", "q", "0"], after))
    assert t[SOURCE].data == cmds(["MULTI"], ["BLPOP", "q", "0"], ["EXEC"])
    s.on_upstream_data(SOURCE, b"+OK\r\n+QUEUED\r\n*1\r\n*-1\r\n")  # nothing to pop
    assert t[SOURCE].data == cmds(["MULTI"], ["BLPOP", "q", "0"], ["EXEC"], ["BLPOP", "q", "0"], after)


def _confirm(kind: str, channel: str | None, count: int) -> bytes:
    ch = b"$-1\r\n" if channel is None else b"$%d\r\n%s\r\n" % (len(channel), channel.encode())
    return b"*3\r\n$%d\r\n%s\r\n%s:%d\r\n" % (len(kind), kind.encode(), ch, count)


def test_a_connection_that_unsubscribed_from_everything_is_an_ordinary_one_again(tmp_path):
    """reads-on-target: SUBSCRIBE a b; UNSUBSCRIBE a; UNSUBSCRIBE; SET w 1 -- the SET must reach the
    source (the write authority) first, then the target, not stream to the target only."""
    _shim, open_session = fake_shim(tmp_path, Phase.READS_ON_TARGET, CONN_TABLE)
    s, client, t = open_session()
    s.on_client_data(cmds(["SUBSCRIBE", "a", "b"], ["UNSUBSCRIBE", "a"]))
    assert t[TARGET].data == cmds(["SUBSCRIBE", "a", "b"])  # the rest waits for the confirmations
    s.on_upstream_data(TARGET, _confirm("subscribe", "a", 1) + _confirm("subscribe", "b", 2))
    assert s.pipe == TARGET and t[TARGET].data.endswith(cmds(["UNSUBSCRIBE", "a"]))
    s.on_upstream_data(TARGET, _confirm("unsubscribe", "a", 1))
    assert s.pipe == TARGET
    s.on_client_data(cmds(["UNSUBSCRIBE"], ["SET", "w", "1"]))
    assert not t[TARGET].data.endswith(cmds(["SET", "w", "1"]))
    s.on_upstream_data(TARGET, _confirm("unsubscribe", "b", 0))
    assert s.pipe is None
    assert t[SOURCE].data == cmds(["SET", "w", "1"])
    s.on_upstream_data(SOURCE, b"+OK\r\n")
    assert t[TARGET].data.endswith(cmds(["SET", "w", "1"]))
    s.on_upstream_data(TARGET, b"+OK\r\n")
    assert client.data == (_confirm("subscribe", "a", 1) + _confirm("subscribe", "b", 2)
                           + _confirm("unsubscribe", "a", 1) + _confirm("unsubscribe", "b", 0) + b"+OK\r\n")


def test_a_refused_subscribe_does_not_make_the_connection_stream(tmp_path):
    _shim, open_session = fake_shim(tmp_path, Phase.READS_ON_TARGET, CONN_TABLE)
    s, _client, t = open_session()
    s.on_client_data(cmds(["SUBSCRIBE", "a"], ["SET", "w", "1"]))
    s.on_upstream_data(TARGET, b"-NOPERM this user has no permissions to access the 'a' channel\r\n")
    assert s.pipe is None and t[SOURCE].data == cmds(["SET", "w", "1"])


def test_unsubscribe_of_two_channels_on_an_unsubscribed_connection_gets_two_replies(tmp_path):
    """UNSUBSCRIBE a b is confirmed once per channel, subscribed or not; the GET's reply follows."""
    _shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    s, client, t = open_session()
    s.on_client_data(cmds(["UNSUBSCRIBE", "a", "b"], ["GET", "k"]))
    assert t[SOURCE].data == cmds(["UNSUBSCRIBE", "a", "b"])
    s.on_upstream_data(SOURCE, _confirm("unsubscribe", "a", 0) + _confirm("unsubscribe", "b", 0))
    assert t[SOURCE].data.endswith(cmds(["GET", "k"]))
    s.on_upstream_data(SOURCE, b"$1\r\nv\r\n")
    assert client.data == _confirm("unsubscribe", "a", 0) + _confirm("unsubscribe", "b", 0) + b"$1\r\nv\r\n"
    assert s.pipe is None


def test_a_refused_subscribe_on_a_subscribed_connection_does_not_hold_it_forever(tmp_path):
    _shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    s, _client, t = open_session()
    s.on_client_data(cmds(["SUBSCRIBE", "a"]))
    s.on_upstream_data(SOURCE, _confirm("subscribe", "a", 1))
    s.on_client_data(cmds(["SUBSCRIBE", "secret"], ["PING"]))
    s.on_upstream_data(SOURCE, b"-NOPERM no permissions to access the 'secret' channel\r\n")
    assert s.pipe == SOURCE and t[SOURCE].data.endswith(cmds(["PING"]))


def test_a_shadow_write_behind_a_read_on_a_stalled_target_releases_its_key_after_the_timeout(tmp_path):
    """reads-on-target: A's GET x (answered by the target, compared on the source) then SET k; the
    target stalls. After shadow_timeout the source's copy answers the GET, the SET's target copy is
    marked dirty and its key released (B's SET k goes on), and A's target connection is reset."""
    import time as _time

    shim, open_session = fake_shim(tmp_path, Phase.READS_ON_TARGET, CONN_TABLE)
    a, ca, ta = open_session()
    b, _cb, tb = open_session()
    a.on_client_data(cmds(["GET", "x"], ["SET", "k", "1"]))
    a.on_upstream_data(SOURCE, b"$-1\r\n+OK\r\n")  # the GET's compare copy, and the SET
    assert ta[TARGET].data == cmds(["GET", "x"], ["SET", "k", "1"])
    b.on_client_data(cmds(["SET", "k", "2"]))
    assert tb[SOURCE].data == b""  # waits for A's SET k on both sides
    assert ca.data == b""  # the target answers the GET: not yet
    a.check_timeouts(_time.monotonic() + 1)
    assert ta[TARGET].closed
    assert ca.data == b"$-1\r\n+OK\r\n"  # the source's answer to the GET, then the SET's
    assert tb[SOURCE].data == cmds(["SET", "k", "2"])
    assert set(shim.dirty.keys) == {(0, b"k")}
    assert shim.seq.held == 1  # B's only


def test_exec_after_the_write_switch_of_keys_watched_before_it_is_aborted(tmp_path):
    """WATCH k went to the source (reads-on-target); the write switch moves writes to the target,
    where nothing is watched: EXEC is answered with a null reply (as if k had changed), the
    target's queue discarded, the source's WATCH dropped. A transaction without WATCH runs."""
    from migrator.shim.routing import ROUTES as R

    shim, open_session = fake_shim(tmp_path, Phase.READS_ON_TARGET, CONN_TABLE)
    s, client, t = open_session()
    s.on_client_data(cmds(["WATCH", "k"]))
    s.on_upstream_data(SOURCE, b"+OK\r\n")
    shim.phase, shim.routes = Phase.WRITES_ON_TARGET, R[Phase.WRITES_ON_TARGET]
    s.on_client_data(cmds(["MULTI"], ["SET", "k", "mine"], ["EXEC"]))
    assert t[TARGET].data == cmds(["MULTI"], ["SET", "k", "mine"], ["DISCARD"])
    assert t[SOURCE].data == cmds(["WATCH", "k"], ["UNWATCH"])
    s.on_upstream_data(TARGET, b"+OK\r\n+QUEUED\r\n+OK\r\n")
    s.on_upstream_data(SOURCE, b"+OK\r\n")
    assert client.data == b"+OK\r\n+OK\r\n+QUEUED\r\n*-1\r\n" and s.drained()
    s.on_client_data(cmds(["MULTI"], ["SET", "k", "mine"], ["EXEC"]))
    assert t[TARGET].data.endswith(cmds(["MULTI"], ["SET", "k", "mine"], ["EXEC"]))


def test_a_pop_blocked_on_the_old_write_side_is_disconnected_at_the_write_switch(tmp_path):
    """Blocked on the source since reads-on-target; after the switch a pop blocked on the target
    and this one would both be woken by one push: this client is disconnected (it reconnects and
    blocks on the target), with nothing marked dirty (no write to its key was in flight)."""
    from migrator.shim.routing import ROUTES as R

    shim, open_session = fake_shim(tmp_path, Phase.READS_ON_TARGET, CONN_TABLE)
    s, client, _t = open_session()
    s.on_client_data(cmds(["BLPOP", "q", "0"]))
    s.on_upstream_data(SOURCE, b"+OK\r\n+QUEUED\r\n*1\r\n*-1\r\n")
    shim.phase, shim.routes = Phase.WRITES_ON_TARGET, R[Phase.WRITES_ON_TARGET]
    s.on_phase(Phase.WRITES_ON_TARGET)
    assert s.closed and client.closed and not shim.dirty.keys and not shim.seq.blocked


def test_subscribe_confirmations_arriving_apart_all_reach_the_client(tmp_path):
    """SUBSCRIBE a b: two confirmations, in separate reads; a refused one (one error) ends it too."""
    _shim, open_session = fake_shim(tmp_path, Phase.MIRRORING, CONN_TABLE)
    s, client, _t = open_session()
    s.on_client_data(cmds(["SUBSCRIBE", "a", "b"]))
    s.on_upstream_data(SOURCE, _confirm("subscribe", "a", 1))
    assert client.data == b""
    s.on_upstream_data(SOURCE, _confirm("subscribe", "b", 2))
    assert client.data == _confirm("subscribe", "a", 1) + _confirm("subscribe", "b", 2) and s.pipe == SOURCE
    s2, client2, t2 = open_session()
    s2.on_client_data(cmds(["SUBSCRIBE", "a", "b"], ["GET", "k"]))
    s2.on_upstream_data(SOURCE, b"-NOPERM no permissions to access the 'a' channel\r\n")
    assert s2.pipe is None and t2[SOURCE].data.endswith(cmds(["GET", "k"]))
    s2.on_upstream_data(SOURCE, b"$1\r\nv\r\n")
    assert client2.data == b"-NOPERM no permissions to access the 'a' channel\r\n$1\r\nv\r\n"
