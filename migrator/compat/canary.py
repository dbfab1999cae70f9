"""Canary keys: small values of each data type, copied between the servers to prove a copy method.

Every canary lives under ``__migrator:canary:{<random>}:``, carries a TTL (so a crash cannot
leave one for long) and is deleted when the ``Canaries`` block ends, even on error. Canary
keys are the only writes a compatibility run makes to the source. The random part is a hash
tag, so all of a run's canaries share one cluster slot and go to the node that owns it.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from typing import Callable

import redis

from migrator.cluster import key_slot

from migrator.compat import typecopy
from migrator.compat.rdb import payload_version
from migrator.compat.rpc import Side, Unavailable, first_line

RESERVED_PREFIX = "__migrator:"
CANARY_PREFIX = RESERVED_PREFIX + "canary:"
CANARY_TTL_MS = 10 * 60 * 1000

# Values with binary bytes, non-ASCII text and a float score, so a lossy copy shows.
_BLOB = b"\x00\xff canary \xc3\xa9\r\n"


def _fill(pipe, key: str, kind: str) -> None:
    if kind == "string":
        pipe.set(key, _BLOB)
    elif kind == "hash":
        pipe.hset(key, mapping={"f1": _BLOB, "f2": "2"})
    elif kind == "list":
        pipe.rpush(key, _BLOB, "b", "c")
    elif kind == "set":
        pipe.sadd(key, _BLOB, "b", "c")
    elif kind == "zset":
        pipe.zadd(key, {_BLOB: 1.5, "b": -2})
    elif kind == "stream":
        pipe.xadd(key, {"f": _BLOB}, id="1-1")
        pipe.xgroup_create(key, "canary-group", id="0")
    else:
        raise ValueError(f"no canary for type {kind!r}")


@dataclass
class Transfer:
    """One canary copied from one server to the other."""

    kind: str
    method: str  # "dump-restore" or "type-aware"
    ok: bool
    payload_version: int | None = None
    error: str = ""

    def to_json(self) -> dict:
        return {"type": self.kind, "method": self.method, "ok": self.ok,
                "payload_version": self.payload_version, "error": self.error}


class Canaries:
    """Creates canaries on either server and copies them; deletes them all on exit."""

    def __init__(self, source: Side, target: Side, route: Callable[[str, int], Side] | None = None) -> None:
        """``route(role, slot)``, where a side is a cluster: the Side of the node owning the canaries' slot."""
        self.prefix = f"{CANARY_PREFIX}{{{secrets.token_hex(6)}}}:"
        self.slot = key_slot(self.prefix)
        self._sides = {"source": source, "target": target}
        if route is not None:
            self._sides = {role: route(role, self.slot) for role in self._sides}
        self._made: dict[str, list[str]] = {"source": [], "target": []}

    def __enter__(self) -> "Canaries":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        for role, keys in self._made.items():
            if keys:
                # Best effort: if the server went away, the TTL removes them.
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    self._sides[role].client.delete(*keys)
                keys.clear()

    def _key(self, role: str, label: str) -> str:
        key = f"{self.prefix}{label}"
        self._made[role].append(key)  # recorded before the write so cleanup never misses one
        return key

    def make(self, role: str, kind: str) -> str:
        """A fresh canary of ``kind`` on ``role``; raises Unavailable if the server refuses writes."""
        side = self._sides[role]
        key = self._key(role, f"{role}:{kind}")
        pipe = side.client.pipeline(transaction=True)
        _fill(pipe, key, kind)
        pipe.pexpire(key, CANARY_TTL_MS)
        try:
            side.guard("canary write", pipe.execute)
        except redis.exceptions.ResponseError as e:  # e.g. a write refused by a proxy or a script-only ACL
            raise Unavailable(role, "canary write", first_line(e)) from None
        return key

    def dump_restore(self, src_role: str, dst_role: str, kind: str, key: str) -> Transfer:
        """DUMP ``key`` on one server, RESTORE it on the other and compare values type-aware."""
        src, dst = self._sides[src_role], self._sides[dst_role]
        payload = src.call("DUMP", key)
        version = payload_version(payload)
        copy = self._key(dst_role, f"from-{src_role}:{kind}")
        try:
            dst.guard("RESTORE", lambda: dst.client.restore(copy, CANARY_TTL_MS, payload, replace=True))
        except redis.exceptions.ResponseError as e:  # refusals of the command itself became Unavailable
            return Transfer(kind, "dump-restore", False, version, first_line(e))
        return self._compare(src, key, dst, copy, kind, "dump-restore", version)

    def type_aware(self, src_role: str, dst_role: str, kind: str, key: str) -> Transfer:
        """Copy ``key`` with type commands (the fallback where DUMP/RESTORE fails) and compare."""
        src, dst = self._sides[src_role], self._sides[dst_role]
        copy = self._key(dst_role, f"typed-from-{src_role}:{kind}")
        try:
            _, value, _ = src.guard("type-aware read", lambda: typecopy.read(src.client, key))
            dst.guard("type-aware write", lambda: typecopy.write(dst.client, copy, kind, value, CANARY_TTL_MS))
        except redis.exceptions.ResponseError as e:
            return Transfer(kind, "type-aware", False, None, first_line(e))
        return self._compare(src, key, dst, copy, kind, "type-aware", None)

    @staticmethod
    def _compare(src: Side, key: str, dst: Side, copy: str, kind: str, method: str, version: int | None) -> Transfer:
        a = src.guard("type-aware read", lambda: typecopy.read(src.client, key))
        b = dst.guard("type-aware read", lambda: typecopy.read(dst.client, copy))
        if a[:2] != b[:2]:
            return Transfer(kind, method, False, version, "copied value differs from the original")
        if b[2] <= 0:
            return Transfer(kind, method, False, version, "copy lost its TTL")
        return Transfer(kind, method, True, version)
