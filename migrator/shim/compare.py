"""Are two replies to the same command the same? Pure functions over hiredis-parsed replies.

- Replies whose order is unspecified (SMEMBERS, HGETALL, KEYS, SINTER...) compare as multisets.
- Replies that depend on time, randomness or the server itself (TTL within a tolerance; INFO,
  TIME, RANDOMKEY, SCAN cursors, CLIENT, OBJECT... not at all) are excluded or tolerated.
- Floats compare by value at 12 significant digits, since Redis and Valkey versions format
  them differently (``3`` / ``3.0000000000000004``).
- RESP2 and RESP3 shapes are normalised (maps vs flat pair lists, sets vs arrays, booleans vs
  0/1), so a divergence is about data, never about encoding.
- Errors match when their code (first word) matches: the messages differ between servers.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import hiredis

# Never compared: their replies legitimately differ between two servers.
EXCLUDED = frozenset({
    b"info", b"time", b"randomkey", b"srandmember", b"hrandfield", b"zrandmember", b"scan", b"sscan", b"hscan",
    b"zscan", b"client", b"object", b"memory", b"debug", b"lastsave", b"config", b"slowlog", b"latency", b"command",
    b"hello", b"role", b"lolwut", b"dbsize", b"pubsub", b"xinfo", b"xpending", b"xautoclaim", b"xclaim", b"spop",
    b"module", b"acl", b"cluster", b"ping", b"echo", b"publish", b"spublish", b"select", b"wait", b"waitaof",
    b"commandlog", b"function", b"script", b"swapdb", b"flushall", b"flushdb", b"dump", b"touch",
})
# Compared with a tolerance (in milliseconds; TTL and EXPIRETIME are in seconds).
TTL_MS = frozenset({b"pttl", b"pexpiretime"})
TTL_S = frozenset({b"ttl", b"expiretime"})
# Hash field TTLs: one integer per field asked, each compared like a key's TTL.
FIELD_TTL_MS = frozenset({b"hpttl", b"hpexpiretime"})
FIELD_TTL_S = frozenset({b"httl", b"hexpiretime"})
# Order not specified by the server.
UNORDERED = frozenset({b"smembers", b"sinter", b"sunion", b"sdiff", b"keys", b"hkeys", b"hvals", b"hgetall"})
# Flat RESP2 [field, value, ...] lists whose pairs are unordered.
PAIRED = frozenset({b"hgetall"})
# Replies that are (or contain) floats printed by the server.
FLOATS = frozenset({
    b"incrbyfloat", b"hincrbyfloat", b"zscore", b"zmscore", b"zincrby", b"geodist", b"geopos", b"zpopmin", b"zpopmax",
    b"zrange", b"zrangebyscore", b"zrevrange", b"zrevrangebyscore", b"zunion", b"zinter", b"zdiff", b"zmpop",
    b"bzpopmin", b"bzpopmax", b"bzmpop", b"georadius", b"georadius_ro", b"georadiusbymember", b"georadiusbymember_ro",
    b"geosearch",
})

MISSING_ON_TARGET = "missing-on-target"
MISSING_ON_SOURCE = "missing-on-source"
DIFFERENT_VALUE = "different-value"
ERROR_ONLY_ON_ONE_SIDE = "error-only-on-one-side"
TYPE = "type"
KINDS = (MISSING_ON_TARGET, MISSING_ON_SOURCE, DIFFERENT_VALUE, ERROR_ONLY_ON_ONE_SIDE, TYPE)


def comparable(name: bytes) -> bool:
    return name not in EXCLUDED


def _float_key(x: Any) -> Any:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return x
    if math.isnan(f) or math.isinf(f):
        return ("f", str(f))
    return ("f", f"{f:.12g}")


class Uncomparable(ValueError):
    """A reply the shim does not compare (nested deeper than ``MAX_DEPTH``)."""


# Replies nested deeper than this are not compared (a script may return a table thousands of
# levels deep; no command's reply nests more than a few levels). The session marks such a
# command's keys dirty instead: a repair compares the data itself.
MAX_DEPTH = 100


def normalize(value: Any, floats: bool = False, _depth: int = 0) -> Any:
    """A hashable, encoding-independent form of a reply; raises Uncomparable past ``MAX_DEPTH``."""
    if isinstance(value, hiredis.ReplyError):
        return ("err", str(value).split(" ", 1)[0])
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return _float_key(value)
    if isinstance(value, bytes):
        return _float_key(value) if floats and _looks_numeric(value) else value
    if isinstance(value, (dict, list)):
        if _depth >= MAX_DEPTH:
            raise Uncomparable(f"reply nested deeper than {MAX_DEPTH} levels")
        d = _depth + 1
        if isinstance(value, list):
            return tuple(normalize(v, floats, d) for v in value)
        return ("map", tuple(sorted(((normalize(k, floats, d), normalize(v, floats, d)) for k, v in value.items()),
                                    key=repr)))
    return value


def _looks_numeric(b: bytes) -> bool:
    return 0 < len(b) < 40 and b[:1] in b"-+.0123456789iI"


def _multiset(value: Any, paired: bool) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "map":
        return value  # already sorted pairs
    if not isinstance(value, tuple):
        return value
    if paired:
        pairs = tuple(zip(value[0::2], value[1::2]))
        return ("map", tuple(sorted(pairs, key=repr)))
    return ("set", tuple(sorted(value, key=repr)))


def canonical(name: bytes, value: Any) -> Any:
    """The form two replies to ``name`` are compared in."""
    v = normalize(value, floats=name in FLOATS)
    if name in UNORDERED:
        v = _multiset(v, paired=name in PAIRED)
    return v


def _empty(v: Any) -> bool:
    return v is None or v == () or v == 0 or v == ("set", ()) or v == ("map", ())


def compare(name: bytes, source: Any, target: Any, ttl_tolerance_ms: int = 2000) -> str | None:
    """None when the replies agree, else the divergence kind.

    ``name`` is the lowercased command name; ``source`` and ``target`` are hiredis-parsed
    replies from each side.
    """
    s_err = isinstance(source, hiredis.ReplyError)
    t_err = isinstance(target, hiredis.ReplyError)
    if s_err or t_err:
        if s_err and t_err:
            return None if normalize(source) == normalize(target) else DIFFERENT_VALUE
        err = source if s_err else target
        return TYPE if str(err).startswith("WRONGTYPE") else ERROR_ONLY_ON_ONE_SIDE
    if name in TTL_MS or name in TTL_S:
        return _compare_ttl(source, target, ttl_tolerance_ms if name in TTL_MS else -(-ttl_tolerance_ms // 1000))
    if (name in FIELD_TTL_MS or name in FIELD_TTL_S) and isinstance(source, list) and isinstance(target, list) \
            and len(source) == len(target):
        tol = ttl_tolerance_ms if name in FIELD_TTL_MS else -(-ttl_tolerance_ms // 1000)
        return next((k for k in map(_compare_ttl, source, target, [tol] * len(source)) if k), None)
    a, b = canonical(name, source), canonical(name, target)
    if a == b:
        return None
    if _empty(b) and not _empty(a):
        return MISSING_ON_TARGET
    if _empty(a) and not _empty(b):
        return MISSING_ON_SOURCE
    if _shape(a) != _shape(b):
        return TYPE
    return DIFFERENT_VALUE


def _compare_ttl(a: Any, b: Any, tolerance: int) -> str | None:
    if not isinstance(a, int) or not isinstance(b, int):
        return None if a == b else DIFFERENT_VALUE
    if a < 0 or b < 0:  # -2: no key, -1: no expiry: exact
        if a == b:
            return None
        if a == -2:
            return MISSING_ON_SOURCE
        if b == -2:
            return MISSING_ON_TARGET
        return DIFFERENT_VALUE
    return None if abs(a - b) <= tolerance else DIFFERENT_VALUE


def _shape(v: Any) -> str:
    if isinstance(v, tuple) and v and v[0] in ("map", "set", "f", "err") and len(v) == 2:
        return v[0] if v[0] != "f" else "scalar"
    if isinstance(v, tuple):
        return "array"
    return "scalar"


def compare_exec(names: list[bytes], source: Any, target: Any, pairs: list[tuple[int, int]],
                 ttl_tolerance_ms: int = 2000) -> str | None:
    """Compare two EXEC replies position by position, for the commands both sides ran unchanged.

    ``pairs[k]`` is (index in the source's EXEC reply, index in the target's) of the command named
    ``names[k]``; commands replaced by their effect have no pair and are not compared.
    """
    if not isinstance(source, list) or not isinstance(target, list):
        return compare(b"exec", source, target, ttl_tolerance_ms)
    for name, (i, j) in zip(names, pairs):
        if i >= len(source) or j >= len(target):
            return DIFFERENT_VALUE
        if not comparable(name):
            continue
        kind = compare(name, source[i], target[j], ttl_tolerance_ms)
        if kind:
            return kind
    return None


def digest(raw: bytes) -> str:
    """A short digest of a raw reply: lets two logs be matched without logging the value."""
    return hashlib.sha256(raw).hexdigest()[:16]
