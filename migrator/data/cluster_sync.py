"""``migrator sync`` when the source is a Redis Cluster: one reader per source shard, by slot.

Each source primary's slots are read by their own thread (``_ShardJob``): per slot, ``CLUSTER
COUNTKEYSINSLOT`` and ``CLUSTER GETKEYSINSLOT`` list its keys, which are copied to the node that
owns the slot on the target (or to the one target server) in batches of keys of several slots
bound for one target node (passed to the scripts as arguments: a cluster node runs a script
without a shebang over undeclared keys of any of its slots), and verified there as in the
standalone sync (``verify``; by DUMP CRC64 signatures, keyspace events being per node).

Progress is per slot, not per SCAN cursor (a cursor is only valid on its node): a slot is *done*
once every batch of it is verified and the node that read it still claims the slot, with no
migration in or out of it, in its own ``CLUSTER NODES`` view, both when its round was planned
and afterwards (``_Coordinator.commit``). The checkpoint keeps the done slots per source node id
(``Checkpoint.shards``), saved about once a second. So:

- a failover of a source primary: its demoted node no longer claims the slots, its reader stops,
  and the next round reads the shard's slots not yet done from the new primary;
- a reshard on the source: slots that moved, or are moving, while or after their round was
  planned are not counted done and are read again from their owner now; slots being migrated
  wait until the migration ends;
- a redirect from the target (MOVED, ASK: a slot moving there) or a lost connection ends that
  shard's round; the next round reads both topologies afresh and copies the slot to its owner
  then (a slot being migrated on the target waits for the migration to end);
- an interrupted sync resumes with the slots not done; a slot is re-copied whole, never skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from migrator import cluster, reports
from migrator.connect import connect
from migrator.data import checkpoint as cpmod
from migrator.data import dirty as dirtymod
from migrator.data.copy import Copier, CopyResult, detect_method
from migrator.data.functions import copy_functions
from migrator.data.keyspace import TMP_PREFIX
from migrator.data.verify import Verifier
from migrator.errors import RefusedError, UnreachableError, UsageError
from migrator.playbook import Endpoint
from migrator.state import iso, now, parse_iso

CHECKPOINT_EVERY_S = 1.0
MIGRATION_WAIT_S = 300.0  # how long slots being migrated (either side) are waited for before the sync gives up
STALLED_ROUNDS = 20  # rounds in a row that complete no slot before the sync gives up
REPLICA_CATCH_UP_S = 5.0  # a replica further behind than this is not read from: its shard reads the primary
# Errors that end one shard's round (the slot's owner moved, or a node went away); the next round re-plans.
TOPOLOGY_ERRORS = (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
                   redis.exceptions.ClusterDownError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                   redis.exceptions.ReadOnlyError, OSError)


def is_topology_error(e: BaseException) -> bool:
    """A redirect, a lost node, or a key no longer served by the node asked (a script's "non local key")."""
    if isinstance(e, TOPOLOGY_ERRORS):
        return True
    if isinstance(e, redis.exceptions.ResponseError):
        text = str(e).lower()
        return "non local key" in text or text.startswith(("moved", "ask", "tryagain", "clusterdown"))
    return False


def redirected(errors: dict[bytes, str]) -> None:
    """Raise TryAgainError when a copy's per-key errors include a redirect (the RESTORE script reports
    each key's error instead of raising): the slot moved on the target, and its round is re-planned."""
    for key, text in errors.items():
        low = text.lower()
        if "non local key" in low or low.startswith(("moved", "ask", "tryagain", "clusterdown")):
            raise redis.exceptions.TryAgainError(f"the target redirected key {key[:100]!r}: {text}")


def is_cluster_endpoint(ep: Endpoint, role: str) -> bool:
    """Whether the server behind ``ep`` runs with cluster mode on (a Sentinel endpoint never does)."""
    if ep.kind == "sentinel":
        return False
    c = connect(ep, role, db=0)
    try:
        return cluster.is_cluster(c)
    except redis.exceptions.ResponseError:  # INFO refused: not something we can shard-read anyway
        return False
    finally:
        c.close()


def slots_set(ranges_text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, ranges_text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def ranges_text(slots) -> str:
    return cluster.format_ranges(cluster._ranges(sorted(slots)))


class Side:
    """One side's nodes: a client per address (cached), the slot map, and each primary's own claims."""

    def __init__(self, ep: Endpoint, role: str, is_cluster: bool) -> None:
        self.ep, self.role, self.is_cluster = ep, role, is_cluster
        self._clients: dict[tuple[str, int], redis.Redis] = {}
        self._lock = threading.Lock()
        self.topo: cluster.ClusterTopology | None = None
        self.claims: dict[str, tuple[str, frozenset[int]]] = {}
        self.moving: set[int] = set()
        self.owner_of: list[str | None] = []
        self.single: redis.Redis | None = None if is_cluster else connect(ep, role)

    def client(self, host: str, port: int, readonly: bool = False) -> redis.Redis:
        with self._lock:
            key = (host, port, readonly)
            c = self._clients.get(key)
            if c is None:
                kw = cluster.node_kwargs(self.ep, host, port)
                if readonly:  # a replica answers reads for its primary's slots only after READONLY
                    kw["redis_connect_func"] = _readonly_on_connect
                c = self._clients[key] = redis.Redis(**kw)
            return c

    def refresh(self) -> None:
        """Read the topology and every primary's own view (raises UnreachableError if no seed answers)."""
        if not self.is_cluster:
            return
        topo = cluster.discover(self.ep, self.role)
        views = cluster.own_views(self.ep, topo)
        self.topo, self.claims, self.moving = topo, cluster.stable_claims(views), cluster.moving_slots(views)
        owner: list[str | None] = [None] * cluster.SLOTS
        for nid, (_addr, slots) in self.claims.items():
            for s in slots:
                owner[s] = nid
        self.owner_of = owner

    def route(self, slot: int) -> tuple[str, redis.Redis]:
        """The (address, client) writes of ``slot`` go to; raises TryAgain while no node claims it."""
        if not self.is_cluster:
            return "", self.single
        nid = self.owner_of[slot]
        if nid is None:
            raise redis.exceptions.TryAgainError(f"slot {slot} has no stable owner on the {self.role} now")
        addr = self.claims[nid][0]
        host, _, port = addr.rpartition(":")
        return addr, self.client(host, int(port))

    def primaries(self) -> list[redis.Redis]:
        """A client of each primary that claims slots (the one server of a standalone side), in address order."""
        if not self.is_cluster:
            return [self.single]
        out = []
        for addr in sorted(a for a, _s in self.claims.values()):
            host, _, port = addr.rpartition(":")
            out.append(self.client(host, int(port)))
        return out

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        if self.single is not None:
            self.single.close()


def _readonly_on_connect(conn) -> None:
    conn.on_connect()
    conn.send_command("READONLY")
    conn.read_response()


@dataclass
class _SlotDone:
    slot: int
    last_seq: int  # the last batch of the slot (-1: it had no keys)
    dst: str  # the target address its batches went to
    keys: int = 0
    bytes: int = 0


@dataclass
class ShardStat:
    """One source shard in this run: for progress, the checkpoint and the report."""

    node_id: str
    address: str
    slots: str  # the ranges planned for it (all the slots it owned, done or not)
    reader: str = ""  # the node it reads from (itself, or a replica)
    keys: int = 0  # copied this run
    done_slots: int = 0
    total_slots: int = 0
    state: str = "waiting"
    note: str = ""


class _ShardJob(threading.Thread):
    """Reads ``slots`` of one source primary, copies and verifies them; reports verified slots."""

    def __init__(self, co: _Coordinator, node: cluster.ClusterNode, slots: list[int], stat: ShardStat) -> None:
        super().__init__(name=f"migrator-shard-{node.port}", daemon=True)
        self.co, self.node, self.slots, self.stat = co, node, slots, stat
        self.stop_flag = threading.Event()
        self.verified: list[_SlotDone] = []
        self.lock = threading.Lock()
        self.error: str = ""
        self.crash: BaseException | None = None

    def take(self) -> list[_SlotDone]:
        with self.lock:
            out, self.verified = self.verified, []
        return out

    def run(self) -> None:
        try:
            self._run()
            self.stat.state = "stopped" if self.stop_flag.is_set() else "round done"
        except BaseException as e:  # noqa: BLE001 - handed to the coordinator, raised there
            if is_topology_error(e):
                self.error = f"{type(e).__name__}: {e}"
                self.stat.state, self.stat.note = "re-planned", self.error
            else:
                self.crash = e
                self.stat.state = "failed"

    def _reader(self, primary: redis.Redis) -> redis.Redis:
        """The primary, or a replica caught up with it when the playbook allows reading replicas."""
        co = self.co
        self.stat.reader = self.node.address
        if not co.r.pb.sync.read_from_replicas:
            return primary
        for rep in co.src.topo.replicas_of(self.node):
            rc = co.src.client(rep.host, rep.port, readonly=True)
            try:
                if _caught_up(primary, rc, REPLICA_CATCH_UP_S):
                    self.stat.reader = f"{rep.address} (replica)"
                    return rc
            except (redis.exceptions.RedisError, OSError):
                continue
        self.stat.note = f"no replica within {REPLICA_CATCH_UP_S:.0f}s of its primary: read from the primary"
        return primary

    def _run(self) -> None:
        pairs: dict[str, tuple[Copier, Verifier]] = {}
        try:
            self._copy(pairs)
        finally:
            for _c, v in pairs.values():  # a stopped or failed round: its slots not handed over are read again
                v.close()

    def _copy(self, pairs: dict[str, tuple[Copier, Verifier]]) -> None:
        co, r = self.co, self.co.r
        primary = co.src.client(self.node.host, self.node.port)
        reader = self._reader(primary)
        replica = reader is not primary
        open_slots: list[_SlotDone] = []
        # Per target node: keys read and not yet copied, and their slots. A batch holds keys of several
        # slots of one source node bound for one target node, passed to the scripts undeclared.
        buffers: dict[str, tuple[list[bytes], list[_SlotDone]]] = {}
        seq = 0

        def flush(addr: str) -> None:
            nonlocal seq
            keys, slots = buffers.pop(addr)
            if addr not in pairs:
                _a, dst = co.dst.route(slots[0].slot)
                copier = r.copier(reader, dst, co.method, sign=True, undeclared=(True, co.dst.is_cluster))
                pairs[addr] = (copier, r.verifier(primary, dst, copier))
            copier, verifier = pairs[addr]
            nbytes = 0
            for i in range(0, len(keys), r.batch):
                part = keys[i:i + r.batch]
                r.limiter.wait(len(part))
                marked_at = time.monotonic()
                res = copier.copy(part)
                redirected(res.errors)
                co.count(res, self.stat)
                co.add_errors(res.errors)
                verifier.add(seq, part, time.monotonic(), res, marked_at)
                nbytes += res.bytes
                seq += 1
            for d in slots:  # done once every batch of this flush is verified
                d.last_seq = seq - 1
                d.bytes = nbytes * d.keys // max(1, len(keys))
            open_slots.extend(slots)

        self.stat.state = "copying"
        last_fresh = time.monotonic()
        counts: dict[int, int] = {}
        listed: dict[int, list[bytes]] = {}
        for i, slot in enumerate(self.slots):
            if self.stop_flag.is_set() or co.stopping.is_set():
                return  # slots read but not copied, or not verified, are not handed over: read again later
            if replica and time.monotonic() - last_fresh > 0.1:
                # Everything the primary had a moment ago is on the replica before it is read.
                if not _caught_up(primary, reader, REPLICA_CATCH_UP_S):
                    for addr in list(buffers):  # what the replica gave so far is copied from it first
                        flush(addr)
                    reader, replica = primary, False
                    self.stat.reader, self.stat.note = self.node.address, "replica fell behind: read from the primary"
                    for c, v in pairs.values():
                        v.drain()
                        v.close()
                        co.absorb(v, c)
                    open_slots = self._release(open_slots, {})
                    pairs.clear()
                last_fresh = time.monotonic()
            if slot not in counts:  # the key counts of the next slots, in one round trip (most slots are small)
                counts = count_keys(reader, self.slots[i:i + COUNT_AHEAD])
                listed = list_keys(reader, counts, 4 * r.batch)
            n = counts[slot]
            if slot in listed:
                keys = r.selection.filter(listed.pop(slot))
            else:
                keys = r.selection.filter(reader.execute_command("CLUSTER", "GETKEYSINSLOT", slot, n)) if n else []
            addr, _dst = co.dst.route(slot)
            done = _SlotDone(slot, -1, addr, keys=len(keys))
            if not keys:
                open_slots.append(done)
            else:
                buf = buffers.setdefault(addr, ([], []))
                buf[0].extend(keys)
                buf[1].append(done)
                if len(buf[0]) >= r.batch:
                    flush(addr)
            for _c, v in pairs.values():
                v.poll()
            open_slots = self._release(open_slots, pairs)
        for addr in list(buffers):
            flush(addr)
        for _c, v in pairs.values():
            v.drain()
        self._release(open_slots, pairs)
        for c, v in pairs.values():
            v.close()
            co.absorb(v, c)

    def _release(self, open_slots: list[_SlotDone], pairs: dict) -> list[_SlotDone]:
        """Hand over the slots whose batches are all verified; returns those still waiting."""
        waiting = {addr: min((p.seq for p in v.queue), default=None) for addr, (_c, v) in pairs.items()}
        ready, rest = [], []
        for d in open_slots:
            oldest = waiting.get(d.dst)
            (ready if oldest is None or d.last_seq < oldest else rest).append(d)
        if ready:
            with self.lock:
                self.verified += ready
        return rest


COUNT_AHEAD = 256  # slots whose key counts are asked in one pipeline


def count_keys(client: redis.Redis, slots: list[int]) -> dict[int, int]:
    """``CLUSTER COUNTKEYSINSLOT`` of each of ``slots``, pipelined."""
    p = client.pipeline(transaction=False)
    for slot in slots:
        p.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
    return {slot: int(n) for slot, n in zip(slots, p.execute())}


def list_keys(client: redis.Redis, counts: dict[int, int], most: int) -> dict[int, list[bytes]]:
    """The keys of the first slots of ``counts`` (slot → key count, in order) that hold keys, up to about
    ``most`` keys in all, with one pipeline of ``CLUSTER GETKEYSINSLOT``; the rest are listed one by one."""
    wanted, total = [], 0
    for slot, n in counts.items():
        if not n:
            continue
        if wanted and total + n > most:
            break
        wanted.append((slot, n))
        total += n
    if not wanted:
        return {}
    p = client.pipeline(transaction=False)
    for slot, n in wanted:
        p.execute_command("CLUSTER", "GETKEYSINSLOT", slot, n)
    return {slot: keys for (slot, _n), keys in zip(wanted, p.execute())}


def _caught_up(primary: redis.Redis, replica: redis.Redis, timeout: float) -> bool:
    """Wait until ``replica`` has applied the replication offset ``primary`` has now."""
    target = int(primary.info("replication").get("master_repl_offset", 0))
    deadline = time.monotonic() + timeout
    while True:
        info = replica.info("replication")
        if int(info.get("slave_repl_offset", -1)) >= target:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


class _Coordinator:
    """Plans rounds of shard jobs over the slots not done, commits verified slots, saves the checkpoint."""

    def __init__(self, r, cp: cpmod.Checkpoint, src: Side, dst: Side, method: str,
                 on_tick: Callable[[], None]) -> None:
        self.r, self.cp, self.src, self.dst, self.method = r, cp, src, dst, method
        self.on_tick = on_tick
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.stats: dict[str, ShardStat] = {}
        self.replanned: list[str] = []  # why rounds were re-planned (failover, reshard, redirects)
        self.done: set[int] = set()
        for entry in cp.shards.values():
            self.done |= slots_set(entry.get("done", ""))
        self.run_keys = 0

    # --- called from the shard threads ------------------------------------------------------
    def count(self, res: CopyResult, stat: ShardStat) -> None:
        with self._lock:
            self.r.total.add(res)
            stat.keys += res.copied + res.deleted

    def add_errors(self, errors: dict[bytes, str]) -> None:
        if errors:
            with self._lock:
                self.r.errors += [(0, cpmod.encode_key(k), e) for k, e in errors.items()]

    def absorb(self, v: Verifier, copier: Copier) -> None:
        with self._lock:
            self.r.verified += v.stats.verified
            self.r.recopied += v.stats.recopied
            self.r.unsettled += [(0, cpmod.encode_key(k)) for k in v.stats.unsettled]
            if copier.method != self.method:
                self.method = copier.method

    # --- the rounds ---------------------------------------------------------------------------
    def run(self) -> None:
        stalled = 0
        waited_since: float | None = None
        last_error = ""
        while True:
            self.src.refresh()
            self.dst.refresh()
            owned = set()
            for _addr, slots in self.src.claims.values():
                owned |= slots
            todo = set(range(cluster.SLOTS)) - self.done
            plannable = (todo & owned) - self.dst.moving
            if self.dst.is_cluster:  # a target slot without a stable owner (a failover there in progress) waits too
                plannable = {s for s in plannable if self.dst.owner_of[s] is not None}
            if not todo:
                return
            if not plannable:
                # Every slot left is being migrated (either side) or has no stable owner now.
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > MIGRATION_WAIT_S:
                    raise RefusedError(
                        f"sync incomplete: slots {ranges_text(todo)} stayed in migration (or without a stable owner) "
                        f"for {MIGRATION_WAIT_S:.0f}s ({self._unstable(todo)}); finish or abort the reshard, then run "
                        "`migrator sync` again (it resumes)")
                time.sleep(0.2)
                continue
            waited_since = None
            before = len(self.done)
            errors = self._round(plannable)
            if len(self.done) == before:  # a round that confirmed no slot (redirects, or slots kept moving)
                stalled += 1
                last_error = errors[0] if errors else "the source's slots kept moving while they were read"
                if stalled >= STALLED_ROUNDS:
                    raise UnreachableError(f"sync stalled: {STALLED_ROUNDS} rounds in a row copied no slot; last: "
                                           f"{last_error}")
                time.sleep(min(2.0, 0.1 * stalled))
            else:
                stalled = 0

    def _unstable(self, todo: set[int]) -> str:
        """Why slots cannot be planned: moving on a side, or no primary of the source claims them."""
        parts = []
        if todo & self.src.moving:
            parts.append(f"migrating on the source: {ranges_text(todo & self.src.moving)}")
        if todo & self.dst.moving:
            parts.append(f"migrating on the target: {ranges_text(todo & self.dst.moving)}")
        owned = set().union(*(slots for _a, slots in self.src.claims.values())) if self.src.claims else set()
        if todo - owned - self.src.moving:
            parts.append(f"no source primary claims {ranges_text(todo - owned - self.src.moving)}")
        if self.dst.is_cluster:
            orphans = {s for s in todo - self.dst.moving if self.dst.owner_of[s] is None}
            if orphans:
                parts.append(f"no target primary claims {ranges_text(orphans)}")
        return "; ".join(parts)

    def _round(self, plannable: set[int]) -> list[str]:
        baseline = dict(self.src.claims)
        jobs = []
        for nid, (addr, slots) in baseline.items():
            mine = sorted(slots & plannable)
            if not mine:
                continue
            node = self.src.topo.by_id(nid)
            if node is None:
                continue
            node_slots = ranges_text(slots | slots_set(self.cp.shards.get(nid, {}).get("done", "")))
            stat = self.stats.get(nid) or ShardStat(nid, addr, node_slots)
            stat.address, stat.slots, stat.state, stat.note = addr, node_slots, "planned", ""
            stat.total_slots = len(slots_set(node_slots))
            stat.done_slots = stat.total_slots - len(mine)
            self.stats[nid] = stat
            jobs.append(_ShardJob(self, node, mine, stat))
        for j in jobs:
            j.start()
        try:
            while any(j.is_alive() for j in jobs):
                for j in jobs:
                    j.join(CHECKPOINT_EVERY_S / max(1, len(jobs)))
                self.commit(jobs, baseline)
                self.on_tick()
        except BaseException:
            self.stopping.set()
            for j in jobs:
                j.join(10)
            raise
        self.commit(jobs, baseline)
        self.on_tick()
        for j in jobs:
            if j.crash is not None:
                raise j.crash
        errors = [f"shard {j.node.address}: {j.error}" for j in jobs if j.error]
        self.replanned += errors
        return errors

    def commit(self, jobs: list[_ShardJob], baseline: dict[str, tuple[str, frozenset[int]]]) -> None:
        """Count as done the verified slots whose reader still claims them (stable) as when planned."""
        ready = {j: j.take() for j in jobs}
        if not any(ready.values()):
            return
        try:
            self.src.refresh()
        except UnreachableError:
            for j, items in ready.items():  # cannot confirm them now: they are read again later
                j.stop_flag.set()
            return
        for j, items in ready.items():
            nid = j.node.id
            was = baseline.get(nid)
            now_ = self.src.claims.get(nid)
            if now_ and was and now_[0] == was[0]:
                lost = set(j.slots) - set(now_[1])
            else:
                lost = set(j.slots)
            if lost & set(j.slots):
                j.stop_flag.set()  # its slots moved (a reshard) or it is no longer primary (a failover)
            entry = self.cp.shards.setdefault(nid, {"address": j.node.address, "done": "", "keys": 0, "bytes": 0})
            done = slots_set(entry["done"])
            for d in items:
                if d.slot in lost:
                    continue
                done.add(d.slot)
                self.done.add(d.slot)
                entry["keys"] += d.keys
                entry["bytes"] += d.bytes
                j.stat.done_slots += 1
            entry["done"] = ranges_text(done)
            entry["address"] = j.node.address
        self.cp.method = self.method
        cpmod.save(self.r.pb.state_path, self.cp)

    def shard_rows(self) -> list[dict]:
        """Per source shard: address, slot ranges, slots done, keys copied (the whole pass, and this run)."""
        rows = []
        for nid, st in sorted(self.stats.items(), key=lambda kv: min(slots_set(kv[1].slots) or {0})):
            entry = self.cp.shards.get(nid, {})
            rows.append({"node_id": nid, "address": st.address, "slots": st.slots, "reader": st.reader,
                         "slots_done": st.done_slots, "slots_total": st.total_slots, "keys": entry.get("keys", 0),
                         "bytes": entry.get("bytes", 0), "run_keys": st.keys, "state": st.state, "note": st.note})
        return rows


def run_full(r, restart: bool, progress_shards: Callable[[list[dict]], None] | None = None):
    """A full pass from a cluster source (``sync._run_full`` for clusters); returns a SyncResult."""
    pb = r.pb
    if r.selection.databases not in (None, [0]):
        raise UsageError(f"source {pb.source.display} is a cluster: it has only database 0, but sync.databases is "
                           f"{r.selection.databases}")
    saved = cpmod.load(pb.state_path)
    cp, resumed, start_over = r.open_pass(
        saved, not restart and saved is not None and not saved.finished and bool(saved.shards or not saved.dbs),
        cpmod.Checkpoint())
    src = Side(pb.source, "source", True)
    dst = Side(pb.target, "target", is_cluster_endpoint(pb.target, "target"))
    try:
        src.refresh()
        dst.refresh()
        cp.method, cp.method_reason = _method(r, cp, src, dst)
        r.total_keys = _source_keys(src)
        r.done_before = sum(e.get("keys", 0) for e in cp.shards.values())
        functions = _copy_functions(src, dst)
        cpmod.save(pb.state_path, cp)
        co = _Coordinator(r, cp, src, dst, cp.method, lambda: None)

        def tick() -> None:
            if progress_shards:
                progress_shards(co.shard_rows())
            r.tick(0)

        co.on_tick = tick
        co.run()
        pending = list(dict.fromkeys(cp.unsettled + r.unsettled))  # by this or an earlier run
        r.unsettled = []
        if pending:
            copy_and_verify_routed(r, [cpmod.decode_key(k) for _db, k in pending], cp.method, sides_=(src, dst))
    finally:
        src.close()
        dst.close()
    complete = len(co.done) == cluster.SLOTS and not r.unsettled and not r.errors
    cp.unsettled = list(dict.fromkeys(list(r.unsettled) + [(db, k) for db, k, _e in r.errors if k]))  # failed: retried
    cp.completed_at = iso(now()) if complete else None
    cpmod.save(pb.state_path, cp)
    if complete:
        dirtymod.clear_walked(pb.state_path, parse_iso(cp.started_at).timestamp(), [0], r.selection)
    res = r.result("full", cp.method, cp.method_reason, cp.started_at, resumed, complete, functions,
                          {0: {"keys": sum(e.get("keys", 0) for e in cp.shards.values()),
                               "bytes": sum(e.get("bytes", 0) for e in cp.shards.values()),
                               "done": len(co.done) == cluster.SLOTS}})
    res.sides, res.restarted = cp.sides, start_over
    res.keys = sum(e.get("keys", 0) for e in cp.shards.values())
    res.bytes = sum(e.get("bytes", 0) for e in cp.shards.values())
    res.runs = cp.runs
    res.shards = co.shard_rows()
    res.replanned = co.replanned[:50]
    return res


def _source_keys(src: Side) -> int:
    return sum(int(c.dbsize()) for c in src.primaries())


def _method(r, cp: cpmod.Checkpoint, src: Side, dst: Side) -> tuple[str, str]:
    if cp.method:
        return cp.method, cp.method_reason
    # The probe RESTOREs a temporary key: ask the target node that owns its slot.
    import os

    probe = TMP_PREFIX + b"probe:" + str(os.getpid()).encode()
    _addr, target = dst.route(cluster.key_slot(probe))
    nodes = src.primaries()
    c = next((c for c in nodes if c.dbsize()), nodes[0])
    return detect_method(c, target, reports.latest(r.pb.state_path, "compat"))


def _copy_functions(src: Side, dst: Side) -> str:
    """Function libraries from one source primary onto every target primary (each node keeps its own)."""
    s = src.primaries()[0]
    targets = dst.primaries()
    outcomes = []
    for t in targets:
        try:
            n, how = copy_functions(s, t)
        except redis.exceptions.ResponseError as e:
            return f"function libraries NOT copied: {e}"
        outcomes.append((n, how))
    n, how = outcomes[0] if outcomes else (0, "none")
    where = f" to each of {len(targets)} target primaries" if len(targets) > 1 else ""
    return f"{n} function librar{'y' if n == 1 else 'ies'} copied ({how}){where}" if n else how


def copy_and_verify_routed(r, keys: list[bytes], method: str, *, compare_first: bool = False,
                           sides_: tuple[Side, Side] | None = None, attempts: int = 5) -> tuple[str, str]:
    """``sync._copy_and_verify`` for keys of a cluster (either side): batches per (source node, target
    node) pair, read from the source node that owns their slots and written to the target node that
    owns them. A redirect
    or a lost node re-reads both topologies and starts the (idempotent) copy over, up to
    ``attempts`` times. Returns the copy method (detected if ``method`` is empty) and why."""
    own = sides_ is None
    src, dst = sides_ or (Side(r.pb.source, "source", r.clustered[0]), Side(r.pb.target, "target", r.clustered[1]))
    reason = ""
    try:
        for attempt in range(attempts):
            try:
                src.refresh()
                dst.refresh()
                if not method:
                    method, reason = _method(r, cpmod.Checkpoint(), src, dst)
                _copy_routed(r, keys, method, src, dst, compare_first)
                return method, reason
            except Exception as e:
                if attempt == attempts - 1 or not is_topology_error(e):
                    raise
                time.sleep(0.2 * (attempt + 1))
    finally:
        if own:
            src.close()
            dst.close()
    return method, reason


class RoutedCopy:
    """Copy-and-verify of keys routed by slot: a Copier and a Verifier per (source node, target node)
    pair, every batch bound for one pair; ``seq`` numbers the batches in the order added."""

    def __init__(self, r, method: str, src: Side, dst: Side) -> None:
        self.r, self.method, self.src, self.dst = r, method, src, dst
        self.pairs: dict[tuple[str, str], tuple[Copier, Verifier, dict]] = {}
        self.seq = 0

    def add(self, keys: list[bytes], compare_first: bool = False) -> int:
        """Copy ``keys`` (any slots); returns the seq the next batch will get. A batch holds the keys of
        one (source node, target node) pair, passed to the scripts undeclared (``fastcall.register``)."""
        r = self.r
        by_pair: dict[tuple[str, str], list[bytes]] = {}
        for k in keys:
            slot = cluster.key_slot(k)
            saddr, s = self.src.route(slot)
            daddr, d = self.dst.route(slot)
            if (saddr, daddr) not in self.pairs:
                copier = r.copier(s, d, self.method, undeclared=(self.src.is_cluster, self.dst.is_cluster))
                self.pairs[(saddr, daddr)] = (copier, r.verifier(s, d, copier), {})
            by_pair.setdefault((saddr, daddr), []).append(k)
        for pair, pair_keys in by_pair.items():
            copier, verifier, errors = self.pairs[pair]
            for i in range(0, len(pair_keys), r.batch):
                if r.copy_batch(copier, verifier, self.seq, pair_keys[i:i + r.batch], compare_first, errors,
                                check=redirected):
                    self.seq += 1
        self.poll()
        return self.seq

    def poll(self) -> None:
        for _c, v, _e in self.pairs.values():
            v.poll()

    def oldest_pending(self) -> int:
        """The lowest seq not verified yet (``self.seq`` when every batch is)."""
        return min((p.seq for _c, v, _e in self.pairs.values() for p in v.queue), default=self.seq)

    def finish(self) -> None:
        for copier, verifier, errors in self.pairs.values():
            verifier.drain()
            verifier.close()
            self.r.absorb(0, verifier, errors)
            if copier.method != self.method:
                self.method = copier.method
        self.pairs = {}


def _copy_routed(r, keys: list[bytes], method: str, src: Side, dst: Side, compare_first: bool) -> None:
    rc = RoutedCopy(r, method, src, dst)
    for i in range(0, len(keys), r.batch):
        rc.add(keys[i:i + r.batch], compare_first)
        r.tick(0)
    rc.finish()


def run_full_to_cluster(r, restart: bool):
    """A full pass from a standalone source to a cluster target: SCAN database 0 of the source from
    the checkpoint's cursor; each SCAN step's keys are routed by slot (``RoutedCopy``); the cursor
    saved is the one after the last step whose every batch is verified."""
    from migrator.data.keyspace import keyspace_sizes, scan_batches

    pb = r.pb
    src = Side(pb.source, "source", False)
    sizes = keyspace_sizes(src.single)
    wanted = r.selection.databases if r.selection.databases is not None else sorted(sizes)
    if [d for d in wanted if d != 0 and (r.selection.databases is not None or sizes.get(d))]:
        src.close()
        raise UsageError(f"target {pb.target.display} is a cluster: it has only database 0, but the source's "
                           f"databases {wanted} are selected; migrate the others to another target, or select "
                           "databases: [0]")
    saved = cpmod.load(pb.state_path)
    cp, resumed, start_over = r.open_pass(
        saved, not restart and saved is not None and not saved.finished and not saved.shards, cpmod.Checkpoint())
    dst = Side(pb.target, "target", True)
    prog = cp.db(0)
    try:
        dst.refresh()
        cp.method, cp.method_reason = (cp.method, cp.method_reason) if cp.method else _method(r, cp, src, dst)
        r.total_keys = sizes.get(0, 0)
        r.done_before = prog.keys
        functions = _copy_functions(src, dst)
        cpmod.save(pb.state_path, cp)
        if not prog.done:
            _scan_routed(r, cp, src, dst, scan_batches)
        pending = list(dict.fromkeys(cp.unsettled + r.unsettled))
        r.unsettled = []
        if pending:
            copy_and_verify_routed(r, [cpmod.decode_key(k) for _db, k in pending], cp.method, sides_=(src, dst))
    finally:
        src.close()
        dst.close()
    complete = prog.done and not r.unsettled and not r.errors
    cp.unsettled = list(dict.fromkeys(list(r.unsettled) + [(db, k) for db, k, _e in r.errors if k]))  # failed: retried
    cp.completed_at = iso(now()) if complete else None
    cpmod.save(pb.state_path, cp)
    if complete:
        dirtymod.clear_walked(pb.state_path, parse_iso(cp.started_at).timestamp(), [0], r.selection)
    res = r.result("full", cp.method, cp.method_reason, cp.started_at, resumed, complete, functions,
                          {0: {"keys": prog.keys, "bytes": prog.bytes, "done": prog.done}})
    res.sides, res.restarted = cp.sides, start_over
    res.keys, res.bytes, res.runs = prog.keys, prog.bytes, cp.runs
    return res


def _scan_routed(r, cp: cpmod.Checkpoint, src: Side, dst: Side, scan_batches) -> None:
    prog = cp.db(0)
    for attempt in range(STALLED_ROUNDS):
        rc = RoutedCopy(r, cp.method, src, dst)
        steps: list[tuple[int, int, int, int]] = []  # (first seq after the step, cursor after, keys, bytes)
        base_keys, base_bytes = prog.keys, prog.bytes
        last_save = time.monotonic()
        try:
            for cursor_after, keys in scan_batches(src.single, r.selection, prog.cursor, r.batch):
                before = (r.total.copied + r.total.deleted, r.total.bytes)
                nxt = rc.add(keys)
                steps.append((nxt, cursor_after, r.total.copied + r.total.deleted - before[0],
                              r.total.bytes - before[1]))
                r.tick(0)
                if time.monotonic() - last_save >= CHECKPOINT_EVERY_S:
                    _advance(r, cp, rc, steps)
                    last_save = time.monotonic()
            rc.finish()
            _advance(r, cp, rc, steps)
            prog.cursor, prog.done = 0, True
            cp.method = rc.method
            cpmod.save(r.pb.state_path, cp)
            return
        except Exception as e:
            if not is_topology_error(e):
                raise
            # The target's slots moved (MOVED/ASK) or a node went away: resume from the cursor
            # saved (every step before it verified) with the target's topology read afresh.
            prog.keys, prog.bytes = max(prog.keys, base_keys), max(prog.bytes, base_bytes)
            time.sleep(min(2.0, 0.2 * (attempt + 1)))
            dst.refresh()
    raise UnreachableError(f"sync stalled: the target {r.pb.target.display} kept redirecting or failing "
                           f"({STALLED_ROUNDS} attempts)")


def _advance(r, cp: cpmod.Checkpoint, rc: RoutedCopy, steps: list) -> None:
    """Move the checkpoint's cursor past every SCAN step whose batches are all verified."""
    prog = cp.db(0)
    oldest = rc.oldest_pending()
    moved = False
    while steps and steps[0][0] <= oldest:
        _nxt, cursor_after, keys, nbytes = steps.pop(0)
        prog.cursor, moved = cursor_after, True
        prog.keys += keys
        prog.bytes += nbytes
    if moved:
        cp.method = rc.method
        cpmod.save(r.pb.state_path, cp)
