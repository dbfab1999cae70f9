"""RDB/DUMP payload versions: reading a payload's footer and predicting what a server accepts.

A DUMP payload ends with a 2-byte little-endian RDB version and an 8-byte CRC64. RESTORE
rejects a version newer than the server's own; Valkey 9 writes its own numbering (80+) and,
with ``rdb-version-check relaxed``, attempts payloads it would otherwise refuse. The canary
DUMP/RESTORE is the authority; this table only explains it, or stands in when DUMP is disabled.
"""

from __future__ import annotations

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
