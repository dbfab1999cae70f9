"""Redis Cluster topology: which nodes exist, which primary owns each slot, what is moving.

One reader of the topology for every component (compat, sync, check, gates, the shim): the
parse of ``CLUSTER NODES`` is pure (``parse_nodes``); ``discover`` asks the playbook's node
and seeds. Everything else about a cluster is built on ``ClusterTopology``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import redis
from redis.crc import key_slot as _key_slot

from migrator.connect import client_kwargs
from migrator.errors import UnreachableError
from migrator.playbook import Endpoint

SLOTS = 16384


def key_slot(key: bytes | str) -> int:
    """The hash slot of a key (hash tags honoured), as every cluster node computes it."""
    return _key_slot(key.encode() if isinstance(key, str) else key)


@dataclass(frozen=True)
class ClusterNode:
    id: str
    host: str
    port: int
    role: str  # "primary" or "replica"
    primary_id: str | None  # for a replica: the primary it follows
    slots: tuple[tuple[int, int], ...] = ()
    flags: frozenset[str] = frozenset()
    connected: bool = True
    config_epoch: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags or "noaddr" in self.flags

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)

    def slot_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.slots)


@dataclass
class ClusterTopology:
    nodes: list[ClusterNode]
    # slot -> (the node id it is migrating from, the node id it is migrating to), from the
    # ``[slot->-id]`` / ``[slot-<-id]`` markers: a reshard in flight.
    migrating: dict[int, tuple[str, str]] = field(default_factory=dict)
    importing: dict[int, tuple[str, str]] = field(default_factory=dict)
    current_epoch: int = 0
    seen_from: str = ""  # the node whose view this is

    def by_id(self, node_id: str) -> ClusterNode | None:
        return next((n for n in self.nodes if n.id == node_id), None)

    def primaries(self) -> list[ClusterNode]:
        """Primaries that own slots and are not failed, in slot order."""
        out = [n for n in self.nodes if n.role == "primary" and n.slots and not n.failed]
        return sorted(out, key=lambda n: n.slots[0][0])

    def replicas_of(self, primary: ClusterNode | str) -> list[ClusterNode]:
        pid = primary if isinstance(primary, str) else primary.id
        return [n for n in self.nodes if n.role == "replica" and n.primary_id == pid and not n.failed]

    def owner(self, slot: int) -> ClusterNode | None:
        return next((n for n in self.primaries() if n.owns(slot)), None)

    def slot_map(self) -> list[str | None]:
        """The owning node id of each of the 16384 slots (None: unassigned)."""
        out: list[str | None] = [None] * SLOTS
        for n in self.primaries():
            for lo, hi in n.slots:
                for s in range(lo, hi + 1):
                    out[s] = n.id
        return out

    def uncovered(self) -> list[tuple[int, int]]:
        """Slot ranges no live primary owns."""
        return _ranges(i for i, owner in enumerate(self.slot_map()) if owner is None)

    def signature(self) -> tuple:
        """Equal for two views exactly when every slot has the same owner at the same address and
        nothing is migrating: a change of it is a reshard or a failover."""
        owners = tuple((n.id, n.address, n.slots) for n in self.primaries())
        return owners, tuple(sorted(self.migrating.items())), tuple(sorted(self.importing.items()))

    def moved_slots(self, other: "ClusterTopology") -> list[tuple[int, int]]:
        """Slot ranges whose owner (id or address) differs between this view and ``other``."""
        mine, theirs = self._owner_addresses(), other._owner_addresses()
        return _ranges(s for s in range(SLOTS) if mine[s] != theirs[s])

    def _owner_addresses(self) -> list[tuple[str, str] | None]:
        out: list[tuple[str, str] | None] = [None] * SLOTS
        for n in self.primaries():
            for lo, hi in n.slots:
                for s in range(lo, hi + 1):
                    out[s] = (n.id, n.address)
        return out


def _ranges(slots: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in slots:
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    """``0-5460,5462`` for humans and evidence."""
    return ",".join(f"{lo}-{hi}" if hi != lo else str(lo) for lo, hi in ranges)


def parse_nodes(text: str, *, connected_to: tuple[str, int] | None = None) -> ClusterTopology:
    """Parse ``CLUSTER NODES`` output (Redis 6.2 … Valkey 9.x formats).

    ``connected_to`` fills in the address of a node that does not know its own IP yet
    (``:0@0`` on a fresh single node).
    """
    nodes: list[ClusterNode] = []
    migrating: dict[int, tuple[str, str]] = {}
    importing: dict[int, tuple[str, str]] = {}
    seen_from = ""
    for line in text.strip().splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        nid, addr, flags_s, master, _ping, _pong, epoch, link = parts[:8]
        flags = frozenset(flags_s.split(","))
        hostport = addr.split("@")[0]
        host, _, port_s = hostport.rpartition(":")
        host = host.strip("[]")
        port = int(port_s) if port_s.isdigit() else 0
        if "myself" in flags:
            seen_from = nid
            if (not host or port == 0) and connected_to:
                host, port = connected_to[0], connected_to[1]
        slots: list[tuple[int, int]] = []
        for s in parts[8:]:
            if s.startswith("["):
                body = s[1:-1]
                if "->-" in body:
                    slot, other = body.split("->-")
                    migrating[int(slot)] = (nid, other)
                elif "-<-" in body:
                    slot, other = body.split("-<-")
                    importing[int(slot)] = (other, nid)
                continue
            lo, _, hi = s.partition("-")
            slots.append((int(lo), int(hi or lo)))
        role = "primary" if "master" in flags else "replica"
        nodes.append(ClusterNode(id=nid, host=host or "127.0.0.1", port=port, role=role,
                                 primary_id=None if master == "-" else master, slots=tuple(sorted(slots)),
                                 flags=flags, connected=link == "connected", config_epoch=int(epoch)))
    return ClusterTopology(nodes=nodes, migrating=migrating, importing=importing, seen_from=seen_from)


def is_cluster(client: redis.Redis) -> bool:
    """True when the server runs with ``cluster-enabled yes``."""
    info = client.info("cluster")
    return int(info.get("cluster_enabled", 0)) == 1


def read_topology(client: redis.Redis, *, connected_to: tuple[str, int] | None = None) -> ClusterTopology:
    """One node's view: ``CLUSTER NODES`` and ``cluster_current_epoch``."""
    raw = client.execute_command("CLUSTER", "NODES")
    text = raw.decode() if isinstance(raw, bytes) else raw if isinstance(raw, str) else "\n".join(raw)
    topo = parse_nodes(text, connected_to=connected_to)
    with contextlib.suppress(redis.exceptions.RedisError):
        info = client.execute_command("CLUSTER", "INFO")
        info = info.decode() if isinstance(info, bytes) else info
        for line in str(info).splitlines():
            if line.startswith("cluster_current_epoch:"):
                topo.current_epoch = int(line.split(":", 1)[1])
    return topo


