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
- pub/sub pins the connection to one node and passes its bytes through.

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
from typing import Any, Callable

import redis

from migrator import cluster
from migrator.connect import ssl_context
from migrator.playbook import Endpoint
from migrator.shim.entry import WRITE_LIKE
from migrator.shim.resp import OK, Framer, ProtocolError, RequestParser, encode, error_reply, is_error, parse
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
_SUBSCRIBE = frozenset({b"subscribe", b"psubscribe", b"ssubscribe"})


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
    if head.startswith(b"MOVED ") or head.startswith(b"ASK "):
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


class NodeConn(asyncio.Protocol):
    """One connection from a RouterConn to one node: replies are matched to futures in order."""

    def __init__(self, owner: "RouterConn", addr: tuple[str, int]) -> None:
        self.owner = owner
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        self.framer = Framer()
        self.waiting: deque[asyncio.Future | None] = deque()  # None: a reply to drop (handshake, ASKING)
        self.lost: str | None = None
        self.passthrough = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.passthrough:
            self.owner.write(data)
            return
        for frame in self.framer.feed(data):
            if frame[:1] == b">" and not self.waiting:
                continue  # a RESP3 push nobody asked for (invalidation...): not a reply
            if not self.waiting:
                continue
            fut = self.waiting.popleft()
            if fut is not None and not fut.done():
                fut.set_result(frame)

    def connection_lost(self, exc) -> None:
        self.lost = f"connection to {self.addr[0]}:{self.addr[1]} lost ({exc or 'closed by the node'})"
        while self.waiting:
            fut = self.waiting.popleft()
            if fut is not None and not fut.done():
                fut.set_exception(NodeLost(self.lost))
        self.owner.node_lost(self)

    def send(self, payload: bytes, replies: list[asyncio.Future | None]) -> None:
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            for f in replies:
                if f is not None and not f.done():
                    f.set_exception(NodeLost(self.lost or "connection closed"))
            return
        self.waiting.extend(replies)
        self.transport.write(payload)


