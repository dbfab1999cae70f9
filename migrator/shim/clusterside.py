"""A cluster side of the shim: one loopback address that routes every command by slot.

When a side of the migration is a Redis/Valkey Cluster, the shim does not talk to its nodes
directly: ``ClusterSide`` listens on a private loopback port (clients must ``AUTH`` with a
random token only this process knows) and the shim's sessions, shared connections and probes
connect to that address as if the side were one standalone server. Each connection to it
(``RouterConn``) routes every command to the node owning its key's slot, on per-node
connections of its own, and returns the replies in command order:

- a key's slot decides the node (``migrator.cluster.key_slot``); commands whose keys are in
  several slots are answered ``-CROSSSLOT`` as a node would;
- ``MOVED`` and ``ASK`` (``ASKING`` then the command on the named node), ``TRYAGAIN`` and
  ``CLUSTERDOWN`` are followed within ``REDIRECT_BUDGET``; while a redirect is followed no later
  command of that connection is sent, so a retry never overtakes a later write to the key;
- keyless commands: ``DBSIZE`` summed, ``KEYS`` merged, ``SCAN`` over every primary with a
  composite cursor, ``FLUSHALL``/``FLUSHDB``/``SCRIPT``/``FUNCTION``/``CONFIG SET`` on every
  primary, everything else (PING, INFO, COMMAND, CLIENT ...) on the owner of slot 0;
- ``MULTI``/``EXEC`` and ``WATCH`` run on the node of their first key's slot;
- pub/sub runs on one node; its confirmations and messages are passed on as they come.

The slot map is read at start, every ``REFRESH_INTERVAL`` and at once on a redirect or a
lost node connection; a change of its signature (an owner moved, a slot started or stopped
migrating, a failover) is counted as a topology change (``changes``, ``last_change``). A write
that met a redirect or ``TRYAGAIN``/``CLUSTERDOWN`` has its keys marked dirty (``on_dirty``):
its slot was in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

from migrator import cluster
from migrator.connect import ssl_context
from migrator.playbook import Endpoint
from migrator.shim.entry import WRITE_LIKE
from migrator.shim.resp import (
    OK,
    Framer,
    ProtocolError,
    RequestParser,
    encode,
    error_reply,
    is_error,
    parse,
)
from migrator.state import iso, now

REFRESH_INTERVAL = 1.0  # seconds between reads of the slot map with no redirect
REDIRECT_BUDGET = 5.0  # seconds a command may spend following redirects / waiting out CLUSTERDOWN
MAX_REDIRECTS = 16
RETRY_SLEEP = 0.05
CROSSSLOT = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
_QUEUED = b"+QUEUED\r\n"
_BLOCKING = frozenset({b"blpop", b"brpop", b"blmove", b"brpoplpush", b"blmpop", b"bzpopmin", b"bzpopmax", b"bzmpop",
                       b"wait", b"waitaof"})
_ALL_PRIMARIES = frozenset({b"flushall", b"flushdb"})
_ALL_PRIMARIES_SUB = frozenset({(b"script", b"load"), (b"script", b"flush"), (b"function", b"load"),
                                (b"function", b"flush"), (b"function", b"delete"), (b"function", b"restore"),
                                (b"config", b"set"), (b"config", b"resetstat")})
_SUBSCRIBE = frozenset({b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe", b"sunsubscribe"})
# The kinds of frame a subscribed connection receives besides replies (RESP2 arrays, RESP3 pushes).
_PUBSUB_KINDS = (b"message", b"pmessage", b"smessage", b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe",
                 b"punsubscribe", b"sunsubscribe")


def _pubsub_frame(frame: bytes) -> tuple[bool, int | None]:
    """(whether ``frame`` is a pub/sub message or (un)subscribe confirmation, the subscription
    count it reports: an (un)subscribe confirmation's last element)."""
    if frame[:1] not in (b"*", b">"):
        return False, None
    head = frame[:40]
    i = head.find(b"\r\n$")
    if i < 0:
        return False, None
    j = head.find(b"\r\n", i + 2)
    kind = head[j + 2 : head.find(b"\r\n", j + 2)] if j >= 0 else b""
    if kind not in _PUBSUB_KINDS:
        return False, None
    if kind.endswith(b"subscribe") and frame.endswith(b"\r\n"):
        k = frame.rfind(b":", 0, len(frame) - 2)
        if k >= 0 and frame[k + 1 : -2].isdigit():
            return True, int(frame[k + 1 : -2])
    return True, None


class NodeLost(Exception):
    """A node connection was lost with commands in flight (their outcome is unknown)."""


class CannotConnect(NodeLost):
    """A node could not be reached: nothing was sent to it."""


class _RouterEndpoint(Endpoint):
    """The playbook endpoint of a cluster side, as the shim's connections see it: the router's
    loopback address and token; ``display`` still names the cluster."""

    def __init__(self, real: Endpoint, host: str, port: int, token: str) -> None:
        super().__init__(url=f"redis://:{token}@{host}:{port}/0", connect_timeout=real.connect_timeout,
                         socket_timeout=real.socket_timeout)
        object.__setattr__(self, "_real_display", real.display)

    @property
    def display(self) -> str:
        return f"{self._real_display} (cluster)"


def _node_addr(n: cluster.ClusterNode) -> tuple[str, int]:
    return (n.host, n.port)


def _redirect(raw: bytes) -> tuple[str, tuple[str, int] | None]:
    """("moved"|"ask"|"tryagain"|"clusterdown"|"", the address named) of an error reply."""
    if not raw or raw[0] != 45:  # '-'
        return "", None
    head = raw[1:12].upper()
    if head.startswith((b"MOVED ", b"ASK ")):
        parts = raw[1:].split()
        host, _, port = parts[2].decode().rpartition(":")
        return ("moved" if head.startswith(b"MOVED") else "ask"), (host, int(port))
    if head.startswith(b"TRYAGAIN"):
        return "tryagain", None
    if head.startswith(b"CLUSTERDOWN"):
        return "clusterdown", None
    return "", None


class ClusterSide:
    """One side's cluster: the slot map, the loopback router and what it noticed."""

    def __init__(self, ep: Endpoint, side_name: str, *, log: Any, classify: Callable, on_dirty: Callable,
                 stats: Any = None) -> None:
        self.ep = ep
        self.stats = stats  # metrics.Stats: topology changes, redirects, CROSSSLOT refusals by side
        self.side_name = side_name
        self.log = log
        self.classify = classify  # the shim's CommandTable.classify: keys and class of a command
        self.on_dirty = on_dirty  # (keys, reason, command): keys whose slot was in flight
        self.token = secrets.token_hex(16)
        self.ssl = ssl_context(ep)
        self.topo: cluster.ClusterTopology | None = None
        self.slot_owner: list[tuple[str, int] | None] = [None] * cluster.SLOTS
        self.changes = 0
        self.last_change: str | None = None
        self.last_moved = ""
        self.redirects = {"moved": 0, "ask": 0, "tryagain": 0, "clusterdown": 0}
        self.crossslot = 0
        self.run_id = hashlib.sha1(b"cluster:" + self.token.encode()).hexdigest().encode()
        self.conns: set[RouterConn] = set()
        self.server: asyncio.AbstractServer | None = None
        self.endpoint: Endpoint | None = None
        self._refresh_task: asyncio.Task | None = None
        self._poll_task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False

    # --- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        topo = await self.loop.run_in_executor(None, cluster.discover, self.ep, self.side_name)
        self._apply(topo, initial=True)
        self.server = await self.loop.create_server(lambda: RouterConn(self), "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.endpoint = _RouterEndpoint(self.ep, host, port, self.token)
        self._poll_task = self.loop.create_task(self._poll())

    async def stop(self) -> None:
        self.stopping = True
        for t in (self._poll_task, self._refresh_task):
            if t is not None:
                t.cancel()
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            c.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_INTERVAL)
            with contextlib.suppress(Exception):
                await self.refresh("poll")

    # --- the slot map ----------------------------------------------------------------
    def _read(self) -> cluster.ClusterTopology:
        """The topology as a known node (the last view's, then the playbook's seeds) sees it."""
        tried: list[tuple[str, int]] = []
        if self.topo is not None:
            tried = [_node_addr(n) for n in self.topo.nodes if not n.failed]
        errors = []
        for host, port in tried + [a for a in cluster.seed_addresses(self.ep) if a not in tried]:
            c = redis.Redis(**{**cluster.node_kwargs(self.ep, host, port), "socket_timeout": 2,
                               "socket_connect_timeout": 1, "retry": None})
            try:
                topo = cluster.read_topology(c, connected_to=(host, port))
                if topo.primaries() and not topo.uncovered():
                    return topo
                errors.append(f"{host}:{port}: slots not covered in its view")
            except (redis.exceptions.RedisError, OSError) as e:
                errors.append(f"{host}:{port}: {e}")
            finally:
                c.close()
        raise NodeLost("; ".join(errors))

    async def refresh(self, why: str) -> None:
        """Read the slot map again (one read at a time; callers share it)."""
        if self.stopping:
            return
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = self.loop.create_task(self._refresh(why))
        await asyncio.shield(self._refresh_task)

    async def _refresh(self, why: str) -> None:
        try:
            topo = await self.loop.run_in_executor(None, self._read)
        except NodeLost as e:
            self.log.warning("shim.cluster_unreadable", side=self.side_name, why=why, error=str(e))
            return
        self._apply(topo, why=why)

    def _apply(self, topo: cluster.ClusterTopology, initial: bool = False, why: str = "") -> None:
        old = self.topo
        self.topo = topo
        owners: list[tuple[str, int] | None] = [None] * cluster.SLOTS
        for n in topo.primaries():
            for lo, hi in n.slots:
                for s in range(lo, hi + 1):
                    owners[s] = _node_addr(n)
        self.slot_owner = owners
        if initial or old is None or old.signature() == topo.signature():
            return
        self.changes += 1
        if self.stats is not None:
            self.stats.topology_changes[self.side_name] += 1
        self.last_change = iso(now())
        self.last_moved = cluster.format_ranges(old.moved_slots(topo))
        self.log.warning("shim.cluster_topology_changed", side=self.side_name, noticed_by=why,
                         moved_slots=self.last_moved or None,
                         migrating=cluster.format_ranges((s, s) for s in sorted(topo.migrating)) or None)

    def count_crossslot(self) -> None:
        self.crossslot += 1
        if self.stats is not None:
            self.stats.crossslot[self.side_name] += 1

    def owner(self, slot: int) -> tuple[str, int]:
        a = self.slot_owner[slot]
        if a is None:
            raise NodeLost(f"slot {slot} has no owner in the {self.side_name}'s cluster")
        return a

    def primaries(self) -> list[tuple[str, int]]:
        return [_node_addr(n) for n in self.topo.primaries()] if self.topo else []

    def status(self) -> dict[str, Any]:
        return {"nodes": len(self.topo.nodes) if self.topo else 0, "primaries": len(self.primaries()),
                "topology_changes": self.changes, "last_change": self.last_change,
                "last_moved_slots": self.last_moved or None, "redirects": dict(self.redirects),
                "crossslot_refused": self.crossslot}


LOST = b"\x00lost"  # (compared by identity) a reply that will never come: its node connection was lost


class Reply:
    """One command's place in a router connection's reply order."""

    __slots__ = ("args", "combine", "followed", "on_reply", "parts", "raw", "releases")

    def __init__(self, args: list[bytes] | None = None, raw: bytes | None = None) -> None:
        self.args = args  # None: not to be retried on a redirect (answered here, or a combined reply)
        self.raw = raw
        self.parts: list[bytes | None] | None = None
        self.combine: Callable | None = None  # parts (or the one reply) -> the reply
        self.on_reply: Callable | None = None
        self.releases = False  # a blocking command: later commands wait for it
        self.followed = False

    def set(self, frame: bytes) -> None:
        if self.on_reply is not None:
            self.on_reply(frame)
        self.raw = self.combine([frame]) if self.combine is not None and frame is not LOST else frame

    def part(self, i: int, frame: bytes) -> None:
        self.parts[i] = frame
        if all(p is not None for p in self.parts):
            self.raw = LOST if any(p is LOST for p in self.parts) else self.combine(self.parts)


class _Part:
    __slots__ = ("i", "reply")

    def __init__(self, reply: Reply, i: int) -> None:
        self.reply, self.i = reply, i

    def set(self, frame: bytes) -> None:
        self.reply.part(self.i, frame)


class _Fut:
    __slots__ = ("fut",)

    def __init__(self, fut: asyncio.Future) -> None:
        self.fut = fut

    def set(self, frame: bytes) -> None:
        if not self.fut.done():
            if frame is LOST:
                self.fut.set_exception(NodeLost("connection lost"))
            else:
                self.fut.set_result(frame)


class _NeedConnect(Exception):
    def __init__(self, addrs: list[tuple[str, int]]) -> None:
        super().__init__()
        self.addrs = addrs


class NodeConn(asyncio.Protocol):
    """One connection from a RouterConn to one node: replies are matched to their waiters in order."""

    def __init__(self, owner: RouterConn, addr: tuple[str, int]) -> None:
        self.owner = owner
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        self.framer = Framer()
        self.waiting: deque = deque()  # Reply / _Part / _Fut, or None: a reply to drop (handshake, ASKING)
        self.lost: str | None = None
        self.subscribed = False  # (un)subscribe commands went here: messages and confirmations pass straight on
        self.out: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        waiting = self.waiting
        for frame in self.framer.feed(data):
            if self.subscribed:
                is_pubsub, count = _pubsub_frame(frame)
                if is_pubsub:
                    self.owner.write(frame)  # nothing else is pending: see RouterConn._subscribe
                    if count == 0:
                        self.subscribed = False
                    continue
            if not waiting:
                continue  # a RESP3 push nobody asked for (invalidation...): not a reply
            w = waiting.popleft()
            if w is not None:
                w.set(frame)
        self.owner.flush()

    def connection_lost(self, exc) -> None:
        self.lost = f"connection to {self.addr[0]}:{self.addr[1]} lost ({exc or 'closed by the node'})"
        waiting, self.waiting = self.waiting, deque()
        for w in waiting:
            if w is not None:
                w.set(LOST)
        self.owner.node_lost(self)

    def usable(self) -> bool:
        return self.lost is None and self.transport is not None and not self.transport.is_closing()

    def queue(self, payload: bytes, waiter) -> None:
        """Send ``payload`` at the end of this round (``RouterConn.send_batched``); ``waiter`` gets its reply."""
        if not self.out:
            self.owner.dirty_nodes.append(self)
        self.out.append(payload)
        self.waiting.append(waiter)

    def send_now(self, payload: bytes, waiters: list) -> None:
        if not self.usable():
            for w in waiters:
                if w is not None:
                    w.set(LOST)
            return
        self.waiting.extend(waiters)
        self.transport.write(payload)


class RouterConn(asyncio.Protocol):
    """One connection from the shim to a cluster side.

    Commands are routed as they arrive, in order, without a round trip (``route``); each gets a
    ``Reply`` in ``pending``, written back in order as soon as it and those before it are in
    (``flush``). ``hold`` stops routing (later commands wait in ``held``) while something must
    happen first: a node connection opening, a redirect followed, a blocking command, subscribing.
    """

    def __init__(self, side: ClusterSide) -> None:
        self.side = side
        self.loop = side.loop
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(1 << 30)
        self.authed = False
        self.nodes: dict[tuple[str, int], NodeConn] = {}
        self.connecting: dict[tuple[str, int], asyncio.Future] = {}
        self.state: dict[str, list[bytes]] = {}  # HELLO / CLIENT SETNAME replayed on each node connection
        self.pending: deque[Reply] = deque()
        self.held: deque[list[bytes]] = deque()
        self.hold = 0
        self.dirty_nodes: list[NodeConn] = []
        self.tx_node: tuple[str, int] | None = None  # WATCH / MULTI pinned here
        self.tx_slot: int | None = None
        self.tx_buffer: list[list[bytes]] | None = None  # MULTI and keyless commands before its node is known
        self.tx_abort = False
        self._resume_scheduled = False
        self.closed = False
        self.tasks: set[asyncio.Task] = set()
        self.connect_deadline: float | None = None

    # --- the shim's side -------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.side.conns.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            cmds = self.parser.feed(data)
        except ProtocolError as e:
            self.flush()
            self.write(error_reply(f"ERR Protocol error: {e}"))
            self.close()
            return
        if cmds:
            self.held.extend(cmds)
            self.resume()

    def connection_lost(self, exc) -> None:
        self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.side.conns.discard(self)
        for t in list(self.tasks):
            t.cancel()
        for n in list(self.nodes.values()):
            if n.transport is not None:
                n.transport.close()
        if self.transport is not None:
            self.transport.close()

    def node_lost(self, n: NodeConn) -> None:
        if self.nodes.get(n.addr) is n:
            del self.nodes[n.addr]
        if n.subscribed:
            self.close()  # as a server going away: the subscriber reconnects and subscribes again
            return
        self.flush()
        if not self.closed and not self.side.stopping:
            self._task(self.side.refresh("node connection lost"))

    def _task(self, coro) -> None:
        t = self.loop.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    # --- the loop of a connection: route what can go, send, answer in order --------
    def resume(self) -> None:
        held = self.held
        while held and not self.hold and not self.closed:
            args = held.popleft()
            try:
                self.route(args)
            except _NeedConnect as e:
                held.appendleft(args)  # nothing of it was sent: routed again once connected
                self.hold += 1
                self._task(self._connect(e.addrs))
                break
            except NodeLost as e:  # a slot no primary owns
                self._local(b"-CLUSTERDOWN Hash slot not served (" + str(e).encode() + b")\r\n")
            self.connect_deadline = None
        self.send_batched()
        self.flush()

    def send_batched(self) -> None:
        for n in self.dirty_nodes:
            out, n.out = n.out, []
            if n.usable():
                n.transport.write(b"".join(out))
            # (lost meanwhile: its waiters were failed by connection_lost)
        self.dirty_nodes.clear()

    def flush(self) -> None:
        pending = self.pending
        out: list[bytes] = []
        while pending and pending[0].raw is not None:
            r = pending[0]
            raw = r.raw
            if raw is LOST:
                # What the shim would see from a server that went away: the connection drops
                # (it marks the writes in flight dirty and reconnects).
                self.write(b"".join(out))
                self.side.log.warning("shim.cluster_node_lost", side=self.side.side_name,
                                      error="a node connection was lost with commands in flight")
                if not self.side.stopping:
                    self._task(self.side.refresh("node lost"))
                self.close()
                return
            if r.args is not None and not r.followed and raw[:1] == b"-" and _redirect(raw)[0]:
                r.followed = True
                r.raw = None
                self.hold += 1  # nothing more is sent until the retries are done
                self._task(self._follow(r, raw))
                break
            if raw[:1] == b"-" and raw.startswith((b"-MOVED ", b"-ASK ")):
                # Not followed (a command queued in MULTI): never hand a node's address to the client.
                raw = b"-TRYAGAIN migrator shim: the slot is moving in the " + self.side.side_name.encode() + b"; retry\r\n"
            pending.popleft()
            out.append(raw)
            if r.releases:
                self.hold -= 1
        if out:
            self.write(b"".join(out))
        if not self.hold and self.held:
            self.resume_soon()  # a blocking command returned: what waited behind it goes now

    def resume_soon(self) -> None:
        if not self._resume_scheduled:
            self._resume_scheduled = True

            def go():
                self._resume_scheduled = False
                self.resume()
            self.loop.call_soon(go)

    # --- node connections -------------------------------------------------------------
    def conn(self, addr: tuple[str, int]) -> NodeConn:
        n = self.nodes.get(addr)
        if n is None or not n.usable():
            raise _NeedConnect([addr])
        return n

    def conns(self, addrs: list[tuple[str, int]]) -> list[NodeConn]:
        missing = [a for a in addrs if a not in self.nodes or not self.nodes[a].usable()]
        if missing:
            raise _NeedConnect(missing)
        return [self.nodes[a] for a in addrs]

    async def _connect(self, addrs: list[tuple[str, int]]) -> None:
        """Open the node connections the next command needs, then go on; a node that cannot be
        reached is retried on the slot's owner as read again, within the budget."""
        if self.connect_deadline is None:
            self.connect_deadline = time.monotonic() + REDIRECT_BUDGET
        try:
            for a in addrs:
                await self.node(a)
        except CannotConnect as e:
            if time.monotonic() > self.connect_deadline:
                args = self.held.popleft()
                self.connect_deadline = None
                self._dirty_if_write(args, {"clusterdown"})
                self._local(b"-CLUSTERDOWN " + str(e).encode() + b"\r\n")
            else:
                await asyncio.sleep(RETRY_SLEEP)
                await self.side.refresh("node unreachable")
        finally:
            self.hold -= 1
        self.resume()

    async def node(self, addr: tuple[str, int]) -> NodeConn:
        n = self.nodes.get(addr)
        if n is not None and n.usable():
            return n
        fut = self.connecting.get(addr)
        if fut is None:
            fut = self.loop.create_future()
            self.connecting[addr] = fut
            try:
                n = await self._open(addr)
                self.nodes[addr] = n
                fut.set_result(n)
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # retrieved: a failed connect is the caller's to report
                raise
            finally:
                self.connecting.pop(addr, None)
            return n
        return await asyncio.shield(fut)

    async def _open(self, addr: tuple[str, int]) -> NodeConn:
        ep = self.side.ep
        try:
            _t, n = await asyncio.wait_for(self.loop.create_connection(
                lambda: NodeConn(self, addr), addr[0], addr[1], ssl=self.side.ssl,
                server_hostname=(ep.tls.server_name if ep.tls and ep.tls.server_name else addr[0]) if self.side.ssl else None),
                timeout=ep.connect_timeout.total_seconds())
        except (TimeoutError, OSError) as e:
            raise CannotConnect(f"cannot connect to {addr[0]}:{addr[1]}: {e or type(e).__name__}") from None
        hs: list[list[bytes]] = []
        if ep.password:
            hs.append([b"AUTH", *([ep.user.encode()] if ep.user else []), ep.password.encode()])
        hs.extend(self.state.values())
        if hs:
            futs = [self.loop.create_future() for _ in hs]
            n.send_now(b"".join(encode(a) for a in hs), [_Fut(f) for f in futs])
            for a, f in zip(hs, futs):
                try:
                    raw = await f
                except NodeLost:
                    raise CannotConnect(f"{addr[0]}:{addr[1]} closed the connection during the handshake") from None
                if is_error(raw) and a[0].upper() == b"AUTH":
                    n.transport.close()
                    raise CannotConnect(f"{addr[0]}:{addr[1]} refused the playbook's credentials: "
                                        f"{raw[1:].strip().decode(errors='replace')}")
        return n

    async def call(self, addr: tuple[str, int], args: list[bytes], asking: bool = False) -> bytes:
        n = await self.node(addr)
        fut = self.loop.create_future()
        if asking:
            n.send_now(encode([b"ASKING"]) + encode(args), [None, _Fut(fut)])
        else:
            n.send_now(encode(args), [_Fut(fut)])
        return await fut

    # --- routing ----------------------------------------------------------------------
    def _slot_of(self, args: list[bytes]) -> tuple[int | None, bool]:
        """(the slot of the command's keys or None when keyless, whether they are in one slot)."""
        name = args[0].lower()
        if name == b"cluster" and len(args) > 2 and args[1].lower() in (b"countkeysinslot", b"getkeysinslot"):
            try:
                return int(args[2]) % cluster.SLOTS, True
            except ValueError:
                return None, True
        if name in (b"spublish", b"ssubscribe", b"sunsubscribe") and len(args) > 1:
            keys = args[1:2] if name == b"spublish" else args[1:]
        else:
            keys = self.side.classify(args).keys(args)
        if not keys:
            return None, True
        first = cluster.key_slot(keys[0])
        for k in keys[1:]:
            if cluster.key_slot(k) != first:
                return first, False
        return first, True

    def _default(self) -> tuple[str, int]:
        return self.side.owner(0)

    def _local(self, raw: bytes) -> None:
        self.pending.append(Reply(None, raw))

    def _emit(self, n: NodeConn, args: list[bytes], r: Reply | None = None) -> Reply:
        if r is None:
            r = Reply(args)
        self.pending.append(r)
        n.queue(encode(args), r)
        return r

    def route(self, args: list[bytes]) -> None:
        """Send one command where it goes (or answer it here); raises _NeedConnect before sending
        anything when a node connection it needs is not open yet."""
        name = args[0].lower()
        if name == b"hello":
            low = [a.lower() for a in args]
            if b"auth" in low:
                i = low.index(b"auth")
                if i + 2 < len(args) and args[i + 2].decode(errors="replace") == self.side.token:
                    self.authed = True
                args = args[:i] + args[i + 3:]
        if not self.authed:
            if name == b"auth" and args[-1].decode(errors="replace") == self.side.token:
                self.authed = True
                self._local(OK)
            else:
                self._local(b"-NOAUTH Authentication required.\r\n")
            return
        if name in (b"auth", b"readonly", b"readwrite", b"asking"):
            self._local(OK)  # reads go to the primaries: READONLY changes nothing here
            return
        if name == b"reset":
            self._reset()
            return
        if name == b"quit":
            self._local(OK)
            self.flush()
            self.close()
            return
        if name == b"select":
            self._local(OK if len(args) == 2 and args[1] == b"0" else b"-ERR SELECT is not allowed in cluster mode\r\n")
            return
        if name == b"hello" or (name == b"client" and len(args) == 3 and args[1].lower() == b"setname"):
            self._setting(args)
            return
        if name in _SUBSCRIBE:
            self._subscribe(args, name)
            return
        if self.tx_buffer is not None or name == b"multi":
            self._tx(args, name)
            return
        slot, one = self._slot_of(args)
        if not one:
            self.side.count_crossslot()
            self._local(CROSSSLOT)
            return
        if name == b"watch":
            if self.tx_slot is not None and slot != self.tx_slot:
                self.side.count_crossslot()
                self._local(CROSSSLOT)
                return
            node = self.conn(self.side.owner(slot))
            self.tx_slot, self.tx_node = slot, node.addr
            self._emit(node, args)
            return
        if name == b"unwatch" and self.tx_node is not None:
            node = self.conn(self.tx_node)
            self.tx_slot = self.tx_node = None
            self._emit(node, args)
            return
        if slot is None:
            if name in (b"dbsize", b"keys") or name in _ALL_PRIMARIES or (
                    len(args) > 1 and (name, args[1].lower()) in _ALL_PRIMARIES_SUB):
                self._fan_out(args, name)
                return
            if name == b"scan":
                self._scan(args)
                return
            node = self.conn(self.tx_node or self._default())
            r = Reply(None if self.tx_node else args)
            if name == b"info":
                r.combine = lambda frames: self._info(frames[0])
            self._emit(node, args, r)
            return
        r = self._emit(self.conn(self.tx_node if self.tx_node is not None else self.side.owner(slot)), args)
        if name in _BLOCKING or (name in (b"xread", b"xreadgroup") and any(a.lower() == b"block" for a in args)):
            # A server serves nothing else on a connection while a command blocks it.
            r.releases = True
            self.hold += 1

    def _setting(self, args: list[bytes]) -> None:
        """A connection setting (HELLO, CLIENT SETNAME): on every node connection open, and
        replayed on those opened later; the reply is the default node's."""
        default = self.conn(self._default())
        cmd = list(args)
        name = cmd[0].lower()

        def accepted(frame: bytes) -> None:
            if frame is LOST or is_error(frame):
                return
            if name == b"hello":
                low = [a.lower() for a in cmd]
                if b"setname" in low:
                    self.state["name"] = [b"CLIENT", b"SETNAME", cmd[low.index(b"setname") + 1]]
                if len(cmd) >= 2:
                    self.state = {"hello": cmd[:2], **{k: v for k, v in self.state.items() if k != "hello"}}
            else:
                self.state["name"] = cmd

        r = Reply(None)
        r.on_reply = accepted
        self._emit(default, args, r)
        for n in self.nodes.values():
            if n is not default and n.usable():
                n.queue(encode(args), None)

    def _reset(self) -> None:
        """RESET (the shim's connection pool): every node connection reset and logged in again."""
        ep = self.side.ep
        auth = [b"AUTH", *([ep.user.encode()] if ep.user else []), ep.password.encode()] if ep.password else None
        for n in self.nodes.values():
            if n.usable():
                n.queue(encode([b"RESET"]), None)
                if auth:
                    n.queue(encode(auth), None)
        self.state.clear()
        self.tx_node = self.tx_slot = self.tx_buffer = None
        self.tx_abort = False
        self.authed = False
        self._local(b"+RESET\r\n")

    def _info(self, raw: bytes) -> bytes:
        """INFO from the owner of slot 0, with the router's own run_id (a failover must not look
        like a restart of the whole side; see docs/shim.md)."""
        if is_error(raw) or raw.find(b"run_id:") < 0:
            return raw
        text = _bulk_text(raw)
        j = text.find(b"run_id:")
        end = text.find(b"\r\n", j)
        return _as_reply(raw, text[:j] + b"run_id:" + self.side.run_id + text[end:])

    def _fan_out(self, args: list[bytes], name: bytes) -> None:
        nodes = self.conns(self.side.primaries())
        r = Reply(None)
        r.parts = [None] * len(nodes)

        def combine(replies: list[bytes]) -> bytes:
            errors = [x for x in replies if is_error(x)]
            if errors:
                return errors[0]
            if name == b"dbsize":
                return b":%d\r\n" % sum(parse(x) for x in replies)
            if name == b"keys":
                keys = [k for x in replies for k in parse(x)]
                return b"*%d\r\n" % len(keys) + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys)
            return replies[0]

        r.combine = combine
        self.pending.append(r)
        payload = encode(args)
        for i, n in enumerate(nodes):
            n.queue(payload, _Part(r, i))

    def _scan(self, args: list[bytes]) -> None:
        """SCAN over the primaries in slot order: cursor = node cursor * 1024 + node index."""
        primaries = self.side.primaries()
        try:
            composite = int(args[1])
        except (IndexError, ValueError):
            self._local(b"-ERR invalid cursor\r\n")
            return
        index, cursor = composite % 1024, composite // 1024
        if index >= len(primaries):
            self._local(b"*2\r\n$1\r\n0\r\n*0\r\n")
            return
        node = self.conn(primaries[index])
        r = Reply(None)

        def combine(frames: list[bytes]) -> bytes:
            raw = frames[0]
            if is_error(raw):
                return raw
            nxt, keys = parse(raw)
            nxt = int(nxt)
            if nxt:
                out = str(nxt * 1024 + index).encode()
            else:
                out = b"0" if index + 1 >= len(primaries) else str(index + 1).encode()
            return (b"*2\r\n$%d\r\n%s\r\n" % (len(out), out) + b"*%d\r\n" % len(keys)
                    + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys))

        r.combine = combine
        self._emit(node, [args[0], str(cursor).encode(), *args[2:]], r)

    def _subscribe(self, args: list[bytes], name: bytes) -> None:
        """Pub/sub on one node (the channel's slot owner for SSUBSCRIBE, the owner of slot 0
        otherwise: a cluster delivers every PUBLISH to every node). Sent once every reply before
        it is written, so that its confirmations and messages, passed straight on as they come,
        cannot overtake a reply."""
        addr = self.side.owner(cluster.key_slot(args[1])) if name in (b"ssubscribe", b"sunsubscribe") and len(args) > 1 \
            else self._default()
        n = self.conn(addr)
        if self.pending:
            self.held.appendleft(args)
            self.hold += 1

            async def later() -> None:
                while self.pending:
                    await asyncio.sleep(0.001)
                self.hold -= 1
                self.resume()

            self._task(later())
            return
        n.subscribed = True
        n.queue(encode(args), None)
        n.waiting.pop()  # no reply to match: its confirmations pass straight on

    def _tx(self, args: list[bytes], name: bytes) -> None:
        """MULTI ... EXEC on the node of the transaction's first key (or the WATCHed key's)."""
        if name == b"multi":
            if self.tx_buffer is not None:
                self._local(b"-ERR MULTI calls can not be nested\r\n")
                return
            if self.tx_node is not None:
                n = self.conn(self.tx_node)
                self._local(OK)
                n.queue(encode(args), None)
                self.tx_buffer, self.tx_abort = [], False
                return
            self.tx_buffer, self.tx_abort = [args], False
            self._local(OK)
            return
        if name in (b"exec", b"discard"):
            node = self.conn(self.tx_node or self._default())
            buffered, self.tx_buffer = self.tx_buffer, None
            pinned, abort = self.tx_node, self.tx_abort
            self.tx_node = self.tx_slot = None
            self.tx_abort = False
            if pinned is None:
                for a in buffered:
                    node.queue(encode(a), None)
            if abort:
                node.queue(encode([b"DISCARD"]), None)
                self._local(b"-EXECABORT Transaction discarded because of previous errors.\r\n" if name == b"exec" else OK)
                return
            self._emit(node, args, Reply(None))
            return
        slot, one = self._slot_of(args)
        if not one or (slot is not None and self.tx_slot is not None and slot != self.tx_slot):
            self.side.count_crossslot()
            self.tx_abort = True
            self._local(CROSSSLOT)
            return
        if slot is not None and self.tx_node is None:
            n = self.conn(self.side.owner(slot))
            self.tx_slot, self.tx_node = slot, n.addr
            for a in self.tx_buffer:
                n.queue(encode(a), None)
            self.tx_buffer = []
        if self.tx_node is None:
            self.tx_buffer.append(args)
            self._local(_QUEUED)
            return
        self._emit(self.conn(self.tx_node), args, Reply(None))

    # --- redirects -------------------------------------------------------------------
    async def _follow(self, r: Reply, raw: bytes) -> None:
        """Follow MOVED/ASK/TRYAGAIN/CLUSTERDOWN within the budget; the command's keys are dirty."""
        side = self.side
        args = r.args
        deadline = time.monotonic() + REDIRECT_BUDGET
        kinds: set[str] = set()
        try:
            for _ in range(MAX_REDIRECTS):
                kind, addr = _redirect(raw)
                if not kind:
                    break
                kinds.add(kind)
                side.redirects[kind] += 1
                if side.stats is not None:
                    side.stats.cluster_redirects[(side.side_name, kind)] += 1
                if time.monotonic() > deadline:
                    break
                try:
                    if kind == "moved":
                        try:
                            known = side.slot_owner[int(raw.split(None, 2)[1]) % cluster.SLOTS] == addr
                        except (IndexError, ValueError):
                            known = False
                        if not known:  # (a command whose keys the table does not name went to slot 0's owner)
                            await side.refresh("MOVED")
                        raw = await self.call(addr, args)
                    elif kind == "ask":
                        raw = await self.call(addr, args, asking=True)
                    else:
                        await asyncio.sleep(RETRY_SLEEP)
                        await side.refresh(kind.upper())
                        slot, _one = self._slot_of(args)
                        raw = await self.call(side.owner(slot) if slot is not None else self._default(), args)
                except CannotConnect as e:
                    raw = b"-CLUSTERDOWN " + str(e).encode() + b"\r\n"
            self._dirty_if_write(args, kinds)
            if _redirect(raw)[0] in ("moved", "ask"):
                # Never hand a node's address to the client: it would bypass the shim.
                raw = b"-TRYAGAIN migrator shim: the slot is moving in the " + side.side_name.encode() + b"; retry\r\n"
        except NodeLost:
            raw = LOST
        r.raw = raw
        self.hold -= 1
        self.flush()
        self.resume()

    def _dirty_if_write(self, args: list[bytes], kinds: set[str]) -> None:
        c = self.side.classify(args)
        if c.cls in WRITE_LIKE:
            keys = c.keys(args)
            if keys:
                self.side.on_dirty(keys, f"{self.side.side_name}-slot-in-flight ({'/'.join(sorted(kinds))})",
                                   args[0].lower())


def _bulk_text(raw: bytes) -> bytes:
    """The text of a bulk ($) or verbatim (=) string reply."""
    eol = raw.find(b"\r\n")
    body = raw[eol + 2 : -2]
    return body[4:] if raw[:1] == b"=" else body


def _as_reply(raw: bytes, text: bytes) -> bytes:
    if raw[:1] == b"=":
        eol = raw.find(b"\r\n")
        return b"=%d\r\n%s%s\r\n" % (len(text) + 4, raw[eol + 2 : eol + 6], text)
    return b"$%d\r\n%s\r\n" % (len(text), text)
