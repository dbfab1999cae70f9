"""Exact comparison of one key on two servers, and what kind of difference it is.

``compare`` is bounded in memory: lengths first, then chunk by chunk (HSCAN → HMGET, SSCAN →
SMISMEMBER, ZRANGE → ZMSCORE, LRANGE ranges, GETRANGE, XRANGE by ID plus consumer groups).
``difference`` classifies a key from its two ``KeyState``s: equal digests clear the value,
anything else is decided by ``compare``, so a digest can clear a key but never condemn one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

from migrator.data import fieldttl, modtypes
from migrator.data.values import (
    SIZE_COMMAND,
    KeyState,
    _s,
    hll_masked,
    range_list,
    range_stream,
    range_string,
    range_zset,
    scan_hash,
    scan_set,
    stream_meta,
    stream_meta_for_compare,
)


def compare(src: redis.Redis, dst: redis.Redis, key: bytes, type_: str, chunk: int, chunk_bytes: int) -> str | None:
    """None if the key's values are equal on both servers, else a value-free description.

    Both keys are known to exist with type ``type_``. Memory is bounded by ``chunk``.
    """
    n_src = src.execute_command(SIZE_COMMAND.get(type_, "EXISTS"), key)
    n_dst = dst.execute_command(SIZE_COMMAND.get(type_, "EXISTS"), key)
    if n_src != n_dst:
        return f"size {n_src} on source, {n_dst} on target"
    fn = _COMPARERS.get(type_) or modtypes.COMPARERS.get(type_)
    if fn is None:
        return _compare_dump(src, dst, key)
    return fn(src, dst, key, chunk, chunk_bytes)


def _compare_string(src, dst, key, _chunk, chunk_bytes):
    for i, (a, b) in enumerate(zip(range_string(src, key, chunk_bytes), range_string(dst, key, chunk_bytes))):
        if i == 0:
            a, b = hll_masked(a), hll_masked(b)
        if a != b:
            return f"bytes differ in chunk {i} (offset {i * chunk_bytes})"
    return None


def _compare_hash(src, dst, key, chunk, _cb):
    for part in scan_hash(src, key, chunk):
        fields = list(part)
        for f, theirs in zip(fields, dst.hmget(key, fields)):
            if theirs != part[f]:
                return f"field of {len(f)} bytes {'missing' if theirs is None else 'differs'} on target"
    return None


def _compare_set(src, dst, key, chunk, _cb):
    for part in scan_set(src, key, chunk):
        present = dst.smismember(key, part)
        missing = sum(1 for p in present if not p)
        if missing:
            return f"{missing} member(s) missing on target"
    return None


def _compare_zset(src, dst, key, chunk, _cb):
    for part in range_zset(src, key, chunk):
        members = [m for m, _ in part]
        for (m, s), theirs in zip(part, dst.zmscore(key, members)):
            if theirs is None:
                return "member missing on target"
            if not _same_score(s, theirs):
                return f"score {s!r} on source, {theirs!r} on target"
    return None


def _same_score(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _compare_list(src, dst, key, chunk, _cb):
    for i, (a, b) in enumerate(zip(range_list(src, key, chunk), range_list(dst, key, chunk))):
        if a != b:
            first = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else 0
            return f"element {i * chunk + first} differs"
    return None


def _compare_stream(src, dst, key, chunk, _cb):
    for i, (a, b) in enumerate(zip(range_stream(src, key, chunk), range_stream(dst, key, chunk))):
        if a != b:
            return f"entries differ in chunk {i} (after ID {_s(a[0][0]) if a else '-'})"
    ms, md = stream_meta_for_compare(stream_meta(src, key)), stream_meta_for_compare(stream_meta(dst, key))
    if ms["last_generated_id"] != md["last_generated_id"]:
        return "last generated ID differs"
    if ms["groups"] != md["groups"]:
        return "consumer groups differ"
    return None


def _compare_dump(src, dst, key):
    # Module types: no type-aware reader exists, so only identical serialisations compare equal.
    a, b = src.dump(key), dst.dump(key)
    if a is not None and b is not None and a[:-10] == b[:-10]:
        return None
    return "serialised values differ (no type-aware comparison for this type)"


_COMPARERS = {"string": _compare_string, "hash": _compare_hash, "set": _compare_set, "zset": _compare_zset,
              "list": _compare_list, "stream": _compare_stream}


# --- classifying one key's difference -------------------------------------------------------

MISSING_ON_TARGET, EXTRA_ON_TARGET, TYPE, VALUE, TTL = "missing", "extra", "type", "value", "ttl"
FIELD_TTL = "field-ttl"  # a hash field's own expiry (Redis 7.4+, Valkey 9.0+) missing or different
KINDS = (MISSING_ON_TARGET, EXTRA_ON_TARGET, TYPE, VALUE, TTL, FIELD_TTL)


@dataclass(frozen=True)
class Difference:
    kind: str
    detail: str
    ttl_delta_ms: int | None = None


def ttl_delta(s: KeyState, d: KeyState) -> int | None:
    """Target PTTL minus source PTTL in ms, when both keys expire."""
    return d.pttl - s.pttl if s.pttl >= 0 and d.pttl >= 0 else None


def difference(src: redis.Redis, dst: redis.Redis, key: bytes, s: KeyState, d: KeyState, ttl_tolerance_ms: int,
               chunk: int, chunk_bytes: int) -> Difference | None:
    """How ``key`` differs between source state ``s`` and target state ``d``; None if it does not.

    Equal digests clear the value; otherwise ``compare`` decides, reading both servers again.
    """
    if not s.exists and not d.exists:
        return None
    if not d.exists:
        return Difference(MISSING_ON_TARGET, f"{s.type} of size {s.size} missing on target")
    if not s.exists:
        return Difference(EXTRA_ON_TARGET, f"{d.type} of size {d.size} only on target")
    if s.type != d.type:
        return Difference(TYPE, f"{s.type} on source, {d.type} on target")
    if not (s.digest and s.digest == d.digest):
        detail = compare(src, dst, key, s.type, chunk, chunk_bytes)
        if detail:
            return Difference(VALUE, detail)
    return _ttl_difference(s, d, ttl_tolerance_ms) or (
        _field_ttl_difference(src, dst, key, s, d, ttl_tolerance_ms, chunk) if s.type == "hash" else None)


def _field_ttl_difference(src: redis.Redis, dst: redis.Redis, key: bytes, s: KeyState, d: KeyState,
                          tolerance_ms: int, chunk: int) -> Difference | None:
    """The first hash field whose own expiry is missing on one side or differs beyond the tolerance.

    Read by the probes for small hashes; a hash the probe did not read (``None``: too big) is
    compared chunk by chunk here (HSCAN on the source, HPEXPIRETIME on both; the values are
    known equal, so the source's fields are all the fields).
    """
    if s.field_ttls == d.field_ttls is not None:
        return None
    if s.field_ttls is not None and d.field_ttls is not None:
        diffs = fieldttl.differences(dict(s.field_ttls), dict(d.field_ttls), tolerance_ms)
    else:
        diffs = []
        src_has, dst_has = fieldttl.supported(src), fieldttl.supported(dst)  # a side without: no field TTLs
        for part in scan_hash(src, key, chunk):
            fields = list(part)
            a = fieldttl.expiry_times(src, key, fields) if src_has else [-1] * len(fields)
            b = fieldttl.expiry_times(dst, key, fields) if dst_has else [-1] * len(fields)
            diffs = fieldttl.differences({f: t for f, t in zip(fields, a) if t > 0},
                                         {f: t for f, t in zip(fields, b) if t > 0}, tolerance_ms)
            if diffs:
                break
    if not diffs:
        return None
    field, how, delta = diffs[0]
    more = f" ({len(diffs) - 1} more field(s) differ)" if len(diffs) > 1 else ""
    return Difference(FIELD_TTL, f"field {fieldttl.field_name(field)!r}: {how}{more}", delta)


def _ttl_difference(s: KeyState, d: KeyState, tolerance_ms: int) -> Difference | None:
    if (s.pttl < 0) != (d.pttl < 0):
        which = "target" if s.pttl < 0 else "source"
        return Difference(TTL, f"expires only on the {which}", None)
    delta = ttl_delta(s, d)
    if delta is not None and abs(delta) > tolerance_ms:
        return Difference(TTL, f"expiry differs by {delta / 1000:+.3f}s", delta)
    return None
