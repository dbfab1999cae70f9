"""RESTORE of a payload one side cannot read: applied where it can be, copied to the other by type.

A DUMP payload carries the RDB version of the server that wrote it, and a server refuses a
payload newer than its own format ("DUMP payload version or checksum are wrong"): Valkey 8.1
writes RDB 11 and Valkey 9.x RDB 80, which Redis 6.2 (9) and 7.0 (10) cannot read. Once reads
are on the target, a DUMP through the shim is answered by Valkey, and the application's RESTORE
of it would fail on Redis. So such a RESTORE runs on the side that can read it, inside
``MULTI``/``EXEC`` together with a read of the key it made (``READER``), and the other side gets
the key's *effect*: ``DEL``, the type's own write commands, and the expiry as an absolute time
(``PEXPIREAT``), in one ``MULTI``/``EXEC`` — the type-aware copy ``migrator.data.copy`` uses.
A hash's field TTLs go along as ``HPEXPIREAT``s (a side without field expiry then refuses the
whole transaction: a visible divergence, never a copy without them).

Pure functions: the server's own RDB version is asked by ``server.load_rdb_version``.
"""

from __future__ import annotations

from typing import Any

Command = list[bytes]

# Run right after the RESTORE, in the same transaction: the key's type, the server's clock (ms),
# its PTTL, its value and, for a hash on a server with field expiry, each field's HPEXPIRETIME.
# Streams and module types are not read (see ``effect``).
READER = b"""local k = KEYS[1]
local t = redis.call('TYPE', k)['ok']
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local v = {}
if t == 'string' then v = {redis.call('GET', k)}
elseif t == 'hash' then v = redis.call('HGETALL', k)
  local ft = {}
  for i = 1, #v, 2000 do
    local f = {}
    for j = i, math.min(#v, i + 1999), 2 do f[#f + 1] = v[j] end
    local r = redis.pcall('HPEXPIRETIME', k, 'FIELDS', #f, unpack(f))
    if type(r) ~= 'table' or r.err then ft = {} break end
    for j = 1, #r do ft[#ft + 1] = r[j] end
  end
  return {t, ms, redis.call('PTTL', k), v, ft}
elseif t == 'list' then v = redis.call('LRANGE', k, 0, -1)
elseif t == 'set' then v = redis.call('SMEMBERS', k)
elseif t == 'zset' then v = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
end
return {t, ms, redis.call('PTTL', k), v}"""

CHUNK = 512  # members (or field/value pairs) per write command of the copy


def reader(key: bytes) -> Command:
    return [b"EVAL", READER, b"1", key]


def payload_version(args: Command) -> int | None:
    """The RDB version in a ``RESTORE key ttl payload ...`` command's payload (None: malformed)."""
    if len(args) < 4 or len(args[3]) < 10:
        return None
    return int.from_bytes(args[3][-10:-8], "little")


def can_read(server_version: int | None, version: int) -> bool:
    """Whether a server writing RDB ``server_version`` accepts a payload of ``version``.

    Unknown (None): assumed yes, so the RESTORE is mirrored as sent and a refusal shows as a
    divergence. Valkey 9 (RDB 80+) reads Redis's 12-79 only with ``rdb-version-check relaxed``;
    that range is assumed readable, as the server then decides.
    """
    if server_version is None:
        return True
    if server_version >= 80 and 12 <= version < 80:
        return True
    return version <= server_version


def rdb_version_of(info: dict) -> int | None:
    """The RDB version a server writes, from its ``INFO server`` (docs: redis-valkey-compat)."""
    def ver(text: Any) -> tuple[int, int]:
        try:
            major, minor = str(text).split(".")[:2]
            return int(major), int(minor)
        except ValueError:
            return (0, 0)

    if str(info.get("server_name", "")).lower() == "valkey" or "valkey_version" in info:
        v = ver(info.get("valkey_version") or info.get("redis_version"))
        return 81 if v >= (9, 2) else 80 if v >= (9, 0) else 11
    v = ver(info.get("redis_version"))
    for at_least, rdb in (((8, 6), 13), ((7, 4), 12), ((7, 2), 11), ((7, 0), 10), ((5, 0), 9)):
        if v >= at_least:
            return rdb
    return None


def _text(x: Any) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


def effect(key: bytes, read: Any) -> list[Command] | None:
    """What the other side runs to hold ``key`` as ``read`` (the ``READER`` reply) shows it.

    None: a type the shim does not copy (stream, module type); the caller marks the key dirty
    so that ``sync --dirty`` copies it.
    """
    if not isinstance(read, list) or len(read) not in (4, 5):
        return None
    type_, now_ms, pttl, value = _text(read[0]), read[1], read[2], read[3]
    out: list[Command] = [[b"DEL", key]]
    if type_ == b"none":
        return out
    if not isinstance(value, list):
        return None
    if type_ == b"string":
        if not value:
            return None
        out.append([b"SET", key, _text(value[0])])
    elif type_ in (b"hash", b"zset"):
        pairs = list(zip(value[0::2], value[1::2]))
        for i in range(0, len(pairs), CHUNK):
            part = pairs[i : i + CHUNK]
            if type_ == b"hash":
                out.append([b"HSET", key, *(_text(x) for p in part for x in p)])
            else:  # ZRANGE WITHSCORES: member, score
                out.append([b"ZADD", key, *(_text(x) for m, s in part for x in (s, m))])
    elif type_ in (b"list", b"set"):
        for i in range(0, len(value), CHUNK):
            out.append([b"RPUSH" if type_ == b"list" else b"SADD", key, *(_text(x) for x in value[i : i + CHUNK])])
    else:
        return None
    if type_ == b"hash" and len(read) == 5 and isinstance(read[4], list):
        by_time: dict[int, list[bytes]] = {}
        for f, at in zip(value[0::2], read[4]):
            if isinstance(at, int) and at > 0:
                by_time.setdefault(at, []).append(_text(f))
        for at, fields in sorted(by_time.items()):
            for i in range(0, len(fields), CHUNK):
                part = fields[i : i + CHUNK]
                out.append([b"HPEXPIREAT", key, b"%d" % at, b"FIELDS", b"%d" % len(part), *part])
    if isinstance(pttl, int) and pttl > 0 and isinstance(now_ms, int):
        out.append([b"PEXPIREAT", key, b"%d" % (now_ms + pttl)])
    return out
