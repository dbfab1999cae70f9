"""Redis Cluster in the pre-flight: every node identified, slots covered, replicas, memory per shard, slots per command.

When a side runs with ``cluster-enabled yes`` the pre-flight reads the topology
(``migrator.cluster``) and then EVERY node of that side, primaries and replicas: its identity,
the RDB version it writes, its modules, memory, command and error statistics, and its own view of
the slots (a slot in flight shows only in the two nodes moving it). The per-server checks then
aggregate over the nodes (``Probe``): the application's commands are summed over the source
primaries, the keyspace is sampled on every primary, canaries go to the node owning their slot.

The checks here run only when a side is a cluster:

- ``cluster.nodes``: every node answered and was identified; mixed versions or modules inside a
  side are named; a primary that does not answer fails (sync and check read every primary).
- ``cluster.slots``: all 16384 slots covered on each cluster side, none migrating or importing.
- ``cluster.replicas``: each primary has a replica (a shard without one warns, by name).
- ``cluster.memory``: the source's data per slot, mapped onto the target's slot layout, against
  each target primary's ``maxmemory``.
- ``cluster.commands``: the multi-key commands the application runs and what a cluster target
  does with them (a standalone source's cross-slot use fails there with CROSSSLOT; a cluster
  source already keeps each command in one slot, and slots are the same function of the key on
  every cluster, so the new layout keeps them together); ``CROSSSLOT`` errors seen; commands that
  are not cluster-safe.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import redis

from migrator import cluster as topo
from migrator.cluster import SLOTS, ClusterNode, ClusterTopology, format_ranges, key_slot
from migrator.compat.identify import Identity, identify
from migrator.compat.model import FAIL, PASS, WARN, Check
from migrator.compat.rdb import written_version
from migrator.compat.ownstats import command_calls
from migrator.compat.rpc import Side, Unavailable, text
from migrator.errors import UnreachableError
from migrator.playbook import Endpoint

# Under this much headroom between a target shard's projected memory and its maxmemory: warn.
MEMORY_HEADROOM = 0.25
_LISTED = 12


def open_side(role: str, endpoint: Endpoint) -> Side:
    """The playbook's node for ``role``; for a cluster whose URL node is down, the first seed that answers."""
    try:
        return Side.open(role, endpoint)
    except UnreachableError as first:
        if not endpoint.seeds or endpoint.kind == "sentinel":
            raise
        seeds = topo.seed_addresses(endpoint)[1:]
        for host, port in seeds:
            c = redis.Redis(**topo.node_kwargs(endpoint, host, port))
            try:
                c.ping()
                return NodeSide(role, endpoint, c)
            except (redis.exceptions.RedisError, OSError):
                c.close()
        tried = ", ".join(f"{h}:{p}" for h, p in seeds)
        raise UnreachableError(f"{first}; no seed answered either ({tried})") from None


def side_is_cluster(side: Side) -> bool:
    """``cluster_enabled:1`` in the server's INFO (a server that refuses INFO cluster is taken as standalone)."""
    try:
        return side.guard("INFO cluster", lambda: topo.is_cluster(side.client))
    except Unavailable:
        return False


class NodeSide(Side):
    """A Side on one node of a cluster: other databases (Valkey 9 ``cluster-databases``) on that same node."""

    def on_db(self, db: int) -> redis.Redis:
        if db == 0:
            return self.client
        if db not in self._by_db:
            kw = self.client.connection_pool.connection_kwargs
            self._by_db[db] = redis.Redis(**{**topo.node_kwargs(self.endpoint, kw["host"], kw["port"]), "db": db})
        return self._by_db[db]


@dataclass
class NodeProbe:
    """What one cluster node said about itself."""

    node: ClusterNode
    side: Side | None
    identity: Identity | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    commandstats: dict[str, int] | None = None
    crossslot_errors: int | None = None  # errorstat_CROSSSLOT (Redis 6.2+), None when not reported
    modules: list[str] | None = None  # None: MODULE LIST refused
    run_id: str = ""
    error: str = ""  # why it could not be read

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def label(self) -> str:
        return f"{self.address} ({'primary' if self.node.role == 'primary' else 'replica'})"

    def to_json(self) -> dict[str, Any]:
        ident = self.identity
        return {"id": self.node.id, "address": self.address, "role": self.node.role,
                "primary_id": self.node.primary_id, "slots": format_ranges(self.node.slots),
                "server": ident.label if ident else None,
                "rdb_version": written_version(ident) if ident else None,
                "modules": self.modules, "used_memory": self.memory.get("used_memory"),
                "maxmemory": self.memory.get("maxmemory"), "error": self.error}


