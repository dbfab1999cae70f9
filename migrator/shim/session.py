"""One client connection: its commands, its two upstream connections, and the order of replies.

No sockets here: the session is handed bytes (``on_client_data``, ``on_upstream_data``) and
writes through the objects the socket layer gives it (``ClientLink.write``, an upstream
transport's ``write``). What it does with them:

- Each client command becomes an ``Entry``, routed by ``routing.ROUTES[phase][class]``. The
  entry sits in the client's in-order queue (``inflight``) and in the queue of each side it goes
  to. Each side's connection answers in order, so its replies are matched to the head of its
  queue; the client gets the answering side's raw reply bytes in its own command order, which
  keeps pipelining intact (no per-command round trip).
- A side's payload may be *deferred* until the answering side replied (an effect, or "source
  first, then target"); a deferred payload holds back that side's later commands, so the order
  of commands on each side is always the client's order.
- The shadow side never makes a client wait longer than ``shim.shadow_timeout``: on a timeout or
  a lost connection its pending writes are recorded as dirty and the connection is reset.
- Connection state (database, protocol, client name, READONLY) is tracked and replayed on any
  upstream connection opened later, before the commands that follow it.
- An entry that goes to both sides and writes (or is a compared read) first takes its keys from
  the shim's ``Sequencer``, so two connections' writes to one key reach both sides in the same
  order. Until granted, its payloads are held back (``DEFERRED``), and so, behind it, are the
  connection's later commands on each side; a connection requests its entries' keys in its own
  command order (``ungranted``), so a held key always belongs to an entry already sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import hiredis

from migrator.shim import compare as cmp
from migrator.shim import effects, restore, server_cmds
from migrator.shim.commands import SIDE_NAMES, SOURCE, TARGET, Classified, Cls
from migrator.shim.resp import (
    OK,
    Framer,
    ProtocolError,
    RequestParser,
    encode,
    error_reply,
    is_error,
    is_push,
    parse,
)
from migrator.shim.routing import SHIM, Plan, publish_reaches
from migrator.shim.sequencer import GRANTED, Request

if TYPE_CHECKING:  # pragma: no cover
    from migrator.shim.host import ClientLink, ShimHost

DEFERRED = object()  # the shadow's payload is computed when the answer arrives
_MULTI = encode([b"MULTI"])
_EXEC = encode([b"EXEC"])
_NULLS = frozenset({b"*-1\r\n", b"$-1\r\n", b"_\r\n"})
_QUEUED = b"+QUEUED\r\n"
_PER_SIDE_STATE = frozenset({b"readonly", b"readwrite"})  # kept per side (see _readonly_settled)
_EVALSHA = frozenset({b"evalsha", b"evalsha_ro"})
_MOVES = frozenset({b"blmove", b"brpoplpush"})  # blocking commands that push what they pop
NOTHING = b""  # the effect was "nothing to do" (e.g. a pop that found nothing)

IDLE, CONNECTING, UP, DOWN = "idle", "connecting", "up", "down"
_WRITE_LIKE = frozenset({Cls.WRITE, Cls.SCRIPT, Cls.SCRIPT_ADMIN, Cls.BLOCKING, Cls.TX})
_COMBINED = frozenset({Cls.PUBLISH, Cls.PUBSUB_COUNT, Cls.SERVER_BOTH})  # the reply is made from both sides'
CLIENT_GONE_GRACE = 5.0  # seconds a disconnected client's in-flight commands may still finish
FAST_PATH_MAX_PARTIAL = 64 * 1024  # a command bigger than this: that connection uses the slow path
# Classes a passthrough connection forwards without entries (blocking commands, transactions,
# subscriptions and AUTH/QUIT need the entry path; connection commands too: the state they set is
# kept only once the server accepted it, see Session._state_change).
_RAW_CLASSES = frozenset({Cls.READ, Cls.WRITE, Cls.ADMIN, Cls.SCRIPT, Cls.SCRIPT_ADMIN, Cls.PUBLISH, Cls.UNKNOWN})
# Commands whose shadow version differs from what the client sent (see effects): never batched.
_NOT_PLAIN = frozenset(effects.NEEDS_REPLY | {b"expire", b"pexpire", b"setex", b"psetex", b"getex", b"restore", b"xadd",
                                             b"select", b"hello", b"client", b"readonly", b"readwrite",
                                             b"evalsha_ro"})  # (healed like EVALSHA: see _heal_script)


class Entry:
    """One command (or one internal command of the shim) on its way through the shim."""

    __slots__ = (
        "answer",
        "args",
        "batch",
        "bkeys",
        "bmove",
        "bprobe",
        "c",
        "close_after",
        "cls",
        "compare",
        "cstate",
        "db",
        "done",
        "effect",
        "exp",
        "expired",
        "fallback",
        "gen",
        "heal_sha",
        "internal",
        "local",
        "n",
        "name",
        "payload",
        "pending",
        "rep",
        "req",
        "restore",
        "saved",
        "sent_idx",
        "shadow",
        "shadow_raw",
        "size",
        "stream",
        "ts",
        "tx",
        "txcmp",
        "wait_shadow",
        "write",
    )

    def __init__(self, args: list[bytes], name: bytes, c: Classified | None, gen: int) -> None:
        self.args = args
        self.name = name
        self.c = c
        self.cls = c.cls if c is not None else Cls.LOCAL
        self.gen = gen
        self.answer = SHIM
        self.shadow: int | None = None
        self.payload: list[Any] = [None, None]
        self.exp = [1, 1]
        self.rep: list[Any] = [None, None]
        self.pending = 0
        self.done = [False, False]
        self.wait_shadow = False
        self.compare = False
        self.db = 0
        self.ts = [0.0, 0.0]
        self.internal = False
        self.local: bytes | None = None
        self.close_after = False
        self.effect = False
        self.tx: list[list[bytes]] | None = None
        self.shadow_raw: bytes | None = None
        self.fallback = False
        self.stream = False
        self.write = self.cls in _WRITE_LIKE
        self.heal_sha: bytes | None = None
        self.txcmp: tuple[list[bytes], list[tuple[int, int]]] | None = None
        self.n = 1  # commands this entry stands for (a batch: a whole pipelined chunk)
        self.batch = False
        self.sent_idx: list[int] | None = None  # a batch's commands the shadow got (None: all)
        self.req: Request | None = None  # its keys in the shim's sequencer
        self.saved: list[Any] | None = None  # the payloads, while held back for the sequencer
        self.bkeys: list | None = None  # a blocking command's keys, while it may block upstream
        self.bprobe = False  # a blocking command tried inside MULTI/EXEC first (see _blocking_probe)
        self.bmove: tuple | None = None  # a blocked move's (source, destination), until it is done
        # Connection state it changes, {field: (before, after)}, until its answer says whether it did.
        self.cstate: dict[str, tuple[Any, Any]] | None = None
        self.expired = False  # its shadow reply is late behind an answer on that side (see check_timeouts)
        self.size = 0  # request bytes it holds while in the client's queue (see Session._flow)
        # A RESTORE the other side cannot read (see _restore_by_effect): True until answered,
        # then the other side's commands (None: a type not copied, its key is marked dirty).
        self.restore: bool | list | None = False


class Upstream:
    """A session's connection to one side."""

    __slots__ = ("attempt", "connect_started", "counter", "framer", "out", "raw_pending", "raw_sent", "side", "state",
                 "transport", "wait")

    def __init__(self, side: int) -> None:
        self.side = side
        self.state = IDLE
        self.transport = None
        self.out: deque[Entry] = deque()  # routed, not sent yet (connecting, or behind a deferred one)
        self.wait: deque[Entry] = deque()  # sent, awaiting replies
        self.framer = Framer()
        self.connect_started = 0.0
        self.attempt = 0
        # Passthrough ("raw") mode: replies owed for commands forwarded without entries, counted
        # by hiredis and forwarded to the client as they arrive (see Session._raw_passthrough).
        self.raw_pending = 0
        self.raw_sent: deque[list] = deque()  # [sent at, replies still owed, generation]
        self.counter = hiredis.Reader()


