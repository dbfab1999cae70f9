"""Upstream connections kept for the next client, reset in between.

A client that opens a connection per request (PHP without persistent connections, short-lived
jobs) would otherwise cost the shim a TCP connect and a handshake per side per request. When a
session ends cleanly (its client closed, nothing in flight, no transaction, subscription or
blocking command), each of its upstream connections is given back here instead of closed: the
shim sends ``RESET`` (Redis 6.2+ and Valkey: discards MULTI and WATCH, tracking, subscriptions,
READONLY, CLIENT REPLY, RESP3, the database and the login), logs in again with the playbook's
credentials, selects the endpoint's database and clears a client name, and only once every reply
has come back as expected is the connection handed to the next session, which replays its own
handshake on it as on a new connection. A connection that answers anything else, or closes, is
dropped. At most ``shim.pool_size`` connections per side are kept; a side without RESET is not
pooled.

With ``shim.auth: passthrough`` a connection is logged in as its session's user. RESET logs it
out (back to the server's ``default`` user, which needs AUTH when it has a password), and nothing
else is sent, the playbook's credentials least of all: the next session logs in on it as its own
user before anything else (``Session._connect``), so one user's connection never carries another
user's commands. A connection whose session set a client name is not kept then (clearing the
name may need a login).

No socket here: the IO layer gives back transports and takes them.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from migrator.shim.resp import Framer, ProtocolError, encode

RESET_REPLY = b"+RESET\r\n"


class Pooled:
    """One upstream connection between two sessions: it stands in for the session on its protocol."""

    __slots__ = ("expected", "framer", "pool", "ready", "side", "transport")

    def __init__(self, pool: Pool, side: int, transport, expected: list[bytes]) -> None:
        self.pool = pool
        self.side = side
        self.transport = transport
        self.expected = deque(expected)
        self.framer = Framer()
        self.ready = False

    # The protocol's calls, as it would make them on a session:
    def on_upstream_data(self, side: int, data: bytes) -> None:
        try:
            frames = self.framer.feed(data)
        except ProtocolError:
            self.pool.drop(self)
            return
        for frame in frames:
            if not self.expected or not _as_expected(frame, self.expected.popleft()):
                self.pool.drop(self)
                return
        if not self.expected and not self.ready:
            self.ready = True
            self.pool.ready(self)

    def on_upstream_lost(self, side: int, transport, reason: str) -> None:
        self.pool.drop(self)

    def on_buffers_changed(self) -> None:
        pass


def _as_expected(frame: bytes, expected: bytes) -> bool:
    return frame == expected


class Pool:
    """Clean upstream connections per side, ready for the next session."""

    def __init__(self, shim, size: int) -> None:
        self.shim = shim
        self.size = size
        self.idle: tuple[deque[Pooled], deque[Pooled]] = (deque(), deque())
        self.resetting: tuple[set[Pooled], set[Pooled]] = (set(), set())
        self.given_back = 0
        self.dropped = 0
        self.stopped = False

    def supported(self, side: int) -> bool:
        table = self.shim.table
        return self.size > 0 and table.loaded(side) and table.classify([b"RESET"]).known[side]

    def give_back(self, side: int, transport, named: bool) -> bool:
        """Keep ``transport`` for a later session (True), or let the caller close it (False)."""
        if (self.stopped or not self.supported(side) or transport is None or transport.is_closing()
                or len(self.idle[side]) + len(self.resetting[side]) >= self.size):
            return False
        protocol = transport.get_protocol()
        if not hasattr(protocol, "session"):
            return False
        ep = self.shim.endpoints[side]
        cmds: list[tuple[list[bytes], bytes]] = [([b"RESET"], RESET_REPLY)]
        if self.shim.passthrough:
            if named:
                return False
            return self._keep(side, transport, protocol, cmds)
        if ep.password:
            cmds.append(([b"AUTH", *([ep.user.encode()] if ep.user else []), ep.password.encode()], b"+OK\r\n"))
        db = self.shim.endpoint_dbs[side]
        if db:
            cmds.append(([b"SELECT", b"%d" % db], b"+OK\r\n"))
        if named:
            cmds.append(([b"CLIENT", b"SETNAME", b""], b"+OK\r\n"))
        return self._keep(side, transport, protocol, cmds)

    def _keep(self, side: int, transport, protocol, cmds: list[tuple[list[bytes], bytes]]) -> bool:
        p = Pooled(self, side, transport, [reply for _args, reply in cmds])
        protocol.session = p
        self.resetting[side].add(p)
        self.given_back += 1
        transport.write(b"".join(encode(args) for args, _reply in cmds))
        return True

    def ready(self, p: Pooled) -> None:
        self.resetting[p.side].discard(p)
        if self.stopped:
            p.transport.close()
            return
        self.idle[p.side].append(p)

    def drop(self, p: Pooled) -> None:
        self.resetting[p.side].discard(p)
        try:
            self.idle[p.side].remove(p)
        except ValueError:
            pass
        self.dropped += 1
        if not p.transport.is_closing():
            p.transport.abort()

    def take(self, side: int) -> Any:
        """A clean, open transport for ``side`` (its protocol still pointing at the pool), or None."""
        idle = self.idle[side]
        while idle:
            p = idle.pop()  # the most recently used: the likeliest to be alive
            if not p.transport.is_closing():
                self.shim.stats.pool_reused += 1
                return p.transport
        return None

    def stop(self) -> None:
        self.stopped = True
        for side in (0, 1):
            for p in [*self.idle[side], *self.resetting[side]]:
                p.transport.close()
            self.idle[side].clear()
            self.resetting[side].clear()

    def status(self) -> dict[str, Any]:
        return {"size": self.size, "idle": [len(x) for x in self.idle], "reused": self.shim.stats.pool_reused,
                "given_back": self.given_back, "dropped": self.dropped}