@dataclass
class ClusterView:
    """One cluster side: its topology (as its nodes together see it) and every node read."""

    role: str
    endpoint: Endpoint
    topology: ClusterTopology
    nodes: list[NodeProbe]
    # Nodes whose own view of the slot owners differs from the seed's (gossip not settled, a split).
    disagreeing: list[str] = field(default_factory=list)
    slot_keys: dict[int, int] | None = None  # keys per slot (CLUSTER COUNTKEYSINSLOT), source side

    def primaries(self) -> list[NodeProbe]:
        ids = {n.id for n in self.topology.primaries()}
        return sorted((n for n in self.nodes if n.node.id in ids), key=lambda n: n.node.slots[0][0])

    def readable_primaries(self) -> list[NodeProbe]:
        return [n for n in self.primaries() if n.side is not None]

    def node_for_slot(self, slot: int) -> NodeProbe | None:
        owner = self.topology.owner(slot)
        return next((n for n in self.nodes if owner and n.node.id == owner.id and n.side), None)

    def side_for_slot(self, slot: int, fallback: Side) -> Side:
        """A Side on the primary owning ``slot`` (the seed's when no live primary owns it: it answers CLUSTERDOWN)."""
        n = self.node_for_slot(slot)
        return n.side if n is not None else fallback

    def close(self) -> None:
        for n in self.nodes:
            if n.side is not None:
                n.side.close()

    def to_json(self) -> dict[str, Any]:
        t = self.topology
        return {"seen_from": t.seen_from, "current_epoch": t.current_epoch,
                "primaries": len(t.primaries()), "nodes": [n.to_json() for n in self.nodes],
                "uncovered": format_ranges(t.uncovered()),
                "migrating": {str(s): list(v) for s, v in sorted(t.migrating.items())},
                "importing": {str(s): list(v) for s, v in sorted(t.importing.items())},
                "disagreeing": self.disagreeing}


def _read_node(role: str, ep: Endpoint, node: ClusterNode) -> tuple[NodeProbe, ClusterTopology | None]:
    label = f"{role} node {node.address}"
    if node.failed:  # the cluster itself gave up on it (a node that is only "disconnected" is still tried)
        return NodeProbe(node, None, error=f"marked {','.join(sorted(node.flags))} by the cluster"), None
    client = redis.Redis(**topo.node_kwargs(ep, node.host, node.port))
    side = NodeSide(label, ep, client)
    probe = NodeProbe(node, side)
    try:
        server = side.call("INFO", "server")
        probe.run_id = str(server.get("run_id", ""))
        probe.identity = identify({**server, **side.call("INFO", "replication")})
        probe.memory = side.call("INFO", "memory")
        with contextlib.suppress(Unavailable):
            probe.commandstats = command_calls(side.call("INFO", "commandstats"))
        with contextlib.suppress(Unavailable):
            errors = side.call("INFO", "errorstats")
            cross = errors.get("errorstat_CROSSSLOT")
            probe.crossslot_errors = int(cross.get("count", 0)) if isinstance(cross, dict) else 0
        with contextlib.suppress(Unavailable):
            reply = side.call("MODULE", "LIST")
            probe.modules = sorted(text(m.get(b"name", m.get("name", b""))).lower() for m in reply)
        view = None
        with contextlib.suppress(Unavailable, redis.exceptions.ResponseError):
            view = side.guard("CLUSTER NODES", lambda: topo.read_topology(client, connected_to=(node.host, node.port)))
        return probe, view
    except (UnreachableError, redis.exceptions.ResponseError) as e:  # down, or e.g. LOADING
        side.close()
        return NodeProbe(node, None, error=str(e).split(": ", 1)[-1]), None


