"""Stateless clients on shared upstream connections, in the one-sided phases.

In ``planned``, ``compatible`` and ``completed`` every command goes to one side and nothing is
compared. A client that carries no connection state there (database 0, RESP2, no transaction,
WATCH, blocking command, subscription or CLIENT setting) does not need upstream connections of
its own: its commands ride on a few connections the shim shares between all such clients, as
twemproxy and Envoy do. The servers and the shim then make a system call per *batch* of
commands instead of per command: the commands that arrive from many clients in one turn of the
event loop go upstream in one write, and their replies come back in one read, split by client.

Guarantees, and what changes against a client with its own connections (``docs/shim.md``):
- **Order.** A client's commands all travel one shared connection, in its order, so it sees its
  own writes as with a direct connection; replies reach it in its command order.
- **State.** The moment a client sends anything that is not a plain read, write, script, PING
  or INFO-like command on the answering side (SELECT, HELLO, MULTI, WATCH, a blocking command,
  SUBSCRIBE, CLIENT ..., an inline or unknown command, ...) — or the phase stops being one-sided,
  or the shim holds writes — it is *pinned*: once its replies in flight have arrived, it becomes
  an ordinary session (``session.Session``) with connections of its own, fed the same bytes from
  that command on. It starts with no state to replay (it had none), so nothing is lost.
- **AUTH** to the shim and ``CLIENT SETINFO`` are answered by the shim itself.
- **Failure.** A shared connection lost with commands in flight closes the clients whose
  commands were on it (their outcome is unknown, as when Redis drops a connection); the others
  carry on, and the connection is opened again for the next command.
- **Back-pressure** is per client as for a session: a client that does not read its replies or
  sends too much stops being read; the shared connection is never paused for one client.

Pure bookkeeping: no socket here. The IO layer gives each ``MuxClient`` its client link and each
``SharedLink`` a transport (``attach``), and hands them bytes.
"""

from __future__ import annotations

import hmac
import time
from collections import deque
from typing import Any, Callable

from migrator.shim import flow
from migrator.shim.commands import SIDE_NAMES, Cls
from migrator.shim.resp import Framer, ProtocolError, RequestParser, encode, is_error

OK = b"+OK\r\n"
IDLE, CONNECTING, UP, DOWN = "idle", "connecting", "up", "down"
# What a multiplexed client may send, besides the local commands below: it needs nothing from
# the shim but forwarding (SCRIPT also its body noted, for healing a later phase's NOSCRIPT).
_PLAIN = frozenset({Cls.READ, Cls.WRITE, Cls.ADMIN, Cls.SCRIPT, Cls.PUBLISH})
# Admin commands that are about the connection (CLIENT ...) or hold it (WAIT blocks until
# replicas acknowledge: on a shared connection it would stall every client behind it).
_ADMIN_PINNED = frozenset({b"client", b"wait", b"waitaof", b"cluster"})  # CLUSTER: the facade (shim.facade) answers it


def one_sided(routes) -> int | None:
    """The side every class goes to in ``routes`` with nothing mirrored, or None."""
    plan = routes[Cls.WRITE]
    side = plan.answer
    for cls in (*_PLAIN, Cls.CONNECTION):
        p = routes[cls]
        if p.answer != side or p.shadow is not None:
            return None
    return side