def seed_addresses(ep: Endpoint) -> list[tuple[str, int]]:
    """The URL's node, then the playbook's ``seeds``, without repeats."""
    out = [(ep.host, ep.port)]
    for s in ep.seeds:
        host, _, port = s.rpartition(":")
        a = (host.strip("[]"), int(port))
        if a not in out:
            out.append(a)
    return out


def node_kwargs(ep: Endpoint, host: str, port: int) -> dict[str, Any]:
    """``redis.Redis`` keyword arguments for one node of ``ep``'s cluster (credentials, TLS and
    timeouts from the endpoint; a cluster has only database 0)."""
    kw = client_kwargs(ep, db=0)
    kw["host"], kw["port"] = host, port
    return kw


def discover(ep: Endpoint, role: str = "endpoint") -> ClusterTopology:
    """The topology as the first reachable seed sees it; UnreachableError naming every seed tried."""
    errors = []
    for host, port in seed_addresses(ep):
        c = redis.Redis(**node_kwargs(ep, host, port))
        try:
            return read_topology(c, connected_to=(host, port))
        except (redis.exceptions.RedisError, OSError) as e:
            errors.append(f"{host}:{port}: {e}")
        finally:
            c.close()
    raise UnreachableError(f"{role} {ep.display}: no cluster node answered ({'; '.join(errors)})")


def cluster_client(ep: Endpoint, **extra: Any) -> redis.RedisCluster:
    """A slot-aware client of ``ep``'s cluster (follows MOVED/ASK and refreshes its slot map)."""
    kw = client_kwargs(ep, db=0)
    for k in ("host", "port", "db", "retry"):
        kw.pop(k, None)
    kw.update(extra)
    nodes = [redis.cluster.ClusterNode(h, p) for h, p in seed_addresses(ep)]
    return redis.RedisCluster(startup_nodes=nodes, **kw)


def own_views(ep: Endpoint, topo: ClusterTopology) -> dict[str, ClusterTopology]:
    """Each live primary's own view (``CLUSTER NODES`` asked of that node), by node id.

    A node's ``myself`` line is the authority on what *it* serves now: the slots it owns and the
    ``[slot->-id]``/``[slot-<-id]`` markers of a migration, which only its own view shows.
    A primary that cannot be asked is left out (its slots then count as unclaimed)."""
    out: dict[str, ClusterTopology] = {}
    for n in topo.primaries():
        c = redis.Redis(**node_kwargs(ep, n.host, n.port))
        try:
            out[n.id] = read_topology(c, connected_to=(n.host, n.port))
        except (redis.exceptions.RedisError, OSError):
            continue
        finally:
            c.close()
    return out


def stable_claims(views: dict[str, ClusterTopology]) -> dict[str, tuple[str, frozenset[int]]]:
    """Per node id: (its address, the slots it says it owns as a primary with no migration of them
    in or out), from ``own_views``. A slot absent here is unowned, moving, or its node is silent."""
    out: dict[str, tuple[str, frozenset[int]]] = {}
    for nid, view in views.items():
        me = view.by_id(view.seen_from or nid)
        if me is None or me.role != "primary" or me.failed:
            continue
        moving = set(view.migrating) | set(view.importing)
        slots = {s for lo, hi in me.slots for s in range(lo, hi + 1)} - moving
        out[nid] = (me.address, frozenset(slots))
    return out


def moving_slots(views: dict[str, ClusterTopology]) -> set[int]:
    """Slots some primary marks as migrating or importing (a reshard in flight)."""
    out: set[int] = set()
    for view in views.values():
        out |= set(view.migrating) | set(view.importing)
    return out