def gather(role: str, side: Side) -> ClusterView:
    """Read the topology from the playbook's node (or a seed), then every node of it."""
    seed_host, seed_port = side.client.connection_pool.connection_kwargs["host"], \
        side.client.connection_pool.connection_kwargs["port"]
    seen = side.guard("CLUSTER NODES", lambda: topo.read_topology(side.client, connected_to=(seed_host, seed_port)))
    nodes: list[NodeProbe] = []
    disagreeing: list[str] = []
    mine = _owners(seen)
    for node in seen.nodes:
        probe, view = _read_node(role, side.endpoint, node)
        nodes.append(probe)
        if view is None:
            continue
        # A slot in flight is marked only in the two nodes moving it: gather every node's markers.
        for slot, move in view.migrating.items():
            seen.migrating.setdefault(slot, move)
        for slot, move in view.importing.items():
            seen.importing.setdefault(slot, move)
        if _owners(view) != mine:
            disagreeing.append(node.address)
    return ClusterView(role, side.endpoint, seen, _in_shard_order(nodes), disagreeing)


def _in_shard_order(nodes: list[NodeProbe]) -> list[NodeProbe]:
    """Primaries in slot order, each followed by its replicas; then any node that fits nowhere."""
    primaries = sorted((n for n in nodes if n.node.role == "primary" and n.node.slots), key=lambda n: n.node.slots[0])
    out: list[NodeProbe] = []
    for p in primaries:
        out.append(p)
        out += [n for n in nodes if n.node.primary_id == p.node.id]
    placed = {id(n) for n in out}
    return out + [n for n in nodes if id(n) not in placed]


def _owners(t: ClusterTopology) -> tuple:
    return tuple(sorted((n.address, n.slots) for n in t.primaries()))


def count_slot_keys(view: ClusterView) -> dict[int, int]:
    """Keys per slot on each primary, for the slots it owns (CLUSTER COUNTKEYSINSLOT, pipelined)."""
    if view.slot_keys is not None:
        return view.slot_keys
    out: dict[int, int] = {}
    for n in view.readable_primaries():
        slots = [s for lo, hi in n.node.slots for s in range(lo, hi + 1)]
        client = n.side.client

        def run(slots=slots, client=client):
            pipe = client.pipeline(transaction=False)
            for s in slots:
                pipe.execute_command("CLUSTER", "COUNTKEYSINSLOT", s)
            return pipe.execute()

        out.update({s: int(c) for s, c in zip(slots, n.side.guard("CLUSTER COUNTKEYSINSLOT", run)) if int(c)})
    view.slot_keys = out
    return out


# --------------------------------------------------------------------------------------------
# cluster.nodes
# --------------------------------------------------------------------------------------------
def nodes_check(probe) -> Check:
    """Every node of each cluster side identified; a primary that cannot be read fails, mixed versions warn."""
    problems: list[tuple[str, str, str]] = []  # (status, what, fix)
    described = []
    for role, view in sorted(probe.clusters.items(), reverse=True):
        prim = view.primaries()
        primary_ids = {n.node.id for n in prim}
        replicas = [n for n in view.nodes if n.node.role == "replica"]
        versions: dict[str, list[str]] = {}
        rdb: dict[str, list[str]] = {}
        mods: dict[str, list[str]] = {}
        for n in view.nodes:
            if n.identity is None:
                is_primary = n.node.id in primary_ids
                problems.append((FAIL if is_primary else WARN,
                                 f"{role} {n.label} could not be read: {n.error}",
                                 f"bring {n.address} back or remove it from the cluster (CLUSTER FORGET)"
                                 + (": sync and check read every primary" if is_primary else "")))
                continue
            versions.setdefault(n.identity.label, []).append(n.address)
            rdb.setdefault(str(written_version(n.identity)), []).append(n.address)
            mods.setdefault(",".join(n.modules) if n.modules is not None else "?", []).append(n.address)
        described.append(f"{role}: {len(prim)} primaries and {len(replicas)} replicas, "
                         + "; ".join(f"{v} on {len(a)} node{'s' if len(a) != 1 else ''}" for v, a in versions.items())
                         + f", RDB {'/'.join(sorted(rdb))}")
        if len(versions) > 1:
            problems.append((WARN, f"the {role}'s nodes run different versions: "
                             + "; ".join(f"{v} on {', '.join(a)}" for v, a in sorted(versions.items())),
                             f"finish upgrading the {role} cluster so every node runs one version (the command, "
                             "configuration and data-format checks ran against one node of it)"))
        known = {k: v for k, v in mods.items() if k != "?"}
        if len(known) > 1:
            problems.append((WARN, f"the {role}'s nodes load different modules: "
                             + "; ".join(f"[{k or 'none'}] on {', '.join(v)}" for k, v in sorted(known.items())),
                             f"load the same modules on every {role} node"))
        if view.disagreeing:
            problems.append((WARN, f"{role} nodes {', '.join(view.disagreeing)} see other slot owners than "
                             f"{view.topology.seen_from[:8] or 'the playbook node'} (gossip not settled or a split)",
                             f"wait until CLUSTER NODES agrees on every {role} node, then run the check again"))
    data = {role: view.to_json() for role, view in probe.clusters.items()}
    # The cluster's own replication traffic, left out of the application's commands.
    data["source_replication_calls"] = probe.facts.get("cluster_replication_calls", {})
    return _verdict("cluster.nodes", "Cluster nodes", problems, "; ".join(described), data)