class SharedLink:
    """One upstream connection shared by several users, and the order of its replies.

    Its users are multiplexed clients (``MuxClient``) and the upstream connections of sessions
    with no connection state (``VirtualConn``). ``waiting`` holds, in the order they were
    written, ``[user, replies, token]``: the next replies belong to its head. A user has
    ``shared_replies(frames, n, token)`` (its next ``n`` replies, each whole), ``shared_done(token)`` (all
    of an item's replies are in; an item of 0 replies is a reply the shim gives itself, delivered
    in its place), ``shared_lost(n, token)`` and ``shared_closed(reason)`` (the connection is lost).
    """

    __slots__ = ("_flush_scheduled", "attempt", "framer", "handshake", "index", "mux", "out", "proto", "side", "state",
                 "transport", "waiting")

    def __init__(self, mux: Mux, side: int, index: int, proto: int = 2) -> None:
        self.mux = mux
        self.side = side
        self.index = index
        self.proto = proto  # RESP2 or RESP3: clients that said HELLO 3 share connections that did too
        self.state = IDLE
        self.transport: Any = None
        self.framer = Framer()
        self.waiting: deque[list] = deque()
        self.out: list[bytes] = []
        self.handshake = 0  # replies of the shim's own handshake still to come (checked, not forwarded)
        self.attempt = 0
        self._flush_scheduled = False

    # --- from the users -----------------------------------------------------------------
    def send(self, user, raw: bytes, n: int, token) -> None:
        """Queue ``raw`` (owing ``n`` replies to ``user``) for the next write.

        An idle connection (nothing owed, nothing queued) writes at once: one client alone must
        not wait a turn of the loop. Otherwise the write waits for the end of this turn of the
        loop, so that what many clients sent meanwhile goes in one system call.
        """
        waiting = self.waiting
        idle = not waiting and not self.out
        waiting.append([user, n, token])
        if self.state is UP:
            if idle:
                self.transport.write(raw)
                return
            self.out.append(raw)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.mux.call_soon(self.flush)
            return
        self.out.append(raw)
        if self.state is not CONNECTING:
            self.connect()

    def send_local(self, user, token) -> None:
        """Something for ``user`` behind its replies still to come (``shared_done(token)`` in its place)."""
        self.waiting.append([user, 0, token])

    def flush(self) -> None:
        """Write what the clients sent in this turn of the loop, in one system call."""
        self._flush_scheduled = False
        if self.state is UP and self.out:
            out, self.out = self.out, []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    # --- the connection ------------------------------------------------------------------
    def connect(self) -> None:
        self.state = CONNECTING
        self.framer = Framer()
        self.attempt += 1
        self.mux.open(self, self.attempt)

    def connected(self, transport, attempt: int) -> bool:
        if self.state is not CONNECTING or attempt != self.attempt or self.mux.stopped:
            return False
        self.transport = transport
        self.state = UP
        hs = self.mux.handshake(self.side, self.proto)
        self.handshake = len(hs)
        self.out[:0] = hs
        self.mux.side_ok(self.side)
        self.flush()
        return True

    def failed(self, reason: str, attempt: int | None = None, side_fault: bool = True) -> None:
        """Connecting failed or the connection was lost: every client with commands on it is closed."""
        if attempt is not None and (attempt != self.attempt or self.state is not CONNECTING):
            return
        if self.transport is not None:
            self.transport.abort()
        self.transport = None
        self.state = DOWN
        self.out = []
        self.handshake = 0
        waiting, self.waiting = self.waiting, deque()
        if side_fault:
            self.mux.side_failed(self.side, reason)
        users: dict[int, Any] = {}
        for user, n, token in waiting:
            user.shared_lost(n, token)
            users[id(user)] = user
        for user in users.values():
            user.shared_closed(f"{SIDE_NAMES[self.side]} connection lost: {reason}")

    def lost(self, transport, reason: str) -> None:
        if transport is self.transport and self.state is UP:
            self.failed(reason)

    # --- replies ---------------------------------------------------------------------------
    def data(self, data: bytes) -> None:
        if self.state is not UP:
            return
        try:
            frames = self.framer.feed(data)
        except ProtocolError as e:
            self.failed(f"unreadable reply from {SIDE_NAMES[self.side]}: {e}", side_fault=False)
            return
        i, nframes = 0, len(frames)
        while self.handshake and i < nframes:
            self.handshake -= 1
            if is_error(frames[i]):
                self.failed(f"handshake refused by {SIDE_NAMES[self.side]}: "
                            f"{frames[i][1:].strip().decode(errors='replace')[:200]}", side_fault=False)
                return
            i += 1
        waiting = self.waiting
        while i < nframes:
            if not waiting:
                self.failed(f"unexpected reply from {SIDE_NAMES[self.side]} (stream out of step)", side_fault=False)
                return
            head = waiting[0]
            take = min(head[1], nframes - i)
            head[1] -= take  # (first: a callback that fails this connection counts only the rest as lost)
            head[0].shared_replies(frames[i:i + take] if i or take < nframes else frames, take, head[2])
            if self.state is not UP or waiting is not self.waiting:
                return  # a user's callback failed this connection
            i += take
            if head[1] == 0:
                waiting.popleft()
                head[0].shared_done(head[2])
                while waiting and waiting[0][1] == 0:  # things given in their place behind it
                    local = waiting.popleft()
                    local[0].shared_done(local[2])


