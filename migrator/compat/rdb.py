"""RDB/DUMP payload versions: reading a payload's footer and predicting what a server accepts.

A DUMP payload ends with a 2-byte little-endian RDB version and an 8-byte CRC64. RESTORE
rejects a version newer than the server's own; Valkey 9 writes its own numbering (80+) and,
with ``rdb-version-check relaxed``, attempts payloads it would otherwise refuse. The canary
DUMP/RESTORE is the authority; this table only explains it, or stands in when DUMP is disabled.
"""

from __future__ import annotations

from dataclasses import dataclass

from migrator.compat.identify import Identity

FIRST_VALKEY_FORMAT = 80  # Valkey 9's RDB versions start here (magic "VALKEY")
LAST_SHARED_FORMAT = 11  # Redis 7.2 and Valkey 7.2/8.x both write 11

# (kind, major, minor) → RDB version written, from the servers' rdb.h; newest first per kind.
_WRITTEN: dict[tuple[str, int, int], int] = {
    ("redis", 8, 6): 13, ("redis", 8, 0): 12, ("redis", 7, 4): 12, ("redis", 7, 2): 11,
    ("redis", 7, 0): 10, ("redis", 6, 0): 9, ("redis", 5, 0): 9,
    ("valkey", 9, 2): 81, ("valkey", 9, 0): 80, ("valkey", 7, 2): 11,
}


def payload_version(payload: bytes) -> int:
    """The RDB version in a DUMP payload's footer."""
    if len(payload) < 10:
        raise ValueError(f"not a DUMP payload ({len(payload)} bytes)")
    return int.from_bytes(payload[-10:-8], "little")


def written_version(ident: Identity) -> int | None:
    """The RDB version this server writes, from the table (None for a version before the table)."""
    v = ident.version_tuple[:2]
    candidates = [(k[1], k[2]) for k in _WRITTEN if k[0] == ident.kind and (k[1], k[2]) <= v]
    return _WRITTEN[(ident.kind, *max(candidates))] if candidates else None


def accepts(target: Identity, target_version: int, payload: int, relaxed: bool = False) -> tuple[bool, str]:
    """Whether ``target`` (writing ``target_version``) should RESTORE a ``payload``-version DUMP, and why."""
    if payload <= target_version and not (target.kind == "valkey" and LAST_SHARED_FORMAT < payload < FIRST_VALKEY_FORMAT):
        return True, f"RDB {payload} is not newer than the target's own RDB {target_version}"
    if target.kind == "valkey" and relaxed:
        return True, (f"RDB {payload} is newer than or foreign to the target's RDB {target_version}, "
                      "but rdb-version-check is relaxed: it loads unless a key uses a type the target lacks")
    if target.kind == "redis" and payload >= FIRST_VALKEY_FORMAT:
        return False, f"RDB {payload} is Valkey 9's format, which no Redis reads"
    if target.kind == "valkey" and LAST_SHARED_FORMAT < payload < FIRST_VALKEY_FORMAT:
        return False, f"RDB {payload} is a Redis 7.4+ format that Valkey refuses with rdb-version-check strict"
    return False, f"RDB {payload} is newer than the target's own RDB {target_version}"


# --- what a pair allows: copy method and replication, each way -----------------------------------

# Data a server's RDB loader cannot read from the other's payloads, whatever rdb-version-check says.
FIELD_TTL_HASHES = "hashes with field TTLs"
VECTOR_SETS = "vector sets"
MODULE_DATA = "module data"

DUMP_RESTORE, TYPE_AWARE, NO_COPY = "dump-restore", "type-aware", "none"


@dataclass(frozen=True)
class PairPlan:
    """What one direction (``src`` → ``dst``) allows, before any canary ran: a prediction."""

    copy_method: str  # DUMP_RESTORE, TYPE_AWARE, or NO_COPY (some data has no copy at all)
    replication: str  # "works (full sync)" or "does not work: why"
    why: str  # the RDB reasoning, one sentence
    relaxed: str = ""  # what ``rdb-version-check relaxed`` on dst would change ("" = not relevant)
    blocked: tuple[str, ...] = ()  # data in use that no method carries to dst

    def to_json(self) -> dict:
        return {"copy_method": self.copy_method, "replication": self.replication, "why": self.why,
                "relaxed": self.relaxed, "blocked": list(self.blocked)}


