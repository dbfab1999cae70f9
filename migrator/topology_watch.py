"""What changed in a cluster's topology between two pieces of evidence: pure, no I/O.

Every probe of a cluster side (``migrator.sides``) keeps a ``view`` of its topology: the
signature (``ClusterTopology.signature``), each live primary's node id, address and slot
ranges, and the slots migrating or importing. Sync and check reports record the sides as they
begin, and every transition journals them, so each piece of evidence carries the topology it
was gathered on. ``diff`` names what happened between two views (a failover of a shard, slots
moved by a reshard, a primary lost) and which slots it touched: a check that began on the old
layout does not vouch for those slots any more (``migrator.data.gates``), and the gate says so.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from migrator.cluster import SLOTS, ClusterTopology, _ranges, format_ranges

# Journal event written when an evaluation sees a topology that differs from the last one recorded.
EVENT = "topology-changed"
FAILOVER, RESHARD, LOST, ADDRESS, MIGRATING = "failover", "reshard", "lost", "address", "migrating"


def signature_hex(topo: ClusterTopology) -> str:
    """A short, stable digest of ``topo.signature()`` (equal views, equal digests)."""
    return hashlib.sha1(repr(topo.signature()).encode()).hexdigest()[:16]


def view(topo: ClusterTopology) -> dict[str, Any]:
    """The JSON-safe evidence of one side's topology."""
    return {
        "signature": signature_hex(topo),
        "primaries": [{"id": n.id, "address": n.address, "slots": [list(r) for r in n.slots]} for n in topo.primaries()],
        "replicas": sum(len(topo.replicas_of(n)) for n in topo.primaries()),
        "nodes": len(topo.nodes),
        "uncovered": [list(r) for r in topo.uncovered()],
        "migrating": sorted([s, a, b] for s, (a, b) in topo.migrating.items()),
        "importing": sorted([s, a, b] for s, (a, b) in topo.importing.items()),
        "epoch": topo.current_epoch,
    }


@dataclass(frozen=True)
class Change:
    role: str
    kind: str  # failover | reshard | lost | address | migrating
    slots: tuple[tuple[int, int], ...]
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "kind": self.kind, "slots": [list(r) for r in self.slots], "text": self.text}

    @property
    def may_lose_writes(self) -> bool:
        """A promoted replica (or a shard without a primary) may lack writes its old primary acknowledged."""
        return self.kind in (FAILOVER, LOST)


def short(node_id: str | None) -> str:
    return (node_id or "?")[:8]


def _owners(v: dict[str, Any]) -> list[str | None]:
    out: list[str | None] = [None] * SLOTS
    for p in v.get("primaries", []):
        for lo, hi in p["slots"]:
            for s in range(lo, hi + 1):
                out[s] = p["id"]
    return out


def diff(role: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[Change]:
    """What changed on ``role``'s cluster from view ``old`` to view ``new`` ([] if nothing, or either is unknown)."""
    if not old or not new or old.get("signature") == new.get("signature"):
        return []
    before, after = _owners(old), _owners(new)
    addr_old = {p["id"]: p["address"] for p in old.get("primaries", [])}
    addr_new = {p["id"]: p["address"] for p in new.get("primaries", [])}
    moved: dict[tuple[str | None, str | None], list[int]] = defaultdict(list)
    for s in range(SLOTS):
        if before[s] != after[s]:
            moved[(before[s], after[s])].append(s)
    out: list[Change] = []
    for (a, b), slots in sorted(moved.items(), key=lambda kv: kv[1][0]):
        ranges = tuple(_ranges(slots))
        where = format_ranges(ranges)
        if a is None:
            out.append(Change(role, RESHARD, ranges, f"{role}: slots {where}, which had no live primary, are now owned by "
                                                     f"{short(b)} at {addr_new[b]}"))
        elif b is None:
            out.append(Change(role, LOST, ranges, f"{role}: slots {where} have no live primary "
                                                  f"(was {short(a)} at {addr_old[a]}: failed, failover pending?)"))
        elif a not in addr_new and b not in addr_old:
            # The old primary no longer owns slots and the new owner did not before: a replica took over.
            out.append(Change(role, FAILOVER, ranges, f"{role}: failover of shard {where}: {addr_old[a]} -> {addr_new[b]} "
                                                      f"(node {short(a)} -> {short(b)})"))
        else:
            out.append(Change(role, RESHARD, ranges, f"{role}: slots {where} moved from {short(a)} at {addr_old[a]} to "
                                                     f"{short(b)} at {addr_new[b]}"))
    for nid in sorted(set(addr_old) & set(addr_new)):
        if addr_old[nid] != addr_new[nid]:
            slots = tuple(tuple(r) for r in next(p["slots"] for p in new["primaries"] if p["id"] == nid))
            out.append(Change(role, ADDRESS, slots, f"{role}: primary {short(nid)} moved from {addr_old[nid]} to "
                                                    f"{addr_new[nid]}"))
    was = {m[0] for m in old.get("migrating", [])} | {m[0] for m in old.get("importing", [])}
    now = {tuple(m) for m in new.get("migrating", [])} | {tuple(m) for m in new.get("importing", [])}
    in_flight = sorted({m[0] for m in now} - was)
    if in_flight:
        pairs = sorted({(m[1], m[2]) for m in now if m[0] in in_flight})
        who = ", ".join(f"{short(x)} -> {short(y)}" for x, y in pairs)
        ranges = tuple(_ranges(in_flight))
        out.append(Change(role, MIGRATING, ranges, f"{role}: slots {format_ranges(ranges)} are migrating ({who}): "
                                                   "a reshard is in flight"))
    return out


def changed_slots(changes: list[Change] | list[dict[str, Any]]) -> list[tuple[int, int]]:
    """The union of the slot ranges the changes (or their JSON) touched: what a check must cover again."""
    ranges = [r for c in changes for r in (c.slots if isinstance(c, Change) else c.get("slots", []))]
    seen = sorted({s for lo, hi in ranges for s in range(lo, hi + 1)})
    return _ranges(seen)


def summary(v: dict[str, Any] | None) -> str:
    """``4 primaries (4 replicas), all 16384 slots`` for humans."""
    if not v:
        return "?"
    unc = v.get("uncovered") or []
    cover = "all 16384 slots" if not unc else f"slots {format_ranges(tuple(r) for r in unc)} UNCOVERED"
    moving = v.get("migrating") or []
    extra = f", {len(moving)} slot(s) migrating" if moving else ""
    return f"{len(v.get('primaries', []))} primaries ({v.get('replicas', 0)} replicas), {cover}{extra}"


def last_recorded(entries: list[dict[str, Any]], role: str) -> tuple[dict[str, Any] | None, str | None]:
    """The newest topology view of ``role`` the journal holds (a transition's sides, or a change event), and when."""
    for e in reversed(entries):
        if e.get("event") == EVENT and isinstance((e.get("views") or {}).get(role), dict):
            return e["views"][role], e.get("seen_at") or e.get("time")
        side = (e.get("sides") or {}).get(role) if e.get("event") == "transition-started" else None
        if isinstance(side, dict) and isinstance(side.get("cluster"), dict):
            return side["cluster"].get("view"), side.get("probed_at") or e.get("time")
    return None, None


def journaled_changes(entries: list[dict[str, Any]], after: str | None = None) -> list[dict[str, Any]]:
    """The topology-changed events in the journal, those seen at or after ``after`` (ISO) if given."""
    out = [e for e in entries if e.get("event") == EVENT]
    if after:
        out = [e for e in out if (e.get("seen_at") or e.get("time") or "") >= after]
    return out
