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

This module is the coordinator: the events in (``on_client_data``, ``on_upstream_connected``,
``on_upstream_failed``, ``on_upstream_lost``, ``on_upstream_data``, ``check_timeouts``,
``on_phase``, ``on_client_lost``, ``on_buffers_changed``, ``release``), routing (``handle``),
writing (``_pump``, ``_flush_client``), back-pressure (``_flow``) and closing. Each other idea
is a base class in a module of its own: ``entry`` (Entry, Upstream), ``dispatch`` (a command's
Plan made an Entry), ``fastpath`` (whole chunks), ``connstate`` (SELECT, HELLO, AUTH... and
their replay), ``transactions``, ``subscriptions``, ``blocking``, ``ordering`` (the
sequencer), ``scripts`` (NOSCRIPT healing), ``restoring`` (RESTORE across RDB versions),
``replies`` (intake, combine, compare) and ``failures`` (a failed or slow side). Its outputs
are calls on what it was given (see ``host``): the client link's ``write``/``close``/
``pause_reading``, an upstream link's ``write``/``abort``, and ``shim.open_upstream``.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from migrator.shim import flow, server_cmds
from migrator.shim.blocking import Blocking
from migrator.shim.commands import SIDE_NAMES, SOURCE, TARGET, Cls
from migrator.shim.connstate import ConnState
from migrator.shim.dispatch import Dispatch
from migrator.shim.entry import (
    CONNECTING,
    DEFERRED,
    DOWN,
    IDLE,
    NOTHING,
    UP,
    WRITE_LIKE,
    Entry,
    Upstream,
)
from migrator.shim.failures import Failures
from migrator.shim.fastpath import FastPath
from migrator.shim.ordering import Ordering
from migrator.shim.replies import Replies
from migrator.shim.resp import (
    OK,
    ProtocolError,
    RequestParser,
    error_reply,
    is_push,
)
from migrator.shim.restoring import Restoring
from migrator.shim.routing import Plan, publish_reaches
from migrator.shim.scripts import Scripts
from migrator.shim.subscriptions import Subscriptions
from migrator.shim.transactions import Transactions

if TYPE_CHECKING:  # pragma: no cover
    from migrator.shim.host import ClientLink, ShimHost


# What a share of a shared upstream connection cannot carry (see Session._pump): connection
# state, and commands that hold the connection (blocking, subscribing, transactions).
NEEDS_OWN_CLASSES = frozenset({Cls.CONNECTION, Cls.TX, Cls.BLOCKING, Cls.BLOCKING_READ, Cls.SUBSCRIBE,
                               Cls.UNSUPPORTED})
NEEDS_OWN_NAMES = frozenset({b"client", b"select", b"hello", b"readonly", b"readwrite", b"reset", b"asking", b"auth",
                             b"multi", b"exec", b"discard", b"watch", b"unwatch", b"wait", b"waitaof", b"monitor",
                             b"subscribe", b"psubscribe", b"ssubscribe"})


