"""``migrator check`` when either side is a Redis Cluster: per shard, per slot range, both ways.

Keys come from every primary of each side, in parallel (one thread per shard): a full check
lists each slot's keys (``CLUSTER GETKEYSINSLOT``) on its owner, a sample draws RANDOMKEY on
each primary in proportion to its keys. Keys drawn from the source are compared with the target
node that owns their slot; keys drawn from the target that the source lacks are compared too
(so keys only on the target are found). A standalone side is walked with SCAN (or sampled) as
before. Every comparison batch holds keys bound for one (source node, target node) pair (passed
to the probe as arguments), probed on the owning node of each side
with the standalone check's probe, exact comparison and rounds (``check._classify``,
``check._recheck``), so a cluster is judged exactly as a server is.

Both topologies are read (every primary's own view) when the check starts and when it ends:
a slot whose owner changed, or that was migrating, on either side meanwhile is *re-covered*:
its earlier verdicts are dropped and its keys are compared again against the owners now. The
report lists the re-covered slot ranges, and per shard (node address + slot ranges) its keys,
the keys compared and the mismatches found.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import redis

from migrator import cluster
from migrator.data import values
from migrator.data.cluster_sync import (
    COUNT_AHEAD,
    TOPOLOGY_ERRORS,
    Side,
    count_keys,
    is_topology_error,
    ranges_text,
    slots_set,
)
from migrator.data.keyspace import Selection, scan_batches

BATCH = 1000
MAX_RECOVER_PASSES = 3  # re-cover passes while the topology keeps changing; the report says if it still moved


@dataclass
class ShardRow:
    side: str
    address: str
    slots: str
    keys: int = 0  # DBSIZE when the check began
    drawn: int = 0  # keys taken from this node to compare
    compared: int = 0  # of those, compared on both sides
    missing_elsewhere: int = 0  # target shards: keys the source lacks
    mismatches: int = 0


@dataclass
class ClusterCheck:
    mismatches: list = field(default_factory=list)
    shards: list[ShardRow] = field(default_factory=list)
    recovered: str = ""  # slot ranges compared again because they moved during the check
    still_moving: str = ""  # slots still moving after the last re-cover pass
    source_keys: int = 0
    target_keys: int = 0


def _nodes(side: Side) -> list[tuple[str, redis.Redis, frozenset[int] | None]]:
    """(address, client, slots it claims; None for a standalone server) per primary of ``side``."""
    if not side.is_cluster:
        return [(side.ep.display, side.single, None)]
    out = []
    for addr, slots in sorted(side.claims.values(), key=lambda v: min(v[1] or {0})):
        host, _, port = addr.rpartition(":")
        out.append((addr, side.client(host, int(port)), slots))
    return out


def _slot_keys(client: redis.Redis, slots, selection: Selection):
    """Batches of one slot: every key of every slot in ``slots`` on ``client`` (a cluster node)."""
    slots = sorted(slots)
    counts: dict[int, int] = {}
    for i, slot in enumerate(slots):
        if slot not in counts:
            counts = count_keys(client, slots[i:i + COUNT_AHEAD])
        n = counts[slot]
        if not n:
            continue
        keys = selection.filter(client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, n))
        for i in range(0, len(keys), BATCH):
            yield keys[i:i + BATCH]


def _draw(client: redis.Redis, want: int, selection: Selection) -> list[bytes]:
    out: set[bytes] = set()
    for start in range(0, want, BATCH):
        p = client.pipeline(transaction=False)
        for _ in range(min(BATCH, want - start)):
            p.randomkey()
        out.update(k for k in p.execute() if k is not None and selection.wants(k))
    return sorted(out)


def _by_slot(keys: list[bytes]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for k in keys:
        out.setdefault(cluster.key_slot(k), []).append(k)
    return out


class _Comparer:
    """Compares single-slot batches on the owning nodes of both sides (one per shard thread)."""

    def __init__(self, chk, r, src: Side, dst: Side) -> None:
        self.chk, self.src, self.dst = chk, src, dst
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.r = replace(r, pool=self.pool, checked=0, ttl_deltas=[], transient=0, in_flux=0, progress=None)
        self.dbs: dict[tuple[str, str], object] = {}
        self.differing: dict[tuple[str, str], dict] = {}
        self.unsure: set[int] = set()  # slots a redirect kept from being compared: re-covered at the end

    def _db(self, slot: int):
        saddr, s = self.src.route(slot)
        daddr, d = self.dst.route(slot)
        pair = (saddr, daddr)
        if pair not in self.dbs:
            r, cb = self.r, self.chk.CHUNK_BYTES
            self.dbs[pair] = self.chk._Db(0, s, d, values.Prober(s, r.chunk, cb, undeclared=self.src.is_cluster),
                                          values.Prober(d, r.chunk, cb, undeclared=self.dst.is_cluster))
            self.differing[pair] = {}
        return pair, self.dbs[pair]

    def compare(self, keys: list[bytes]) -> int:
        """Compare ``keys`` (any slots: one probe per node pair, the keys passed undeclared); returns how
        many were compared. A batch whose slot moved meanwhile (a redirect, a key no longer local) is left
        to the re-cover pass: its slots are added to ``self.unsure``."""
        n = 0
        groups: dict[tuple[str, str], tuple[object, list[bytes], set[int]]] = {}
        for slot, part in _by_slot(list(dict.fromkeys(keys))).items():
            try:
                pair, d = self._db(slot)
            except redis.exceptions.TryAgainError:  # no stable owner now
                self.unsure.add(slot)
                continue
            g = groups.setdefault(pair, (d, [], set()))
            g[1].extend(part)
            g[2].add(slot)
        for pair, (d, part, slots) in groups.items():
            self.r.limiter.wait(len(part))
            try:
                self.chk._classify(self.r, d, part, self.pool.submit(d.src_probe.probe, part),
                                   self.pool.submit(d.dst_probe.probe, part), self.differing[pair])
            except (*TOPOLOGY_ERRORS, redis.exceptions.ResponseError) as e:
                if not is_topology_error(e):
                    raise
                self.unsure |= slots
                continue
            n += len(part)
        return n

    def finish(self) -> list:
        out = []
        for pair, found in self.differing.items():
            if found:
                try:
                    out += self.chk._recheck(self.r, self.dbs[pair], found)
                except (*TOPOLOGY_ERRORS, redis.exceptions.ResponseError) as e:
                    if not is_topology_error(e):
                        raise
                    self.unsure |= {cluster.key_slot(k) for k in found}
        self.pool.shutdown(wait=True)
        for m in out:
            m.slot = cluster.key_slot(m.key)
        return out


def run(chk, r, selection: Selection, sample: int | None, src: Side, dst: Side) -> ClusterCheck:
    """Compare the two sides shard by shard (``sample`` keys in all, or every key when None)."""
    src.refresh()
    dst.refresh()
    before = (dict(src.claims), dict(dst.claims), set(src.moving) | set(dst.moving))
    out = ClusterCheck()
    lock = threading.Lock()
    unsure: set[int] = set()  # slots a redirect kept from being compared
    s_nodes, d_nodes = _nodes(src), _nodes(dst)
    sizes = {addr: int(c.dbsize()) for addr, c, _s in s_nodes + d_nodes}
    out.source_keys = sum(sizes[a] for a, _c, _s in s_nodes)
    out.target_keys = sum(sizes[a] for a, _c, _s in d_nodes)
    rows = {("source", a): ShardRow("source", a, ranges_text(s) if s is not None else "all", sizes[a])
            for a, _c, s in s_nodes}
    rows.update({("target", a): ShardRow("target", a, ranges_text(s) if s is not None else "all", sizes[a])
                 for a, _c, s in d_nodes})

    def share(addr: str, side_total: int) -> int:
        return -(-sample * sizes[addr] // (2 * side_total)) if side_total else 0

    def batches(client, slots, want: int | None):
        if want is not None:
            keys = _draw(client, want, selection)
            for i in range(0, len(keys), BATCH):
                yield keys[i:i + BATCH]
        else:  # every key the node holds (a cluster node's SCAN covers its own slots)
            for _cursor, keys in scan_batches(client, selection, 0, BATCH):
                if keys:
                    yield keys

    def shard(side: str, addr: str, client, slots) -> list:
        comparer = _Comparer(chk, r, src, dst)
        row = rows[(side, addr)]
        total = out.source_keys if side == "source" else out.target_keys
        want = None if sample is None else share(addr, total)
        for keys in batches(client, slots, want):
            row.drawn += len(keys)
            if side == "target":  # only the keys the source lacks: the others are compared from the source
                keys = _missing_on_source(src, keys)
                row.missing_elsewhere += len(keys)
            row.compared += comparer.compare(keys)
            if r.progress:
                with lock:
                    r.progress.update(r.progress.done + len(keys))
        ms = comparer.finish()
        with lock:
            _merge(r, comparer.r)
            unsure.update(comparer.unsure)
        return ms

    with ThreadPoolExecutor(max_workers=len(s_nodes) + len(d_nodes)) as pool:
        futures = [pool.submit(shard, "source", a, c, s) for a, c, s in s_nodes]
        futures += [pool.submit(shard, "target", a, c, s) for a, c, s in d_nodes]
        for f in futures:
            out.mismatches += f.result()
    out.mismatches, out.recovered, out.still_moving = _recover(chk, r, selection, src, dst, before, out.mismatches,
                                                               unsure)
    for row in rows.values():
        mine = None if row.slots == "all" else slots_set(row.slots)
        row.mismatches = sum(1 for m in out.mismatches if mine is None or m.slot in mine)
    out.shards = list(rows.values())
    return out


def _merge(r, part) -> None:
    r.checked += part.checked
    r.transient += part.transient
    r.in_flux += part.in_flux
    r.ttl_deltas += part.ttl_deltas[:max(0, 100_000 - len(r.ttl_deltas))]


def _missing_on_source(src: Side, keys: list[bytes]) -> list[bytes]:
    """The keys that the source node owning their slot does not have (one pipeline per node)."""
    by_node: dict[str, tuple[redis.Redis, list[bytes]]] = {}
    for slot, part in _by_slot(keys).items():
        addr, c = src.route(slot)
        by_node.setdefault(addr, (c, []))[1].extend(part)
    out = []
    for c, part in by_node.values():
        p = c.pipeline(transaction=False)
        for k in part:
            p.exists(k)
        out += [k for k, e in zip(part, p.execute()) if not e]
    return out


def _changed(before, src: Side, dst: Side) -> set[int]:
    """Slots whose owner (on either side) changed since ``before``, or that were or are moving."""
    changed = set(before[2]) | set(src.moving) | set(dst.moving)
    for was, now in ((before[0], src.claims), (before[1], dst.claims)):
        if not was and not now:
            continue  # a standalone side
        owner_was = {s: a for a, slots in was.values() for s in slots}
        owner_now = {s: a for a, slots in now.values() for s in slots}
        changed |= {s for s in range(cluster.SLOTS) if owner_was.get(s) != owner_now.get(s)}
    return changed


def _recover(chk, r, selection: Selection, src: Side, dst: Side, before, mismatches: list,
             unsure: set[int]) -> tuple[list, str, str]:
    """Compare again, every key, the slots that moved during the check (and those ``unsure``: a redirect
    kept them from being compared); their earlier verdicts are dropped."""
    import time

    recovered: set[int] = set()
    for _ in range(MAX_RECOVER_PASSES):
        src.refresh()
        dst.refresh()
        moved = _changed(before, src, dst) | unsure
        if not moved:
            return mismatches, ranges_text(recovered), ""
        recovered |= moved
        before = (dict(src.claims), dict(dst.claims), set(src.moving) | set(dst.moving))
        # While a slot is migrating its keys are on two nodes: compare it once it has settled (a
        # change during this wait is found by the next pass, which compares against ``before``).
        deadline = time.monotonic() + 30
        while (src.moving | dst.moving) & moved and time.monotonic() < deadline:
            time.sleep(0.2)
            src.refresh()
            dst.refresh()
        mismatches = [m for m in mismatches if m.slot not in moved]
        keys: list[bytes] = []
        for _addr, c, slots in _nodes(src) + _nodes(dst):
            if slots is None:  # a standalone side: its keys of the moved slots
                for _cursor, part in scan_batches(c, selection, 0, BATCH):
                    keys += [k for k in part if cluster.key_slot(k) in moved]
            else:
                for part in _slot_keys(c, moved & slots, selection):
                    keys += part
        comparer = _Comparer(chk, r, src, dst)
        comparer.compare(list(dict.fromkeys(keys)))
        mismatches += comparer.finish()
        _merge(r, comparer.r)
        unsure = comparer.unsure
    src.refresh()
    dst.refresh()
    return mismatches, ranges_text(recovered), ranges_text(_changed(before, src, dst) | unsure)


def side_keys(side: Side) -> int:
    """Keys on every primary of ``side`` (DBSIZE of database 0 for a standalone server)."""
    return sum(int(c.dbsize()) for _a, c, _s in _nodes(side))


def repair(chk, r, mismatches: list, phase, src: Side, dst: Side) -> list:
    """``check._repair`` routed by slot: copy each mismatch from the authoritative side's owning
    node to the other side's owning node, then compare it again; returns those fixed."""
    from migrator import reports
    from migrator.data import compare
    from migrator.data.copy import Copier, detect_method

    forward = chk._authoritative(phase) == "source"
    fixed = []
    method = ""
    for slot, ms in _by_slot_mismatches(mismatches).items():
        _sa, s = src.route(slot)
        _da, d = dst.route(slot)
        auth, other = (s, d) if forward else (d, s)
        if not method:
            method, _why = detect_method(auth, other, reports.latest(r.pb.state_path, "compat"), rollback=not forward)
        keys = [m.key for m in ms]
        Copier(auth, other, method, chunk=r.chunk, chunk_bytes=chk.CHUNK_BYTES).copy(keys)
        sp, dp = values.Prober(s, r.chunk, chk.CHUNK_BYTES), values.Prober(d, r.chunk, chk.CHUNK_BYTES)
        for m, st, tt in zip(ms, sp.probe(keys), dp.probe(keys)):
            if compare.difference(s, d, m.key, st, tt, r.ttl_tolerance_ms, r.chunk, chk.CHUNK_BYTES) is None:
                m.repaired = True
                fixed.append(m)
    return fixed


def _by_slot_mismatches(ms: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for m in ms:
        out.setdefault(cluster.key_slot(m.key), []).append(m)
    return out


def attach_values(ms: list, src: Side, dst: Side) -> None:
    for m in ms:
        slot = cluster.key_slot(m.key)
        m.source_value = values.value_preview(src.route(slot)[1], m.key, m.source.type)
        m.target_value = values.value_preview(dst.route(slot)[1], m.key, m.target.type)