class VirtualConn:
    """A session's upstream connection that is a share of a ``SharedLink`` (see ``Session._connect``).

    It stands in for the transport: the session sends whole commands with the number of replies
    they owe (``send``), gets its replies through ``on_upstream_data`` as from a connection of its
    own, and ``abort``/``close`` only make it deaf: the replies still owed are read and dropped,
    so the shared connection stays in step.
    """

    __slots__ = ("dead", "link", "session", "side")

    def __init__(self, link: SharedLink, session, side: int) -> None:
        self.link = link
        self.session = session
        self.side = side
        self.dead = False
        if link.state is IDLE or link.state is DOWN:
            link.connect()

    def send(self, data: bytes, n: int) -> None:
        if not self.dead:
            self.link.send(self, data, n, None)

    def abort(self) -> None:
        self.dead = True

    close = abort

    def is_closing(self) -> bool:
        return self.dead

    def get_write_buffer_size(self) -> int:
        return self.link.buffered()

    def shared_replies(self, frames: list[bytes], n: int, token) -> None:
        if not self.dead:
            self.session.on_upstream_frames(self.side, frames)

    def shared_done(self, token) -> None:
        pass

    def shared_lost(self, n: int, token) -> None:
        pass

    def shared_closed(self, reason: str) -> None:
        if not self.dead:
            self.dead = True
            self.session.on_upstream_lost(self.side, self, reason)