def _verdict(name: str, title: str, problems: list[tuple[str, str, str]], passed: str, data: dict) -> Check:
    if not problems:
        return Check(name, title, PASS, passed, "", data)
    status = FAIL if any(p[0] == FAIL for p in problems) else WARN
    fixes = list(dict.fromkeys(p[2] for p in problems if p[2]))
    return Check(name, title, status, "; ".join(p[1] for p in problems), "; ".join(fixes), data)


# --------------------------------------------------------------------------------------------
# cluster.slots
# --------------------------------------------------------------------------------------------
def slots_check(probe) -> Check:
    """All 16384 slots owned by a live primary on each cluster side, and no slot migrating or importing."""
    problems, passed, data = [], [], {}
    for role, view in sorted(probe.clusters.items(), reverse=True):
        t = view.topology
        uncovered = t.uncovered()
        moving = sorted(set(t.migrating) | set(t.importing))
        data[role] = {"uncovered": format_ranges(uncovered), "migrating": sorted(t.migrating),
                      "importing": sorted(t.importing)}
        if uncovered:
            n = sum(hi - lo + 1 for lo, hi in uncovered)
            problems.append((FAIL, f"the {role} has {n} slot{'s' if n != 1 else ''} no live primary owns: "
                             f"{format_ranges(uncovered)}",
                             f"assign the {role}'s uncovered slots (CLUSTER ADDSLOTSRANGE, or redis-cli --cluster "
                             "fix) so writes to them do not fail with CLUSTERDOWN"))
        if moving:
            where = []
            for s in moving:
                src, dst = t.migrating.get(s) or t.importing.get(s)
                where.append(f"{s} ({_addr(t, src)} → {_addr(t, dst)})")
            problems.append((FAIL, f"the {role} has slots being resharded: {', '.join(where[:_LISTED])}"
                             + (f" and {len(where) - _LISTED} more" if len(where) > _LISTED else ""),
                             f"finish or cancel the {role}'s reshard (redis-cli --cluster fix, or CLUSTER SETSLOT "
                             "<slot> STABLE on both nodes) before the migration starts"))
        if not uncovered and not moving:
            passed.append(f"{role}: all {SLOTS} slots owned by {len(t.primaries())} primaries, none moving")
    return _verdict("cluster.slots", "Cluster slot coverage", problems, "; ".join(passed), data)


def _addr(t: ClusterTopology, node_id: str) -> str:
    n = t.by_id(node_id)
    return n.address if n else node_id[:8]


