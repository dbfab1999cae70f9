"""The shim's controller: the listener, the phase, the admin endpoint, timers, and running it.

The sockets themselves are in ``io`` (client and upstream connections); what to do with bytes
is in ``session`` (per connection, no sockets) and the pure modules it uses. ``Shim`` is the
sessions' host (``host.ShimHost``). One ``Shim`` runs on one asyncio loop (uvloop when
installed). Background tasks:

- every ``POLL_INTERVAL``: re-read ``state.json`` when its mtime changes and apply a new phase
  (with the etcd control plane: take the newest state a watch delivered, ``control.etcd.StateFollower``);
  once the commands issued under the old generation have finished (bounded wait), publish the
  new generation through ``migrator.registry`` — that is the acknowledgement ``advance`` and
  ``rollback`` wait for;
- every ``registry.HEARTBEAT``: heartbeat record, divergence counters, dirty marks (written off
  the loop, in a thread);
- every few milliseconds: shadow timeouts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migrator import registry
from migrator.connect import make_client, ssl_context
from migrator.errors import UnreachableError, UsageError
from migrator.logs import get_logger
from migrator.phases import Phase
from migrator.playbook import Playbook, split_hostport
from migrator.reports import reports_dir
from migrator.shim import admin as admin_http
from migrator.shim import metrics, restore
from migrator.shim.commands import (
    SIDE_NAMES,
    SOURCE,
    TARGET,
    CommandTable,
    parse_command_reply,
)
from migrator.cluster import is_cluster
from migrator.shim.clusterside import ClusterSide
from migrator.shim.dirty import DirtyRecorder
from migrator.shim.facade import Facade
from migrator.shim.divergence import DivergenceRecorder, latest_complete_sync
from migrator.shim.mux import Mux, SharedLink
from migrator.shim.pool import Pool
from migrator.shim.lag import OffsetTracker
from migrator.shim.replwatch import ReplicaWatch
from migrator.shim.routing import DUAL_WRITE, REPLICATION, mode_of, replica_side, roles_for, routes_for
from migrator.shim.sequencer import Sequencer
from migrator.shim.resp import run_id_of
from migrator.shim.io import ClientProtocol, bind_errors, connect_shared, connect_upstream, new_loop, tls_server_context
from migrator.shim.scripts import sha1_hex
from migrator.shim.sentinelwatch import SentinelWatch
from migrator.shim.session import Session
from migrator.state import (
    StateError,
    StateStore,
    atomic_write_json,
    iso,
    now,
    parse_iso,
)

POLL_INTERVAL = 0.1  # seconds between checks of state.json (the spec allows up to 1 s)
HOLD_POLL_INTERVAL = 0.005
TABLE_RETRY = 5.0  # seconds between attempts to read a side's COMMAND table that was down
MAX_BACKOFF = 5.0
DRAIN_TIMEOUT = 10.0  # seconds SIGTERM waits for in-flight commands


class SideHealth:
    """Reconnection backoff for one side, shared by every session."""

    def __init__(self) -> None:
        self.failures = 0
        self.retry_at = 0.0
        self.last_reason = ""

    def to_json(self) -> dict[str, Any]:
        return {"state": "down" if self.failures else "up", "failures": self.failures, "last_error": self.last_reason or None}


def _one_shot_client(ep, timeout: float | None = None) -> redis.Redis:
    extra: dict[str, Any] = {"retry": Retry(NoBackoff(), 0)}
    if timeout is not None:
        extra["socket_timeout"] = max(ep.socket_timeout.total_seconds(), timeout)
    return make_client(ep, **extra)  # (a Sentinel endpoint's: to the primary of the moment)


def _raw_replies(ep, *commands: tuple, timeout: float | None = None, what: str = "", keep_errors: bool = False) -> list:
    """Send ``commands`` on one fresh connection to ``ep`` and return their raw replies (blocking; run off the loop).

    No retry: a side that is down is retried by the caller's own loop, not here. ``keep_errors``:
    a server's error reply is returned as its ``ResponseError`` rather than raised.
    """
    client = _one_shot_client(ep, timeout)
    try:
        conn = client.connection_pool.get_connection()
        try:
            replies = []
            for cmd in commands:
                conn.send_command(*cmd)
                try:
                    replies.append(conn.read_response())
                except redis.exceptions.ResponseError as e:
                    if not keep_errors:
                        raise
                    replies.append(e)
            return replies
        finally:
            client.connection_pool.release(conn)
    except (redis.exceptions.RedisError, OSError) as e:
        raise UnreachableError(f"{ep.display}: cannot read {what or commands[0][0]} ({e})") from None
    finally:
        client.close()


def _probe_cluster(ep) -> bool:
    """Whether ``ep`` runs with cluster mode on (blocking; run off the loop)."""
    client = _one_shot_client(ep)
    try:
        return is_cluster(client)
    except (redis.exceptions.RedisError, OSError) as e:
        raise UnreachableError(f"{ep.display}: cannot read INFO cluster ({e})") from None
    finally:
        client.close()


def load_command_table(ep) -> dict:
    """The parsed ``COMMAND`` reply of one endpoint (blocking; run off the loop).

    Where the server refuses ``COMMAND`` (a managed service renames it away or an ACL denies
    it), the table shipped with migrator for the server's version family stands in
    (``migrator.shim.command_tables``, docs/shim.md "Without COMMAND").
    """
    from migrator.compat.rpc import is_restricted
    from migrator.shim import command_tables

    (reply, server) = _raw_replies(ep, ("COMMAND",), ("INFO", "server"), timeout=10, keep_errors=True)
    if isinstance(reply, redis.exceptions.ResponseError):
        if not is_restricted(reply) or isinstance(server, redis.exceptions.ResponseError):
            raise UnreachableError(f"{ep.display}: cannot read COMMAND ({reply}) or INFO server ({server})")
        server = _text(server)
        fields = dict(line.split(b":", 1) for line in server.splitlines() if b":" in line)
        valkey = fields.get(b"server_name", b"").strip() == b"valkey" or b"valkey_version" in fields
        kind = "valkey" if valkey else "redis"
        version = fields.get(b"valkey_version" if kind == "valkey" else b"redis_version", b"0").strip().decode()
        family = command_tables.family_for(kind, version)
        get_logger("shim").warning("shim.command_table_shipped", server=ep.display, refused=str(reply).splitlines()[0],
                                 family=family, version=f"{kind} {version}")
        reply = command_tables.load_reply(family)
    return parse_command_reply(reply)


def _text(x) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


def read_side_info(ep) -> tuple[bytes | None, list[int]]:
    """(run_id, databases holding keys) of one endpoint (blocking; run off the loop)."""
    server, keyspace = map(_text, _raw_replies(ep, ("INFO", "server"), ("INFO", "keyspace"), what="INFO"))
    dbs = [int(line[2 : line.index(b":")]) for line in keyspace.splitlines()
           if line.startswith(b"db") and b":" in line and line[2 : line.index(b":")].isdigit()]
    return run_id_of(server), dbs


def load_rdb_version(ep) -> int | None:
    """The RDB version one endpoint writes, from ``INFO server`` (blocking; None if unknown)."""
    client = _one_shot_client(ep)
    try:
        return restore.rdb_version_of(client.info("server"))
    except (redis.exceptions.RedisError, OSError):
        return None
    finally:
        client.close()


class Shim:
    """One shim process (or worker): listener, sessions, phase, counters."""

    def __init__(self, playbook: Playbook, *, listen: str | None = None, admin: str | None = None,
                 shim_id: str | None = None, reuse_port: bool = False, worker: int | None = None) -> None:
        self.playbook = playbook
        self.cfg = playbook.shim
        self.listen = listen or self.cfg.listen
        self.admin_addr = self.cfg.admin if admin is None else admin
        self.reuse_port = reuse_port
        self.worker = worker
        self.endpoints = (playbook.source, playbook.target)
        self.endpoint_dbs = (playbook.source.db, playbook.target.db)  # parsed from the URL once, not per command
        self.state_dir = playbook.state_path
        self.store = StateStore(self.state_dir, playbook.name)
        _host, port = split_hostport(self.listen)
        # The start time (ms) keeps a restarted container's shim (PID 1 again, same pod name) from
        # taking over the registration a killed predecessor left for no_lost_shims.
        self.id = shim_id or (f"{socket.gethostname()}-{port}-{os.getpid()}-{time.time_ns() // 1_000_000}"
                              + (f"-w{worker}" if worker is not None else ""))
        pw = self.cfg.client_password
        self.password: bytes | None = pw.encode() if pw else None
        # shim.auth: passthrough: each client's own login goes to the servers (connstate._forward_login).
        self.passthrough = self.cfg.auth_mode == "passthrough"
        self.shadow_timeout = self.cfg.shadow_timeout.total_seconds()
        self.ttl_tolerance_ms = int(playbook.check.ttl_tolerance.total_seconds() * 1000)
        self.stats = metrics.Stats()
        self.dirty = DirtyRecorder(self.state_dir, self.id)
        self.divergence = DivergenceRecorder(self.state_dir, self.id, self.cfg.log_values)
        self.table = CommandTable(None, None)
        self.rdb_versions: list[int | None] = [None, None]  # what each side's DUMP writes (see shim.restore)
        self.phase = Phase.PLANNED
        self.generation = -1
        self.mode = DUAL_WRITE  # how the second server is kept in step (routing.mode_of)
        self.routes = routes_for(self.phase, self.mode)
        self.lag_aware = False
        self.ryw = False
        self.sequence_keys = True
        self.tracker = OffsetTracker()
        self.watch: ReplicaWatch | None = None  # started with the loop (start)
        self.sentinels = SentinelWatch(self)  # Sentinel-managed sides: +switch-master (shim.sentinelwatch)
        self.applied_generation = -1
        self.applied_phase = self.phase
        self._ack: tuple[int, float] | None = None  # (generation, deadline) awaiting the drain
        self.sessions: set[Session] = set()
        self.outstanding: dict[int, int] = {}
        self.mirror_depth = 0
        # Commands one connection may have in flight (and in the mirror queue) before it is no
        # longer read (back-pressure, see Session._flow): a share, so no one fills the queue.
        self.client_window = max(64, self.cfg.mirror_queue_size // 8)
        # Per-key order of writes across this process's connections (the timer for handing a
        # key to a woken blocking command's effect needs the loop: set in start()).
        self.seq = Sequencer()
        self.health = (SideHealth(), SideHealth())
        self.script_bodies: dict[bytes, bytes] = {}
        self.scripts_loaded: tuple[set[bytes], set[bytes]] = (set(), set())
        self._warned: set[tuple[str, int, bytes]] = set()
        self._sample_acc = 0.0
        self.log = get_logger("migrator.shim", shim=self.id)
        self.started_at = iso(now())
        self.stopping = False
        self.ssl_contexts = (ssl_context(playbook.source), ssl_context(playbook.target))
        self._server: asyncio.AbstractServer | None = None
        self._admin: asyncio.AbstractServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopped: asyncio.Event | None = None
        self._state_sig: tuple | None = None
        self.follower = None  # with the etcd control plane: the watch on the state key
        self.control_error: str | None = None  # the last failure to publish to the control plane
        self.control_down_since: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.extra_stats = None  # a supervisor's function adding its workers' numbers
        # The write switch's barrier (see docs/phases.md): hold new commands, drain, report.
        self.holding = False
        self.barrier = None
        self.barrier_state: str | None = None
        self.hold_started = 0.0
        self.hold_deadline = 0.0
        self.last_pause_ms: float | None = None
        self._reports_mtime = 0
        self.stalled_until = 0.0  # until then the shim is not sure a late reply is the side's fault
        # Each side's run_id as last seen (INFO server on every upstream connection in a two-sided
        # phase, and every heartbeat): a new one is a restart (see side_restarted).
        self.run_ids: list[bytes | None] = [None, None]
        # Whether each side answered the last background INFO probe (None: not probed yet): a
        # side can be down while no client connection has tried it (migrator_shim_side_up).
        self.side_reachable: list[bool | None] = [None, None]
        self.restarts: list[list[dict]] = [[], []]
        self.known_dbs: tuple[set[int], set[int]] = (set(), set())  # databases each side had keys in
        self._info_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="migrator-shim-info")
        self._run_id_task: asyncio.Task | None = None
        # Stateless clients share upstream connections in the one-sided phases (shim.mux).
        # (Not with passthrough logins: a shared connection is logged in as one user.)
        self.mux = Mux(self, 0 if self.passthrough else self.cfg.shared_connections, lambda cb: self.loop.call_soon(cb),
                       self._open_shared)
        # Upstream connections of ended sessions, reset for the next one (shim.pool).
        self.pool = Pool(self, self.cfg.pool_size)
        # A side that is a Redis Cluster is reached through its slot router (shim.clusterside),
        # and clients then see the shim as a one-node cluster (shim.facade); set in start().
        self.clusters: list[ClusterSide | None] = [None, None]
        self.facade: Facade | None = None

    # --- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.seq.call_later = self.loop.call_later
        self._stopped = asyncio.Event()
        # An unreadable state must stop the start-up (first, before anything slow): serving
        # "planned" by default could send writes to the source after the write cutover.
        self._state_sig = None
        state = self.store.load()
        if state.endpoints_hash and state.endpoints_hash != self.playbook.endpoints_hash():
            # As advance and rollback refuse: a shim must not route this migration's phase to
            # other servers than the ones the migration started with.
            raise StateError(
                f"the playbook's source/target differ from the ones this migration started with ({self.state_dir}); "
                "a shim will not route the migration's phase to other servers: put the original endpoints back, "
                "or start a new migration with its own state_dir")
        if self.store.control is not None:
            from migrator.control.follow import StateFollower

            self.follower = StateFollower(self.store, idle=min(5.0, self.store.control.lease_ttl))
            self.follower.start(state, self.store._rev)
        try:
            await self._start_clusters()
        except BaseException:
            for c in self.clusters:  # (one side's router started, the other side's cluster unreachable)
                if c is not None:
                    await c.stop()
            if self.follower is not None:
                self.follower.stop()
            raise
        await asyncio.gather(self._load_table(SOURCE), self._load_table(TARGET))
        await self._watch_run_ids()  # the baseline a restart is told from
        # Only what the source has and the target lacks can fail an application's command once
        # the target serves it; the target's newer commands the source lacks were never used.
        missing = self.table.unknown_to(TARGET)
        if missing:
            self.log.warning("shim.commands_unknown", side=SIDE_NAMES[TARGET], count=len(missing),
                             commands=sorted(m.decode() for m in missing)[:50])
        # Known before the counters are resumed, so a restart keeps its "since the sync" counts.
        self._note_sync(latest_complete_sync(self.state_dir), state.phase_started)
        self.watch = ReplicaWatch(self)
        self.watch.start()
        self.sentinels.start()
        try:
            self._apply_state(state, initial=True)
            host, port = split_hostport(self.listen)
            with bind_errors(self.listen, "--listen", "shim.listen"):
                self._server = await self.loop.create_server(
                    lambda: ClientProtocol(self), host, port, ssl=tls_server_context(self.cfg), backlog=1024,
                    reuse_port=self.reuse_port or None, reuse_address=True)
            self.address = self._server.sockets[0].getsockname()[:2]
            if any(self.clusters):
                # One id for every worker and restart of this shim address (clients compare ids).
                self.facade = Facade(f"{self.playbook.name}@{self.listen}", self.address)
            # Loading the command tables took a while: a phase change or a write-switch barrier
            # written meanwhile applies before the first client is served.
            self._apply_state(self._read_state(force=True))
            if self.admin_addr:
                ahost, aport = split_hostport(self.admin_addr)
                try:
                    with bind_errors(self.admin_addr, "--admin", "shim.admin", "or --admin '' to disable it"):
                        self._admin = await admin_http.start(ahost, aport, {
                            "/metrics": lambda: ("text/plain; version=0.0.4; charset=utf-8",
                                                 metrics.render(self.metrics_stats, self._extra)),
                            "/status": admin_http.json_route(self.status),
                        })
                except UsageError:
                    self._server.close()
                    raise
                self.admin_address = self._admin.sockets[0].getsockname()[:2]
        except BaseException:
            # Not listening after all (the port is taken, a bad TLS file): nothing may outlive it.
            for c in self.clusters:
                if c is not None:
                    await c.stop()
            await self.watch.stop()
            await self.sentinels.stop()
            if self.follower is not None:
                self.follower.stop()
            raise
        await self._publish()
        for coro in (self._poll_loop(), self._heartbeat_loop(), self._sweep_loop(), self._run_id_loop()):
            self._tasks.append(asyncio.create_task(coro))
        self.log.info("shim.started", listen=self.listen, admin=self.admin_addr, phase=str(self.phase),
                      generation=self.generation, source=self.endpoints[0].display, target=self.endpoints[1].display,
                      auth=self.cfg.auth_mode)

    async def _start_clusters(self) -> None:
        """Route each side that is a Redis Cluster through a slot router of its own (shim.clusterside)."""
        for side in (SOURCE, TARGET):
            ep = self.endpoints[side]
            if ep.kind != "server":
                continue
            try:
                is_cl = bool(ep.seeds) or await self.loop.run_in_executor(None, _probe_cluster, ep)
            except UnreachableError as e:
                self.log.warning("shim.cluster_probe_failed", side=SIDE_NAMES[side], error=str(e))
                continue  # down: served as a standalone server, as before
            if not is_cl:
                continue
            if self.passthrough:
                raise UsageError(f"shim.auth: passthrough is not supported with a cluster {SIDE_NAMES[side]} "
                                 f"({ep.display}): use shim.auth: password")
            cs = ClusterSide(ep, SIDE_NAMES[side], log=self.log, classify=lambda a: self.table.classify(a),
                             on_dirty=self._slot_in_flight, stats=self.stats)
            await cs.start()
            self.clusters[side] = cs
            eps = list(self.endpoints)
            eps[side] = cs.endpoint
            self.endpoints = (eps[0], eps[1])
            ctxs = list(self.ssl_contexts)
            ctxs[side] = None  # the router speaks TLS to the nodes; the loopback hop is plain
            self.ssl_contexts = (ctxs[0], ctxs[1])
            self.log.info("shim.cluster_side", side=SIDE_NAMES[side], primaries=len(cs.primaries()),
                          nodes=len(cs.topo.nodes))

    def _slot_in_flight(self, keys: list[bytes], reason: str, command: bytes) -> None:
        """A write met a redirect on a cluster side: its keys are dirty, as for a one-side failure."""
        if not self.two_sided():
            return
        self.dirty.add(0, keys, reason, command)
        self.stats.dirty_marked["slot-in-flight"] += 1

    def facade_reply(self, args: list[bytes], client) -> bytes | None:
        """A CLUSTER command answered by the shim as a one-node cluster (None: not answered here)."""
        addr = None
        transport = getattr(client, "transport", None)
        if transport is not None:
            sock = transport.get_extra_info("sockname")
            if isinstance(sock, tuple):
                addr = (sock[0], sock[1])
        return self.facade.answer(args, addr)

    def topology_changes(self) -> dict[str, Any] | None:
        """Topology changes the cluster sides' routers noticed (gate evidence); None without a cluster side."""
        if not any(self.clusters):
            return None
        out: dict[str, Any] = {SIDE_NAMES[i]: (c.changes if c else 0) for i, c in enumerate(self.clusters)}
        lasts = [c.last_change for c in self.clusters if c and c.last_change]
        out["last"] = max(lasts) if lasts else None
        return out

    async def _load_table(self, side: int) -> bool:
        try:
            table = await self.loop.run_in_executor(None, load_command_table, self.endpoints[side])
        except UnreachableError as e:
            self.log.warning("shim.command_table_unavailable", side=SIDE_NAMES[side], error=str(e))
            return False
        self.table.set_table(side, table)
        self.rdb_versions[side] = await self.loop.run_in_executor(None, load_rdb_version, self.endpoints[side])
        return True

    async def stop(self, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """Stop accepting, let in-flight commands finish on both sides, then close everything."""
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        self.log.info("shim.stopping", connections=len(self.sessions))
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.client.pause_reading()
        deadline = time.monotonic() + drain_timeout
        while any(not s.drained() for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for s in list(self.sessions):
            s.close("shim stopping")
        self.mux.stop()
        self.pool.stop()
        for c in self.clusters:
            if c is not None:
                await c.stop()
        if self.watch is not None:
            await self.watch.stop()
        await self.sentinels.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._admin is not None:
            self._admin.close()
        if self._run_id_task is not None:
            self._run_id_task.cancel()
        self._info_pool.shutdown(wait=False, cancel_futures=True)
        await self.loop.run_in_executor(None, self._persist, self.divergence.take(), self.dirty.take(), None)
        if self.follower is not None:
            self.follower.stop()
        try:
            await self.loop.run_in_executor(None, registry.remove, self.state_dir, self.id)
        except UnreachableError as e:  # its lease expires on its own: then it counts as lost
            self.log.error("shim.deregister_failed", error=str(e))
        self.log.info("shim.stopped", commands=sum(self.stats.commands.values()))
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- phase ---------------------------------------------------------------------------
    def _read_state(self, force: bool = False):
        if self.follower is not None:
            return self.follower.latest()  # a watch delivered it (no I/O here)
        path = self.store.state_path
        try:
            st = path.stat()
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            sig = None
        if not force and sig == self._state_sig:
            return None
        if sig is None and self._state_sig is not None:
            # It was there: gone now (a restore in progress, a mistake). Serving the default
            # "planned" would send every write to the source only, whatever the phase is.
            self.log.error("shim.state_missing", path=str(path), keeping_phase=str(self.phase))
            self._state_sig = sig
            return None
        try:
            state = self.store.load()
        except StateError as e:
            # Keep the phase applied now (once per change of the file, not every poll).
            self.log.error("shim.state_unreadable", error=str(e), keeping_phase=str(self.phase))
            self._state_sig = sig
            return None
        self._state_sig = sig
        return state

    def _apply_state(self, state, initial: bool = False) -> None:
        if state is None:
            return
        if state.generation == self.generation and state.phase == self.phase:
            if mode_of(state.phase, state.mirror) != self.mode:
                self._apply_mode(state)  # the strategy recorded after the phase changed
            return
        self._apply_phase(state, initial)
        b = state.barrier
        if b is not None and b.generation == state.generation:
            # Never longer than max_pause, whatever the deadline says: it is a wall-clock time
            # written on another host (or before this host's clock stepped back).
            remaining = min((parse_iso(b.deadline) - now()).total_seconds(),
                            self.playbook.steps.write_cutover.max_pause.total_seconds())
            if remaining > 0 and (self.barrier is None or self.barrier.id != b.id):
                self._hold(b, remaining)
        elif self.holding:
            self._release("released")

    def _hold(self, barrier, remaining: float) -> None:
        if self.holding:
            self._release("superseded")
        self.holding = True
        self.barrier = barrier
        self.barrier_state = "holding"
        self.hold_started = time.monotonic()
        self.hold_deadline = self.hold_started + remaining
        self.log.info("shim.holding", barrier=barrier.id, purpose=barrier.purpose, deadline_s=round(remaining, 3))

    def _release(self, how: str) -> None:
        """Stop holding; what clients sent meanwhile is routed by the phase applied now."""
        self.holding = False
        self.last_pause_ms = round((time.monotonic() - self.hold_started) * 1000, 3)
        self.barrier_state = how
        self.log.info("shim.released", barrier=self.barrier.id if self.barrier else None, how=how,
                      pause_ms=self.last_pause_ms, phase=str(self.phase))
        for s in list(self.sessions):
            s.release()

    def _drained(self) -> bool:
        return all(s.drained() for s in self.sessions)

    async def _barrier_tick(self) -> None:
        if not self.holding:
            return
        if time.monotonic() >= self.hold_deadline:
            self._release("expired")
            await self._publish()
        elif self.barrier_state == "holding" and self._drained():
            self.barrier_state = "held"
            self.applied_generation, self.applied_phase = self.generation, self.phase
            self._ack = None
            await self._publish()

    def _apply_phase(self, state, initial: bool) -> None:
        old = self.phase
        self.phase = state.phase
        self.generation = state.generation
        self._set_mode(mode_of(self.phase, state.mirror))
        self.mux.phase_changed()
        self.divergence.start_generation(self.generation, self.phase.value)
        for s in list(self.sessions):
            s.on_phase(self.phase)
        if initial:
            self.applied_generation, self.applied_phase = self.generation, self.phase
            return
        self.log.info("shim.phase_changed", from_phase=str(old), to_phase=str(self.phase), generation=self.generation)
        # Commands issued under the old phase finish before the acknowledgement, so "acked"
        # means nothing is still in flight under the old routing. Bounded: a shadow that does
        # not answer is cut off after shadow_timeout anyway.
        bound = min(max(1.0, 2 * self.shadow_timeout), self.cfg.ack_timeout.total_seconds() / 2)
        self._ack = (self.generation, time.monotonic() + bound)

    def _set_mode(self, mode: str) -> None:
        """Route ``self.phase`` in ``mode``, and what the core does differently in it (see ``host.ShimHost``)."""
        self.mode = mode
        self.routes = routes_for(self.phase, mode)
        replica = replica_side(self.phase, mode)
        self.tracker.reset(None if replica is None else 1 - replica, replica)
        self.lag_aware = mode == REPLICATION  # reads are compared against (or answered by) a replica
        self.ryw = mode == REPLICATION and self.phase == Phase.READS_ON_TARGET and self.cfg.read_your_writes
        self.sequence_keys = mode == DUAL_WRITE  # otherwise the servers order the writes
        if replica is not None:
            self.tracker.demand(time.monotonic(), 0.05)  # a first reading now, not at the next slow poll

    def _apply_mode(self, state) -> None:
        old = self.mode
        self._set_mode(mode_of(state.phase, state.mirror))
        self.mux.phase_changed()
        for s in list(self.sessions):
            s.on_phase(self.phase)
        self.log.info("shim.mode_changed", phase=str(self.phase), from_mode=old, to_mode=self.mode,
                      generation=self.generation)

    def confirm_mismatch(self, m) -> None:
        if self.watch is None:
            self.stats.lag_unconfirmed["no-watch"] += 1
            return
        self.watch.submit(m)

    def _old_outstanding(self, generation: int) -> int:
        return sum(n for g, n in self.outstanding.items() if g < generation)

    async def _poll_loop(self) -> None:
        next_table_retry = time.monotonic() + TABLE_RETRY
        while True:
            # While holding for the write switch, clients wait: notice the switch quickly.
            await asyncio.sleep(HOLD_POLL_INTERVAL if self.holding else POLL_INTERVAL)
            try:
                self._apply_state(self._read_state())
                await self._barrier_tick()
                if self._ack is not None:
                    gen, deadline = self._ack
                    left = self._old_outstanding(gen)
                    if gen != self.generation:
                        self._ack = None
                    elif left == 0 or time.monotonic() >= deadline:
                        if left:
                            self.log.warning("shim.ack_before_drain", generation=gen, in_flight=left)
                        self._ack = None
                        self.applied_generation, self.applied_phase = gen, self.phase
                        await self._publish()
                        self.log.info("shim.phase_applied", phase=str(self.phase), generation=gen)
                if time.monotonic() >= next_table_retry:
                    next_table_retry = time.monotonic() + TABLE_RETRY
                    for side in (SOURCE, TARGET):
                        if not self.table.loaded(side) and await self._load_table(side):
                            self.log.info("shim.command_table_loaded", side=SIDE_NAMES[side])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the poller must survive anything transient
                self.log.error("shim.poll_failed", error=f"{type(e).__name__}: {e}")

    def _record(self) -> registry.ShimRecord:
        return registry.ShimRecord(
            id=self.id, pid=os.getpid(), host=socket.gethostname(), listen=self.listen, admin=self.admin_addr or "",
            started_at=self.started_at, heartbeat_at=self.started_at, applied_phase=str(self.applied_phase),
            applied_generation=self.applied_generation, counters=self.counters(),
            barrier_id=self.barrier.id if self.barrier else None, barrier_state=self.barrier_state,
            pending_shadow=self.mirror_depth, dirty_keys=len(self.dirty.keys), last_pause_ms=self.last_pause_ms)

    def _persist(self, div, dirty_lines, record) -> None:
        """Blocking writes, on a worker thread."""
        try:
            try:
                self.divergence.write(div)
            finally:
                self.dirty.write(dirty_lines)  # what either could not write is kept for the next call
            if record is not None:
                registry.write(self.state_dir, record)
        except UnreachableError as e:
            # The control plane (etcd) is out of reach: keep routing the phase applied now, and say so.
            if self.control_error is None:
                self.control_down_since = iso(now())
                self.log.error("shim.control_unreachable", error=str(e), keeping_phase=str(self.applied_phase),
                               generation=self.applied_generation)
            self.control_error = str(e)
            return
        if record is not None:
            if self.control_error is not None:
                self.log.info("shim.control_reachable", since=self.control_down_since)
            self.control_error = self.control_down_since = None

    async def _publish(self) -> None:
        await self.loop.run_in_executor(None, self._persist, self.divergence.take(), self.dirty.take(), self._record())

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(registry.HEARTBEAT)
            try:
                # Off the loop: with the etcd control plane this is a request (or a timeout).
                self.dirty.adopt(await self.loop.run_in_executor(None, self.dirty.scan))
                await self._watch_sync()
                await self._publish()
                if self.worker is not None:
                    await self.loop.run_in_executor(None, write_worker_stats, self.state_dir, self.id,
                                                    self.metrics_stats().snapshot(), self.status())
                self.stats.dirty_keys = len(self.dirty.keys)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.log.error("shim.heartbeat_failed", error=f"{type(e).__name__}: {e}")

    def two_sided(self) -> bool:
        """Both sides hold the data by the shim's writes now (mirroring, reads-on-target, writes-on-target
        in dual-write). With replication, a restarted side is resynchronised by the servers themselves."""
        return self.mode == DUAL_WRITE and roles_for(self.phase, self.mode).both_connected

    async def _run_id_loop(self) -> None:
        """Every heartbeat interval, apart from the heartbeat (a side that hangs must not delay it)."""
        while True:
            await asyncio.sleep(registry.HEARTBEAT)
            try:
                if self._run_id_task is None or self._run_id_task.done():
                    self._run_id_task = self.loop.create_task(self._watch_run_ids())
                    await self._run_id_task
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.log.error("shim.run_id_check_failed", error=f"{type(e).__name__}: {e}")

    async def _watch_run_ids(self) -> None:
        """Read both sides' run_id (and which databases hold keys), on a thread of its own."""
        for side in (SOURCE, TARGET):
            try:
                run_id, dbs = await self.loop.run_in_executor(self._info_pool, read_side_info, self.endpoints[side])
            except UnreachableError:
                self.side_reachable[side] = False
                continue  # down: its connections say so; the run_id is read when it is back
            except (RuntimeError, concurrent.futures.CancelledError):
                return  # stopping: the thread pool is shut down
            self.side_reachable[side] = True
            if run_id is not None:
                self.note_run_id(side, run_id)
            if self.run_ids[side] == run_id:
                self.known_dbs[side].update(dbs)

    def note_run_id(self, side: int, run_id: bytes) -> None:
        """A side's current run_id: a different one than seen before means it restarted."""
        old = self.run_ids[side]
        self.run_ids[side] = run_id
        if old is not None and old != run_id:
            self.side_restarted(side, old, run_id)

    def side_restarted(self, side: int, old: bytes, new: bytes) -> None:
        """``side`` restarted: in a two-sided phase, its whole keyspace may be gone or old.

        Every database it (or the other side) had keys in, and the playbook's, is marked dirty
        as a whole: the ``no_dirty_keys`` gate then refuses the next cutover until a full
        ``migrator sync`` has copied everything again.
        """
        name = SIDE_NAMES[side]
        event = {"side": name, "old_run_id": old.decode(errors="replace"), "new_run_id": new.decode(errors="replace"),
                 "at": iso(now()), "phase": str(self.phase), "marked": self.two_sided()}
        self.restarts[side].append(event)
        del self.restarts[side][:-10]
        self.stats.side_restarts[name] += 1
        if self.lag_aware and side == self.tracker.replica:
            self.tracker.invalidate("restarted: not read since")
        if not self.two_sided():
            self.log.info("shim.side_restarted", **event)
            return
        dbs = sorted(self.known_dbs[0] | self.known_dbs[1] | {self.endpoint_dbs[side]}
                     | {s.db for s in self.sessions if s.db is not None})
        reason = f"{name}-restarted (run_id {event['old_run_id']} -> {event['new_run_id']})"
        for db in dbs:
            self.dirty.add(db, [], reason, b"(restart)")
            self.stats.dirty_marked[f"{name}-restarted"] += 1
        self.log.error("shim.side_restarted", databases=dbs,
                       hint=f"the {name}'s data may be gone: run a full migrator sync before the next step", **event)

    async def _watch_sync(self) -> None:
        """Notice a complete full sync finishing: the divergence gate counts from then on."""
        try:
            mtime = os.stat(reports_dir(self.state_dir)).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._reports_mtime:
            return
        self._reports_mtime = mtime
        last = await self.loop.run_in_executor(None, latest_complete_sync, self.state_dir)
        self._note_sync(last, self.store.load().phase_started)

    def _note_sync(self, last: dict | None, phase_started) -> None:
        if last is not None and last.get("pass_started_at"):
            # Same rule as the no_dirty_keys gate: marks older than the pass are repaired.
            self.dirty.covered_by_sync(parse_iso(last["pass_started_at"]).timestamp())
        if (last is not None and last.get("finished_at") and parse_iso(last["finished_at"]) > phase_started
                and last.get("id") != self.divergence.sync_id):
            self.log.info("shim.sync_seen", sync=last.get("id"), finished_at=last.get("finished_at"))
            self.divergence.sync_finished(last.get("id"))

    async def _sweep_loop(self) -> None:
        interval = max(0.005, min(0.05, self.shadow_timeout / 4))
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            t = time.monotonic()
            if t - last - interval > max(0.05, self.shadow_timeout / 4):
                # The loop itself ran late (the shim is overloaded): replies may be sitting unread
                # in its sockets. A side is not declared down for the shim's own delay; its
                # timeouts count again once the loop has kept time for a shadow_timeout.
                self.stalled_until = t + self.shadow_timeout
            last = t
            for s in list(self.sessions):
                try:
                    s.check_timeouts(t)
                except Exception as e:  # noqa: BLE001 - one broken session must not stop the sweep
                    self.log.error("shim.session_error", error=f"{type(e).__name__}: {e}", peer=s.client.peer)
                    s.close("internal error")

    # --- what sessions call --------------------------------------------------------------
    def session_opened(self, s: Session) -> None:
        self.sessions.add(s)
        self.stats.connections = len(self.sessions)
        self.stats.connections_total += 1

    def session_closed(self, s: Session, reason: str) -> None:
        self.sessions.discard(s)
        self.stats.connections = len(self.sessions)

    def pin_client(self, mc, data: bytes) -> None:
        """A multiplexed client needs connection state: it gets a session of its own from here on.

        Nothing of it is in flight any more; its bytes from the command that needs the state on
        are fed to the session, which parses them again. AUTH already given is carried over.
        """
        self.sessions.discard(mc)
        link = mc.client
        s = Session(self, link)
        s.own = True  # it needs connection state: connections of its own from the start
        s.proto = mc.link.proto  # (HELLO 3 moved it to the RESP3 shared connections: replayed)
        if mc.authed:
            s.authed = True
        link.session = s
        self.sessions.add(s)
        if self.stopping:
            s.close("shim stopping")
            return
        s.connect_sides()
        if mc.paused:
            link.resume_reading()  # the session's own back-pressure takes over
        if data:
            s.on_client_data(data)
        if mc.gone:
            s.on_client_lost()

    def open_shared(self, session: Session, side: int, attempt: int) -> bool:
        """A share of a shared connection for a session with no connection state (shim.mux.VirtualConn)."""
        if self.mux.per_side <= 0 or self.stopping or self.loop is None:
            return False  # (no loop: a session driven by hand, in tests)
        vc = self.mux.virtual(session, side)
        self.loop.call_soon(self._shared_opened, session, side, vc, attempt)
        return True

    def _shared_opened(self, session: Session, side: int, vc, attempt: int) -> None:
        if not session.on_upstream_connected(side, vc, attempt):
            vc.close()

    def _open_shared(self, link: SharedLink, attempt: int) -> None:
        asyncio.ensure_future(connect_shared(self.loop, link, attempt, self.endpoints[link.side],
                                             self.ssl_contexts[link.side]))

    def entry_finished(self, gen: int, count: int = 1) -> None:
        n = self.outstanding.get(gen, 0) - count
        if n <= 0:
            self.outstanding.pop(gen, None)
        else:
            self.outstanding[gen] = n

    def sample(self) -> bool:
        """Deterministic sampling of ``shim.compare_reads``: exactly that fraction, evenly spread."""
        p = self.cfg.compare_reads
        if p >= 1.0:
            return True
        self._sample_acc += p
        if self._sample_acc >= 1.0:
            self._sample_acc -= 1.0
            return True
        return False

    def open_upstream(self, session: Session, side: int, attempt: int) -> None:
        transport = self.pool.take(side)
        if transport is not None:
            protocol = transport.get_protocol()
            protocol.session = session
            protocol.side = side
            self.loop.call_soon(self._pooled, session, side, transport, attempt)
            return
        asyncio.ensure_future(connect_upstream(self.loop, session, side, attempt, self.endpoints[side],
                                               self.ssl_contexts[side]))

    def _pooled(self, session: Session, side: int, transport, attempt: int) -> None:
        if transport.is_closing():
            session.on_upstream_failed(side, "pooled connection closed", attempt)
        elif not session.on_upstream_connected(side, transport, attempt):
            transport.close()

    def give_back(self, side: int, transport, named: bool) -> bool:
        """A session that ended cleanly offers its upstream connection for the next one (shim.pool)."""
        return self.pool.give_back(side, transport, named)

    def side_failed(self, side: int, reason: str) -> None:
        h = self.health[side]
        t = time.monotonic()
        if t < h.retry_at:
            return  # already known down; this failure is the same outage
        h.failures += 1
        h.last_reason = reason
        h.retry_at = t + min(0.1 * 2 ** (h.failures - 1), MAX_BACKOFF)
        if h.failures == 1:
            self.log.warning("shim.side_down", side=SIDE_NAMES[side], reason=reason)
        if self.lag_aware and side == self.tracker.replica:
            self.tracker.invalidate(f"connection failed ({reason}): not read since")
        self.check_run_ids_soon()  # a restart shows as a lost connection first

    def check_run_ids_soon(self) -> None:
        """Read the sides' run_ids now (once at a time), not only at the next interval."""
        if self.loop is None or self.stopping or (self._run_id_task is not None and not self._run_id_task.done()):
            return
        self._run_id_task = self.loop.create_task(self._watch_run_ids())

    def side_ok(self, side: int) -> None:
        h = self.health[side]
        if h.failures:
            self.log.info("shim.side_up", side=SIDE_NAMES[side], after_failures=h.failures)
            self.check_run_ids_soon()  # back: the same process, or a restarted one?
        h.failures = 0
        h.retry_at = 0.0

    def may_retry(self, side: int) -> bool:
        return time.monotonic() >= self.health[side].retry_at

    def warn_unknown(self, side: int, name: bytes) -> None:
        key = ("unknown", side, name)
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning("shim.command_unknown", side=SIDE_NAMES[side], command=name.decode(errors="replace").upper())

    def warn_noscript(self, side: int, sha: bytes) -> None:
        key = ("noscript", side, sha)
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning("shim.noscript_not_healed", side=SIDE_NAMES[side], sha=sha.decode(errors="replace"),
                             hint="the shim never saw this script's body; its keys are marked dirty")

    def note_script(self, args: list[bytes], name: bytes) -> None:
        """Remember script bodies the clients send, to heal a NOSCRIPT on the other side."""
        if name == b"eval" and len(args) > 1:
            self.script_bodies[sha1_hex(args[1])] = args[1]
        elif name == b"script" and len(args) > 2 and args[1].lower() == b"load":
            self.script_bodies[sha1_hex(args[2])] = args[2]
        elif name == b"script" and len(args) > 1 and args[1].lower() == b"flush":
            # Forgotten for every connection: healing a side from them would undo the flush.
            self.script_bodies.clear()

    def script_result(self, side: int, args: list[bytes], name: bytes, raw: bytes) -> None:
        if raw[:1] == b"-":
            return
        if name == b"eval" and len(args) > 1:
            self.scripts_loaded[side].add(sha1_hex(args[1]))
        elif name == b"evalsha" and len(args) > 1:
            self.scripts_loaded[side].add(args[1].lower())
        elif name == b"script" and len(args) > 1:
            sub = args[1].lower()
            if sub == b"load" and len(args) > 2:
                self.scripts_loaded[side].add(sha1_hex(args[2]))
            elif sub == b"flush":
                self.scripts_loaded[side].clear()

    # --- reporting -----------------------------------------------------------------------
    def metrics_stats(self) -> metrics.Stats:
        self.stats.mirror_queue = self.mirror_depth
        self.stats.dirty_keys = len(self.dirty.keys)
        self.stats.shared_clients = sum(1 for x in self.sessions
                                        if not isinstance(x, Session) or any(u.virtual for u in x.up))
        if self.extra_stats is not None:
            return metrics.Stats.merge([self.stats.snapshot(), *self.extra_stats()])
        return self.stats

    def side_up(self, side: int) -> bool:
        """Neither a client connection nor the last probe failed to reach ``side``."""
        return not self.health[side].failures and self.side_reachable[side] is not False

    def _extra(self) -> dict[str, Any]:
        return {"phase": str(self.applied_phase), "generation": self.applied_generation,
                "state_phase": str(self.phase), "state_generation": self.generation,
                "sides_up": {SIDE_NAMES[i]: self.side_up(i) for i in (SOURCE, TARGET)},
                "mirror_queue_limit": self.cfg.mirror_queue_size, "control_up": self.control_status()["reachable"],
                "replication": self.replication_status()}

    def control_status(self) -> dict[str, Any]:
        """Whether the control plane (the state folder, or etcd) answers, and what the shim does meanwhile."""
        if self.follower is None:
            return {"backend": "local", "reachable": True}
        reachable = self.follower.reachable and self.control_error is None
        out: dict[str, Any] = {"backend": "etcd", "endpoints": self.store.control.endpoints, "reachable": reachable}
        if not reachable:
            out["error"] = self.control_error or self.follower.error
            out["since"] = self.control_down_since or iso(now())
            out["note"] = (f"etcd unreachable: routing the last applied phase {self.applied_phase} "
                           f"(generation {self.applied_generation}) until it answers again")
        return out

    def replication_status(self) -> dict[str, Any]:
        """The routing mode, the tracked offsets and lag, and the read-your-writes setting (``/status``)."""
        return {"mode": self.mode, **self.tracker.to_json(),
                "read_your_writes": self.ryw, "sequenced": self.sequence_keys,
                "error": self.watch.last_error if self.watch is not None else None}

    def counters(self) -> dict[str, Any]:
        st = self.stats
        return {
            "commands": sum(st.commands.values()),
            "compared": st.compared,
            "divergences": sum(st.divergences.values()),
            "dirty_marked": sum(st.dirty_marked.values()),
            "connections": len(self.sessions),
            "mirror_queue": self.mirror_depth,
            "side_restarts": [e for r in self.restarts for e in r],
            **({"topology_changes": self.topology_changes()} if any(self.clusters) else {}),
        }

    def status(self) -> dict[str, Any]:
        st = self.metrics_stats()
        lat = {SIDE_NAMES[i]: {"count": h.count, "p50_le_s": h.quantile(0.5), "p99_le_s": h.quantile(0.99)}
               for i, h in enumerate(st.latency)}
        return {
            "id": self.id,
            "pid": os.getpid(),
            "listen": self.listen,
            "admin": self.admin_addr,
            "phase": str(self.phase),
            "generation": self.generation,
            "applied_phase": str(self.applied_phase),
            "applied_generation": self.applied_generation,
            "control": self.control_status(),
            "uptime_s": round(time.time() - self.stats.started, 3),
            "connections": st.connections,
            "commands": {f"{c}/{s}": n for (c, s), n in sorted(st.commands.items())},
            "compared": st.compared,
            "divergences": dict(st.divergences),
            "dirty_keys": st.dirty_keys,
            "dirty_marked": dict(st.dirty_marked),
            "mirror_queue": st.mirror_queue,
            "sequencer": self.seq.stats(),
            "replication": {**self.replication_status(), "skipped": st.lag_skipped, "lag_resolved": st.lag_resolved,
                            "unconfirmed": dict(st.lag_unconfirmed), "pending": st.lag_pending,
                            "read_your_writes_redirects": st.ryw_redirects,
                            "unready_redirects": st.unready_redirects},
            "unknown_commands": {f"{s}:{c}": n for (s, c), n in sorted(st.unknown.items())},
            "shadow_failures": {f"{s}:{r}": n for (s, r), n in sorted(st.shadow_failures.items())},
            "refused": dict(st.refused),
            "backpressure": st.backpressure,
            "clients_paused": sum(1 for x in self.sessions if x.paused),
            "pool": self.pool.status(),
            "multiplexed": {**self.mux.status(), "clients": sum(1 for x in self.sessions if not isinstance(x, Session)),
                            "sessions_sharing": sum(1 for x in self.sessions
                                                    if isinstance(x, Session) and any(u.virtual for u in x.up))},
            "latency": lat,
            "topology_changes": self.topology_changes(),
            "cluster": {SIDE_NAMES[i]: c.status() for i, c in enumerate(self.clusters) if c is not None},
            "sides": {SIDE_NAMES[i]: {"url": self.endpoints[i].display, **self.health[i].to_json(),
                                      "reachable": self.side_reachable[i], "up": self.side_up(i),
                                      "command_table": self.table.loaded(i),
                                      "run_id": self.run_ids[i].decode(errors="replace") if self.run_ids[i] else None,
                                      "restarts": list(self.restarts[i])} for i in (SOURCE, TARGET)},
            "sentinel": self.sentinels.status(),
        }


# --- running it ----------------------------------------------------------------------------


def worker_stats_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "shim" / "workers"


def write_worker_stats(state_dir: Path, shim_id: str, snapshot: dict, status: dict) -> None:
    atomic_write_json(worker_stats_dir(state_dir) / f"{shim_id}.json", {"snapshot": snapshot, "status": status})


def run(playbook: Playbook, *, listen: str | None = None, admin: str | None = None, shim_id: str | None = None,
        reuse_port: bool = False, worker: int | None = None, ready=None) -> int:
    """Run one shim process until SIGTERM/SIGINT; returns the exit code (0 after a clean drain).

    ``ready(listen, admin)`` is called once it listens, with the addresses bound ("host:port";
    admin None when disabled).

    ``migrator.shim.run`` (the CLI's) runs this, or a supervisor of N of it (``workers``).
    """
    loop = new_loop()
    asyncio.set_event_loop(loop)
    shim = Shim(playbook, listen=listen, admin=admin, shim_id=shim_id, reuse_port=reuse_port, worker=worker)

    async def main() -> None:
        await shim.start()
        # What start-up built (command tables, metrics, the playbook) lives as long as the shim:
        # kept out of the cyclic collector's full passes.
        gc.freeze()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(shim.stop()))
        if ready is not None:
            ready(_hostport(shim.address), _hostport(shim.admin_address) if shim.admin_addr else None)
        await shim.wait_stopped()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return 0


def _hostport(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ShimThread:
    """A shim on its own event loop in a background thread: for tests and embedding.

    ``with ShimThread(playbook) as shim: ...`` starts it (waiting until it listens and has
    published its record) and stops it cleanly on exit.
    """

    def __init__(self, playbook: Playbook, **kw: Any) -> None:
        self.playbook = playbook
        self.kw = kw
        self.shim: Shim | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> Self:
        self._thread = threading.Thread(target=self._run, name="migrator-shim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("shim did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        self.loop = new_loop()
        asyncio.set_event_loop(self.loop)
        self.shim = Shim(self.playbook, **self.kw)
        try:
            self.loop.run_until_complete(self.shim.start())
        except BaseException as e:  # noqa: BLE001 - handed to the starting thread
            self._error = e
            self._ready.set()
            self.loop.close()
            return
        self._ready.set()
        try:
            self.loop.run_until_complete(self.shim.wait_stopped())
        finally:
            self.loop.close()

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the shim's loop and return its result (for inspection)."""
        async def wrapper():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None or self.loop is None or self.loop.is_closed():
            return
        if self.shim is not None and self._error is None:
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self.shim.stop(), self.loop).result(timeout)
        self._thread.join(timeout)

    @property
    def port(self) -> int:
        return self.shim.address[1]

    @property
    def admin_port(self) -> int | None:
        return self.shim.admin_address[1] if self.shim.admin_address else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