def unreadable(src: Identity, dst: Identity, in_use: set[str]) -> list[str]:
    """The kinds of data in use (``FIELD_TTL_HASHES``, ``VECTOR_SETS``, ``MODULE_DATA``) that ``dst``'s
    RDB loader cannot read from ``src``'s payloads even with rdb-version-check relaxed: Redis 7.4+
    encodes hashes with field TTLs as RDB types 24/25 and Valkey 9 as type 22, which only the same
    kind (and for Valkey, 9.0+) reads; vector sets and module types exist in no Valkey's loader."""
    out = []
    if FIELD_TTL_HASHES in in_use and not (src.kind == dst.kind and dst.version_tuple >= src.version_tuple):
        out.append(FIELD_TTL_HASHES)
    if VECTOR_SETS in in_use and dst.kind != "redis":
        out.append(VECTOR_SETS)
    if MODULE_DATA in in_use:
        out.append(MODULE_DATA)
    return out


def _type_aware(dst: Identity, in_use: set[str]) -> tuple[str, tuple[str, ...]]:
    """The type-aware copy's reach: core types always, field TTLs where dst has them (Redis 7.4+,
    Valkey 9.0+), never vector sets (or module data, which has its own check)."""
    blocked = []
    if FIELD_TTL_HASHES in in_use and not (dst.at_least("redis", 7, 4) or dst.at_least("valkey", 9, 0)):
        blocked.append(FIELD_TTL_HASHES)
    if VECTOR_SETS in in_use and dst.kind != "redis":
        blocked.append(VECTOR_SETS)
    return (NO_COPY if blocked else TYPE_AWARE), tuple(blocked)


def plan_pair(src: Identity, dst: Identity, relaxed: bool = False, in_use: set[str] | frozenset = frozenset()) -> PairPlan:
    """Copy method and replication for ``src`` → ``dst`` from their RDB versions and the data in use.

    Native replication loads the same RDB format RESTORE does, so both follow one rule: ``dst``
    reads ``src``'s payloads (``accepts``), and no data in use is of a type ``dst`` cannot load.
    ``rdb-version-check relaxed`` (Valkey 8.1+) lets a Valkey try a newer or Redis 7.4+ format: it
    helps when only the version number stands in the way, not for types it does not know.
    """
    in_use = set(in_use)
    src_v, dst_v = written_version(src), written_version(dst)
    if src_v is None or dst_v is None:
        method, blocked = _type_aware(dst, in_use)
        return PairPlan(method, "unknown: RDB versions unknown", "RDB versions unknown (a version before the table)",
                        blocked=blocked)
    can_relax = dst.at_least("valkey", 8, 1)  # the setting exists from Valkey 8.1 on
    relaxed = relaxed and can_relax
    ok_strict, _ = accepts(dst, dst_v, src_v, False)
    ok, why = accepts(dst, dst_v, src_v, relaxed)
    foreign = unreadable(src, dst, in_use)
    advice = ""
    if not ok_strict and can_relax:
        if foreign:
            advice = (f"would not help: {', '.join(foreign)} in use cannot be loaded by the target's RDB reader "
                      "whatever the version check says")
        elif relaxed:
            advice = "is set, and lets DUMP/RESTORE and replication through (no type the target lacks is in use)"
        else:
            advice = ("would help: the target would load RDB " + str(src_v) + " (no type it lacks is in use), "
                      "allowing DUMP/RESTORE and native replication")
    if ok and not foreign:
        return PairPlan(DUMP_RESTORE, "works (full sync)", why, advice)
    method, blocked = _type_aware(dst, in_use)
    reason = (f"{', '.join(foreign)} in use cannot be loaded by the target" if ok and foreign
              else "the target cannot load the source's RDB format")
    return PairPlan(method, f"does not work: {reason}", why if not ok else f"{why}; but {reason}", advice, blocked)
