"""Is each side the same server, with the same data, as when the evidence was gathered?

A server that restarts without persistence (a cache that crashed, a failover onto an empty
replica) comes back with a new ``run_id`` and none of the keys that a sync copied or a check
compared. Evidence gathered before that moment says nothing about the server that answers now,
so every piece of it (a sync, a check, a repair) must be voided for that side.

This module owns that idea:

- ``probe`` reads a side's identity in one bounded call (INFO server + keyspace): reachable or
  not, ``run_id``, when it started (from its uptime, which needs no clock agreement) and its keys.
- ``snapshot`` probes both sides; sync and check record it in their reports (``sides``) as they
  start, and every transition journals it with the gates' evidence.
- ``restarted_since`` says, for a piece of evidence, which side restarted after it began.
- ``compare_sizes`` says whether the two sides' key counts agree within the playbook's drift.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migrator.connect import make_client
from migrator.playbook import Endpoint, Playbook
from migrator.state import iso, now, parse_iso

ROLES = ("source", "target")
# Uptime is reported in whole seconds: a start time computed from it is exact to about a second.
UPTIME_SLACK = timedelta(seconds=1.5)


@dataclass
class Side:
    role: str
    url: str
    reachable: bool
    error: str | None = None
    run_id: str | None = None
    started_at: str | None = None  # now − uptime, as seen from here
    uptime_s: int | None = None
    keys: int | None = None  # every database
    dbs: dict[str, int] = field(default_factory=dict)
    # A cluster side: {"view": migrator.topology_watch.view(...), "nodes": {node id: {address,
    # run_id, started_at, uptime_s, keys, slots}}} for each live primary; keys/dbs are their sums.
    cluster: dict[str, Any] | None = None
    probed_at: str = field(default_factory=lambda: iso(now()))
    # INFO replication's master_replid / master_replid2: a replica promoted by a failover has the
    # old primary's replication id as its replid2 (it continued that primary's history).
    replid: str | None = None
    replid2: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Side:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def describe(self) -> str:
        if not self.reachable:
            return f"{self.role} {self.url}: unreachable ({self.error})"
        if self.cluster is not None:
            from migrator.topology_watch import summary

            return f"{self.role}: cluster of {summary(self.cluster.get('view'))}, {self.keys:,} keys"
        return f"{self.role}: run_id {(self.run_id or '?')[:8]}, up {_uptime(self.uptime_s)}, {self.keys:,} keys"


def _uptime(s: int | None) -> str:
    from migrator.durations import format_duration

    return "?" if s is None else format_duration(timedelta(seconds=s))


def probe(ep: Endpoint, role: str, timeout: float | None = None) -> Side:
    """One side's identity, in at most about ``timeout`` seconds (default: its connect_timeout).

    Never raises for a server that is down, stopped or refuses us: a probe is evidence, and an
    unreachable side is evidence too. No retry: a stopped server (SIGSTOP) must cost one timeout,
    not the client library's default of ten.
    """
    t = timeout if timeout is not None else ep.connect_timeout.total_seconds()
    c = make_client(ep, socket_timeout=t, socket_connect_timeout=t, retry=Retry(NoBackoff(), 0))
    try:
        info = c.info("server")
        keyspace = c.info("keyspace")
        repl = c.info("replication")
    except (redis.exceptions.RedisError, OSError) as e:
        if ep.seeds and not isinstance(e, redis.exceptions.AuthenticationError):
            return _probe_cluster(ep, role, t)  # the URL's node is down: another seed may answer
        return Side(role, ep.display, False, error=_why(e))
    finally:
        c.close()
    if _mode(info) == "cluster":
        return _probe_cluster(ep, role, t)
    if _mode(info) == "sentinel":  # its keyspace is empty: counting it would look like a side that lost its data
        return Side(role, ep.display, False, error="it answers as a sentinel, not as a data node")
    uptime = int(info.get("uptime_in_seconds", 0))
    dbs = {k[2:]: int(v.get("keys", 0)) for k, v in keyspace.items() if k.startswith("db") and isinstance(v, dict)}
    return Side(role, ep.display, True, run_id=str(info.get("run_id", "")) or None,
                started_at=iso(now() - timedelta(seconds=uptime)), uptime_s=uptime, keys=sum(dbs.values()), dbs=dbs,
                replid=str(repl.get("master_replid") or "") or None, replid2=_replid2(repl))


def _replid2(repl: dict[str, Any]) -> str | None:
    v = str(repl.get("master_replid2") or "")
    return None if not v or set(v) == {"0"} else v


def failed_over(old: Side, cur: Side) -> bool:
    """``cur`` is a replica of ``old`` promoted by a failover (it continued old's replication history)."""
    return bool(old.replid and cur.replid2 and cur.replid2 == old.replid)


def _mode(info: dict[str, Any]) -> str:
    """standalone, cluster or sentinel (Redis says ``redis_mode``, Valkey 8+ ``server_mode``)."""
    return str(info.get("server_mode") or info.get("redis_mode") or "standalone")


def _probe_cluster(ep: Endpoint, role: str, t: float) -> Side:
    """A cluster side: the topology from the first seed that answers, then each live primary's
    identity and keys. Unreachable if no seed answers, a primary does not, or a slot has no live
    primary (a failover in progress): the side cannot then serve every key."""
    from migrator import cluster, topology_watch

    quick = {"socket_timeout": t, "socket_connect_timeout": t, "retry": Retry(NoBackoff(), 0)}
    topo, errors = None, []
    for host, port in cluster.seed_addresses(ep):
        c = redis.Redis(**{**cluster.node_kwargs(ep, host, port), **quick})
        try:
            topo = cluster.read_topology(c, connected_to=(host, port))
            break
        except (redis.exceptions.RedisError, OSError) as e:
            errors.append(f"{host}:{port}: {_why(e)}")
        finally:
            c.close()
    if topo is None:
        return Side(role, ep.display, False, error=f"no cluster node answered ({'; '.join(errors)})")
    nodes: dict[str, dict[str, Any]] = {}
    down = []
    for n in topo.primaries():
        c = redis.Redis(**{**cluster.node_kwargs(ep, n.host, n.port), **quick})
        try:
            info, keyspace = c.info("server"), c.info("keyspace")
            if n.id != topo.seen_from:
                # A slot's MIGRATING/IMPORTING marks show only in the views of the two nodes involved.
                own = cluster.read_topology(c, connected_to=(n.host, n.port))
                topo.migrating.update(own.migrating)
                topo.importing.update(own.importing)
        except (redis.exceptions.RedisError, OSError) as e:
            down.append(f"primary {n.address} (node {n.id[:8]}, slots {cluster.format_ranges(n.slots)}): {_why(e)}")
            continue
        finally:
            c.close()
        uptime = int(info.get("uptime_in_seconds", 0))
        keys = sum(int(v.get("keys", 0)) for k, v in keyspace.items() if k.startswith("db") and isinstance(v, dict))
        nodes[n.id] = {"address": n.address, "run_id": str(info.get("run_id", "")) or None,
                       "started_at": iso(now() - timedelta(seconds=uptime)), "uptime_s": uptime, "keys": keys,
                       "slots": cluster.format_ranges(n.slots)}
    view = topology_watch.view(topo)
    detail = {"view": view, "nodes": nodes}
    if view["uncovered"]:
        down.append(f"slots {cluster.format_ranges(tuple(r) for r in view['uncovered'])} have no live primary "
                    "(a failover in progress?)")
    if down:
        return Side(role, ep.display, False, error="; ".join(down), cluster=detail)
    keys = sum(n["keys"] for n in nodes.values())
    return Side(role, ep.display, True, keys=keys, dbs={"0": keys} if keys else {}, cluster=detail)


def _why(e: BaseException) -> str:
    if isinstance(e, redis.exceptions.AuthenticationError):
        return f"authentication failed: {e}"
    if isinstance(e, redis.exceptions.TimeoutError):
        return "no answer within the timeout (stopped, overloaded or partitioned)"
    return str(e) or type(e).__name__


def snapshot(pb: Playbook, timeout: float | None = None) -> dict[str, Side]:
    """Both sides' identities."""
    return {"source": probe(pb.source, "source", timeout), "target": probe(pb.target, "target", timeout)}


def snapshot_json(pb: Playbook) -> dict[str, dict[str, Any]]:
    return {role: s.to_json() for role, s in snapshot(pb).items()}


def recorded(evidence: dict[str, Any] | None) -> dict[str, Side]:
    """The sides a report or journal entry recorded (``sides``), if any."""
    raw = (evidence or {}).get("sides") or {}
    return {role: Side.from_json(v) for role, v in raw.items() if isinstance(v, dict) and role in ROLES}


def restarted_since(current: dict[str, Side], began: str | datetime | None,
                    then: dict[str, Side] | None = None, failover_ok: bool = False) -> list[str]:
    """Why each side that restarted after ``began`` (the evidence's start) voids it; [] if none did.

    With the ``run_id`` the evidence recorded, a different one now is a restart, whenever it
    happened — except, with ``failover_ok``, a replica of the recorded server promoted by a
    failover (``failed_over``: it holds that server's data up to what asynchronous replication
    had sent; the key counts are still compared by the callers). Without one (older evidence), a server that started after ``began`` restarted.
    An unreachable side is not judged here: the gates that need it live say so themselves.
    """
    if began is None:
        return []
    began_dt = parse_iso(began) if isinstance(began, str) else began
    why = []
    for role in ROLES:
        cur = current.get(role)
        if cur is None or not cur.reachable:
            continue
        old = (then or {}).get(role)
        if cur.cluster is not None:
            why += _nodes_restarted(role, cur, old, began_dt)
            continue
        if old is not None and old.reachable and old.run_id and cur.run_id:
            if old.run_id != cur.run_id and not (failover_ok and failed_over(old, cur)):
                then_keys = f", {old.keys:,} then" if isinstance(old.keys, int) else ""
                why.append(f"the {role} restarted (run_id {old.run_id[:8]} → {cur.run_id[:8]}, up {_uptime(cur.uptime_s)}, "
                           f"{cur.keys:,} keys now{then_keys})")
            continue
        if cur.started_at and parse_iso(cur.started_at) > began_dt + UPTIME_SLACK:
            why.append(f"the {role} restarted at {cur.started_at[11:19]} (up {_uptime(cur.uptime_s)}, {cur.keys:,} keys)")
    return why


def _nodes_restarted(role: str, cur: Side, old: Side | None, began: datetime) -> list[str]:
    """Each primary of a cluster side that restarted after the evidence began, named by node id and address.

    A node keeps its id across a restart (nodes.conf), so its run_id tells. A primary the
    evidence did not know (a promoted replica, a node added by a reshard) is a topology change,
    judged by ``migrator.topology_watch``; with evidence that recorded no nodes at all (older
    reports), a primary whose process started after the evidence began restarted.
    """
    then_nodes = ((old.cluster or {}).get("nodes") or {}) if old is not None else {}
    why = []
    for nid, n in sorted((cur.cluster or {}).get("nodes", {}).items(), key=lambda kv: first_slot(kv[1].get("slots"))):
        was = then_nodes.get(nid)
        name = f"the {role} node {nid[:8]} at {n['address']} (slots {n.get('slots', '?')})"
        up, keys = _uptime(n.get("uptime_s")), n.get("keys", 0)
        if was and was.get("run_id") and n.get("run_id"):
            if was["run_id"] != n["run_id"]:
                why.append(f"{name} restarted (run_id {was['run_id'][:8]} → {n['run_id'][:8]}, up {up}, "
                           f"{keys:,} keys now, {was.get('keys', 0):,} then)")
        elif not then_nodes and n.get("started_at") and parse_iso(n["started_at"]) > began + UPTIME_SLACK:
            why.append(f"{name} restarted at {n['started_at'][11:19]} (up {up}, {keys:,} keys)")
    return why


def first_slot(ranges: str | None) -> int:
    """The first slot of ``0-5460,5462`` (for ordering nodes by their slots)."""
    head = (ranges or "").split(",")[0].split("-")[0]
    return int(head) if head.isdigit() else 1 << 20


def topology_changes(current: dict[str, Side], then: dict[str, Side] | None) -> list:
    """What changed in each cluster side's topology since ``then`` (``migrator.topology_watch.Change``s).

    Unreachable sides are compared too when their topology was read (a primary lost is a change).
    """
    from migrator import topology_watch

    out = []
    for role in ROLES:
        cur, old = current.get(role), (then or {}).get(role)
        if cur is None or old is None or cur.cluster is None or old.cluster is None:
            continue
        out += topology_watch.diff(role, old.cluster.get("view"), cur.cluster.get("view"))
    return out


def compare_sizes(current: dict[str, Side], max_drift: float, dbs: list[int] | None = None,
                  short: str | None = None) -> str | None:
    """Why the two sides' key counts disagree beyond ``max_drift``, or None if they agree.

    With ``short`` ("source" or "target"), only that side holding fewer keys counts: a rollback
    cares whether the side taking authority back lost data, not whether the other one did.

    Key counts are the cheapest sign of a side that lost its data: a target restarted empty
    holds a fraction of the source's keys. Lazy expiry and writes in flight make them differ a
    little, hence the drift (a fraction of the larger count) and a floor of a few keys.
    """
    s, t = current.get("source"), current.get("target")
    if s is None or t is None or not s.reachable or not t.reachable:
        return None
    pick = [str(d) for d in dbs] if dbs is not None else sorted(set(s.dbs) | set(t.dbs), key=int)
    problems = []
    for db in pick:
        a, b = s.dbs.get(db, 0), t.dbs.get(db, 0)
        allowed = max(5, math.ceil(max_drift * max(a, b)))
        missing = {"source": b - a, "target": a - b}.get(short or "", abs(a - b))
        if missing > allowed:
            problems.append(f"db{db}: source {a:,} keys, target {b:,} ({_pct(a, b)} apart, more than {allowed:,})")
    return "; ".join(problems) or None


def _pct(a: int, b: int) -> str:
    return f"{abs(a - b) / max(a, b, 1) * 100:.1f}%"
