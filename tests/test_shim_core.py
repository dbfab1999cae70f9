"""The shim's sans-IO core driven with no socket, no event loop and no server.

A ``Session`` is given a recording host (the ``host.ShimHost`` protocol: configuration, shared
counters and the actions it may ask for) and recording links (``host.ClientLink``,
``host.UpstreamLink``). Events go in as method calls with RESP bytes (``on_client_data``,
``on_upstream_connected``, ``on_upstream_data``, ``on_upstream_lost``, ``check_timeouts``,
``on_phase``...); every test asserts the actions that came out: the bytes written to the client
and to each side, the connections opened or dropped, and what was recorded (dirty keys,
divergences). Real servers are in the other shim tests; these pin the core's decisions.
"""

from __future__ import annotations

import time

import pytest

from migrator import playbook
from migrator.logs import get_logger
from migrator.phases import Phase
from migrator.shim import compare as cmp
from migrator.shim import metrics
from migrator.shim.commands import SOURCE, TARGET, CommandTable, parse_command_reply
from migrator.shim.dirty import DirtyRecorder
from migrator.shim.divergence import DivergenceRecorder
from migrator.shim.resp import encode
from migrator.shim.lag import OffsetTracker
from migrator.shim.routing import ROUTES
from migrator.shim.scripts import sha1_hex
from migrator.shim.sequencer import Sequencer
from migrator.shim.session import Session
from tests.conftest import write_playbook

RANGE1 = [{b"begin_search": {b"type": b"index", b"spec": {b"index": 1}},
           b"find_keys": {b"type": b"range", b"spec": {b"lastkey": 0, b"keystep": 1, b"limit": 0}}}]
TABLE = parse_command_reply([
    [b"get", 2, [b"readonly"], 1, 1, 1, [], [], RANGE1, []],
    [b"set", -3, [b"write"], 1, 1, 1, [], [], RANGE1, []],
    [b"incr", 2, [b"write"], 1, 1, 1, [], [], RANGE1, []],
    [b"blpop", -3, [b"write", b"blocking"], 1, -2, 1, [], [], [], []],
    [b"select", 2, [b"loading"], 0, 0, 0, [], [], [], []],
    [b"multi", 1, [b"loading"], 0, 0, 0, [], [], [], []],
    [b"exec", 1, [b"loading"], 0, 0, 0, [], [], [], []],
    [b"subscribe", -2, [b"pubsub"], 0, 0, 0, [], [], [], []],
    [b"eval", -3, [b"noscript"], 0, 0, 0, [], [], [], []],
    [b"evalsha", -3, [b"noscript"], 0, 0, 0, [], [], [], []],
    [b"ping", -1, [b"fast"], 0, 0, 0, [], [], [], []],
])
SHA = sha1_hex(b"return 1")


def resp(*commands) -> bytes:
    """The client's bytes for ``commands`` (lists of str/bytes)."""
    return b"".join(encode([a.encode() if isinstance(a, str) else a for a in c]) for c in commands)


class Link:
    """A recording upstream link: what the core wrote to one side's connection."""

    def __init__(self) -> None:
        self.data = b""
        self.aborted = self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def take(self) -> bytes:
        data, self.data = self.data, b""
        return data

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


class Client(Link):
    """A recording client link: replies written, close and flow control asked for."""

    peer = "core-test"

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.pauses = 0
        self.buffered = 0  # bytes the client has not read yet (as the transport would say)

    def buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False