# --------------------------------------------------------------------------------------------
# cluster.replicas
# --------------------------------------------------------------------------------------------
def replicas_check(probe) -> Check:
    """Each primary of each cluster side has at least one live replica; a shard without one warns, by name."""
    problems, passed, data = [], [], {}
    for role, view in sorted(probe.clusters.items(), reverse=True):
        t = view.topology
        counts = {p.address: len(t.replicas_of(p)) for p in t.primaries()}
        data[role] = counts
        alone = [p for p in t.primaries() if not t.replicas_of(p)]
        if alone:
            problems.append((WARN, f"{role} shard{'s' if len(alone) != 1 else ''} without a replica: "
                             + ", ".join(f"{p.address} (slots {format_ranges(p.slots)})" for p in alone),
                             f"add a replica to each {role} shard (CLUSTER REPLICATE): without one a node failure "
                             "during the migration loses that shard's slots until it is back"))
        else:
            passed.append(f"{role}: every primary has a replica ({min(counts.values(), default=0)}"
                          f"–{max(counts.values(), default=0)} each)")
    return _verdict("cluster.replicas", "Cluster replicas", problems, "; ".join(passed), data)


# --------------------------------------------------------------------------------------------
# cluster.memory
# --------------------------------------------------------------------------------------------
def source_bytes_per_slot(probe) -> tuple[dict[int, float], str]:
    """The source's data spread over the 16384 slots, and how it was estimated.

    A cluster source: each primary's bytes per key (its sampled MEMORY USAGE average, else
    ``used_memory_dataset`` over its keys) times ``CLUSTER COUNTKEYSINSLOT`` of each slot it owns.
    A standalone source: the sampled keys' slots, each carrying an equal share of the data.
    """
    view = probe.clusters.get("source")
    out: dict[int, float] = {}
    if view is not None:
        counts = count_slot_keys(view)
        for n in view.readable_primaries():
            per_key = _bytes_per_key(n, probe.node_samples.get(n.node.id), sum(
                c for s, c in counts.items() if n.node.owns(s)))
            for s, c in counts.items():
                if n.node.owns(s):
                    out[s] = out.get(s, 0.0) + c * per_key
        return out, "keys per slot (CLUSTER COUNTKEYSINSLOT) × each source primary's bytes per key"
    keys = probe.source_keys
    sampled = [k for d in keys.dbs.values() for k in d.sampled]
    total = sum(d.estimated_memory or 0 for d in keys.dbs.values()) or _dataset(keys.used_memory, {})
    if not sampled:
        if keys.user_keys:  # keys exist but SCAN was refused: nothing to spread over the slots
            raise Unavailable("source", "SCAN", next((d.unsampled for d in keys.dbs.values() if d.unsampled),
                                                     "no key could be sampled"))
        return out, "the source is empty"
    share = total / len(sampled)
    for k in sampled:
        s = key_slot(k)
        out[s] = out.get(s, 0.0) + share
    return out, f"the slots of {len(sampled)} sampled source keys, each ~{share:.0f} bytes"


def _dataset(used: int, memory: dict) -> int:
    if "used_memory_dataset" in memory:
        return int(memory["used_memory_dataset"])
    return max(0, used - int(memory.get("used_memory_startup", 0)))


def _bytes_per_key(n: NodeProbe, sample, keys: int) -> float:
    if sample is not None:
        sampled = sum(len(d.sampled) for d in sample.dbs.values())
        mem = [d.memory_sampled for d in sample.dbs.values() if d.memory_sampled is not None]
        if sampled and mem:
            return sum(mem) / sampled
    return _dataset(int(n.memory.get("used_memory", 0)), n.memory) / keys if keys else 0.0


@dataclass
class ShardProjection:
    address: str
    slots: str
    share: int  # bytes of the source's data its slots would hold
    used: int  # its used_memory now
    maxmemory: int  # 0: unlimited
    status: str = PASS

    @property
    def projected(self) -> int:
        return self.used + self.share

    def to_json(self) -> dict:
        return {**self.__dict__, "projected": self.projected}

    def describe(self) -> str:
        limit = _human(self.maxmemory) if self.maxmemory else "no maxmemory"
        return (f"{self.address} (slots {self.slots}): ~{_human(self.share)} of the source's data + "
                f"{_human(self.used)} used now = ~{_human(self.projected)} against {limit}")