class RouterConn(asyncio.Protocol):
    """One connection from the shim to a cluster side."""

    def __init__(self, side: ClusterSide) -> None:
        self.side = side
        self.loop = side.loop
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(1 << 30)
        self.authed = False
        self.nodes: dict[tuple[str, int], NodeConn] = {}
        self.connecting: dict[tuple[str, int], asyncio.Future] = {}
        self.state: dict[str, list[bytes]] = {}  # HELLO / CLIENT SETNAME replayed on each node connection
        self.inq: deque[list[bytes]] = deque()
        self.outq: asyncio.Queue = asyncio.Queue()
        self.wake = asyncio.Event()
        self.unblocked = asyncio.Event()
        self.unblocked.set()
        self.tx_node: tuple[str, int] | None = None  # WATCH / MULTI pinned here
        self.tx_slot: int | None = None
        self.tx_buffer: list[list[bytes]] | None = None  # MULTI and keyless commands before its node is known
        self.tx_abort = False
        self.passthrough: NodeConn | None = None
        self.closed = False
        self.tasks: list[asyncio.Task] = []
        self.owed = 0  # commands taken whose reply is not written yet

    # --- the shim's side -------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.side.conns.add(self)
        self.tasks = [self.loop.create_task(self._dispatch_loop()), self.loop.create_task(self._reply_loop())]

    def data_received(self, data: bytes) -> None:
        if self.passthrough is not None:
            self.passthrough.transport.write(data)
            return
        try:
            cmds = self.parser.feed(data)
        except ProtocolError as e:
            self.write(error_reply(f"ERR Protocol error: {e}"))
            self.close()
            return
        if cmds:
            self.inq.extend(cmds)
            self.wake.set()

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
        for t in self.tasks:
            t.cancel()
        for n in self.nodes.values():
            if n.transport is not None:
                n.transport.close()
        if self.transport is not None:
            self.transport.close()

    def node_lost(self, n: NodeConn) -> None:
        if self.nodes.get(n.addr) is n:
            del self.nodes[n.addr]
        if n.passthrough:
            self.close()
        if not self.closed and not self.side.stopping:
            self.loop.create_task(self.side.refresh("node connection lost"))

    # --- node connections -------------------------------------------------------------
    async def node(self, addr: tuple[str, int]) -> NodeConn:
        n = self.nodes.get(addr)
        if n is not None and n.lost is None:
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
            n.send(b"".join(encode(a) for a in hs), futs)
            for a, f in zip(hs, futs):
                raw = await f
                if is_error(raw) and a[0].upper() == b"AUTH":
                    n.transport.close()
                    raise CannotConnect(f"{addr[0]}:{addr[1]} refused the playbook's credentials: "
                                   f"{raw[1:].strip().decode(errors='replace')}")
        return n

    async def call(self, addr: tuple[str, int], args: list[bytes], asking: bool = False) -> bytes:
        n = await self.node(addr)
        fut = self.loop.create_future()
        if asking:
            n.send(encode([b"ASKING"]) + encode(args), [None, fut])
        else:
            n.send(encode(args), [fut])
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
        slots = {cluster.key_slot(k) for k in keys}
        return next(iter(slots)), len(slots) == 1

    def _default(self) -> tuple[str, int]:
        return self.side.owner(0)

    async def _dispatch_loop(self) -> None:
        while True:
            while not self.inq:
                self.wake.clear()
                await self.wake.wait()
            args = self.inq.popleft()
            await self.unblocked.wait()
            try:
                await self._dispatch(args)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - one command's failure is its reply
                self._answer(error_reply(f"ERR migrator shim: {e}"))

    def _put(self, item) -> None:
        self.owed += 1
        self.outq.put_nowait(item)

    def _answer(self, raw: bytes) -> None:
        fut = self.loop.create_future()
        fut.set_result(raw)
        self._put((None, fut))

    async def _dispatch(self, args: list[bytes]) -> None:
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
                self._answer(OK)
            else:
                self._answer(b"-NOAUTH Authentication required.\r\n")
            return
        if name in (b"auth", b"readonly", b"readwrite", b"asking"):
            self._answer(OK)  # reads go to the primaries: READONLY changes nothing here
            return
        if name == b"reset":
            await self._reset()
            return
        if name == b"quit":
            self._answer(OK)
            self._put(("close", None))
            return
        if name == b"select":
            self._answer(OK if len(args) == 2 and args[1] == b"0" else
                         b"-ERR SELECT is not allowed in cluster mode\r\n")
            return
        if name == b"hello" or (name == b"client" and len(args) == 3 and args[1].lower() == b"setname"):
            raw = await self._on_every_node(args, replay=True)
            self._put((None, _done(self.loop, raw)))
            return
        if name in _SUBSCRIBE:
            await self._subscribe(args, name)
            return
        if self.tx_buffer is not None or name == b"multi":
            await self._tx(args, name)
            return
        slot, one = self._slot_of(args)
        if not one:
            self.side.count_crossslot()
            self._answer(CROSSSLOT)
            return
        if name == b"watch":
            if self.tx_slot is not None and slot != self.tx_slot:
                self.side.count_crossslot()
                self._answer(CROSSSLOT)
                return
            self.tx_slot, self.tx_node = slot, self.side.owner(slot)
        elif name == b"unwatch" and self.tx_node is not None:
            node = self.tx_node
            self.tx_slot = self.tx_node = None
            self._put((args, self._send(node, args)))
            return
        if slot is None:
            if name == b"dbsize" or name == b"keys" or name == b"scan" or name in _ALL_PRIMARIES or (
                    len(args) > 1 and (name, args[1].lower()) in _ALL_PRIMARIES_SUB):
                self._put((None, self.loop.create_task(self._fan_out(args, name))))
                return
            if name == b"info":
                self._put((None, self.loop.create_task(self._info(args))))
                return
            node = self.tx_node or self._default()
        else:
            node = self.tx_node if self.tx_node is not None else self.side.owner(slot)
        fut = self._send(node, args)
        self._put((args, fut))
        if name in _BLOCKING or (name in (b"xread", b"xreadgroup") and any(a.lower() == b"block" for a in args)):
            # A server serves nothing else on a connection while a command blocks it.
            with contextlib.suppress(Exception):
                await asyncio.shield(fut)

    def _send(self, node: tuple[str, int], args: list[bytes]) -> asyncio.Future:
        n = self.nodes.get(node)
        if n is not None and n.lost is None:
            fut = self.loop.create_future()
            n.send(encode(args), [fut])
            return fut
        return self.loop.create_task(self.call(node, args))

    async def _on_every_node(self, args: list[bytes], replay: bool) -> bytes:
        """A connection setting (HELLO, CLIENT SETNAME): on every node connection open, and
        replayed on those opened later; the reply is the default node's."""
        raw = await self.call(self._default(), args)
        if replay and not is_error(raw):
            cmd = list(args)
            if cmd[0].lower() == b"hello":
                if len(cmd) < 2:
                    return raw  # HELLO alone changes nothing
                if len(cmd) > 2 and b"setname" in (a.lower() for a in cmd):
                    i = [a.lower() for a in cmd].index(b"setname")
                    self.state["name"] = [b"CLIENT", b"SETNAME", cmd[i + 1]]
                cmd = cmd[:2]  # AUTH / SETNAME options: the login is the playbook's
                self.state = {"hello": cmd, **{k: v for k, v in self.state.items() if k != "hello"}}
            else:
                self.state["name"] = cmd
            for addr, n in list(self.nodes.items()):
                if addr != self._default() and n.lost is None:
                    n.send(encode(cmd), [None])
        return raw

    async def _reset(self) -> None:
        """RESET (the shim's connection pool): every node connection reset and logged in again."""
        while self.owed:
            await asyncio.sleep(0.001)
        ep = self.side.ep
        again = encode([b"RESET"])
        if ep.password:
            again += encode([b"AUTH", *([ep.user.encode()] if ep.user else []), ep.password.encode()])
        for n in self.nodes.values():
            n.send(again, [None, None] if ep.password else [None])
        self.state.clear()
        self.tx_node = self.tx_slot = self.tx_buffer = None
        self.tx_abort = False
        self.authed = False
        self._answer(b"+RESET\r\n")

    async def _info(self, args: list[bytes]) -> bytes:
        """INFO from the owner of slot 0, with the router's own run_id (a failover must not look
        like a restart of the whole side; see docs/shim.md)."""
        raw = await self.call(self._default(), args)
        if raw.find(b"run_id:") < 0 or is_error(raw):
            return raw
        text = _bulk_text(raw)
        j = text.find(b"run_id:")
        end = text.find(b"\r\n", j)
        text = text[:j] + b"run_id:" + self.side.run_id + text[end:]
        return _as_reply(raw, text)

    async def _fan_out(self, args: list[bytes], name: bytes) -> bytes:
        primaries = self.side.primaries()
        if name == b"scan":
            return await self._scan(args, primaries)
        replies = await asyncio.gather(*(self.call(a, args) for a in primaries))
        errors = [r for r in replies if is_error(r)]
        if errors:
            return errors[0]
        if name == b"dbsize":
            return b":%d\r\n" % sum(parse(r) for r in replies)
        if name == b"keys":
            keys = [k for r in replies for k in parse(r)]
            return b"*%d\r\n" % len(keys) + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys)
        return replies[0]

    async def _scan(self, args: list[bytes], primaries: list[tuple[str, int]]) -> bytes:
        """SCAN over the primaries in slot order: cursor = node cursor * 1024 + node index."""
        try:
            composite = int(args[1])
        except (IndexError, ValueError):
            return b"-ERR invalid cursor\r\n"
        index, cursor = composite % 1024, composite // 1024
        if index >= len(primaries):
            return b"*2\r\n$1\r\n0\r\n*0\r\n"
        raw = await self.call(primaries[index], [args[0], str(cursor).encode(), *args[2:]])
        if is_error(raw):
            return raw
        nxt, keys = parse(raw)
        nxt = int(nxt)
        if nxt == 0:
            index, nxt = index + 1, 0
            if index >= len(primaries):
                index = 0
                out = b"0"
            else:
                out = str(index).encode()
        else:
            out = str(nxt * 1024 + index).encode()
        return (b"*2\r\n$%d\r\n%s\r\n" % (len(out), out) + b"*%d\r\n" % len(keys)
                + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys))

    async def _subscribe(self, args: list[bytes], name: bytes) -> None:
        """Pub/sub: wait for the replies before it, then pass this connection's bytes through to
        one node (the channel's slot owner for SSUBSCRIBE; the owner of slot 0 otherwise)."""
        while self.owed:
            await asyncio.sleep(0.001)
        addr = self.side.owner(cluster.key_slot(args[1])) if name == b"ssubscribe" and len(args) > 1 else self._default()
        n = await self.node(addr)
        self.passthrough = n
        n.passthrough = True
        rest = [args, *self.inq]
        self.inq.clear()
        n.transport.write(b"".join(encode(a) for a in rest))

    async def _tx(self, args: list[bytes], name: bytes) -> None:
        """MULTI ... EXEC on the node of the transaction's first key (or the WATCHed key's)."""
        if name == b"multi":
            if self.tx_buffer is not None:
                self._answer(b"-ERR MULTI calls can not be nested\r\n")
                return
            self.tx_buffer, self.tx_abort = [args], False
            self._answer(OK)
            if self.tx_node is not None:
                self._send(self.tx_node, args).add_done_callback(_ignore)
                self.tx_buffer = []
            return
        if name in (b"exec", b"discard"):
            buffered, self.tx_buffer = self.tx_buffer, None
            node, abort = self.tx_node, self.tx_abort
            self.tx_node = self.tx_slot = None
            self.tx_abort = False
            if node is None:
                node = self._default()
                for a in buffered:
                    self._send(node, a).add_done_callback(_ignore)
            if abort:
                self._send(node, [b"DISCARD"]).add_done_callback(_ignore)
                self._answer(b"-EXECABORT Transaction discarded because of previous errors.\r\n"
                             if name == b"exec" else OK)
                return
            self._put((None, self._send(node, args)))
            return
        slot, one = self._slot_of(args)
        if not one or (slot is not None and self.tx_slot is not None and slot != self.tx_slot):
            self.side.count_crossslot()
            self.tx_abort = True
            self._answer(CROSSSLOT)
            return
        if slot is not None and self.tx_node is None:
            self.tx_slot, self.tx_node = slot, self.side.owner(slot)
            for a in self.tx_buffer:
                self._send(self.tx_node, a).add_done_callback(_ignore)
            self.tx_buffer = []
        if self.tx_node is None:
            self.tx_buffer.append(args)
            self._answer(_QUEUED)
            return
        self._put((None, self._send(self.tx_node, args)))

    # --- replies, in order ----------------------------------------------------------
    async def _reply_loop(self) -> None:
        while True:
            args, fut = await self.outq.get()
            if args == "close":
                self.close()
                return
            try:
                try:
                    raw = await fut
                except CannotConnect as e:
                    if args is None:
                        raise
                    self.unblocked.clear()  # nothing was sent: retried on the slot's owner as read again
                    raw = await self._follow(args, b"-CLUSTERDOWN " + str(e).encode() + b"\r\n")
                else:
                    if args is not None and _redirect(raw)[0]:
                        self.unblocked.clear()  # nothing more is sent until the retries are done
                        raw = await self._follow(args, raw)
            except NodeLost as e:
                # What the shim would see from a server that went away: the connection drops
                # (it marks the writes in flight dirty and reconnects).
                self.side.log.warning("shim.cluster_node_lost", side=self.side.side_name, error=str(e))
                if not self.side.stopping:
                    self.loop.create_task(self.side.refresh("node lost"))
                self.close()
                return
            self.write(raw)
            self.owed -= 1
            if self.owed == 0:
                self.unblocked.set()

    async def _follow(self, args: list[bytes], raw: bytes) -> bytes:
        """Follow MOVED/ASK/TRYAGAIN/CLUSTERDOWN within the budget; the command's keys are dirty."""
        side = self.side
        deadline = time.monotonic() + REDIRECT_BUDGET
        kinds = set()
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
        c = side.classify(args)
        if c.cls in WRITE_LIKE:
            keys = c.keys(args)
            if keys:
                side.on_dirty(keys, f"{side.side_name}-slot-in-flight ({'/'.join(sorted(kinds))})", args[0].lower())
        kind, _ = _redirect(raw)
        if kind in ("moved", "ask"):
            # Never hand a node's address to the client: it would bypass the shim.
            return b"-TRYAGAIN migrator shim: the slot is moving in the " + side.side_name.encode() + b"; retry\r\n"
        return raw


def _done(loop, raw: bytes) -> asyncio.Future:
    f = loop.create_future()
    f.set_result(raw)
    return f


def _ignore(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()


def _bulk_text(raw: bytes) -> bytes:
    """The text of a bulk ($) or verbatim (=) string reply."""
    eol = raw.find(b"\r\n")
    body = raw[eol + 2 : -2]
    return body[4:] if raw[:1] == b"=" else body


def _as_reply(raw: bytes, text: bytes) -> bytes:
    if raw[:1] == b"=":
        return b"=%d\r\n%s%s\r\n" % (len(text) + 4, raw[raw.find(b"\r\n") + 2 : raw.find(b"\r\n") + 6], text)
    return b"$%d\r\n%s\r\n" % (len(text), text)