class Host:
    """A recording ``host.ShimHost``: real counters and recorders, and the actions asked of it."""

    def __init__(self, folder, phase: Phase, password: bytes | None = None) -> None:
        pb = playbook.load(write_playbook(folder / "m.yaml", "redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0",
                                          shim={"listen": "127.0.0.1:1", "admin": "127.0.0.1:2"}))
        self.cfg = pb.shim
        self.endpoints = (pb.source, pb.target)
        self.endpoint_dbs = (0, 0)
        self.password = password
        self.passthrough = False
        self.shadow_timeout = 0.5
        self.ttl_tolerance_ms = 1000
        self.client_window = max(64, self.cfg.mirror_queue_size // 8)
        self.routes = ROUTES[phase]
        self.mode = "dual-write"
        self.lag_aware = False
        self.ryw = False
        self.sequence_keys = True
        self.tracker = OffsetTracker()
        self.mismatches: list = []
        self.generation = 1
        self.holding = False
        self.stalled_until = 0.0
        self.rdb_versions = [None, None]
        self.table = CommandTable(TABLE, TABLE)
        self.facade = None  # set to a shim.facade.Facade to play a shim with a cluster side
        self.seq = Sequencer()
        self.stats = metrics.Stats()
        self.dirty = DirtyRecorder(folder, "core")
        self.divergence = DivergenceRecorder(folder, "core")
        self.outstanding: dict[int, int] = {}
        self.mirror_depth = 0
        self.script_bodies: dict[bytes, bytes] = {}
        self.scripts_loaded: tuple[set[bytes], set[bytes]] = (set(), set())
        self.log = get_logger("migrator.shim.test")
        # The actions recorded.
        self.opened: list[tuple[Session, int, int]] = []
        self.closed: list[str] = []
        self.side_failures: list[tuple[int, str]] = []
        self.down: set[int] = set()

    def open_upstream(self, session, side: int, attempt: int) -> None:
        self.opened.append((session, side, attempt))

    def session_closed(self, session, reason: str) -> None:
        self.closed.append(reason)

    def give_back(self, side: int, transport, named: bool) -> bool:
        return False  # (no pool: a closed session's links are closed, as the tests assert)

    def open_shared(self, session, side: int, attempt: int) -> bool:
        return False  # (no shared connections: every side is a link of its own)

    def entry_finished(self, gen: int, count: int = 1) -> None:
        self.outstanding[gen] = self.outstanding.get(gen, 0) - count

    def confirm_mismatch(self, m) -> None:
        self.mismatches.append(m)

    def side_failed(self, side: int, reason: str) -> None:
        self.side_failures.append((side, reason))
        self.down.add(side)

    def side_ok(self, side: int) -> None:
        self.down.discard(side)

    def may_retry(self, side: int) -> bool:
        return side not in self.down

    def sample(self) -> bool:
        return True

    def warn_unknown(self, side: int, name: bytes) -> None:
        pass

    def warn_noscript(self, side: int, sha: bytes) -> None:
        pass

    def facade_reply(self, args: list[bytes], client) -> bytes | None:
        return self.facade.answer(args)

    def note_script(self, args: list[bytes], name: bytes) -> None:
        if name == b"eval" and len(args) > 1:
            self.script_bodies[sha1_hex(args[1])] = args[1]

    def script_result(self, side: int, args: list[bytes], name: bytes, raw: bytes) -> None:
        if raw[:1] != b"-" and name == b"eval":
            self.scripts_loaded[side].add(sha1_hex(args[1]))


class Core:
    """One session on a recording host, its client link and its upstream links by side."""

    def __init__(self, folder, phase: Phase, password: bytes | None = None, refused: frozenset = frozenset()) -> None:
        self.host = Host(folder, phase, password)
        self.client = Client()
        self.session = Session(self.host, self.client)
        self.links: dict[int, Link] = {}
        self.session.connect_sides()
        self.accept(refused)

    def accept(self, refused: frozenset = frozenset()) -> list[int]:
        """Complete the connections the core asked for (``refused``: those sides fail); the sides asked for."""
        opened, self.host.opened = self.host.opened, []
        for session, side, attempt in opened:
            if side in refused:
                session.on_upstream_failed(side, f"cannot connect to {('source', 'target')[side]}: refused", attempt)
                continue
            self.links[side] = Link()
            assert session.on_upstream_connected(side, self.links[side], attempt)
        return [side for _, side, _ in opened]

    def send(self, *commands) -> None:
        self.session.on_client_data(resp(*commands))

    def reply(self, side: int, data: bytes) -> None:
        self.session.on_upstream_data(side, data)

    def sent(self, side: int) -> bytes:
        return self.links[side].take() if side in self.links else b""

    def answered(self) -> bytes:
        return self.client.take()

    def dirty(self) -> set:
        return set(self.host.dirty.keys)


@pytest.fixture
def core(tmp_path):
    def make(phase: Phase, **kw) -> Core:
        return Core(tmp_path, phase, **kw)

    return make


# --- routing per phase ---------------------------------------------------------------------

def test_planned_opens_and_writes_the_source_only(core):
    """While planned, a client connection opens the source alone and its commands go there as sent."""
    c = core(Phase.PLANNED)
    assert list(c.links) == [SOURCE]
    c.send(["SET", "a", "1"], ["GET", "a"])
    assert c.sent(SOURCE) == resp(["SET", "a", "1"], ["GET", "a"])
    c.reply(SOURCE, b"+OK\r\n")
    assert c.answered() == b"+OK\r\n"  # passthrough: each reply as it arrives
    c.reply(SOURCE, b"$1\r\n1\r\n")
    assert c.answered() == b"$1\r\n1\r\n"


def test_mirroring_sends_writes_to_both_and_answers_from_the_source(core):
    """While mirroring, a write reaches both sides and the client has the source's reply without waiting for the target."""
    c = core(Phase.MIRRORING)
    assert sorted(c.links) == [SOURCE, TARGET]
    c.send(["SET", "a", "1"])
    assert c.sent(SOURCE) == c.sent(TARGET) == resp(["SET", "a", "1"])
    c.reply(SOURCE, b"+OK\r\n")
    assert c.answered() == b"+OK\r\n"
    assert c.host.mirror_depth == 1
    c.reply(TARGET, b"+OK\r\n")
    assert c.answered() == b"" and c.host.mirror_depth == 0 and c.host.stats.compared == 1


def test_reads_on_target_writes_source_first_then_target(core):
    """After the read cutover a write goes to the source, then to the target, and the client waits for both."""
    c = core(Phase.READS_ON_TARGET)
    c.send(["SET", "a", "1"])
    assert c.sent(SOURCE) == resp(["SET", "a", "1"])
    assert c.sent(TARGET) == b""  # sequential: only what the source applied
    c.reply(SOURCE, b"+OK\r\n")
    assert c.sent(TARGET) == resp(["SET", "a", "1"]) and c.answered() == b""
    c.reply(TARGET, b"+OK\r\n")
    assert c.answered() == b"+OK\r\n"


def test_reads_on_target_reads_are_answered_by_the_target(core):
    """After the read cutover a read's reply is the target's, and the source's copy is compared with it."""
    c = core(Phase.READS_ON_TARGET)
    c.send(["GET", "a"])
    assert c.sent(TARGET) == c.sent(SOURCE) == resp(["GET", "a"])
    c.reply(SOURCE, b"$1\r\n1\r\n")
    assert c.answered() == b""
    c.reply(TARGET, b"$1\r\n1\r\n")
    assert c.answered() == b"$1\r\n1\r\n" and c.host.stats.compared == 1


def test_writes_on_target_answers_from_the_target_and_mirrors_to_the_source(core):
    """After the write cutover the target answers a write and the source gets it as the shadow."""
    c = core(Phase.WRITES_ON_TARGET)
    c.send(["INCR", "n"])
    assert c.sent(TARGET) == c.sent(SOURCE) == resp(["INCR", "n"])
    c.reply(TARGET, b":7\r\n")
    assert c.answered() == b":7\r\n"
    c.reply(SOURCE, b":7\r\n")
    assert c.answered() == b"" and c.dirty() == set()


def test_completed_uses_the_target_only(core):
    """Once completed, the connection opens the target alone and commands go only there."""
    c = core(Phase.COMPLETED)
    assert list(c.links) == [TARGET]
    c.send(["GET", "a"])
    assert c.sent(TARGET) == resp(["GET", "a"])
    c.reply(TARGET, b"$-1\r\n")
    assert c.answered() == b"$-1\r\n"


def test_phase_change_moves_the_next_write_to_the_new_side(core):
    """A phase applied while connected routes the next command by the new phase (mirroring -> writes-on-target)."""
    c = core(Phase.MIRRORING)
    c.host.routes = ROUTES[Phase.WRITES_ON_TARGET]
    c.session.on_phase(Phase.WRITES_ON_TARGET)
    c.send(["SET", "a", "2"])
    c.sent(SOURCE), c.sent(TARGET)
    c.reply(SOURCE, b"+OK\r\n")
    assert c.answered() == b""  # the source is the shadow now: its reply is not the client's
    c.reply(TARGET, b"+OK\r\n")
    assert c.answered() == b"+OK\r\n"


# --- reply order ----------------------------------------------------------------------------

def test_pipelined_replies_keep_the_clients_order_across_paths(core):
    """A pipelined chunk mixing plain commands, SELECT and an AUTH the shim answers itself keeps its order."""
    c = core(Phase.MIRRORING)
    c.send(["GET", "a"], ["AUTH", "x"], ["SELECT", "0"], ["GET", "b"])
    assert c.answered() == b""  # AUTH is answered locally, but not before GET a's reply
    c.reply(SOURCE, b"$1\r\n1\r\n")
    assert c.answered() == b"$1\r\n1\r\n+OK\r\n"
    c.reply(SOURCE, b"+OK\r\n$-1\r\n")
    assert c.answered() == b"+OK\r\n$-1\r\n"


def test_replies_split_across_reads_are_framed(core):
    """A reply arriving in pieces reaches the client whole, once, in order."""
    c = core(Phase.MIRRORING)
    c.send(["GET", "a"], ["GET", "b"])
    c.reply(SOURCE, b"$5\r\nhel")
    assert c.answered() == b""
    c.reply(SOURCE, b"lo\r\n$2\r\nhi\r\n")
    assert c.answered() == b"$5\r\nhello\r\n$2\r\nhi\r\n"


# --- comparison and dirty keys --------------------------------------------------------------

def test_read_divergence_is_recorded_and_the_client_gets_the_source(core):
    """Two different replies to a read count a divergence; the client gets the source's; no key is marked dirty."""
    c = core(Phase.MIRRORING)
    c.send(["GET", "a"])
    c.reply(TARGET, b"$1\r\n2\r\n")
    c.reply(SOURCE, b"$1\r\n1\r\n")
    assert c.answered() == b"$1\r\n1\r\n"
    assert c.host.stats.divergences[cmp.DIFFERENT_VALUE] == 1
    assert c.dirty() == set()


def test_write_divergence_marks_its_key_dirty(core):
    """A write both sides answered differently is a divergence and its key is marked dirty on the target."""
    c = core(Phase.MIRRORING)
    c.send(["INCR", "n"])
    c.reply(SOURCE, b":1\r\n")
    c.reply(TARGET, b":5\r\n")
    assert c.answered() == b":1\r\n"
    assert c.host.stats.divergences[cmp.DIFFERENT_VALUE] == 1
    assert c.dirty() == {(0, b"n")}


def test_shadow_timeout_marks_keys_dirty_and_resets_the_shadow(core):
    """A shadow that does not answer within shadow_timeout: its pending write's key is dirty and its connection dropped."""
    c = core(Phase.MIRRORING)
    c.send(["SET", "a", "1"])
    c.reply(SOURCE, b"+OK\r\n")
    assert c.answered() == b"+OK\r\n"
    target = c.links[TARGET]
    c.session.check_timeouts(time.monotonic() + 10)
    assert target.aborted
    assert c.dirty() == {(0, b"a")}
    assert c.host.stats.shadow_failures[("target", "timeout")] == 1
    assert c.host.side_failures == [(TARGET, "shadow-timeout")]
    assert c.host.mirror_depth == 0 and not c.client.closed


def test_lost_shadow_marks_dirty_and_the_next_write_reopens_it(core):
    """A lost target connection marks its unconfirmed write dirty; the client is answered; a later write reconnects it."""
    c = core(Phase.MIRRORING)
    c.send(["SET", "a", "1"])
    target = c.links[TARGET]
    c.session.on_upstream_lost(TARGET, target, "connection closed by server")
    assert c.dirty() == {(0, b"a")}
    c.reply(SOURCE, b"+OK\r\n")
    assert c.answered() == b"+OK\r\n" and not c.client.closed
    c.host.side_ok(TARGET)  # its backoff has passed
    c.send(["SET", "b", "2"])
    assert c.accept() == [TARGET]
    assert c.sent(TARGET) == resp(["SET", "b", "2"])


def test_target_down_at_connect_sends_writes_to_the_source_and_marks_them(core):
    """A target that cannot be reached: writes go to the source alone and their keys are marked dirty at once."""
    c = core(Phase.MIRRORING, refused=frozenset({TARGET}))
    assert TARGET not in c.links
    assert c.host.side_failures == [(TARGET, "cannot connect to target: refused")]
    c.send(["SET", "a", "1"])
    assert c.sent(SOURCE) == resp(["SET", "a", "1"])
    assert c.host.opened == []  # not retried before its backoff
    assert c.dirty() == {(0, b"a")}
    c.reply(SOURCE, b"+OK\r\n")
    assert c.answered() == b"+OK\r\n"


def test_lost_answering_side_closes_the_client(core):
    """The source lost while it owes the client a reply: the client connection is closed, not left hanging."""
    c = core(Phase.MIRRORING)
    c.send(["GET", "a"])
    c.session.on_upstream_lost(SOURCE, c.links[SOURCE], "connection lost (reset)")
    assert c.client.closed
    assert c.host.closed == ["source connection lost: connection lost (reset)"]
    assert c.links[TARGET].closed


def test_garbage_from_a_side_resets_that_connection(core):
    """Bytes from the shadow that are not RESP drop that connection and mark its pending write dirty."""
    c = core(Phase.MIRRORING)
    c.send(["SET", "a", "1"])
    c.reply(SOURCE, b"+OK\r\n")
    c.reply(TARGET, b"?what\r\n")
    assert c.links[TARGET].aborted
    assert c.dirty() == {(0, b"a")}
    assert c.answered() == b"+OK\r\n" and not c.client.closed


# --- transactions ---------------------------------------------------------------------------

def test_multi_exec_runs_on_the_source_then_whole_on_the_target(core):
    """MULTI/EXEC runs on the source; once EXEC answered, the target gets the transaction and the replies are compared."""
    c = core(Phase.MIRRORING)
    c.send(["MULTI"], ["SET", "a", "1"], ["SET", "b", "2"], ["EXEC"])
    assert c.sent(SOURCE) == resp(["MULTI"], ["SET", "a", "1"], ["SET", "b", "2"], ["EXEC"])
    assert c.sent(TARGET) == b""
    c.reply(SOURCE, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n+OK\r\n")
    assert c.answered() == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n+OK\r\n"
    assert c.sent(TARGET) == resp(["MULTI"], ["SET", "a", "1"], ["SET", "b", "2"], ["EXEC"])
    c.reply(TARGET, b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n+OK\r\n")
    assert c.host.stats.compared == 1 and c.host.stats.divergences[cmp.DIFFERENT_VALUE] == 0


def test_aborted_exec_sends_nothing_to_the_target(core):
    """An EXEC the source aborted (a WATCHed key changed) reaches the client as nil and the target gets nothing."""
    c = core(Phase.MIRRORING)
    c.send(["MULTI"], ["SET", "a", "1"], ["EXEC"])
    c.sent(SOURCE)
    c.reply(SOURCE, b"+OK\r\n+QUEUED\r\n*-1\r\n")
    assert c.answered() == b"+OK\r\n+QUEUED\r\n*-1\r\n"
    assert c.sent(TARGET) == b""
    assert c.session.drained()


# --- connection state -----------------------------------------------------------------------

def test_select_is_replayed_on_a_reopened_connection(core):
    """SELECT goes to both sides and, accepted, is sent first on a connection opened later."""
    c = core(Phase.MIRRORING)
    c.send(["SELECT", "2"])
    assert c.sent(SOURCE) == c.sent(TARGET) == resp(["SELECT", "2"])
    c.reply(SOURCE, b"+OK\r\n")
    c.reply(TARGET, b"+OK\r\n")
    assert c.answered() == b"+OK\r\n"
    c.session.on_upstream_lost(TARGET, c.links[TARGET], "connection closed by server")
    c.host.side_ok(TARGET)
    c.send(["SET", "a", "1"])
    assert c.accept() == [TARGET]
    assert c.sent(TARGET) == resp(["SELECT", "2"], ["SET", "a", "1"])


def test_refused_select_is_not_replayed(core):
    """A SELECT both servers refused leaves the connection's database as it was: nothing replayed later."""
    c = core(Phase.MIRRORING)
    c.send(["SELECT", "99"])
    c.reply(SOURCE, b"-ERR DB index is out of range\r\n")
    c.reply(TARGET, b"-ERR DB index is out of range\r\n")
    assert c.answered() == b"-ERR DB index is out of range\r\n"
    c.session.on_upstream_lost(TARGET, c.links[TARGET], "connection closed by server")
    c.host.side_ok(TARGET)
    c.sent(SOURCE)
    c.send(["SET", "a", "1"])
    c.accept()
    assert c.sent(TARGET) == resp(["SET", "a", "1"])


# --- blocking commands ----------------------------------------------------------------------

def test_blocking_pop_is_tried_first_and_its_effect_mirrored(core):
    """BLPOP is first tried inside MULTI/EXEC on the source; what it popped reaches the target as LPOP."""
    c = core(Phase.MIRRORING)
    c.send(["BLPOP", "q", "0"])
    assert c.sent(SOURCE) == resp(["MULTI"], ["BLPOP", "q", "0"], ["EXEC"])
    assert c.sent(TARGET) == b""
    c.reply(SOURCE, b"+OK\r\n+QUEUED\r\n*1\r\n*2\r\n$1\r\nq\r\n$1\r\nx\r\n")
    assert c.answered() == b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n"
    assert c.sent(TARGET) == resp(["LPOP", "q"])
    c.reply(TARGET, b"$1\r\nx\r\n")
    assert c.dirty() == set() and c.session.drained()


def test_blocking_pop_with_nothing_to_pop_blocks_as_itself(core):
    """BLPOP that finds nothing in its try is sent again as itself, and the target gets nothing until it returns."""
    c = core(Phase.MIRRORING)
    c.send(["BLPOP", "q", "0"])
    c.sent(SOURCE)
    c.reply(SOURCE, b"+OK\r\n+QUEUED\r\n*1\r\n*-1\r\n")
    assert c.sent(SOURCE) == resp(["BLPOP", "q", "0"])
    assert c.answered() == b"" and c.sent(TARGET) == b""
    c.reply(SOURCE, b"*2\r\n$1\r\nq\r\n$1\r\ny\r\n")
    assert c.answered() == b"*2\r\n$1\r\nq\r\n$1\r\ny\r\n"
    assert c.sent(TARGET) == resp(["LPOP", "q"])


# --- subscriptions --------------------------------------------------------------------------

def test_subscribe_streams_messages_from_the_side_it_subscribed_on(core):
    """SUBSCRIBE goes to the read side; its confirmation and later messages reach the client as they come."""
    c = core(Phase.MIRRORING)
    c.send(["SUBSCRIBE", "ch"])
    assert c.sent(SOURCE) == resp(["SUBSCRIBE", "ch"]) and c.sent(TARGET) == b""
    c.reply(SOURCE, b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
    assert c.answered() == b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    assert c.session.pipe == SOURCE
    c.reply(SOURCE, b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n")
    assert c.answered() == b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"


def test_commands_after_subscribe_wait_for_its_confirmation(core):
    """A command pipelined behind SUBSCRIBE is sent only once the subscription is confirmed, on the subscribed side."""
    c = core(Phase.MIRRORING)
    c.send(["SUBSCRIBE", "ch"], ["PING"])
    assert c.sent(SOURCE) == resp(["SUBSCRIBE", "ch"])
    c.reply(SOURCE, b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
    assert c.sent(SOURCE) == resp(["PING"]) and c.sent(TARGET) == b""


# --- scripts ----------------------------------------------------------------------------------

def test_evalsha_heals_a_target_without_the_script(core):
    """EVALSHA of a script the target has not loaded: the target gets SCRIPT LOAD of the body first."""
    c = core(Phase.MIRRORING)
    c.send(["EVAL", "return 1", "0"])
    assert c.sent(TARGET) == resp(["EVAL", "return 1", "0"])
    c.reply(SOURCE, b":1\r\n")
    c.reply(TARGET, b":1\r\n")
    c.sent(SOURCE)
    c.host.scripts_loaded[TARGET].clear()  # e.g. the target restarted
    c.send(["EVALSHA", SHA, "0"])
    assert c.sent(SOURCE) == resp(["EVALSHA", SHA, "0"])
    assert c.sent(TARGET) == resp(["SCRIPT", "LOAD", "return 1"], ["EVALSHA", SHA, "0"])
    c.reply(TARGET, b"$40\r\n" + SHA + b"\r\n:1\r\n")
    c.reply(SOURCE, b":1\r\n")
    assert c.answered() == b":1\r\n:1\r\n"
    assert c.host.stats.script_heals == 1 and SHA in c.host.scripts_loaded[TARGET]


def test_noscript_on_the_target_alone_marks_the_keys_dirty(core):
    """An EVALSHA only the target answers NOSCRIPT (body never seen): its keys are dirty and the client has the source's reply."""
    c = core(Phase.MIRRORING)
    c.send(["EVALSHA", "ab" * 20, "1", "k"])
    assert c.sent(TARGET) == resp(["EVALSHA", "ab" * 20, "1", "k"])
    c.reply(TARGET, b"-NOSCRIPT No matching script.\r\n")
    c.reply(SOURCE, b":1\r\n")
    assert c.answered() == b":1\r\n"
    assert c.dirty() == {(0, b"k")}
    assert c.host.stats.shadow_failures[("target", "noscript")] == 1


# --- answered by the shim itself ------------------------------------------------------------

def test_auth_is_answered_by_the_shim_and_never_forwarded(core):
    """With shim.password set, commands before AUTH are refused locally; AUTH itself never reaches a side."""
    c = core(Phase.MIRRORING, password=b"pw")
    c.send(["GET", "a"])
    assert c.answered() == b"-NOAUTH Authentication required.\r\n"
    c.send(["AUTH", "nope"])
    assert c.answered().startswith(b"-WRONGPASS")
    c.send(["AUTH", "pw"], ["GET", "a"])
    assert c.answered() == b"+OK\r\n"
    assert c.sent(SOURCE) == c.sent(TARGET) == resp(["GET", "a"])


def test_quit_answers_ok_and_closes(core):
    """QUIT is answered +OK by the shim after the replies before it, then the client is closed."""
    c = core(Phase.MIRRORING)
    c.send(["GET", "a"], ["QUIT"])
    assert c.sent(SOURCE) == resp(["GET", "a"])  # QUIT is not forwarded
    assert not c.client.closed
    c.reply(SOURCE, b"$-1\r\n")
    c.reply(TARGET, b"$-1\r\n")
    assert c.answered() == b"$-1\r\n+OK\r\n"
    assert c.client.closed and c.host.closed == ["client sent QUIT"]


def test_unsupported_command_is_refused_locally(core):
    """MONITOR is refused with one error line naming it; nothing reaches a side."""
    c = core(Phase.MIRRORING)
    c.send(["MONITOR"])
    assert c.answered().startswith(b"-ERR migrator shim: MONITOR is not supported through the shim")
    assert c.sent(SOURCE) == c.sent(TARGET) == b""


def test_protocol_error_answers_and_closes(core):
    """Bytes that are not RESP get the server's protocol error line and the connection is closed."""
    c = core(Phase.PLANNED)
    c.session.on_client_data(b"*1\r\n$x\r\n")
    assert c.answered().startswith(b"-ERR Protocol error")
    assert c.client.closed


# --- flow control and the write switch ------------------------------------------------------

def test_too_many_commands_in_flight_pause_the_client_until_replies_drain(core):
    """A client with more than its window of commands in flight stops being read; its replies resume it."""
    c = core(Phase.PLANNED)
    n = c.host.client_window + 1
    c.send(*[["GET", "a"]] * n)
    assert c.client.paused and c.host.stats.backpressure == 1
    c.reply(SOURCE, b"$-1\r\n" * n)
    assert not c.client.paused
    assert c.answered() == b"$-1\r\n" * n


def test_a_client_not_reading_its_replies_is_not_read_either(core):
    """When the client link's unread bytes cross max_client_buffer_bytes the client is paused, and resumed below half."""
    c = core(Phase.PLANNED)
    limit = c.host.cfg.max_client_buffer_bytes
    c.client.buffered = limit + 1
    c.session.on_buffers_changed()
    assert c.client.paused
    c.client.buffered = limit // 2 - 1
    c.session.on_buffers_changed()
    assert not c.client.paused and c.client.pauses == 1


def test_write_switch_holds_client_bytes_until_released(core):
    """While the shim holds (the write switch), nothing reaches a side; released, the held commands go by the new phase."""
    c = core(Phase.MIRRORING)
    c.host.holding = True
    c.send(["SET", "a", "1"])
    assert c.sent(SOURCE) == c.sent(TARGET) == b""
    c.host.holding = False
    c.host.routes = ROUTES[Phase.WRITES_ON_TARGET]
    c.session.release()
    assert c.sent(TARGET) == c.sent(SOURCE) == resp(["SET", "a", "1"])
    c.reply(TARGET, b"+OK\r\n")
    assert c.answered() == b"+OK\r\n"


# --- the host protocol ----------------------------------------------------------------------

CORE_MODULES = ("session", "entry", "dispatch", "fastpath", "connstate", "transactions", "subscriptions", "blocking", "ordering",
                "scripts", "restoring", "replies", "failures")


def _host_members() -> set[str]:
    from migrator.shim.host import ShimHost

    return set(ShimHost.__annotations__) | {n for n in vars(ShimHost) if not n.startswith("_")}


def _used_on_host() -> set[str]:
    """Every attribute the core's modules read or call on their shim (``self.shim.x``, or ``shim.x`` after ``shim = self.shim``)."""
    import ast
    from pathlib import Path

    import migrator.shim

    used: set[str] = set()
    for mod in CORE_MODULES:
        tree = ast.parse((Path(migrator.shim.__file__).parent / f"{mod}.py").read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            v = node.value
            if (isinstance(v, ast.Attribute) and v.attr == "shim" and isinstance(v.value, ast.Name)
                    and v.value.id == "self") or (isinstance(v, ast.Name) and v.id == "shim"):
                used.add(node.attr)
    return used


def test_the_core_uses_only_what_the_host_protocol_declares():
    """Everything the core reads or calls on its shim is declared in host.ShimHost, so a host can be written from it."""
    used = _used_on_host()
    assert {"open_upstream", "stats", "routes", "seq"} <= used  # (the walk sees the core's uses)
    assert used - _host_members() == set()


def test_the_shim_and_the_recording_host_provide_the_host_protocol(tmp_path):
    """server.Shim and this file's recording host both have every member of host.ShimHost."""
    from migrator.shim.server import Shim

    pb = playbook.load(write_playbook(tmp_path / "p.yaml", "redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0",
                                      shim={"listen": "127.0.0.1:1", "admin": "127.0.0.1:2"}))
    for host in (Shim(pb), Host(tmp_path, Phase.MIRRORING)):
        missing = {m for m in _host_members() if not hasattr(host, m)}
        assert missing == set(), f"{type(host).__name__} lacks {sorted(missing)}"