def project(per_slot: dict[int, float], target: ClusterView, headroom: float = MEMORY_HEADROOM) -> list[ShardProjection]:
    """Each target primary's share of the source's data (its slots' bytes) plus what it uses now, against its maxmemory."""
    out = []
    for n in target.primaries():
        share = sum(b for s, b in per_slot.items() if n.node.owns(s))
        p = ShardProjection(n.address, format_ranges(n.node.slots), int(share), int(n.memory.get("used_memory", 0)),
                            int(n.memory.get("maxmemory", 0) or 0))
        if p.maxmemory and p.projected > p.maxmemory:
            p.status = FAIL
        elif p.maxmemory and p.projected * (1 + headroom) > p.maxmemory:
            p.status = WARN
        out.append(p)
    return out


def memory_check(probe) -> Check:
    """No target shard's share of the source's data (by the target's slot layout) exceeds its maxmemory."""
    target = probe.clusters.get("target")
    if target is None:
        return Check("cluster.memory", "Memory per target shard", PASS,
                     "the target is one server: the configuration check compares its maxmemory with the source's "
                     f"used_memory summed over the source primaries ({_human(probe.source_keys.used_memory)})", "", {})
    per_slot, how = source_bytes_per_slot(probe)
    shards = project(per_slot, target)
    data = {"estimated_from": how, "source_bytes": int(sum(per_slot.values())),
            "headroom": MEMORY_HEADROOM, "shards": [s.to_json() for s in shards]}
    over = [s for s in shards if s.status == FAIL]
    tight = [s for s in shards if s.status == WARN]
    head = f"~{_human(sum(per_slot.values()))} of source data estimated from {how}"
    if over or tight:
        parts = ([f"over maxmemory: {'; '.join(s.describe() for s in over)}"] if over else []) + \
                ([f"under {MEMORY_HEADROOM:.0%} headroom: {'; '.join(s.describe() for s in tight)}"] if tight else [])
        fix = "raise maxmemory on " + ", ".join(
            f"{s.address} to at least {_human(int(s.projected * (1 + MEMORY_HEADROOM)))}" for s in over + tight) + \
            ", or give the target more shards so each owns fewer slots"
        return Check("cluster.memory", "Memory per target shard", FAIL if over else WARN,
                     f"{head}; " + "; ".join(parts), fix, data)
    return Check("cluster.memory", "Memory per target shard", PASS,
                 f"{head}; " + "; ".join(s.describe() for s in shards), "", data)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------------------------
# cluster.commands
# --------------------------------------------------------------------------------------------
# Commands that read or change one node's part of a cluster only, or use databases a cluster lacks.
NOT_CLUSTER_SAFE: dict[str, str] = {
    "keys": "sees only the keys of the node it reaches",
    "scan": "walks only the node it reaches (a cluster client must scan every primary)",
    "dbsize": "counts only the node it reaches",
    "randomkey": "picks from one node only",
    "flushdb": "empties only the node it reaches",
    "flushall": "empties only the node it reaches",
    "select": "a cluster has database 0 only (Valkey 9.0+: as many as cluster-databases)",
    "move": "a cluster has database 0 only (Valkey 9.0+: as many as cluster-databases)",
    "swapdb": "a cluster has database 0 only (Valkey 9.0+: as many as cluster-databases)",
    "script|load": "loads the script on one node only: EVALSHA answers NOSCRIPT on the others",
    "function|load": "loads the library on one node only",
    "wait": "waits for the replicas of one shard only",
}


def multi_key_commands(probe, executed: dict[str, int]) -> dict[str, str]:
    """Executed commands that can name keys of several slots: {name: why}, from the source's COMMAND key specs."""
    try:
        table = probe.memo("cluster:keyspecs", lambda: _key_specs(probe.source))
    except Unavailable:
        table = {}
    out = {}
    for name in executed:
        base = name.partition("|")[0]
        if base in ("multi", "exec"):
            out[name] = "a transaction's keys must all be in one slot"
        elif base in table:
            first, last, step, movable = table[base]
            if movable:
                out[name] = "takes a variable set of keys"
            elif first > 0 and (last < 0 or last > first):
                out[name] = "takes several keys"
    return out


