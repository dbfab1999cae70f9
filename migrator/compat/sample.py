"""A sample of a server's keyspace: key counts per database, the types in use, estimated memory.

Each database is walked with SCAN up to ``per_db`` keys (all of them in a small database, so
small deployments are covered completely) and every sampled key's TYPE is read. Keys under
migrator's reserved prefix are skipped: they are canaries or bookkeeping, not user data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from migrator.compat.canary import RESERVED_PREFIX
from migrator.compat.rpc import Side, Unavailable, text

SAMPLE_PER_DB = 1000
_RESERVED = RESERVED_PREFIX.encode()


@dataclass
class DbSample:
    db: int
    keys: int  # from INFO keyspace: every key, ours included
    expires: int
    field_ttl_keys: int | None  # hashes with field TTLs, where INFO keyspace counts them
    sampled: list[bytes] = field(default_factory=list)
    types: dict[bytes, str] = field(default_factory=dict)
    memory_sampled: int | None = None  # bytes over the sampled keys (MEMORY USAGE); None if unavailable
    reserved: int = 0  # keys under migrator's prefix met while sampling
    unsampled: str = ""  # why the keys could not be walked (SCAN refused)

    @property
    def complete(self) -> bool:
        return len(self.sampled) + self.reserved >= self.keys

    @property
    def user_keys(self) -> int:
        """Keys that are not migrator's own: exact when the walk was complete, else an upper bound."""
        return len(self.sampled) if self.complete else self.keys - self.reserved

    @property
    def estimated_memory(self) -> int | None:
        if self.memory_sampled is None or not self.sampled:
            return None
        return int(self.memory_sampled / len(self.sampled) * self.user_keys)

    def to_json(self) -> dict[str, Any]:
        return {"db": self.db, "keys": self.user_keys, "expires": self.expires, "sampled": len(self.sampled),
                "complete": self.complete, "types": dict(Counter(self.types.values())),
                "estimated_memory": self.estimated_memory, "unsampled": self.unsampled}


@dataclass
class KeyspaceSample:
    dbs: dict[int, DbSample]
    used_memory: int

    @property
    def user_keys(self) -> int:
        return sum(d.user_keys for d in self.dbs.values())

    def types(self) -> Counter:
        out: Counter = Counter()
        for d in self.dbs.values():
            out.update(d.types.values())
        return out

    def keys_of_type(self, kind: str) -> list[tuple[int, bytes]]:
        return [(d.db, k) for d in self.dbs.values() for k, t in d.types.items() if t == kind]

    def to_json(self) -> dict[str, Any]:
        return {"used_memory": self.used_memory, "user_keys": self.user_keys,
                "dbs": [d.to_json() for d in self.dbs.values()]}


def keyspace_counts(side: Side) -> dict[int, dict[str, Any]]:
    """``INFO keyspace`` as {db: {keys, expires, ...}}."""
    info = side.call("INFO", "keyspace")
    return {int(name[2:]): stats for name, stats in info.items() if name.startswith("db") and isinstance(stats, dict)}


def sample(side: Side, per_db: int = SAMPLE_PER_DB) -> KeyspaceSample:
    dbs = {}
    for db, stats in sorted(keyspace_counts(side).items()):
        ttl_keys = stats.get("subexpiry", stats.get("keys_with_volatile_items"))
        d = DbSample(db, int(stats.get("keys", 0)), int(stats.get("expires", 0)),
                     None if ttl_keys is None else int(ttl_keys))
        _walk(side, d, per_db)
        dbs[db] = d
    memory = side.call("INFO", "memory")
    return KeyspaceSample(dbs, int(memory.get("used_memory", 0)))


def _walk(side: Side, d: DbSample, per_db: int) -> None:
    client = side.on_db(d.db)
    try:
        keys = side.guard("SCAN", lambda: list(dict.fromkeys(_scan(client, per_db))))
    except Unavailable as e:
        d.unsampled = str(e)  # counts from INFO keyspace remain; types stay unknown
        return
    for key in keys:
        if key.startswith(_RESERVED):
            d.reserved += 1
        else:
            d.sampled.append(key)
    if not d.sampled:
        return
    pipe = client.pipeline(transaction=False)
    for key in d.sampled:
        pipe.type(key)
    types = {k: text(t) for k, t in zip(d.sampled, side.guard("TYPE", pipe.execute))}
    # "none": the key expired or was deleted between SCAN and TYPE (a live server). It is not a
    # type the target would have to hold (read as one, it failed the data-types check).
    d.types = {k: t for k, t in types.items() if t != "none"}
    d.sampled = [k for k in d.sampled if k in d.types]
    try:
        d.memory_sampled = _memory(side, client, d.sampled)
    except Unavailable:
        d.memory_sampled = None


def _scan(client, limit: int):
    seen = 0
    cursor = 0
    while True:
        cursor, keys = client.scan(cursor=cursor, count=min(limit, 1000))
        for k in keys:
            yield k
            seen += 1
            if seen >= limit:
                return
        if cursor == 0:
            return


def _memory(side: Side, client, keys: list[bytes]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return sum(int(v or 0) for v in side.guard("MEMORY USAGE", pipe.execute))


def merge(samples: list[KeyspaceSample]) -> KeyspaceSample:
    """The samples of a cluster's primaries as one keyspace: counts, keys and memory summed per database."""
    dbs: dict[int, DbSample] = {}
    for s in samples:
        for d in s.dbs.values():
            m = dbs.get(d.db)
            if m is None:
                m = dbs[d.db] = DbSample(d.db, 0, 0, 0, memory_sampled=0)
            m.keys += d.keys
            m.expires += d.expires
            m.field_ttl_keys = None if m.field_ttl_keys is None or d.field_ttl_keys is None \
                else m.field_ttl_keys + d.field_ttl_keys
            m.sampled.extend(d.sampled)
            m.types.update(d.types)
            mem = 0 if d.memory_sampled is None and not d.sampled else d.memory_sampled  # nothing to measure
            m.memory_sampled = None if m.memory_sampled is None or mem is None else m.memory_sampled + mem
            m.reserved += d.reserved
            m.unsampled = "; ".join(x for x in (m.unsampled, d.unsampled) if x)
    return KeyspaceSample(dict(sorted(dbs.items())), sum(s.used_memory for s in samples))