class Session:
    def __init__(self, shim: ShimHost, client: ClientLink) -> None:
        self.shim = shim
        self.client = client
        self.parser = RequestParser(shim.cfg.max_request_bytes)
        self.inflight: deque[Entry] = deque()
        self.up = [Upstream(SOURCE), Upstream(TARGET)]
        self.db: int | None = None  # None: each endpoint's own database (shim.endpoint_dbs)
        self.proto = 2
        self.name: bytes | None = None
        self.readonly = [False, False]  # READONLY accepted by each side: replayed only there
        self.authed = shim.password is None
        self.tx: list[list[bytes]] | None = None
        self.tx_plan: Plan | None = None
        self.tx_gen = 0
        self.tx_abort = False  # a command inside MULTI was refused by the shim: EXEC fails (EXECABORT)
        self.watched: set[int] = set()  # the sides WATCH was sent to since the last EXEC/DISCARD/UNWATCH
        # Entries changing connection state (SELECT, CLIENT SETNAME, HELLO, an EXEC with those)
        # not answered yet, in command order (see _state_change).
        self.conn_pending: deque[Entry] = deque()
        self.pipe: int | None = None  # the side this (subscribed) connection streams from
        # What the connection is subscribed to, by kind (b"": channels, b"p": patterns, b"s":
        # shard channels), from the servers' confirmations; it streams (``pipe``) while any is set.
        self.subs: dict[bytes, set[bytes]] = {b"": set(), b"p": set(), b"s": set()}
        # A (un)subscribe whose confirmations decide whether the connection streams: the later
        # commands wait (``sub_held``) until they are in. [kind, confirmations still to come]
        self.sub_expect: list | None = None
        self.sub_held: list[list[bytes]] = []
        self.backlog: list[bytes] = []
        self.out: list[bytes] = []
        self.pending_count = 0
        self.closed = False
        self.client_gone = 0.0  # when the client disconnected (0: connected)
        self.blocking_pending = 0  # pending commands that may block: not waited for by a drain
        self.held: list[bytes] = []  # client bytes received while the shim holds (write switch)
        self.held_bytes = 0
        # Raw forwarding of whole pipelined chunks (see _raw_commands): bytes of a partial command.
        self.fast = True
        self.leftover = b""
        # Entries needing the sequencer, in command order, from the first not granted yet
        # (a blocking command stays here until its effect has its keys).
        self.ungranted: deque[Entry] = deque()
        # Back-pressure (see _flow): commands and request bytes in flight (read from the client,
        # reply not written to it yet), commands of this connection in the mirror queue, and
        # whether reading from the client is paused.
        self.inflight_n = 0
        self.inflight_bytes = 0
        self.shadow_n = 0
        self.paused = False

    # --- client side ---------------------------------------------------------------------
    def on_client_data(self, data: bytes) -> None:
        if self.closed or self.client_gone:
            return
        self._feed(data)
        self._flow()

    def _feed(self, data: bytes) -> None:
        if self.shim.holding:
            # The write switch: nothing new goes upstream until authority has moved; the
            # client just waits (bounded by the barrier's deadline).
            self.held.append(data)
            self.held_bytes += len(data)
            return
        if self.parser.error is not None:
            return  # the rest of a stream that stopped being commands: the error reply is queued
        try:
            commands = self.parser.feed(data)
        except ProtocolError as e:
            self.shim.stats.refused["protocol-error"] += 1
            self.shim.log.warning("shim.client_protocol_error", peer=self.client.peer, error=str(e))
            self._flush_client()
            self.client.write(error_reply(f"ERR Protocol error: {e}"))
            self.close("protocol error")
            return
        if self.parser.error is not None:
            self.fast, self.leftover = False, b""
        raw = self._raw_commands(data, commands) if self.fast else None
        if raw is not None and self._raw_passthrough(commands, raw):
            return
        if raw is None or not self._batch(commands, raw):
            for args in commands:
                self.handle(args)
                if self.closed:
                    return
        if self.parser.error is not None:
            # Bytes that are not a command after these commands: they run, then the error and
            # the close come after their replies, as Redis does.
            self.shim.stats.refused["protocol-error"] += 1
            self.shim.log.warning("shim.client_protocol_error", peer=self.client.peer, error=str(self.parser.error))
            self._local([b"protocol-error"], None, error_reply(f"ERR Protocol error: {self.parser.error}"),
                        close_after=True)
        self._pump(SOURCE)
        self._pump(TARGET)
        self._flush_client()

    def connect_sides(self) -> None:
        """Open the connections the current phase uses now, not at the first command.

        Writes from different clients reach the shadow in the order the shim forwards them;
        a connection still opening when its client's first write arrives would let another
        client's later write overtake it (a pop mirrored before the push it popped).
        """
        plan = self.shim.routes[Cls.WRITE]
        for side in plan.sides():
            u = self.up[side]
            if u.state is IDLE and (side == plan.answer or self.shim.may_retry(side)):
                self._connect(side)

    def release(self) -> None:
        """The shim stopped holding: route what arrived meanwhile, by the phase now applied."""
        held, self.held, self.held_bytes = self.held, [], 0
        if held and not self.closed:
            # Also when the client has gone meanwhile: the server would have run what it had
            # received before the client's FIN.
            self._feed(b"".join(held))
            if self.client_gone:
                self._close_if_gone()
            else:
                self._flow()

    def on_client_lost(self) -> None:
        if self.closed:
            return
        self.client_gone = time.monotonic()
        self._close_if_gone()

    def _close_if_gone(self) -> None:
        """The client has gone: close once nothing it sent is still to be done.

        What it sent still runs (bounded by ``CLIENT_GONE_GRACE``), except a blocking command:
        the server drops a blocked client that disconnects, and one left blocking here would
        pop for nobody. Closing at once settles its shadow side (its keys are marked dirty: a
        pop may have happened with its reply in flight).
        """
        if self.closed or self.held:
            return  # held for the write switch: routed when released
        if self.blocking_pending and self._close_blocked("client closed while a blocking command was pending"):
            return
        if not self.pending_count and not self._raw_owed():
            self.close("client closed")

    def _blocked(self, classes=(Cls.BLOCKING, Cls.BLOCKING_READ)) -> list[Entry]:
        """Blocking commands sent as themselves (not their non-blocking try) and not returned yet."""
        return [e for e in self.inflight if e.cls in classes and not e.bprobe and e.rep[e.answer] is None]

    def _close_blocked(self, reason: str, classes=(Cls.BLOCKING, Cls.BLOCKING_READ)) -> bool:
        """Close the session if a blocking command is blocked upstream; True if it did."""
        blocked = self._blocked(classes)
        if not blocked:
            return False
        seq = self.shim.seq
        for e in blocked:
            # It may have popped only if a write to its keys is in flight or has just woken it
            # (the sequencer still has the key): otherwise its shadow side lost nothing and is
            # settled as such. (A keyless write, a barrier, may touch it.)
            other = e.shadow
            if (other is not None and e.bkeys is not None and not seq.fence
                    and not any(k in seq.locks for k in e.bkeys)):
                with contextlib.suppress(ValueError):
                    self.up[other].out.remove(e)
                self._finish_side(e, other)
        self._flush_client()
        self.close(reason)
        return True

    def handle(self, args: list[bytes]) -> None:
        if self.sub_expect is not None:
            self.sub_held.append(args)  # after a (un)subscribe: handled once it is confirmed
            return
        shim = self.shim
        name = args[0].lower()
        c = shim.table.classify(args)
        cls = c.cls
        if not self.authed and name not in (b"auth", b"hello", b"quit"):
            self._local(args, c, b"-NOAUTH Authentication required.\r\n")
            return
        if cls is Cls.LOCAL:
            if self.tx is not None and name != b"quit":
                # Redis would queue AUTH and run it at EXEC; the shim answers it itself, which
                # would leave EXEC's reply one result short: refused, and EXEC fails like Redis's.
                self._refuse_in_tx(args, c, name)
                return
            self._handle_local(args, name, c)
            return
        refusal = None
        if cls is Cls.UNSUPPORTED:
            refusal = error_reply(
                f"ERR migrator shim: {name.decode(errors='replace').upper()}"
                f"{' ' + args[1].decode(errors='replace').upper() if len(args) > 1 and name in (b'client', b'acl', b'module') else ''}"
                " is not supported through the shim during a migration; connect to the server directly")
        elif name == b"client" and len(args) > 2 and args[1].lower() == b"kill":
            refusal = server_cmds.client_kill_refusal(args)
        if refusal is not None:
            if self.tx is not None:
                self.tx_abort = True  # refused inside MULTI: EXEC fails, as after a queueing error
            shim.stats.refused[f"unsupported:{name.decode(errors='replace')}"] += 1
            self._local(args, c, refusal)
            return
        if self.pipe is not None:
            self._pipe_command(args, name, c)
            return
        if cls is Cls.TX:
            self._handle_tx(args, name, c)
            return
        if self.tx is not None:
            if name == b"hello":
                # Run at EXEC it would switch the protocol in the middle of EXEC's reply.
                self._refuse_in_tx(args, c, name)
                return
            # Queued inside MULTI (connection commands too: SELECT, CLIENT SETNAME run at EXEC,
            # and the connection state follows EXEC's result): the write side queues it; the
            # shadow gets the whole transaction once EXEC has answered.
            self.tx.append(args)
            self._dispatch(args, name, c, Plan(self.tx_plan.answer), gen=self.tx_gen)
            return
        if cls is Cls.CONNECTION:
            self._handle_connection(args, name, c)
            return
        plan = shim.routes[cls]
        e = self._dispatch(args, name, c, plan)
        if cls is Cls.SUBSCRIBE:
            # The connection streams from that side only if the server confirms a subscription;
            # each channel named gets a confirmation of its own.
            n = self._sub_expected(args, name)
            if n:
                e.exp[e.answer] = n
                self.sub_expect = [None, n]

    def _local(self, args: list[bytes], c: Classified | None, reply: bytes, close_after: bool = False) -> None:
        e = Entry(args, args[0].lower(), c, self.shim.generation)
        e.local = reply
        e.close_after = close_after
        self.inflight.append(e)
        self.inflight_n += 1

    def _refuse_in_tx(self, args: list[bytes], c: Classified | None, name: bytes) -> None:
        self.tx_abort = True
        self.shim.stats.refused[f"in-multi:{name.decode(errors='replace')}"] += 1
        self._local(args, c, error_reply(
            f"ERR migrator shim: {name.decode(errors='replace').upper()} inside MULTI is not supported through the shim"))

    def _check_password(self, password: bytes) -> bool:
        expected = self.shim.password
        return expected is not None and hmac.compare_digest(password, expected)

    def _handle_local(self, args: list[bytes], name: bytes, c: Classified) -> None:
        if name == b"quit":
            self._local(args, c, OK, close_after=True)
            return
        # AUTH is the client's credential for the shim; the upstream connections authenticate
        # with the playbook's credentials, so it is never forwarded.
        if len(args) not in (2, 3):
            self._local(args, c, error_reply("ERR wrong number of arguments for 'auth' command"))
            return
        if self.shim.password is None:
            self._local(args, c, OK)
            return
        if self._check_password(args[-1]):
            self.authed = True
            self._local(args, c, OK)
        else:
            self.shim.stats.refused["wrong-password"] += 1
            self._local(args, c, b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")

    def _handle_connection(self, args: list[bytes], name: bytes, c: Classified) -> None:
        plan = self.shim.routes[Cls.CONNECTION]
        if name == b"hello":
            forward = [args[0]]
            if len(args) > 1:
                try:
                    proto = int(args[1])
                except ValueError:
                    self._local(args, c, error_reply("ERR Protocol version is not an integer or out of range"))
                    return
                if proto not in (2, 3):
                    self._local(args, c, b"-NOPROTO unsupported protocol version\r\n")
                    return
                forward.append(args[1])
                i, setname, auth_ok = 2, None, None
                while i < len(args):
                    opt = args[i].lower()
                    if opt == b"auth" and i + 2 < len(args):
                        auth_ok = self.shim.password is None or self._check_password(args[i + 2])
                        i += 3
                    elif opt == b"setname" and i + 1 < len(args):
                        setname = args[i + 1]
                        i += 2
                    else:
                        self._local(args, c, error_reply(f"ERR Syntax error in HELLO option '{opt.decode(errors='replace')}'"))
                        return
                if auth_ok is False:
                    self.shim.stats.refused["wrong-password"] += 1
                    self._local(args, c, b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
                    return
                if auth_ok:
                    self.authed = True
                if not self.authed:
                    self._local(args, c, b"-NOAUTH HELLO must be called with the client already authenticated, "
                                         b"otherwise the HELLO <proto> AUTH <user> <pass> option can be used to "
                                         b"authenticate the client and select the RESP protocol version at the same time\r\n")
                    return
                changes: dict[str, Any] = {"proto": proto}
                if setname is not None:
                    forward += [b"SETNAME", setname]
                    changes["name"] = setname
                self._state_change(self._dispatch(forward, name, c, plan), changes)
                return
            elif not self.authed:
                self._local(args, c, b"-NOAUTH Authentication required.\r\n")
                return
            self._dispatch(forward, name, c, plan)
            return
        e = self._dispatch(args, name, c, plan)
        changes = _state_changes(args, name)
        if changes:
            self._state_change(e, changes)

    # --- connection state ----------------------------------------------------------------------
    def _state_change(self, e: Entry, changes: dict[str, Any]) -> None:
        """``e`` changes the connection state: applied now, undone if its answer says it did not.

        Applied at once so that the commands after it are keyed, marked dirty and replayed on a
        new upstream connection with the state the server will have when it runs them; a SELECT
        the server refuses (SELECT 99) must not stay in it, or every later connection would be
        refused.
        """
        e.cstate = {f: (getattr(self, f), v) for f, v in changes.items()}
        for f, v in changes.items():
            setattr(self, f, v)
        self.conn_pending.append(e)

    def _state_settled(self, e: Entry, raw: bytes) -> None:
        """``e``'s answer is in: keep what it did, undo what it did not do."""
        cstate, e.cstate = e.cstate, None
        pending = self.conn_pending
        try:
            i = pending.index(e)
        except ValueError:
            return
        del pending[i]
        if e.tx is not None:
            result = parse(raw)
            done = _tx_state_changes(e.tx, result) if isinstance(result, list) else {}
        else:
            done = {} if is_error(raw) else {f: after for f, (_, after) in cstate.items()}
        for f, (before, after) in cstate.items():
            got = done.get(f, before)
            if got == after:
                continue
            # Not what was assumed: the next pending change of the field starts from what it is,
            # or, if none, the connection is in that state now.
            later = next((x for x in list(pending)[i:] if x.cstate is not None and f in x.cstate), None)
            if later is not None:
                later.cstate[f] = (got, later.cstate[f][1])
            else:
                setattr(self, f, got)

    def _handle_tx(self, args: list[bytes], name: bytes, c: Classified) -> None:
        if name == b"multi" and self.tx is None:
            self.tx = []
            self.tx_abort = False
            # The transaction's sides are fixed when it starts, even if the phase changes
            # before EXEC: its queued commands are on the write side already.
            self.tx_plan = self.shim.routes[Cls.TX]
            self.tx_gen = self.shim.generation
            self._dispatch(args, name, c, Plan(self.tx_plan.answer), gen=self.tx_gen)
            return
        if name == b"exec" and self.tx is not None:
            tx, plan, gen = self.tx, self.tx_plan, self.tx_gen
            self.tx = self.tx_plan = None
            watched, self.watched = self.watched, set()
            if self.tx_abort or (watched and watched != {plan.answer}):
                # The shim refused a command inside MULTI: like Redis after a queueing error,
                # nothing runs. Or keys were WATCHed on the side that took writes then, and the
                # write switch has moved writes since: the transaction would run where nothing
                # watches them, so it is aborted as if a watched key had changed (which the
                # shim cannot rule out). Either way the server discards what it queued.
                self._internal(plan.answer, [b"DISCARD"], gen)
                self._unwatch(watched - {plan.answer}, gen)
                if self.tx_abort:
                    self.tx_abort = False
                    self._local(args, c, b"-EXECABORT Transaction discarded because of previous errors.\r\n")
                else:
                    self.shim.stats.refused["exec-watch-across-write-switch"] += 1
                    self._local(args, c, b"_\r\n" if self.proto == 3 else b"*-1\r\n")
                return
            self._unwatch(watched - {plan.answer}, gen)
            now_shadow = self.shim.routes[Cls.TX].shadow
            if plan.shadow is None and now_shadow is not None:
                # Begun before mirroring, executed after: it runs on one side only, so what it
                # writes must be repaired on the other.
                e = Entry(tx, name, c, gen)
                e.tx = tx
                self._mark_dirty(self._entry_keys(e), self._db(now_shadow), "transaction-across-phase-change", name)
            e = self._dispatch(args, name, c, plan, gen=gen, tx=tx)
            changes = _tx_state_changes(tx)
            if changes:
                self._state_change(e, changes)
            return
        if name == b"discard" and self.tx is not None:
            plan, gen = self.tx_plan, self.tx_gen
            self.tx = self.tx_plan = None
            self.tx_abort = False
            watched, self.watched = self.watched, set()
            self._unwatch(watched - {plan.answer}, gen)
            self._dispatch(args, name, c, Plan(plan.answer), gen=gen)
            return
        # WATCH/UNWATCH (and misplaced MULTI/EXEC/DISCARD, which the server rejects): the write
        # side only. The shadow replays what EXEC did, so it needs no WATCH of its own.
        answer = self.tx_plan.answer if self.tx_plan is not None else self.shim.routes[Cls.TX].answer
        if self.tx is None:
            if name == b"watch":
                self.watched.add(answer)
            elif name == b"unwatch":
                watched, self.watched = self.watched, set()
                self._unwatch(watched - {answer}, None)
        self._dispatch(args, name, c, Plan(answer), gen=self.tx_gen if self.tx is not None else None)

    def _internal(self, side: int, args: list[bytes], gen: int | None) -> None:
        """A command of the shim's own on ``side``, in stream order; its reply goes to nobody."""
        self._enqueue(side, _internal_entry(side, args, self.shim.generation if gen is None else gen))

    def _unwatch(self, sides, gen: int | None) -> None:
        for side in sides:
            if self.up[side].state is UP or self.up[side].state is CONNECTING:
                self._internal(side, [b"UNWATCH"], gen)

    def _sub_expected(self, args: list[bytes], name: bytes) -> int:
        """How many confirmations a (un)subscribe gets (0: none to wait for, e.g. an arity error)."""
        if len(args) > 1:
            return len(args) - 1
        if name.endswith(b"unsubscribe"):
            return max(1, len(self.subs[name[: -len(b"unsubscribe")]]))  # one per subscription, or one
        return 0

    def _sub_confirmed(self, raw: bytes) -> bool:
        """Track a (un)subscribe confirmation; False if ``raw`` is not one."""
        if raw[:1] not in (b"*", b">") or b"subscribe\r\n" not in raw[:32]:
            return False
        try:
            msg = parse(raw)
        except Exception:  # noqa: BLE001 - not a frame of ours to judge
            return False
        if not isinstance(msg, list) or len(msg) != 3 or not isinstance(msg[0], bytes):
            return False
        kind = msg[0].lower()
        if kind.endswith(b"unsubscribe"):
            subs = self.subs.get(kind[: -len(b"unsubscribe")])
            if subs is None:
                return False
            subs.discard(msg[1])
        elif kind.endswith(b"subscribe"):
            subs = self.subs.get(kind[: -len(b"subscribe")])
            if subs is None:
                return False
            subs.add(msg[1])
        else:
            return False
        return True

    def _sub_settled(self, side: int) -> None:
        """The awaited confirmations are in: stream from ``side`` while subscribed, then go on."""
        self.sub_expect = None
        self.pipe = side if any(self.subs.values()) else None
        held, self.sub_held = self.sub_held, []
        for args in held:
            self.handle(args)
            if self.closed:
                return

    def _pipe_command(self, args: list[bytes], name: bytes, c: Classified) -> None:
        """A command on a subscribed connection: a stream to the side it subscribed on."""
        side = self.pipe
        if c.cls in _WRITE_LIKE and self.shim.routes[Cls.WRITE].shadow is not None:
            # RESP3 lets a subscribed connection write; that write reaches one side only.
            self._mark_dirty(c.keys(args), self._db(1 - side), "write-on-subscribed-connection", name)
        e = Entry(args, name, c, self.shim.generation)
        e.stream = True
        e.answer = side
        e.payload[side] = encode(args)
        self._enqueue(side, e)
        if c.cls is Cls.SUBSCRIBE:
            n = self._sub_expected(args, name)
            if n:
                self.sub_expect = [side, n]  # counted as the confirmations stream by

    # --- passthrough: one side only, no entries at all ----------------------------------------
    def _raw_passthrough(self, commands: list[list[bytes]], raw: bytes) -> bool:
        """In a one-sided phase, forward a chunk as it came and its replies as they come.

        Only while nothing else is in flight on this connection, and only for commands that
        need nothing from the shim but connection-state tracking; replies are counted (hiredis),
        not framed. Anything else (and every command after a phase change) takes the entry
        path, which waits until the replies owed here have arrived, so the order holds.
        """
        shim = self.shim
        routes = shim.routes
        plan = routes[Cls.WRITE]
        side = plan.answer
        if plan.shadow is not None or routes[Cls.READ].shadow is not None or routes[Cls.READ].answer != side:
            return False
        u = self.up[side]
        if (u.state is not UP or self.inflight or u.out or u.wait or self.tx is not None or self.pipe is not None
                or self.sub_expect is not None or not self.authed or u.framer.buf or self.up[1 - side].raw_pending):
            return False
        classify = shim.table.classify
        counts: dict[Cls, int] = {}
        special: list[tuple[Classified, list[bytes]]] = []
        reads = writes = 0
        for args in commands:
            c = classify(args)
            cls = c.cls
            if c.known[side]:  # the common case first: a read or a write this side knows
                if cls is Cls.WRITE:
                    writes += 1
                    continue
                if cls is Cls.READ:
                    reads += 1
                    continue
            if cls not in _RAW_CLASSES or (cls is Cls.ADMIN and args[0].lower() == b"client"):
                return False  # (CLIENT KILL's filters are checked on the entry path, in every phase)
            if cls is Cls.SCRIPT or cls is Cls.SCRIPT_ADMIN or not c.known[side]:
                special.append((c, args))
            counts[cls] = counts.get(cls, 0) + 1
        # Everything was checked before anything changes: a False above left no trace.
        for c, args in special:
            name = args[0].lower()
            if c.cls is Cls.SCRIPT or c.cls is Cls.SCRIPT_ADMIN:
                shim.note_script(args, name)
            if not c.known[side]:
                shim.stats.unknown[(SIDE_NAMES[side], name.decode(errors="replace"))] += 1
        n = len(commands)
        stats = shim.stats.commands
        if reads:
            counts[Cls.READ] = counts.get(Cls.READ, 0) + reads
        if writes:
            counts[Cls.WRITE] = counts.get(Cls.WRITE, 0) + writes
        for cls, k in counts.items():
            stats[(cls.value, SIDE_NAMES[side])] += k
        gen = shim.generation
        shim.outstanding[gen] = shim.outstanding.get(gen, 0) + n
        u.raw_pending += n
        u.raw_sent.append([time.monotonic(), n, gen, len(raw)])
        self.inflight_n += n
        self.inflight_bytes += len(raw)
        u.transport.write(raw)
        return True

    def _raw_replies(self, u: Upstream, data: bytes) -> None:
        """Replies owed for passthrough commands: to the client as they are, counted."""
        reader = u.counter
        reader.feed(data)
        n = 0
        try:
            while reader.gets() is not False:
                n += 1
        except hiredis.ProtocolError as e:
            # A reply hiredis cannot count (nested over ~1,000 levels): where the stream stands
            # is lost, so the connection ends, after what arrived, as if the server had closed it.
            self.client.write(data)
            self.fail(u.side, f"{SIDE_NAMES[u.side]} reply not counted: {e}", side_fault=False)
            return
        self.client.write(data)  # (a client not reading them: see _flow)
        if n > u.raw_pending:
            self.fail(u.side, f"unexpected reply from {SIDE_NAMES[u.side]} (stream out of step)", side_fault=False)
            return
        u.raw_pending -= n
        now = time.monotonic()
        latency = self.shim.stats.latency[u.side]
        sent = u.raw_sent
        while n and sent:
            head = sent[0]
            take = min(n, head[1])
            head[1] -= take
            n -= take
            self.inflight_n -= take
            latency.observe(now - head[0], take)
            self.shim.entry_finished(head[2], take)
            if head[1] == 0:
                self.inflight_bytes -= head[3]
                sent.popleft()

    # --- the fast path: a pipelined chunk of plain commands, forwarded as it came -------------
    def _raw_commands(self, data: bytes, commands: list[list[bytes]]) -> bytes | None:
        """The exact bytes of ``commands`` if the client encodes canonically (every client does).

        hiredis does not say where a partial command starts, so the bytes are accounted for by
        re-computing each command's encoded length. A client whose bytes do not add up (inline
        commands, non-canonical lengths) or that sends very large commands loses the fast path
        for the rest of its connection; the slow path re-encodes every command and is exact.
        """
        buf = self.leftover + data if self.leftover else data
        if not commands:
            self.leftover = buf
            if len(buf) > FAST_PATH_MAX_PARTIAL:
                self.fast, self.leftover = False, b""
            return None
        consumed = self.parser.encoded  # (counted by the parser: the same sum of canonical lengths)
        n = len(buf)
        if (consumed < 0 or self.parser.inline or consumed > n or buf[consumed - 2 : consumed] != b"\r\n"
                or (consumed < n and buf[consumed] != 42)):
            self.fast, self.leftover = False, b""
            return None
        if consumed == n:
            self.leftover = b""
            return buf
        self.leftover = buf[consumed:]
        if len(self.leftover) > FAST_PATH_MAX_PARTIAL:
            self.fast, self.leftover = False, b""
        return buf[:consumed]

    def _batch(self, commands: list[list[bytes]], raw: bytes) -> bool:
        """Route a chunk as one entry if every command in it is plain and routed alike.

        Plain: a read or a write both sides know, compared as sent, with no effect to compute.
        The chunk goes to each side as the client sent it and the replies are matched as a
        whole; anything else takes the per-command path. False: nothing was done.
        """
        if self.tx is not None or self.pipe is not None or self.sub_expect is not None or not self.authed:
            return False
        shim = self.shim
        routes = shim.routes
        classify = shim.table.classify
        read_plan, write_plan = routes[Cls.READ], routes[Cls.WRITE]
        reads = writes = first = 0
        never_compared_in = 0  # bit 1: a read, bit 2: a write whose reply is never compared
        lock_keys: list[bytes] = []  # the sequencer's keys, if the chunk goes to both sides
        simple = True  # every command has one key, at argv[1]: no key-spec walk below
        for args in commands:
            c = classify(args)
            memo = c.batch
            if memo is None:
                memo = c.batch = _batch_memo(c)
            kind, single, set_like, never_compared = memo
            if not first:
                first = kind
            if kind == 2:
                writes += 1
            elif kind == 1:
                reads += 1
            else:
                return False
            if set_like and len(args) > 3:
                return False  # SET with options (EX, GET, KEEPTTL...): see effects
            if never_compared:
                never_compared_in |= kind
            if simple:
                # Collected here rather than in a second pass: this runs for every chunk.
                if single and len(args) > 1:
                    lock_keys.append(args[1])
                else:
                    simple = False
        plan = write_plan if first == 2 else read_plan
        if reads and writes and read_plan is not write_plan and (
                read_plan.answer, read_plan.shadow, read_plan.sequential, read_plan.fallback) != (
                write_plan.answer, write_plan.shadow, write_plan.sequential, write_plan.fallback):
            return False
        if never_compared_in and ((never_compared_in & 1 and read_plan.compare)
                                   or (never_compared_in & 2 and write_plan.compare)):
            return False
        k = len(commands)
        answer, shadow = plan.answer, plan.shadow
        if shadow is not None:
            u = self.up[shadow]
            if (u.state is DOWN or u.state is IDLE) and not shim.may_retry(shadow):
                return False
            if reads and shim.cfg.compare_reads < 1.0:
                return False  # reads are sampled one by one, on the per-command path
            if plan.fallback and (shim.dirty.keys or not shim.may_retry(answer)):
                return False
        e = Entry(commands, b"", None, shim.generation)
        e.batch = True
        e.n = k
        e.cls = Cls.WRITE if writes else Cls.READ
        e.write = bool(writes)
        e.answer, e.shadow = answer, shadow
        e.db = self._db(answer)
        e.payload[answer] = raw
        e.exp[answer] = k
        e.pending = 1
        stats = shim.stats.commands
        if reads:
            stats[("read", SIDE_NAMES[answer])] += reads
        if writes:
            stats[("write", SIDE_NAMES[answer])] += writes
        if shadow is not None:
            e.pending = 2
            e.exp[shadow] = k
            e.compare = True
            e.wait_shadow = plan.wait_shadow
            e.fallback = plan.fallback
            shim.mirror_depth += k
            self.shadow_n += k
            if reads:
                stats[("read", SIDE_NAMES[shadow])] += reads
            if writes:
                stats[("write", SIDE_NAMES[shadow])] += writes
            if plan.sequential:
                e.payload[shadow] = DEFERRED
                e.shadow_raw = raw
            else:
                e.payload[shadow] = raw
            if simple and not (reads and writes):
                # Writes take their keys exclusively, compared reads shared.
                db = self._db(SOURCE)
                self._sequence(e, list(dict.fromkeys(lock_keys if not db else [(db, x) for x in lock_keys])),
                               excl=bool(writes))
            else:
                self._sequence(e, self._tx_spec(commands))
        self.pending_count += 1
        shim.outstanding[e.gen] = shim.outstanding.get(e.gen, 0) + 1
        self.inflight.append(e)
        e.size = len(raw)
        self.inflight_n += k
        self.inflight_bytes += e.size
        self._enqueue(answer, e)
        if shadow is not None:
            self._enqueue(shadow, e)
        return True

    def _resolve_batch(self, e: Entry, other: int, frames: list[bytes]) -> None:
        """Source first, then target: the shadow gets the commands the answering side applied."""
        failed = [i for i, f in enumerate(frames) if f[:1] == b"-"]
        if not failed:
            e.payload[other] = e.shadow_raw
            return
        keep = [i for i in range(e.n) if i not in set(failed)]
        e.sent_idx = keep
        e.exp[other] = max(len(keep), 1)
        e.payload[other] = b"".join(encode(e.args[i]) for i in keep) if keep else NOTHING

    def _compare_batch(self, e: Entry) -> None:
        shim = self.shim
        src, tgt = e.rep[SOURCE], e.rep[TARGET]
        idx = e.sent_idx
        if idx is None:
            pairs = zip(range(e.n), src, tgt)
        else:  # some commands failed on the answering side and were not sent to the shadow
            answer_frames = e.rep[e.answer]
            shadow_frames = e.rep[e.shadow]
            pairs = ((i, *((answer_frames[i], shadow_frames[j]) if e.answer == SOURCE else (shadow_frames[j], answer_frames[i])))
                     for j, i in enumerate(idx))
        compared = 0
        for i, a, b in pairs:
            compared += 1
            if a == b:
                continue
            args = e.args[i]
            name = args[0].lower()
            kind = cmp.compare(name, parse(a), parse(b), shim.ttl_tolerance_ms)
            if kind is None:
                continue
            c = shim.table.classify(args)
            self._diverged(e, kind, name, c.keys(args), a, b, c.cls is Cls.WRITE)
        shim.stats.compared += compared
        shim.divergence.compared(compared)

    # --- routing -------------------------------------------------------------------------
    def _db(self, side: int) -> int:
        return self.db if self.db is not None else self.shim.endpoint_dbs[side]

    def _dispatch(self, args: list[bytes], name: bytes, c: Classified, plan: Plan, gen: int | None = None,
                  tx: list[list[bytes]] | None = None) -> Entry:
        shim = self.shim
        stats = shim.stats
        e = Entry(args, name, c, shim.generation if gen is None else gen)
        e.tx = tx
        answer, shadow = plan.answer, plan.shadow
        cls = e.cls
        if shadow is not None and plan.sampled and not shim.sample():
            shadow = None
        if plan.fallback and shim.dirty.keys and shim.dirty.is_dirty(self._db(answer), c.keys(args)):
            # A key whose last write did not reach the read side is read from the side that has it.
            answer, shadow = plan.shadow, None
        elif plan.fallback and not shim.may_retry(answer):
            # The read side failed (down or timed out) moments ago: the write side answers, at once.
            answer, shadow = plan.shadow, None
        known = c.known
        if not known[answer]:
            stats.unknown[(SIDE_NAMES[answer], name.decode(errors="replace"))] += 1
            shim.warn_unknown(answer, name)
        if shadow is not None:
            reason = None
            if not known[shadow]:
                stats.unknown[(SIDE_NAMES[shadow], name.decode(errors="replace"))] += 1
                shim.warn_unknown(shadow, name)
                reason = f"unknown-on-{SIDE_NAMES[shadow]}"
                if shadow == TARGET:
                    shim.divergence.target_lacks(name)
            elif self.up[shadow].state in (DOWN, IDLE) and not shim.may_retry(shadow):
                reason = f"{SIDE_NAMES[shadow]}-down"
            # (A full mirror queue drops nothing: connections adding to it stop being read, see _flow.)
            if reason is not None:
                stats.shadow_failures[(SIDE_NAMES[shadow], reason)] += 1
                if cls is Cls.SERVER_BOTH:
                    shim.log.warning("shim.server_command_one_side", side=SIDE_NAMES[shadow], reason=reason,
                                     command=b" ".join(args[:2]).decode(errors="replace").upper())
                if e.write:
                    self._mark_dirty(self._entry_keys(e), self._db(shadow), reason, name)
                shadow = None
        e.answer, e.shadow = answer, shadow
        e.db = self._db(answer)
        raw = encode(args)
        e.payload[answer] = raw
        e.pending = 1
        stats.commands[(cls.value, SIDE_NAMES[answer])] += 1
        if shadow is not None:
            e.pending = 2
            e.wait_shadow = plan.wait_shadow or plan.combine
            e.fallback = plan.fallback
            shim.mirror_depth += 1
            self.shadow_n += 1
            stats.commands[(cls.value, SIDE_NAMES[shadow])] += 1
            needs_reply = tx is not None or plan.effect or (e.write and effects.needs_reply(args))
            if needs_reply:
                e.payload[shadow] = DEFERRED
                e.effect = True
                e.compare = tx is not None and plan.compare
            else:
                rewritten = effects.rewrite_now(args, int(time.time() * 1000)) if e.write else None
                shadow_raw = encode(rewritten) if rewritten is not None else raw
                if plan.sequential:
                    e.payload[shadow] = DEFERRED
                    e.shadow_raw = shadow_raw
                else:
                    e.payload[shadow] = shadow_raw
                e.compare = plan.compare and cmp.comparable(name)
            if tx is not None:
                # A transaction's EVALSHA reaches the shadow inside its copy of the transaction.
                for targs in tx:
                    if targs[0].lower() in _EVALSHA and len(targs) > 1:
                        self._heal_script(shadow, targs[1].lower())
        if name in _EVALSHA and len(args) > 1:
            # (EVALSHA_RO too: a read, answered by the target after the read cutover.)
            sha = args[1].lower()
            # Never on the answering side: the client sees what that server says (NOSCRIPT after a
            # SCRIPT FLUSH, which a reload would undo); the shadow is healed to stay in step.
            if shadow is not None:
                self._heal_script(shadow, sha)
        if cls is Cls.SCRIPT or cls is Cls.SCRIPT_ADMIN:
            shim.note_script(args, name)
        if name == b"restore" and shadow is not None and tx is None:
            self._restore_by_effect(e)
        # SCRIPT FLUSH is ordered like a keyless write (a barrier): a script other connections
        # still have in flight to the shadow must not run there after the flush, nor before it.
        if shadow is not None and (e.write or e.compare) and (cls is not Cls.SCRIPT_ADMIN or _script_flush(args)):
            if cls is Cls.BLOCKING:
                # First tried without blocking (inside MULTI/EXEC), holding its keys like a write,
                # so a pop of data already there is ordered like any write. Only if there is
                # nothing yet is it sent as itself, to block without holding anything (see
                # _blocking_probe); the connection's later entries wait until it has returned.
                e.bprobe = True
                e.payload[answer] = _MULTI + raw + _EXEC
                e.exp[answer] = 3
                self._sequence(e, [(k, True) for k in dict.fromkeys(self._lock_keys(c.keys(args)))])
                if e.req.state == GRANTED:
                    self.ungranted.append(e)  # granted at once: still holds back what follows
            else:
                self._sequence(e, self._entry_spec(e))
        self.pending_count += 1
        if cls is Cls.BLOCKING or cls is Cls.BLOCKING_READ:
            self.blocking_pending += 1  # may wait forever by design: a drain does not wait for it
        else:
            shim.outstanding[e.gen] = shim.outstanding.get(e.gen, 0) + 1
        self.inflight.append(e)
        e.size = len(raw)
        self.inflight_n += 1
        self.inflight_bytes += e.size
        self._enqueue(answer, e)
        if shadow is not None:
            self._enqueue(shadow, e)
        return e

    def _restore_by_effect(self, e: Entry) -> None:
        """A RESTORE whose payload one side cannot read: run where it can be, copy the key to the other.

        The write side answers if it reads the payload; else the read side does if it can (after
        the read cutover a DUMP is answered by the target, so its payload must RESTORE through the
        shim). That side runs RESTORE and a read of the key it made, in one MULTI/EXEC; the other
        side then gets the key's type-aware copy (see shim.restore), and the client's reply waits
        for both. A payload both sides read goes as sent; one only the other side reads gets
        the write side's refusal, as without the shim.
        """
        version = restore.payload_version(e.args)
        if version is None:
            return
        versions = self.shim.rdb_versions
        answer, other = e.answer, e.shadow
        if restore.can_read(versions[answer], version):
            if restore.can_read(versions[other], version):
                return  # both read it: mirrored as sent
        elif restore.can_read(versions[other], version) and other == self.shim.routes[Cls.READ].answer:
            # Reads-on-target: the payload came from a DUMP the target answered; the target applies it.
            answer, other = other, answer
        else:
            # The answering side will refuse it as it would without the shim: the other side gets
            # it only if it was accepted after all.
            if e.payload[other] is not DEFERRED:
                e.shadow_raw, e.payload[other] = e.payload[other], DEFERRED
            return
        e.answer, e.shadow = answer, other
        e.db = self._db(answer)
        e.payload[answer] = _MULTI + encode(e.args) + encode(restore.reader(e.args[1])) + _EXEC
        e.exp[answer] = 4
        e.payload[other] = DEFERRED
        e.exp[other] = 1
        e.shadow_raw = None
        e.effect = e.compare = False
        e.wait_shadow = True
        e.restore = True

    def _restore_answered(self, e: Entry, side: int) -> None:
        """The RESTORE's MULTI/EXEC answered: the client gets RESTORE's own reply; the copy is made."""
        frames = e.rep[side]
        queued, result = frames[1], frames[3]
        cmds: list | None = []
        if is_error(queued):
            reply = queued  # rejected when queued (arity): EXEC only says EXECABORT
        elif is_error(result):
            reply = result
        elif result in _NULLS:
            reply = error_reply("ERR migrator shim: RESTORE was not run: this connection's WATCH aborted the "
                                "transaction the shim runs it in; retry it")
        else:
            start = result.index(b"\r\n") + 2
            end = result.index(b"\r\n", start) + 2
            reply = result[start:end]  # RESTORE answers one line: +OK or an error
            if not is_error(reply):
                parsed = parse(result)
                cmds = restore.effect(e.args[1], parsed[1] if isinstance(parsed, list) and len(parsed) == 2 else None)
                if cmds is None:
                    self._mark_dirty([e.args[1]], self._db(e.shadow), "restore-not-copied", b"restore")
        e.rep[side] = reply
        e.restore = cmds

    # --- per-key ordering across connections (see sequencer) ---------------------------------
    def _lock_keys(self, keys: list[bytes]) -> list:
        """Keys as the sequencer names them: the source's database identifies the key."""
        db = self._db(SOURCE)
        return keys if not db else [(db, k) for k in keys]

    def _entry_spec(self, e: Entry) -> list[tuple[Any, bool]] | None:
        """(key, exclusive) pairs for one command or a transaction; [] a barrier; None no ordering needed."""
        if e.tx is None:
            keys = e.c.keys(e.args) if e.c is not None else []
            if not keys:
                return [] if e.write else None  # a keyless write orders against everything
            excl = e.write
            if len(keys) == 1:
                return [(self._lock_keys(keys)[0], excl)]
            return [(k, excl) for k in dict.fromkeys(self._lock_keys(keys))]
        return self._tx_spec(e.tx)

    def _tx_spec(self, commands: list[list[bytes]]) -> list[tuple[Any, bool]] | None:
        classify = self.shim.table.classify
        spec: dict[Any, bool] = {}
        for args in commands:
            c = classify(args)
            write = c.cls in _WRITE_LIKE
            keys = c.keys(args)
            if not keys:
                if write:
                    return []
                continue
            for k in self._lock_keys(keys):
                spec[k] = spec.get(k, False) or write
        return list(spec.items()) if spec else None

    def _sequence(self, e: Entry, spec: list | None, excl: bool | None = None) -> None:
        """Take the entry's keys now, or hold it (and the connection's later commands) back.

        ``spec``: (key, exclusive) pairs, or plain keys all taken as ``excl``; None: nothing to take.
        """
        if spec is None:
            return
        req = Request(self, spec, self._granted, excl)
        req.data = e
        e.req = req
        if not spec and e.cls is Cls.SCRIPT:
            # A keyless script orders against everything, but one running for long (a busy
            # script) must not hold every other client here: past shadow_timeout the others go
            # on to the servers, which answer -BUSY as they would without the shim.
            req.lift_after = self.shim.shadow_timeout
        if self.ungranted or not self.shim.seq.acquire(req):
            e.saved = e.payload
            e.payload = [DEFERRED, DEFERRED]
            self.ungranted.append(e)

    def _granted(self, req: Request) -> None:
        """The sequencer's callback: a held-back entry may go."""
        e = req.data
        if e is None:
            return  # released already (its entry settled)
        if self.closed or e.pending == 0:
            self.shim.seq.release(req)
            return
        if e.saved is not None:
            e.payload, e.saved = e.saved, None
        if self.ungranted and self.ungranted[0] is e and not e.bprobe:
            self.ungranted.popleft()
            self._request_next()
        self._after_io()

    def _request_next(self) -> None:
        """Request the keys of the connection's next held-back entries, in order, until one waits."""
        q = self.ungranted
        seq = self.shim.seq
        while q:
            e = q[0]
            req = e.req
            if req is None:
                return  # a blocking command that has not returned yet
            if req.state == 0:
                if not seq.acquire(req):
                    return
                if e.saved is not None:
                    e.payload, e.saved = e.saved, None
            elif req.state != GRANTED:
                return
            if e.bprobe:
                return  # a blocking command: what follows waits until it has returned
            q.popleft()

    def _blocking_probe(self, e: Entry, side: int) -> bool:
        """The non-blocking try of a blocking command answered; False: it is being sent for real.

        Inside MULTI/EXEC a blocking command does not block. If it popped something, that is
        its answer, taken while it held its keys: its effect follows in order. If there was
        nothing, the command is sent again as itself, at the head of its side's queue, and its
        keys released: nothing could change them meanwhile, so it blocks until a later write
        wakes it, and that write hands the key over to its effect (see sequencer).
        """
        e.bprobe = False
        queued, result = e.rep[side][1], e.rep[side][2]
        if is_error(queued):
            answer = queued  # rejected when queued (arity, syntax): EXEC says only EXECABORT
        elif is_error(result):
            answer = result
        else:
            inner = result[result.index(b"\r\n") + 2:]
            if result[:2] != b"*1" or inner in _NULLS:  # nothing to pop yet (or EXEC aborted by a WATCH)
                seq = self.shim.seq
                e.rep[side] = None
                e.exp[side] = 1
                e.payload[side] = encode(e.args)
                e.bkeys = self._lock_keys(e.c.keys(e.args))
                seq.blocking_started(e.bkeys)
                if e.name in _MOVES and len(e.args) > 2:
                    e.bmove = tuple(self._lock_keys(e.args[1:3]))
                    seq.move_started(*e.bmove)
                req, e.req = e.req, None
                self.up[side].out.appendleft(e)
                seq.release(req)
                return False
            answer = inner
        e.rep[side] = answer
        if self.ungranted and self.ungranted[0] is e:
            self.ungranted.popleft()
            self._request_next()
        return True

    def _blocking_returned(self, e: Entry, other: int, cmds: list[list[bytes]]) -> None:
        """A blocking command answered: its effect takes its keys ahead of everything waiting."""
        seq = self.shim.seq
        seq.blocking_ended(e.bkeys)
        e.bkeys = None
        if cmds and not e.done[other]:
            classify = self.shim.table.classify
            keys = list(dict.fromkeys(k for cmd in cmds for k in self._lock_keys(classify(cmd).keys(cmd))))
            if keys:
                if seq.call_later is not None and seq.fed_by_move(keys, e.bmove):
                    # A move into its key was probably woken by the same write, and the server
                    # ran it first (chained BLMOVEs): its effect must reach the shadow first.
                    e.saved = list(e.payload)
                    e.payload[other] = DEFERRED
                    self._await_feeder(e, other, keys, time.monotonic() + self.shim.shadow_timeout)
                    return  # stays at the head of ``ungranted``
                if not self._effect_first(e, keys):
                    e.saved = list(e.payload)
                    e.payload[other] = DEFERRED
                    return  # stays at the head of ``ungranted`` until granted
        if self.ungranted and self.ungranted[0] is e:
            self.ungranted.popleft()
            self._request_next()

    def _effect_first(self, e: Entry, keys: list) -> bool:
        """Request a blocking command's effect's keys ahead of every waiting request; True if granted now."""
        req = Request(self, [(k, True) for k in keys], self._granted)
        req.data = e
        e.req = req
        return self.shim.seq.acquire_first(req)

    def _await_feeder(self, e: Entry, other: int, keys: list, deadline: float) -> None:
        """Hold ``e``'s effect while a blocked move into its keys may not be mirrored yet.

        Looked at again every 2 ms, at most until ``deadline`` (``shadow_timeout``): then it goes
        anyway, and if the shadow pops something else than the answering side did, the effect
        check records a divergence and marks the keys dirty.
        """
        seq = self.shim.seq

        def again() -> None:
            if self.closed:
                return
            if e.pending == 0 or e.done[other]:  # settled meanwhile (its shadow failed): let the rest go
                if self.ungranted and self.ungranted[0] is e:
                    self.ungranted.popleft()
                    self._request_next()
                    self._after_io()
                return
            if seq.fed_by_move(keys, e.bmove) and time.monotonic() < deadline:
                seq.call_later(0.002, again)
                return
            if not self._effect_first(e, keys):
                return  # granted later: see _granted
            e.payload, e.saved = e.saved, None
            if self.ungranted and self.ungranted[0] is e:
                self.ungranted.popleft()
                self._request_next()
            self._after_io()

        seq.call_later(0.002, again)

    def _heal_script(self, side: int, sha: bytes) -> None:
        """Load a script on ``side`` before an EVALSHA if the shim saw its body but not it loaded there."""
        shim = self.shim
        if sha in shim.scripts_loaded[side]:
            return
        body = shim.script_bodies.get(sha)
        if body is None:
            return  # a NOSCRIPT may follow; it is counted and the keys marked dirty then
        e = _internal_entry(side, [b"SCRIPT", b"LOAD", body], shim.generation)
        e.heal_sha = sha
        shim.stats.script_heals += 1
        self._enqueue(side, e)

    def _enqueue(self, side: int, e: Entry) -> None:
        u = self.up[side]
        if u.state is IDLE or u.state is DOWN:
            self._connect(side)
        u.out.append(e)

    def _connect(self, side: int) -> None:
        """Open ``side``'s connection; replay the connection state as of now before anything else."""
        u = self.up[side]
        u.state = CONNECTING
        u.connect_started = time.monotonic()
        u.framer = Framer()
        ep = self.shim.endpoints[side]
        hs: list[list[bytes]] = []
        if ep.password:
            hs.append([b"AUTH", *([ep.user.encode()] if ep.user else []), ep.password.encode()])
        if self.proto == 3:
            hs.append([b"HELLO", b"3"])
        db = self._db(side)
        if db != 0:
            hs.append([b"SELECT", b"%d" % db])
        if self.name is not None:
            hs.append([b"CLIENT", b"SETNAME", self.name])
        if self.readonly[side]:
            hs.append([b"READONLY"])
        for args in reversed(hs):
            u.out.appendleft(_internal_entry(side, args, self.shim.generation))
        u.attempt += 1
        self.shim.open_upstream(self, side, u.attempt)

    # --- upstream side -------------------------------------------------------------------
    def on_upstream_connected(self, side: int, transport, attempt: int) -> bool:
        """A connection opened; False if nobody wants it any more (the caller closes it)."""
        u = self.up[side]
        if self.closed or u.state is not CONNECTING or u.attempt != attempt:
            return False
        u.transport = transport
        u.state = UP
        self.shim.side_ok(side)
        self._pump(side)
        return True

    def on_upstream_failed(self, side: int, reason: str, attempt: int) -> None:
        u = self.up[side]
        if not self.closed and u.state is CONNECTING and u.attempt == attempt:
            self.fail(side, reason)
            self._after_io()

    def on_upstream_lost(self, side: int, transport, reason: str) -> None:
        if not self.closed and self.up[side].transport is transport and self.up[side].state is UP:
            self.fail(side, reason)
            self._after_io()

    def _pump(self, side: int) -> None:
        u = self.up[side]
        if u.state is not UP or not u.out or u.raw_pending:
            return
        out, wait = u.out, u.wait
        buf: list[bytes] = []
        nothing: list[Entry] | None = None
        now = time.monotonic()
        while out:
            e = out[0]
            p = e.payload[side]
            if p is DEFERRED:
                break
            out.popleft()
            if p is NOTHING:
                # Settled after the write below: settling may release keys, and a grant may
                # pump this very connection, which must not overtake what is collected here.
                if nothing is None:
                    nothing = []
                nothing.append(e)
                continue
            buf.append(p)
            if not e.stream:
                e.ts[side] = now
                wait.append(e)
                if e.bprobe and side == e.answer:
                    # A blocking command's non-blocking try: if it finds nothing, the command is
                    # sent again as itself, and nothing after it may reach the server first
                    # (a SELECT would move the pop to another database, a PUBLISH run before it).
                    break
        if buf:
            u.transport.write(b"".join(buf) if len(buf) > 1 else buf[0])  # (not keeping up: see _flow)
        if nothing is not None:
            for e in nothing:
                self._finish_side(e, side)

    def on_upstream_data(self, side: int, data: bytes) -> None:
        u = self.up[side]
        if u.state is not UP:
            return
        if u.raw_pending:
            # Only passthrough replies can be on the wire now: entries for this side wait in
            # ``out`` until these are all in (see _pump), so the whole chunk is theirs.
            self._raw_replies(u, data)
            if not u.raw_pending and not self.closed:
                self._after_io()
            elif self.paused:
                self._flow()
            return
        try:
            frames = u.framer.feed(data)
        except ProtocolError as e:
            self.fail(side, f"protocol error from {SIDE_NAMES[side]}: {e}", side_fault=False)
            self._after_io()
            return
        now = time.monotonic()
        wait = u.wait
        if self.pipe is None and wait and wait[0].batch:
            # A pipelined chunk's replies: taken as a slice, not one by one.
            i, nf = 0, len(frames)
            while i < nf and wait and wait[0].batch:
                e = wait[0]
                got = e.rep[side]
                if got is None:
                    got = e.rep[side] = []
                need = e.exp[side] - len(got)
                if need > nf - i:
                    got.extend(frames[i:] if i else frames)
                    i = nf
                    break
                got.extend(frames[i : i + need] if i or need < nf else frames)
                i += need
                wait.popleft()
                self._side_done(e, side, now)
                if self.closed:
                    return
            if i == nf:
                self._after_io()
                return
            frames = frames[i:]
        for raw in frames:
            if not wait or (raw[0] == 0x3E and self.pipe == side and wait[0].cls is not Cls.SUBSCRIBE):
                if self.pipe == side:
                    if self.inflight:
                        self.backlog.append(raw)
                    else:
                        self.out.append(raw)
                    if self._sub_confirmed(raw) and self.sub_expect is not None:
                        self.sub_expect[1] -= 1
                        if not self.sub_expect[1]:
                            self._sub_settled(side)
                            if self.closed:
                                return
                    elif self.sub_expect is not None and raw[:1] == b"-":
                        self._sub_settled(side)  # the (un)subscribe was refused (NOPERM...)
                        if self.closed:
                            return
                    continue
                if is_push(raw):
                    continue  # an out-of-band push for nobody (this connection did not subscribe)
                self.fail(side, f"unexpected reply from {SIDE_NAMES[side]} (stream out of step)", side_fault=False)
                break
            e = wait[0]
            if e.exp[side] == 1 and not e.batch:
                wait.popleft()
                e.rep[side] = raw
            else:
                got = e.rep[side]
                if got is None:
                    got = e.rep[side] = []
                got.append(raw)
                if len(got) < e.exp[side]:
                    if raw[:1] != b"-" or e.cls is not Cls.SUBSCRIBE:
                        continue
                    e.exp[side] = len(got)  # a (un)subscribe refused (NOPERM): one error, whatever it named
                wait.popleft()
            self._side_done(e, side, now)
            if self.closed:
                return
        self._after_io()

    def _after_io(self) -> None:
        if self.closed:
            return
        self._pump(SOURCE)
        self._pump(TARGET)
        self._flush_client()
        if self.client_gone:
            self._close_if_gone()
        elif self.paused:
            self._flow()

    def _flow(self) -> None:
        """Back-pressure: stop reading the client while it has too much in the shim, resume once half is gone.

        Too much: unread replies (the client's output buffer), commands or request bytes in
        flight, or bytes held for the write switch, over ``max_client_buffer_bytes`` /
        ``Shim.client_window`` commands; its own share of the mirror queue over the window, or
        any share while the mirror queue is full; an upstream connection not taking its bytes.
        Nothing is dropped, refused or marked dirty: the client's own TCP window fills and it
        waits, as with a busy Redis. Every connection's share is bounded, so one greedy client
        cannot fill the mirror queue for the others.
        """
        if self.closed or self.client_gone:
            return
        shim = self.shim
        limit = shim.cfg.max_client_buffer_bytes
        window = shim.client_window
        up0, up1 = self.up
        if self.paused:
            limit //= 2
            window //= 2
        over = (self.inflight_n > window or self.shadow_n > window or self.inflight_bytes > limit
                or self.held_bytes > limit or self.client.buffer_size() > limit
                or (self.shadow_n and shim.mirror_depth >= shim.cfg.mirror_queue_size)
                or (up0.transport is not None and up0.transport.get_write_buffer_size() > limit)
                or (up1.transport is not None and up1.transport.get_write_buffer_size() > limit))
        if over and not self.paused:
            self.paused = True
            shim.stats.backpressure += 1
            self.client.pause_reading()
        elif self.paused and not over:
            self.paused = False
            self.client.resume_reading()

    def _side_done(self, e: Entry, side: int, now: float) -> None:
        """``side``'s reply to ``e`` is in; whatever goes wrong handling it ends that one entry cleanly."""
        try:
            self._reply_in(e, side, now)
        except Exception as err:  # noqa: BLE001 - one reply must never wedge its keys (or every client)
            self._reply_failed(e, side, err)

    def _reply_failed(self, e: Entry, side: int, err: Exception) -> None:
        """Handling ``side``'s reply to ``e`` raised (a reply nested too deep to parse or compare).

        The entry ends as if compared: the client gets the answering side's reply, its keys are
        released, and, where both sides got it, marked dirty on the other side (what each side
        holds is not known; the repair compares the data itself). A keyless command (a script
        without declared keys) marks its whole database.
        """
        shim = self.shim
        expected = isinstance(err, (ProtocolError, cmp.Uncomparable))
        (shim.log.warning if expected else shim.log.error)(
            "shim.reply_not_compared", command=e.name.decode(errors="replace").upper() or "(pipelined chunk)",
            side=SIDE_NAMES[side], error=str(err) or type(err).__name__, peer=self.client.peer,
            **({} if expected else {"exc_info": err}))
        if e.internal or e.stream:
            return
        e.compare = False
        if e.bprobe:  # (its reply is made from EXEC's, which could not be read)
            e.bprobe = False
            e.rep[side] = error_reply(f"ERR migrator shim: reply not understood: {err}")
        other = e.shadow if side == e.answer else e.answer
        if other is not None and other >= 0:
            if e.payload[other] is DEFERRED and e.saved is None:
                e.payload[other] = NOTHING  # what it should run depended on this reply
            if e.write:
                keys = self._entry_keys(e)
            else:  # a compared read: its keys (a keyless read names no data to repair)
                classify = shim.table.classify
                keys = [k for args in (e.args if e.batch else e.tx or [e.args]) for k in classify(args).keys(args)]
            if keys or e.write:
                self._mark_dirty(keys, self._db(e.shadow if e.shadow is not None else other),
                                 "reply-not-compared" if expected else "shim-error", e.name)
        self._finish_side(e, side)

    def _reply_in(self, e: Entry, side: int, now: float) -> None:
        shim = self.shim
        took = now - e.ts[side]
        shim.stats.latency[side].observe(took, e.n)
        if e.shadow is not None and not e.internal:
            self._paired_in(e, side, took)
        if e.batch:
            if side == e.answer and e.shadow is not None and e.payload[e.shadow] is DEFERRED:
                self._resolve_batch(e, e.shadow, e.rep[side])
            if e.compare and _complete(e, 1 - side):
                self._compare_batch(e)
            self._finish_side(e, side)
            return
        if e.bprobe and side == e.answer and not self._blocking_probe(e, side):
            return
        if e.restore is True and side == e.answer:
            self._restore_answered(e, side)
        if e.internal:
            raw = e.rep[side]
            if e.heal_sha is not None:
                if not is_error(raw):
                    shim.scripts_loaded[side].add(e.heal_sha)
            elif is_error(raw):
                # This connection's state (a command it replays) was refused: the side is fine.
                self.fail(side, f"{SIDE_NAMES[side]} refused {e.name.decode().upper()} while connecting: "
                                f"{raw[1:].strip().decode(errors='replace')}", side_fault=False)
            return
        if side == e.answer:
            raw = e.rep[side]
            other = e.shadow
            if other is not None and e.payload[other] is DEFERRED:
                self._resolve_deferred(e, other, raw)
            if e.cstate is not None:
                self._state_settled(e, raw)
            if e.cls is Cls.SUBSCRIBE and self.sub_expect is not None and self.pipe is None:
                for f in raw if type(raw) is list else (raw,):
                    self._sub_confirmed(f)
                self._sub_settled(side)
            self._readonly_settled(e, side, raw)
            if e.cls is Cls.SCRIPT or e.cls is Cls.SCRIPT_ADMIN:
                shim.script_result(side, e.args, e.name, raw)
        else:
            raw = e.rep[side]
            if e.name in _EVALSHA and raw.startswith(b"-NOSCRIPT"):
                shim.scripts_loaded[side].discard(e.args[1].lower())
            elif e.cls is Cls.SCRIPT or e.cls is Cls.SCRIPT_ADMIN:
                shim.script_result(side, e.args, e.name, raw if e.exp[side] == 1 else raw[-1])
            self._readonly_settled(e, side, raw)
        if e.cls in _COMBINED and e.shadow is not None and _complete(e, 1 - side):
            self._combine(e)
        if e.shadow is not None and not e.batch and _complete(e, e.shadow) and _complete(e, e.answer):
            self._shadow_refusal(e)
        if e.compare and _complete(e, 1 - side):
            self._compare(e)
        self._finish_side(e, side)
        if (e.cls is Cls.CONNECTION and e.shadow is not None and e.rep[SOURCE] is not None
                and e.rep[TARGET] is not None and is_error(e.rep[SOURCE]) != is_error(e.rep[TARGET])
                and e.name not in _PER_SIDE_STATE):
            # One side took SELECT / CLIENT SETNAME / HELLO, the other refused it: the shadow
            # connection is not in the client's state. Reset it (this connection only: the side
            # itself is fine); a new one replays the state.
            self.fail(e.shadow, f"{SIDE_NAMES[e.shadow]} and {SIDE_NAMES[e.answer]} answered "
                                f"{e.name.decode(errors='replace').upper()} differently", side_fault=False)

    def _paired_in(self, e: Entry, side: int, took: float) -> None:
        """A command sent to both sides: once both replied, each side's latency and one-sided errors (for the gates).

        The first reply's latency waits in ``e.ts`` (its side no longer waits on ``e``), so both
        sides are measured over the same commands (``latency`` and ``error_rate`` gates).
        """
        other = 1 - side
        if not _complete(e, other):
            e.ts[side] = took
            return
        # A blocking command waits for data on the answering side (the other gets its effect): no latency of the server.
        lat = None if e.cls is Cls.BLOCKING else (took, e.ts[other]) if side == SOURCE else (e.ts[other], took)
        src, tgt = e.rep[SOURCE], e.rep[TARGET]
        if not e.batch:
            t_err, s_err = _has_error(tgt), _has_error(src)
            if t_err != s_err:
                self.shim.divergence.paired(lat, 1, [e.name] if t_err else [], int(s_err))
            else:
                self.shim.divergence.paired(lat, 1, [], 0)
            return
        if e.sent_idx is None:
            pairs = zip(range(e.n), src, tgt)
        else:  # the shadow got only the commands the answering side applied
            a, b = e.rep[e.answer], e.rep[e.shadow]
            pairs = ((i, *((a[i], b[j]) if e.answer == SOURCE else (b[j], a[i]))) for j, i in enumerate(e.sent_idx))
        n = s_err = 0
        t_err: list[bytes] = []
        for i, fs, ft in pairs:
            n += 1
            es, et = fs[:1] == b"-", ft[:1] == b"-"
            if es != et:
                if et:
                    t_err.append(e.args[i][0])
                else:
                    s_err += 1
        self.shim.divergence.paired(lat, n, t_err, s_err)

    def _readonly_settled(self, e: Entry, side: int, raw) -> None:
        """READONLY / READWRITE: what each side accepted is what a new connection to it replays.

        A side that refused READONLY (a server without cluster mode) is never sent it again: its
        refusal concerns this connection's command, not the side.
        """
        if (e.name == b"readonly" or e.name == b"readwrite") and type(raw) is bytes and not is_error(raw) \
                and raw != _QUEUED:
            self.readonly[side] = e.name == b"readonly"

    def _combine(self, e: Entry) -> None:
        """Both sides answered a command whose reply is made from both (see server_cmds)."""
        answer, other = e.rep[e.answer], e.rep[e.shadow]
        if (e.cls is Cls.SERVER_BOTH and is_error(other) and not is_error(answer)
                and not (len(e.args) > 1 and e.args[1].lower() == b"kill")):  # (NOTBUSY: nothing ran there)
            # CONFIG SET of a parameter one side lacks...: the client hears the write side; the
            # refusal is counted and logged, never silent.
            self.shim.stats.shadow_failures[(SIDE_NAMES[e.shadow], "refused")] += 1
            self.shim.log.warning("shim.server_command_refused", side=SIDE_NAMES[e.shadow],
                                  command=b" ".join(e.args[:2]).decode(errors="replace").upper(),
                                  error=other[1:].strip().decode(errors="replace")[:200])
        if e.cls is not Cls.SERVER_BOTH and is_error(answer) and not is_error(other):
            # SPUBLISH / PUBSUB SHARDNUMSUB on a side without sharded pub/sub (Redis 6.2): any
            # subscriber is on the other side, which answers.
            e.rep[e.answer] = other
            return
        e.rep[e.answer] = server_cmds.combine(e.args, answer, other)

    def _shadow_refusal(self, e: Entry) -> None:
        """Both replies are in: a refusal by the shadow side alone is never silent.

        A write both sides refused (FUNCTION LOAD of a library that exists, FUNCTION FLUSH BOGUS,
        an EVALSHA both lack) changed neither: nothing to repair. An uncompared write, or an
        EVALSHA, that only the shadow refused marks its keys dirty.
        """
        shim = self.shim
        side = e.shadow
        raw = e.rep[side]
        if not _has_error(raw):
            if e.effect and e.tx is None and e.exp[side] == 1:
                self._effect_check(e)
            return
        if is_error(e.rep[e.answer]) and all(is_error(f) for f in (raw if type(raw) is list else (raw,))):
            return  # refused by both: applied by neither (compared ones are also compared below)
        if e.name in _EVALSHA and raw.startswith(b"-NOSCRIPT"):
            shim.stats.shadow_failures[(SIDE_NAMES[side], "noscript")] += 1
            shim.warn_noscript(side, e.args[1])
            if e.write:
                self._mark_dirty(self._entry_keys(e), self._db(side), "noscript", e.name)
            else:
                e.compare = False  # a read that could not run there: nothing to compare
        elif e.write and not e.compare:
            # An effect the other side refused (not compared, so caught here): never silent.
            shim.stats.shadow_failures[(SIDE_NAMES[side], "error")] += 1
            self._mark_dirty(self._entry_keys(e), self._db(side), "shadow-error", e.name)

    def _effect_check(self, e: Entry) -> None:
        """An effect (a pop's removal of what it popped) that did something else on the shadow side is
        a divergence, and its keys dirty: never a silent difference (see ``effects.confirms``)."""
        answer = parse(e.rep[e.answer])
        shadow = parse(e.rep[e.shadow])
        if effects.confirms(e.args, answer, shadow):
            return
        if shadow is None or shadow == 0 or shadow == []:
            kind = cmp.MISSING_ON_TARGET if e.shadow == TARGET else cmp.MISSING_ON_SOURCE
        else:
            kind = cmp.DIFFERENT_VALUE
        src, tgt = (e.rep[SOURCE], e.rep[TARGET])
        self._diverged(e, kind, e.name, self._entry_keys(e), src, tgt, True)

    def _answer_lost(self, e: Entry) -> None:
        """The answering side's reply will never come: a shadow refusal already in stays on record."""
        other = e.shadow
        if other is not None and e.write and _complete(e, other) and _has_error(e.rep[other]):
            self.shim.stats.shadow_failures[(SIDE_NAMES[other], "error")] += 1
            self._mark_dirty(self._entry_keys(e), self._db(other), "shadow-error", e.name)

    def _resolve_deferred(self, e: Entry, other: int, raw: bytes) -> None:
        """The answer is in: compute what the shadow side runs (possibly nothing)."""
        if e.tx is not None:
            e.payload[other], e.exp[other] = self._shadow_transaction(e, raw)
        elif e.restore is not False:
            cmds = e.restore or []
            e.payload[other] = _MULTI + b"".join(encode(c) for c in cmds) + _EXEC if cmds else NOTHING
            e.exp[other] = len(cmds) + 2 if cmds else 1
        elif e.effect:
            cmds = effects.effect(e.args, parse(raw))
            e.payload[other] = b"".join(encode(c) for c in cmds) if cmds else NOTHING
            e.exp[other] = max(len(cmds), 1)
            if e.bkeys is not None:
                self._blocking_returned(e, other, cmds)
        elif is_error(raw) and (e.cls is not Cls.SCRIPT or raw.startswith(b"-NOSCRIPT") or _killed(raw)):
            # Sequential: the shadow applies it only if the answering side did. (A script that
            # failed may have written before the error, and Lua does not roll back: it runs on
            # the shadow too, which fails the same way; the two replies are compared. A script
            # stopped by SCRIPT/FUNCTION KILL wrote nothing, or it could not have been killed:
            # run on the shadow it would only keep that side busy until killed again.)
            e.payload[other] = NOTHING
        else:
            e.payload[other] = e.shadow_raw

    def _shadow_transaction(self, e: Entry, raw: bytes) -> tuple[bytes, int]:
        result = parse(raw)
        if not isinstance(result, list):
            return NOTHING, 1  # aborted (WATCH) or refused (EXECABORT): nothing happened
        now_ms = int(time.time() * 1000)
        shadow_cmds: list[list[bytes]] = []
        pairs: list[tuple[int, int]] = []
        names: list[bytes] = []
        for i, (args, r) in enumerate(zip(e.tx, result)):
            replaced = effects.needs_reply(args)
            for cmd in effects.shadow_commands(args, r, now_ms):
                if not replaced:
                    names.append(args[0].lower())
                    pairs.append((i, len(shadow_cmds)) if e.answer == SOURCE else (len(shadow_cmds), i))
                shadow_cmds.append(cmd)
        e.txcmp = (names, pairs)  # for comparing the two EXEC replies
        if not shadow_cmds:
            return NOTHING, 1
        payload = encode([b"MULTI"]) + b"".join(encode(c) for c in shadow_cmds) + encode([b"EXEC"])
        return payload, len(shadow_cmds) + 2

    def _compare(self, e: Entry) -> None:
        shim = self.shim
        src, tgt = e.rep[SOURCE], e.rep[TARGET]
        if e.tx is not None:
            src_last = src[-1] if isinstance(src, list) else src
            tgt_last = tgt[-1] if isinstance(tgt, list) else tgt
            names, pairs = e.txcmp or ([], [])
            kind = cmp.compare_exec(names, parse(src_last), parse(tgt_last), pairs, shim.ttl_tolerance_ms)
            src, tgt = src_last, tgt_last
        else:
            if src == tgt:
                shim.divergence.compared()
                shim.stats.compared += 1
                return
            kind = cmp.compare(e.name, parse(src), parse(tgt), shim.ttl_tolerance_ms)
        shim.divergence.compared()
        shim.stats.compared += 1
        if kind is None:
            return
        self._diverged(e, kind, e.name, self._entry_keys(e), src, tgt, e.write)

    def _diverged(self, e: Entry, kind: str, name: bytes, keys: list[bytes], src: bytes | None, tgt: bytes | None,
                  write: bool) -> None:
        """The two sides answered a command of ``e`` differently: count, log, and mark a write's keys dirty."""
        shim = self.shim
        shim.stats.divergences[kind] += 1
        db = self._db(e.shadow if e.shadow is not None else TARGET)
        shim.divergence.record(kind=kind, command=name, keys=keys, db=e.db, source_raw=src, target_raw=tgt,
                               awaiting_repair=self._awaiting_repair(db, keys))
        if write:
            # The two sides answered a write differently, so their data may now differ too.
            self._mark_dirty(keys, db, f"divergent-{kind}", name)

    def _finish_side(self, e: Entry, side: int) -> None:
        if e.done[side]:
            return
        e.done[side] = True
        if e.internal or e.stream:
            return
        if side == e.shadow:
            self.shim.mirror_depth -= e.n
            self.shadow_n -= e.n
        e.pending -= 1
        if e.pending == 0:
            self._entry_done(e)

    def _entry_done(self, e: Entry) -> None:
        if e.bmove is not None:
            self.shim.seq.move_ended(*e.bmove)
            e.bmove = None
        if e.req is not None or e.bkeys is not None:
            seq = self.shim.seq
            if e.bkeys is not None:
                seq.blocking_ended(e.bkeys)
                e.bkeys = None
            if e.req is not None:
                seq.release(e.req)
                # Released: the request no longer names its entry. (The two naming each other
                # are a cycle, which only the garbage collector frees: with a chunk's argument
                # lists behind every entry, collections took about a sixth of a busy shim's time.)
                e.req.data = None
            if self.ungranted and self.ungranted[0] is e:
                self.ungranted.popleft()  # settled without being granted (its shadow failed)
                self._request_next()
        self.pending_count -= 1
        if e.cls is Cls.BLOCKING or e.cls is Cls.BLOCKING_READ:
            self.blocking_pending -= 1
        else:
            self.shim.entry_finished(e.gen)

    def _flush_client(self) -> None:
        if self.up[0].raw_pending or self.up[1].raw_pending:
            return  # passthrough replies still owed come first; they are written as they arrive
        inflight = self.inflight
        out = self.out
        close = False
        while inflight:
            e = inflight[0]
            if e.local is not None:
                out.append(e.local)
                inflight.popleft()
                self.inflight_n -= 1
                if e.close_after:
                    close = True
                    break
                continue
            raw = e.rep[e.answer]
            if raw is None or (type(raw) is list and len(raw) < e.exp[e.answer]) or e.bprobe:
                break  # (a blocking command's non-blocking try: its reply is made from EXEC's)
            if e.wait_shadow and e.shadow is not None and not e.done[e.shadow]:
                break
            if e.batch or type(raw) is list:  # (a list: a (un)subscribe's confirmations)
                out.extend(raw)
            else:
                out.append(raw)
            inflight.popleft()
            self.inflight_n -= e.n
            self.inflight_bytes -= e.size
        if not inflight and self.backlog:
            out.extend(self.backlog)
            self.backlog.clear()
        if out and not self.client_gone:
            self.client.write(b"".join(out) if len(out) > 1 else out[0])
            # A client not reading its replies is not read either (see _flow); only a subscribed
            # connection, whose messages the server pushes regardless, is disconnected.
            if self.pipe is not None and self.client.buffer_size() > self.shim.cfg.max_client_buffer_bytes:
                self.shim.stats.refused["client-buffer-full"] += 1
                self.shim.log.warning("shim.client_buffer_full", peer=self.client.peer,
                                      limit=self.shim.cfg.max_client_buffer_bytes)
                out.clear()
                self.close("client output buffer over shim.max_client_buffer_bytes")
                return
        out.clear()
        if close:
            self.close("protocol error" if self.parser.error is not None else "client sent QUIT")

    # --- failures ------------------------------------------------------------------------
    def fail(self, side: int, reason: str, side_fault: bool = True) -> None:
        """``side``'s connection is unusable: settle everything that was waiting on it.

        ``side_fault``: the side itself failed (connect refused, connection lost, its own
        timeout), which every connection backs off from. A command refused on this connection
        only (a handshake command it replays, an answer that differs) resets this connection,
        never the side for the others.
        """
        u = self.up[side]
        if u.state is DOWN and not u.wait and not u.out:
            return
        shim = self.shim
        was_up = u.state is UP
        if u.transport is not None:
            u.transport.abort()
        u.transport = None
        u.state = DOWN
        if side_fault:
            shim.side_failed(side, reason)
        pending = list(u.wait) + list(u.out)
        u.wait.clear()
        u.out.clear()
        lost_answer = self._drop_raw(u)
        for e in pending:
            if e.internal or e.stream:
                if e.stream:
                    lost_answer = True
                continue
            if side == e.answer:
                other = e.shadow
                if (e.fallback and other is not None and not e.done[side]
                        and (not e.done[other] or _complete(e, other))):
                    # A read the other side also got (and can still answer, or has): its reply
                    # answers instead.
                    e.answer, e.shadow = other, None
                    e.done[side] = True
                    e.pending -= 1
                    if not e.done[other]:
                        shim.mirror_depth -= e.n  # counted as the shadow's; it answers now
                        self.shadow_n -= e.n
                    e.wait_shadow = False
                    if e.pending == 0:
                        self._entry_done(e)
                    continue
                lost_answer = True
                self._answer_lost(e)
                self._finish_side(e, side)
            else:
                shim.stats.shadow_failures[(SIDE_NAMES[side], _reason_label(reason))] += 1
                if e.write and e.payload[side] is not NOTHING:  # NOTHING: there was nothing to apply
                    self._mark_dirty(self._entry_keys(e), self._db(side), _reason_label(reason), e.name)
                self._finish_side(e, side)
        if lost_answer or self.pipe == side or (
                self.pipe is not None and was_up and side == shim.routes[Cls.WRITE].answer):
            # (A subscribed connection also ends when its open connection to the write side is
            # lost: a CLIENT KILL aimed at it goes there, where CLIENT ID/LIST name it.)
            shim.log.warning("shim.authoritative_lost", side=SIDE_NAMES[side], reason=reason, peer=self.client.peer)
            self._flush_client()
            self.close(f"{SIDE_NAMES[side]} connection lost: {reason}")
            return
        self._flush_client()

    @staticmethod
    def _answers_on(u: Upstream) -> bool:
        """Some client command is waiting for this side's answer (so it is not just a shadow)."""
        side = u.side
        return any(not x.internal and x.answer == side for x in u.wait) or any(
            not x.internal and x.answer == side for x in u.out)

    def _drop_raw(self, u: Upstream) -> bool:
        """Forget passthrough replies that will never come; True if some were owed."""
        owed = u.raw_pending
        for head in u.raw_sent:
            self.shim.entry_finished(head[2], head[1])
            self.inflight_n -= head[1]
            self.inflight_bytes -= head[3]
        u.raw_sent.clear()
        u.raw_pending = 0
        u.counter = hiredis.Reader()
        return owed > 0

    def check_timeouts(self, now: float) -> None:
        """Called periodically: a shadow that stopped answering must not hold anything up."""
        if self.closed:
            return
        up = self.up
        if not self.client_gone and not (up[0].wait or up[0].out or up[1].wait or up[1].out):
            return  # idle: the common case, kept cheap for many connections
        limit = self.shim.shadow_timeout
        stalled = now < self.shim.stalled_until  # the shim's own delay, not the sides' (see _sweep_loop)
        for u in up:
            side = u.side
            if stalled:
                break
            if u.state is UP and u.wait:
                e = u.wait[0]
                # A shadow reply, or a handshake/heal on a connection nobody waits on for an answer.
                if now - e.ts[side] > limit:
                    if side != e.answer or (e.internal and not self._answers_on(u)):
                        self.fail(side, "shadow-timeout")
                    elif self._can_fall_back(u):
                        # Reads the other side also got (after the read cutover): it answers them.
                        self.fail(side, "read-timeout")
                    else:
                        self._expire_behind(u, now - limit)
            elif (u.state is CONNECTING and u.out and now - u.connect_started > limit
                  and any(e.answer != side and not e.internal for e in u.out)
                  and not any(e.answer == side and not e.internal for e in u.out)):
                # Only shadow work waits on this connection: give up on it like on a slow reply.
                self.fail(side, "shadow-connect-timeout")
        if self.client_gone and not self.closed and not self.held and now - self.client_gone > CLIENT_GONE_GRACE:
            self.close("client closed; in-flight commands did not finish in time")
        if not self.closed:
            self._after_io()

    @staticmethod
    def _can_fall_back(u: Upstream) -> bool:
        """Every client command this side owes an answer has a copy on the other side to answer instead."""
        side = u.side
        for q in (u.wait, u.out):
            for x in q:
                if x.answer == side and not x.internal and (x.stream or not x.fallback or x.shadow is None):
                    return False
        return True

    def _expire_behind(self, u: Upstream, sent_before: float) -> None:
        """Shadow work waiting behind an answer on a slow side: stop letting it hold anything up.

        The side answers a command (a read after the read cutover), so the connection is not
        given up; but a shadow write queued behind that answer must not keep its keys from other
        connections, nor its own client waiting, past ``shadow_timeout``. Its keys are marked
        dirty and released; its reply, if it comes, is still taken and compared.
        """
        side = u.side
        for e in u.wait:
            if e.ts[side] > sent_before:
                break
            if side == e.answer or e.internal or e.stream or e.expired:
                continue
            e.expired = True
            self.shim.stats.shadow_failures[(SIDE_NAMES[side], "timeout")] += 1
            if e.write:
                self._mark_dirty(self._entry_keys(e), self._db(side), "timeout", e.name)
            e.wait_shadow = False
            req = e.req
            if req is not None:
                e.req = None
                req.data = None
                self.shim.seq.release(req)
                if self.ungranted and self.ungranted[0] is e:
                    self.ungranted.popleft()
                    self._request_next()

    def close(self, reason: str) -> None:
        """Close the client and both upstream connections; settle every pending entry."""
        if self.closed:
            return
        self.closed = True
        self.client.close()
        self.ungranted.clear()
        for u in self.up:
            self._drop_raw(u)
            pending = list(u.wait) + list(u.out)
            u.wait.clear()
            u.out.clear()
            if u.transport is not None:
                u.transport.close()
                u.transport = None
            u.state = DOWN
            for e in pending:
                if e.internal or e.stream:
                    continue
                if u.side == e.shadow and e.write:
                    # Sent (or about to be) but never confirmed: the shadow may lack it.
                    self._mark_dirty(self._entry_keys(e), self._db(u.side), "connection-closed", e.name)
                elif u.side == e.answer and not e.done[u.side]:
                    self._answer_lost(e)
                self._finish_side(e, u.side)
        self.inflight.clear()
        self.shim.session_closed(self, reason)

    # --- helpers -------------------------------------------------------------------------
    def _entry_keys(self, e: Entry) -> list[bytes]:
        if e.batch:
            keys: list[bytes] = []
            for args in e.args:
                c = self.shim.table.classify(args)
                if c.cls in _WRITE_LIKE:
                    keys.extend(c.keys(args))
            return list(dict.fromkeys(keys))
        if e.tx is not None:
            keys: list[bytes] = []
            for args in e.tx:
                c = self.shim.table.classify(args)
                if c.cls in _WRITE_LIKE:
                    keys.extend(c.keys(args))
            return list(dict.fromkeys(keys))
        return e.c.keys(e.args) if e.c is not None else []

    def _awaiting_repair(self, db: int, keys: list[bytes]) -> bool:
        """The command's keys are all already marked dirty: their difference is on record (see ``divergence.Tally``)."""
        dirty = self.shim.dirty
        return bool(keys) and bool(dirty.keys) and all(dirty.is_dirty(db, [k]) for k in keys)

    def _mark_dirty(self, keys: list[bytes], db: int, reason: str, command: bytes) -> None:
        self.shim.dirty.add(db, keys, reason, command)
        self.shim.stats.dirty_marked[reason] += 1

    def on_phase(self, phase) -> None:
        """A new phase was applied: a subscriber on a side PUBLISH no longer reaches must move."""
        if self.pipe is not None and self.pipe not in publish_reaches(phase):
            self.close(f"subscribed on the {SIDE_NAMES[self.pipe]}, which no longer receives PUBLISH")
            return
        if self.blocking_pending:
            # The write side changed (the write switch, or its rollback): a pop still blocked on
            # the old one would be woken by the same push as a pop blocked on the new one, and
            # one element delivered twice. Disconnected, like a server restart: clients reconnect
            # and block again, on the new side.
            answer = self.shim.routes[Cls.BLOCKING].answer
            if any(e.answer != answer for e in self._blocked((Cls.BLOCKING,))) and self._close_blocked(
                    f"blocked on the {SIDE_NAMES[1 - answer]}, which no longer takes writes", (Cls.BLOCKING,)):
                return
        if self.pipe is None and not self.client_gone:
            self.connect_sides()

    def drained(self) -> bool:
        """Nothing in flight except commands that may block indefinitely (BLPOP...)."""
        return self.pending_count == self.blocking_pending and not self._raw_owed()

    def _raw_owed(self) -> int:
        return self.up[0].raw_pending + self.up[1].raw_pending


def _killed(raw: bytes) -> bool:
    """A script's error reply says SCRIPT KILL or FUNCTION KILL stopped it."""
    return b"killed by user" in raw[:300].lower()


def _state_changes(args: list[bytes], name: bytes) -> dict[str, Any]:
    """The connection state SELECT or CLIENT SETNAME sets if the server accepts it."""
    if name == b"select" and len(args) == 2:
        try:
            return {"db": int(args[1])}
        except ValueError:
            return {}  # both sides reject it the same way
    if name == b"client" and len(args) == 3 and args[1].lower() == b"setname":
        return {"name": args[2]}
    return {}


def _tx_state_changes(tx: list[list[bytes]], result: list | None = None) -> dict[str, Any]:
    """The connection state a transaction's SELECT / CLIENT SETNAME set (``result``: only those that succeeded)."""
    changes: dict[str, Any] = {}
    for i, args in enumerate(tx):
        name = args[0].lower()
        if name not in (b"select", b"client"):
            continue
        if result is not None and (i >= len(result) or isinstance(result[i], hiredis.ReplyError)):
            continue
        changes.update(_state_changes(args, name))
    return changes


def _batch_memo(c: Classified) -> tuple[int, bool, bool, int]:
    """(0 not plain / 1 read / 2 write, one key at argv[1], SET, reply never compared) for ``_batch``.

    Plain: a read or a write both sides know, sent to the shadow as the client sent it (no effect
    to compute, no connection state).
    """
    info = c.info
    name = info.name if info is not None else b""
    base = name.split(b"|", 1)[0]  # a subcommand (b"object|idletime") is ruled by its command
    plain = ((c.cls is Cls.WRITE or c.cls is Cls.READ) and name not in _NOT_PLAIN and base not in _NOT_PLAIN
             and c.known[0] and c.known[1])
    kind = (2 if c.cls is Cls.WRITE else 1) if plain else 0
    never_compared = name in cmp.EXCLUDED or base in cmp.EXCLUDED
    return kind, bool(info is not None and info.single_key), name == b"set", int(never_compared)


def _internal_entry(side: int, args: list[bytes], gen: int) -> Entry:
    """A command of the shim's own (handshake, SCRIPT LOAD, DISCARD...) for ``side``; no client waits for it."""
    e = Entry(args, args[0].lower(), None, gen)
    e.internal = True
    e.answer = side
    e.payload[side] = encode(args)
    return e


def _script_flush(args: list[bytes]) -> bool:
    return len(args) > 1 and args[0].lower() == b"script" and args[1].lower() == b"flush"


def _has_error(raw: bytes | list[bytes]) -> bool:
    return any(is_error(f) for f in raw) if type(raw) is list else is_error(raw)


def _complete(e: Entry, side: int) -> bool:
    """``side`` has sent every reply ``e`` expects of it (a list fills up frame by frame)."""
    r = e.rep[side]
    return r is not None and (type(r) is not list or len(r) >= e.exp[side])


def _reason_label(reason: str) -> str:
    """A short, bounded label for metrics from a free-text failure reason."""
    if "timeout" in reason:
        return "timeout"
    if reason.startswith("protocol error"):
        return "protocol-error"
    if "refused" in reason and "while connecting" in reason:
        return "handshake-refused"
    return "connection-lost"


def sha1_hex(body: bytes) -> bytes:
    return hashlib.sha1(body).hexdigest().encode()
