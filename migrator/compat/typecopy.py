"""Type-aware ("struct") reads and writes of one key: the copy that works across RDB formats.

Used to compare a canary after RESTORE, to test the copy in a direction where DUMP/RESTORE
fails, and to seed a scratch server. Values are read whole, so this is for small keys only;
bulk copying belongs to ``migrator.data``.
"""

from __future__ import annotations

from typing import Any

import redis

CORE_TYPES = ("string", "hash", "list", "set", "zset", "stream")


def read(client: redis.Redis, key: bytes | str) -> tuple[str, Any, int]:
    """(type, comparable value, PTTL in ms or -1) of one key; the type is ``none`` if it is gone."""
    kind = client.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    reader = _READERS.get(kind)
    if reader is None:
        raise ValueError(f"type {kind!r} has no type-aware copy")
    return kind, reader(client, key), int(client.pttl(key))


def write(client: redis.Redis, key: bytes | str, kind: str, value: Any, pttl: int) -> None:
    """Create ``key`` from a value read by ``read`` (replacing it), with its TTL."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    _WRITERS[kind](pipe, key, value)
    if pttl > 0:
        pipe.pexpire(key, pttl)
    pipe.execute()


def _read_stream(c: redis.Redis, key) -> dict[str, Any]:
    entries = [(i, sorted(f.items())) for i, f in c.xrange(key, "-", "+")]
    groups = sorted((g["name"], g["last-delivered-id"]) for g in c.xinfo_groups(key))
    return {"entries": entries, "groups": groups}


_READERS = {
    "none": lambda c, k: None,
    "string": lambda c, k: c.get(k),
    "hash": lambda c, k: sorted(c.hgetall(k).items()),
    "list": lambda c, k: c.lrange(k, 0, -1),
    "set": lambda c, k: sorted(c.smembers(k)),
    "zset": lambda c, k: c.zrange(k, 0, -1, withscores=True),
    "stream": _read_stream,
}


def _write_stream(p, key, value) -> None:
    for entry_id, fields in value["entries"]:
        p.xadd(key, dict(fields), id=entry_id)
    for name, last_id in value["groups"]:
        p.xgroup_create(key, name, id=last_id, mkstream=True)


_WRITERS = {
    "string": lambda p, k, v: p.set(k, v),
    "hash": lambda p, k, v: p.hset(k, mapping=dict(v)),
    "list": lambda p, k, v: p.rpush(k, *v),
    "set": lambda p, k, v: p.sadd(k, *v),
    "zset": lambda p, k, v: p.zadd(k, dict(v)),
    "stream": _write_stream,
}