class MuxClient:
    """A client connection while it is multiplexed (see the module's docstring)."""

    __slots__ = ("authed", "client", "closed", "db", "gone", "inflight_bytes", "inflight_n", "leftover", "link", "mux",
                 "parser", "paused", "stash", "__weakref__")

    def __init__(self, mux: Mux, client, link: SharedLink) -> None:
        self.mux = mux
        self.client = client
        self.link = link
        self.parser = RequestParser(mux.shim.cfg.max_request_bytes)
        self.leftover = b""  # bytes of a partial command (not forwarded yet)
        self.stash: bytearray | None = None  # bytes for the session this client is becoming
        self.authed = mux.shim.password is None
        self.inflight_n = 0
        self.inflight_bytes = 0
        self.paused = False
        self.closed = False
        self.gone = False
        self.db = None  # (the shim's view of a session's database: the endpoint's own)

    # --- the client's bytes --------------------------------------------------------------------
    def on_client_data(self, data: bytes) -> None:
        if self.closed:
            return
        if self.stash is not None:
            self.stash += data
            self._flow()
            return
        buf = self.leftover + data if self.leftover else data
        mux = self.mux
        side = mux.side
        if side is None or side != self.link.side or mux.shim.holding:
            self._pin(buf, "phase" if not mux.shim.holding else "holding")
            return
        try:
            commands = self.parser.feed(data)
        except ProtocolError:
            self._pin(buf, "protocol-error")
            return
        consumed = self.parser.encoded
        n = len(buf)
        if (self.parser.error is not None or self.parser.inline or consumed < 0 or consumed > n
                or (consumed and buf[consumed - 2:consumed] != b"\r\n") or (consumed < n and buf[consumed] != 42)):
            self._pin(buf, "inline")  # not canonical RESP (inline, odd lengths, garbage): a session parses it
            return
        if not commands:
            self.leftover = buf
            return
        shim = mux.shim
        classify = shim.table.classify
        local: list[bytes] | None = None
        counts: dict[Cls, int] = {}
        scripts = []
        for i, args in enumerate(commands):
            c = classify(args)
            cls = c.cls
            if cls in _PLAIN and c.known[side] and not (cls is Cls.ADMIN and args[0].lower() in _ADMIN_PINNED):
                if not self.authed:
                    self._pin(buf, "noauth")  # the session answers NOAUTH, in order
                    return
                if cls is Cls.SCRIPT:
                    scripts.append(args)
                counts[cls] = counts.get(cls, 0) + 1
                continue
            name = args[0].lower()
            if not self.authed and name != b"auth" and name != b"hello":
                self._pin(buf, "noauth")  # the session answers NOAUTH, in order
                return
            if name == b"client" and len(args) >= 2:
                # Answered here, as the side would: CLIENT SETINFO (the library's name is per
                # connection), and a subcommand the side does not have (redis-py 8's
                # MAINT_NOTIFICATIONS on a server without it).
                sub = args[1].lower()
                if sub == b"setinfo" and len(args) == 4 and c.known[side]:
                    local = self._local_at(local, i, OK)
                    continue
                if not c.known[side] and shim.table.loaded(side):
                    local = self._local_at(local, i, b"-ERR unknown subcommand '" + args[1][:128].replace(b"\r", b" ")
                                           .replace(b"\n", b" ") + b"'. Try CLIENT HELP.\r\n")
                    continue
            if name == b"auth" and len(args) in (2, 3):
                expected = shim.password
                if expected is None or hmac.compare_digest(args[-1], expected):
                    if expected is not None:
                        self.authed = True
                    local = self._local_at(local, i, OK)
                    continue
            elif name == b"select" and len(args) == 2 and args[1] == b"0" and shim.endpoint_dbs[side] == 0:
                local = self._local_at(local, i, OK)  # already there
                continue
            elif name == b"hello" and i == 0 and len(commands) == 1 and not self.inflight_n:
                if self._hello(args, buf):
                    return
            self._pin(buf, name.decode(errors="replace")[:32] + (
                " " + args[1].decode(errors="replace").lower()[:32] if name in (b"client", b"hello") and len(args) > 1 else ""))
            return
        # Every command is plain: nothing above changed anything yet but ``authed`` (an AUTH
        # that would also have succeeded in the session).
        self.leftover = buf[consumed:] if consumed < n else b""
        raw = buf[:consumed] if consumed < n else buf
        for args in scripts:
            shim.note_script(args, args[0].lower())
        stats = shim.stats.commands
        sname = SIDE_NAMES[side]
        for cls, k in counts.items():
            stats[(cls.value, sname)] += k
        if local is None:
            self._send(raw, len(commands))
        else:
            self._send_mixed(commands, local)
        self._flow()

    def _hello(self, args: list[bytes], buf: bytes) -> bool:
        """``HELLO [2|3] [AUTH user pass]`` alone in its chunk, nothing in flight: the client moves to
        the shared connections of that protocol and gets the server's own HELLO reply from one.
        False (the client is pinned by the caller) for anything else: SETNAME, a bad version."""
        rest = args[1:]
        proto = self.link.proto
        if rest:
            if rest[0] not in (b"2", b"3"):
                return False
            proto = int(rest[0])
            rest = rest[1:]
        if rest[:1] and rest[0].lower() == b"auth" and len(rest) >= 3:
            expected = self.mux.shim.password
            if expected is not None and not hmac.compare_digest(rest[2], expected):
                return False  # the session answers WRONGPASS
            if expected is not None:
                self.authed = True
            rest = rest[3:]
        if rest or not self.authed:
            return False
        self.link = self.mux.link(self.link.side, self.link.index, proto)
        self.leftover = buf[self.parser.encoded:]
        self._send(encode([b"HELLO", b"%d" % proto]), 1)
        self._flow()
        return True

    def _local_at(self, local: list | None, i: int, reply: bytes) -> list:
        if local is None:
            local = []
        local.append((i, reply))
        return local

    def _send(self, raw: bytes, n: int) -> None:
        shim = self.mux.shim
        gen = shim.generation
        shim.outstanding[gen] = shim.outstanding.get(gen, 0) + n
        self.inflight_n += n
        self.inflight_bytes += len(raw)
        self.link.send(self, raw, n, (time.monotonic(), gen, len(raw)))

    def _send_mixed(self, commands: list[list[bytes]], local: list[tuple[int, bytes]]) -> None:
        """Some commands are answered here (AUTH, CLIENT SETINFO): their replies keep their place."""
        answers = dict(local)
        run: list[list[bytes]] = []
        for i, args in enumerate(commands):
            if i in answers:
                if run:
                    self._send(b"".join(map(encode, run)), len(run))
                    run = []
                if self.inflight_n:
                    self.link.send_local(self, answers[i])  # (a reply: see shared_done)
                else:
                    self.client.write(answers[i])
            else:
                run.append(args)
        if run:
            self._send(b"".join(map(encode, run)), len(run))

    # --- replies (as a user of its SharedLink) ------------------------------------------------
    def reply(self, data: bytes) -> None:
        if not self.closed:
            self.client.write(data)

    def shared_replies(self, frames: list[bytes], n: int, token) -> None:
        if not self.closed:
            self.client.write(frames[0] if n == 1 else b"".join(frames))
        mux = self.mux
        mux.latency[self.link.side].observe(time.monotonic() - token[0], n)
        mux.entry_finished(token[1], n)
        self.inflight_n -= n

    def shared_done(self, token) -> None:
        if token.__class__ is bytes:  # a reply the shim gave itself, in its place
            self.reply(token)
            return
        self.inflight_bytes -= token[2]
        self.settled()

    def shared_lost(self, n: int, token) -> None:
        if n:
            self.inflight_n -= n
            self.inflight_bytes -= token[2]
            self.mux.entry_finished(token[1], n)

    def shared_closed(self, reason: str) -> None:
        self.close(reason)

    def settled(self) -> None:
        """Replies arrived: a client waiting to become a session (or gone) may now."""
        if self.closed:
            return
        if not self.inflight_n:
            if self.stash is not None:
                self._become_session()
                return
            if self.gone:
                self.close("client closed")
                return
        if self.paused:
            self._flow()

    # --- becoming a session ---------------------------------------------------------------
    def _pin(self, buf: bytes, why: str = "state") -> None:
        """From this command on the client needs a session: once its replies in flight are in."""
        self.stash = bytearray(buf)
        self.leftover = b""
        self.mux.shim.stats.pinned[why] += 1
        if not self.inflight_n:
            self._become_session()
        else:
            self._flow()

    def _become_session(self) -> None:
        data, self.stash = bytes(self.stash or b""), None
        self.closed = True
        self.mux.become_session(self, data)

    # --- what the shim asks of every connection ---------------------------------------------
    def on_client_lost(self) -> None:
        if self.closed:
            return
        self.gone = True
        if not self.inflight_n:
            self.close("client closed")

    def _flow(self) -> None:
        if self.closed or self.gone:
            return
        shim = self.mux.shim
        limit, window = flow.bounds(shim.cfg, shim.client_window, self.paused)
        # (A client waiting to become a session is not read until its replies in flight are in.)
        over = (self.inflight_n > window or self.inflight_bytes > limit or self.client.buffer_size() > limit
                or (self.stash is not None and (self.inflight_n > 0 or len(self.stash) > limit))
                or self.link.buffered() > limit)
        flow.pause_or_resume(self, over, shim.stats)

    def on_buffers_changed(self) -> None:
        self._flow()

    def release(self) -> None:
        """The shim stopped holding writes: a client that waited to become a session does so when drained."""

    def on_phase(self, phase) -> None:
        """A phase change: the next command decides (a two-sided phase pins the client)."""

    def check_timeouts(self, now: float) -> None:
        """Nothing to time out: the answering side's replies are waited for, as a direct client would."""

    def drained(self) -> bool:
        return not self.inflight_n

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.close()
        self.mux.closed(self, reason)