def _key_specs(side: Side) -> dict[str, tuple[int, int, int, bool]]:
    out = {}
    for entry in side.call("COMMAND", raw=True):
        flags = {text(f).lower() for f in entry[2]}
        out[text(entry[0]).lower()] = (int(entry[3]), int(entry[4]), int(entry[5]), "movablekeys" in flags)
    return out


def _calls(names: list[str], executed: dict[str, int]) -> str:
    shown = ", ".join(f"{n} ({executed[n]:,} call{'s' if executed[n] != 1 else ''})" for n in names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def commands_check(probe) -> Check:
    """Multi-key and not-cluster-safe commands the application runs, judged for the pair's topologies."""
    executed = probe.commandstats
    source_cluster, target_cluster = "source" in probe.clusters, "target" in probe.clusters
    multi = multi_key_commands(probe, executed)
    unsafe = {n: why for n, why in NOT_CLUSTER_SAFE.items() if n in executed}
    crossslot = probe.source_crossslot_errors
    data = {"multi_key": {n: {"calls": executed[n], "why": w} for n, w in sorted(multi.items())},
            "not_cluster_safe": {n: {"calls": executed[n], "why": w} for n, w in sorted(unsafe.items())},
            "crossslot_errors": crossslot, "source_cluster": source_cluster, "target_cluster": target_cluster}
    names = sorted(multi)
    problems: list[tuple[str, str, str]] = []
    passed = []
    if not target_cluster:
        passed.append("the target is one server: multi-key commands work across all keys there"
                      + (f" ({_calls(names, executed)})" if names else ""))
    elif source_cluster:
        if names:
            passed.append(f"multi-key commands the application runs: {_calls(names, executed)}; the source "
                          "cluster already keeps each one within one hash slot, and a key's slot is the same on "
                          "every cluster, so the target's different slot layout keeps them together")
        else:
            passed.append("the application runs no multi-key command")
    else:
        if names:
            problems.append((WARN, f"multi-key commands the application runs on the standalone source: "
                             f"{_calls(names, executed)}; on the cluster target each one fails with CROSSSLOT "
                             "unless all its keys hash to one slot",
                             "give keys used together one hash tag ({user42}:cart, {user42}:profile) before the "
                             "cutover; during mirroring the shim counts the commands that would fail with CROSSSLOT"))
    if crossslot:
        problems.append((WARN, f"the source answered CROSSSLOT {crossslot:,} time{'s' if crossslot != 1 else ''} "
                         "(INFO errorstats): the application already sends commands across slots, and they fail "
                         "on the target too",
                         "find the commands (the application's error logs) and give their keys one hash tag"))
    if unsafe and target_cluster:
        listed = "; ".join(f"{_calls([n], executed)}: {why}" for n, why in sorted(unsafe.items()))
        if source_cluster:
            passed.append(f"commands that act on one node, as on the source cluster: {listed}")
        else:
            problems.append((WARN, f"commands that are not cluster-safe: {listed}",
                             "use a cluster-aware client for these (it runs SCAN, KEYS or SCRIPT LOAD on every "
                             "primary) or drop them before the cutover"))
    check = _verdict("cluster.commands", "Multi-key commands and slots", problems, "; ".join(passed), data)
    if problems and passed:
        check.evidence += "; " + "; ".join(passed)
    return check


# (name, title, function, what to verify by hand): run after the topology check when a side is a cluster.
CHECKS = (
    ("cluster.nodes", "Cluster nodes", nodes_check, "run INFO server and MODULE LIST on every node"),
    ("cluster.slots", "Cluster slot coverage", slots_check,
     "run redis-cli --cluster check on each cluster and confirm all 16384 slots are covered and none is open"),
    ("cluster.replicas", "Cluster replicas", replicas_check, "run CLUSTER REPLICAS <id> for each primary"),
    ("cluster.memory", "Memory per target shard", memory_check,
     "compare each target primary's maxmemory with the source's data in the slots it owns"),
    ("cluster.commands", "Multi-key commands and slots", commands_check,
     "check the application's multi-key commands use one hash tag per command"),
)