class Session(Dispatch, FastPath, ConnState, Transactions, Subscriptions, Blocking, Ordering, Scripts, Restoring, Replies, Failures):
    """One client connection (see the module's docstring); each base class is one idea, in its own module."""

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
        self.login: tuple[bytes | None, bytes] | None = None  # (user, password) forwarded (shim.auth: passthrough)
        self.tx: list[list[bytes]] | None = None
        self.tx_plan: Plan | None = None
        self.tx_gen = 0
        self.tx_abort = False  # a command inside MULTI was refused by the shim: EXEC fails (EXECABORT)
        self.watched: set[int] = set()  # the sides WATCH was sent to since the last EXEC/DISCARD/UNWATCH
        # Needed connection state once: its upstream connections are its own from then on (not
        # shares of the shim's shared connections, see _connect).
        self.own = False
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
        # Read-your-writes while a replica answers reads (see Dispatch._ryw_redirect): this
        # connection's writes not acknowledged yet, when the last one was, and the primary's
        # offset that includes it.
        self.ryw_pending = 0
        self.ryw_acked: float | None = None
        self.ryw_offset: int | None = None

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
        if (name == b"cluster" or name == b"readonly" or name == b"readwrite") and self.tx is None \
                and getattr(shim, "facade", None) is not None:
            # The shim as a one-node cluster (shim.facade); READONLY changes nothing: reads go to
            # each side's primaries.
            reply = OK if name != b"cluster" else shim.facade_reply(args, self.client)
            if reply is not None:
                self._local(args, c, reply)
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
        virtual = u.virtual
        replies = 0  # owed for what is sent now (a shared connection's share counts them)
        own = False
        while out:
            e = out[0]
            p = e.payload[side]
            if p is DEFERRED:
                break
            if virtual and not e.batch and (e.stream or e.bprobe or e.cls in NEEDS_OWN_CLASSES
                                            or e.name in NEEDS_OWN_NAMES):
                # Connection state (or a command that holds the connection): from here on this
                # side needs a connection of its own, once what was sent on the share is answered.
                self.own = own = True
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
                replies += e.exp[side]
                if e.bprobe and side == e.answer:
                    # A blocking command's non-blocking try: if it finds nothing, the command is
                    # sent again as itself, and nothing after it may reach the server first
                    # (a SELECT would move the pop to another database, a PUBLISH run before it).
                    break
        if buf:
            if virtual:
                u.transport.send(b"".join(buf) if len(buf) > 1 else buf[0], replies)
            else:
                u.transport.write(b"".join(buf) if len(buf) > 1 else buf[0])  # (not keeping up: see _flow)
        if nothing is not None:
            for e in nothing:
                self._finish_side(e, side)
        if own and not u.wait and u.virtual and u.state is UP and not self.closed:
            self._own_connection(side)

    def _own_connection(self, side: int) -> None:
        """Leave the shared connection for one of its own, nothing being owed on the share.

        The commands not sent yet stay queued behind the new connection's handshake, which
        replays the state as of now (none: the command that changes it is among those queued).
        """
        u = self.up[side]
        u.transport.abort()  # (a share: only stops listening)
        u.transport = None
        u.virtual = False
        u.state = IDLE
        # The state is applied when a command is handled (see _state_change), before it is sent:
        # the new connection replays it as of the first command it has not run yet.
        unsent = {id(e) for e in u.out}
        before: dict[str, object] = {}
        for e in self.conn_pending:
            if e.cstate and id(e) in unsent:
                for f, (was, _now) in e.cstate.items():
                    before.setdefault(f, was)
        now = {f: getattr(self, f) for f in before}
        for f, v in before.items():
            setattr(self, f, v)
        try:
            self._connect(side)
        finally:
            for f, v in now.items():
                setattr(self, f, v)

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
        self.on_upstream_frames(side, frames)

    def on_upstream_frames(self, side: int, frames: list[bytes]) -> None:
        """Whole replies from ``side``, already framed (by ``on_upstream_data``, or by a shared
        connection for its share: see ``mux.VirtualConn``)."""
        u = self.up[side]
        if u.state is not UP:
            return
        if u.raw_pending:
            self.on_upstream_data(side, b"".join(frames))  # counted there, not framed
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
                    self._streamed(side, raw)
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

    def on_buffers_changed(self) -> None:
        """A link's write buffer crossed its bound, either way (the IO layer's flow control)."""
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
        limit, window = flow.bounds(shim.cfg, shim.client_window, self.paused)
        up0, up1 = self.up
        over = (self.inflight_n > window or self.shadow_n > window or self.inflight_bytes > limit
                or self.held_bytes > limit or self.client.buffer_size() > limit
                or (self.shadow_n and shim.mirror_depth >= shim.cfg.mirror_queue_size)
                or (up0.transport is not None and up0.transport.get_write_buffer_size() > limit)
                or (up1.transport is not None and up1.transport.get_write_buffer_size() > limit))
        flow.pause_or_resume(self, over, shim.stats)

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
                    close = e.close_after  # (a str: the reason)
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
            self.close(close if type(close) is str else "protocol error" if self.parser.error is not None
                       else "client sent QUIT")

    # --- closing -------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Close the client and both upstream connections; settle every pending entry."""
        if self.closed:
            return
        self.closed = True
        self.client.close()
        self.ungranted.clear()
        clean = (reason == "client closed" and self.tx is None and self.pipe is None and not self.blocking_pending
                 and self.sub_expect is None and not self.watched)
        for u in self.up:
            owed = u.raw_pending
            self._drop_raw(u)
            pending = list(u.wait) + list(u.out)
            u.wait.clear()
            u.out.clear()
            if u.transport is not None:
                if not (clean and not pending and not owed and u.state is UP and not u.framer.buf and not u.virtual
                        and self.shim.give_back(u.side, u.transport, self.name is not None)):
                    u.transport.close()  # (given back: reset and kept for the next session, see shim.pool)
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
                if c.cls in WRITE_LIKE:
                    keys.extend(c.keys(args))
            return list(dict.fromkeys(keys))
        if e.tx is not None:
            keys: list[bytes] = []
            for args in e.tx:
                c = self.shim.table.classify(args)
                if c.cls in WRITE_LIKE:
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
        if self.pipe is not None and self.pipe not in publish_reaches(phase, self.shim.mode):
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