class Mux:
    """The shared connections of one shim process, and its multiplexed clients."""

    def __init__(self, shim, per_side: int, call_soon: Callable, open_link: Callable) -> None:
        self.shim = shim
        self.per_side = per_side
        self.call_soon = call_soon
        self._open = open_link
        self.links: dict[tuple[int, int], list[SharedLink]] = {
            (side, 2): [SharedLink(self, side, i) for i in range(per_side)] for side in (0, 1)}
        self.latency = shim.stats.latency
        self.entry_finished = shim.entry_finished
        self.stopped = False
        self.side: int | None = one_sided(shim.routes)
        self._next = 0
        self._next_virtual = 0

    def applies(self) -> bool:
        return self.per_side > 0 and not self.stopped and self.side is not None and not self.shim.holding

    def phase_changed(self) -> None:
        self.side = one_sided(self.shim.routes)

    def client(self, link_client) -> MuxClient:
        links = self.links[(self.side, 2)]
        self._next = (self._next + 1) % len(links)
        return MuxClient(self, link_client, links[self._next])

    def virtual(self, session, side: int) -> VirtualConn:
        """A share of a RESP2 shared connection to ``side`` for ``session`` (round robin)."""
        links = self.links[(side, 2)]
        self._next_virtual = (self._next_virtual + 1) % len(links)
        return VirtualConn(links[self._next_virtual], session, side)

    def link(self, side: int, index: int, proto: int) -> SharedLink:
        links = self.links.get((side, proto))
        if links is None:
            links = self.links[(side, proto)] = [SharedLink(self, side, i, proto) for i in range(self.per_side)]
        return links[index]

    def open(self, link: SharedLink, attempt: int) -> None:
        self._open(link, attempt)

    def handshake(self, side: int, proto: int) -> list[bytes]:
        ep = self.shim.endpoints[side]
        hs = []
        if ep.password:
            hs.append(encode([b"AUTH", *([ep.user.encode()] if ep.user else []), ep.password.encode()]))
        if proto == 3:
            hs.append(encode([b"HELLO", b"3"]))
        db = self.shim.endpoint_dbs[side]
        if db:
            hs.append(encode([b"SELECT", b"%d" % db]))
        hs.append(encode([b"CLIENT", b"SETNAME", b"migrator-shim-shared"]))
        return hs

    def side_ok(self, side: int) -> None:
        self.shim.side_ok(side)

    def side_failed(self, side: int, reason: str) -> None:
        self.shim.side_failed(side, reason)

    def become_session(self, mc: MuxClient, data: bytes) -> None:
        self.shim.pin_client(mc, data)

    def closed(self, mc: MuxClient, reason: str) -> None:
        self.shim.session_closed(mc, reason)

    def stop(self) -> None:
        self.stopped = True
        for links in self.links.values():
            for link in links:
                if link.transport is not None:
                    link.transport.close()
                link.state = DOWN

    def status(self) -> dict[str, Any]:
        return {"per_side": self.per_side, "active": self.side is not None,
                "links": {f"{SIDE_NAMES[s]}/resp{p}": [ln.state for ln in links] for (s, p), links in self.links.items()},
                # Clients that left the shared connections for a session of their own, by the
                # command (or reason) that needed it.
                "pinned": sum(self.shim.stats.pinned.values()), "pinned_by": dict(self.shim.stats.pinned)}
