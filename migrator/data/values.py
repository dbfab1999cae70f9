"""A key's state on one server: type, PTTL, size and a digest of its value; and chunked readers.

``Prober.probe``: one Lua script per batch returns, for each key, its type, PTTL, size
(elements, or bytes for strings) and a canonical digest of its value: hashes and sets sorted,
sorted sets with normalised scores, lists in order, HyperLogLogs without their cached
cardinality. Keys larger than ``chunk`` elements, streams and module types get no digest (the
exact comparison in ``compare`` decides them). Without scripting (EVAL denied) the same state
is read with pipelined commands and the digest computed here.

The chunked readers (HSCAN, SSCAN, ZRANGE by rank, LRANGE ranges, GETRANGE, XRANGE by ID) serve
the exact comparison and the type-aware copy.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator, NamedTuple

import redis

from migrator.data import fastcall, fieldttl

SIZE_COMMAND = {"string": "STRLEN", "hash": "HLEN", "list": "LLEN", "set": "SCARD", "zset": "ZCARD", "stream": "XLEN"}
CONTAINERS = ("hash", "list", "set", "zset")

_PROBE_LUA = r"""
local maxn, maxb, fttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local function enc(s) return #s .. ':' .. s end
local function score(s) local n = tonumber(s); if n then return string.format('%.17g', n) end; return s end
-- A HyperLogLog caches its cardinality in header bytes 9-16, rewritten by PFCOUNT (a read).
local function hll(v)
  if #v >= 16 and string.sub(v, 1, 4) == 'HYLL' then return string.sub(v, 1, 8) .. string.sub(v, 17) end
  return v
end
local out = {}
for i, k in ipairs(KEYS) do
  local ty = redis.call('TYPE', k)['ok']
  local ttl = redis.call('PTTL', k)
  local n, d, ft = 0, '', {}
  if ty == 'string' then
    n = redis.call('STRLEN', k)
    if n <= maxb then d = redis.sha1hex(hll(redis.call('GET', k))) end
  elseif ty == 'hash' then
    n = redis.call('HLEN', k)
    if n <= maxn then
      local a, p = redis.call('HGETALL', k), {}
      for j = 1, #a, 2 do p[#p + 1] = enc(a[j]) .. '=' .. enc(a[j + 1]) end
      table.sort(p); d = redis.sha1hex(table.concat(p, ','))
      -- Field TTLs: {field, absolute ms, ...} for the fields that have one.
      for j = 1, fttl and #a or 0, 2000 do
        local f = {}
        for m = j, math.min(#a, j + 1999), 2 do f[#f + 1] = a[m] end
        local r = redis.call('HPEXPIRETIME', k, 'FIELDS', #f, unpack(f))
        for m = 1, #r do if r[m] > 0 then ft[#ft + 1] = f[m]; ft[#ft + 1] = r[m] end end
      end
    elseif fttl then ft = -1
    end
  elseif ty == 'set' then
    n = redis.call('SCARD', k)
    if n <= maxn then
      local a, p = redis.call('SMEMBERS', k), {}
      for j = 1, #a do p[j] = enc(a[j]) end
      table.sort(p); d = redis.sha1hex(table.concat(p, ','))
    end
  elseif ty == 'zset' then
    n = redis.call('ZCARD', k)
    if n <= maxn then
      local a, p = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES'), {}
      for j = 1, #a, 2 do p[#p + 1] = enc(a[j]) .. '=' .. score(a[j + 1]) end
      d = redis.sha1hex(table.concat(p, ','))
    end
  elseif ty == 'list' then
    n = redis.call('LLEN', k)
    if n <= maxn then
      local a, p = redis.call('LRANGE', k, 0, -1), {}
      for j = 1, #a do p[j] = enc(a[j]) end
      d = redis.sha1hex(table.concat(p, ','))
    end
  elseif ty == 'stream' then
    n = redis.call('XLEN', k)
  end
  out[i] = {ty, ttl, n, d, ft}
end
return out
"""


# The same probe with the keys in ARGV (after the three settings) instead of KEYS: a cluster node runs
# a script without a shebang that reads keys of several of its slots when none are declared
# (declared keys must share one slot), so a batch is one call per node, not one per slot.
_PROBE_ARGV_LUA = "local KEYS = {}\nfor i = 4, #ARGV do KEYS[i - 3] = ARGV[i] end\n" + _PROBE_LUA


class KeyState(NamedTuple):
    """One key on one server at one moment. ``digest`` (hex bytes) is empty when none was computed."""

    type: str
    pttl: int  # -1 no expiry, -2 missing
    size: int
    digest: bytes = b""
    # Hash field TTLs: ((field, absolute expiry ms), ...) sorted by field, for the fields that have
    # one; None when not read (a hash too big for the probe, on a server with field expiry).
    field_ttls: tuple | None = ()

    @property
    def exists(self) -> bool:
        return self.type != "none"

    @property
    def fingerprint(self) -> tuple:
        """What changes when the value changes (the TTL counts down, so it is left out; field
        TTLs are absolute times, so they are in)."""
        return (self.type, self.size, self.digest, self.field_ttls)


MISSING = KeyState("none", -2, 0, b"")
_TYPE_NAMES = {t.encode(): t for t in ("none", "string", "hash", "list", "set", "zset", "stream")}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Prober:
    """Reads KeyStates for batches of keys, by Lua script where allowed, else by pipelined reads."""

    def __init__(self, client: redis.Redis, chunk: int, max_bytes: int, undeclared: bool = False) -> None:
        self.client = client
        self.chunk = chunk
        self.max_bytes = max_bytes
        self.lua: bool | None = None  # unknown until the first call
        self.field_ttls: bool | None = None  # the server has hash field expiry (asked on first use)
        self.undeclared = undeclared  # keys passed as arguments (a cluster node's batch of several slots)
        self._script = client.register_script(_PROBE_ARGV_LUA if undeclared else _PROBE_LUA)

    def probe(self, keys: list[bytes]) -> list[KeyState]:
        if not keys:
            return []
        if self.field_ttls is None:
            self.field_ttls = fieldttl.supported(self.client)
        if self.lua is not False:
            try:
                limits = [self.chunk, self.max_bytes, 1 if self.field_ttls else 0]
                if self.undeclared:
                    rows = fastcall.evalsha(self.client, self._script, [], [*limits, *keys])
                else:
                    rows = fastcall.evalsha(self.client, self._script, keys, limits)
                self.lua = True
                types = _TYPE_NAMES
                return [KeyState(types.get(t) or _s(t), ttl, n, d, _field_ttls(ft)) for t, ttl, n, d, ft in rows]
            except redis.exceptions.ResponseError as e:
                if self.lua or not _scripting_denied(e):
                    raise
                self.lua = False
        return probe_by_reads(self.client, keys, self.chunk, self.max_bytes, self.field_ttls)


def _field_ttls(ft: Any) -> tuple | None:
    """The probe's flat {field, ms, ...} as sorted pairs; -1 (not read) as None."""
    if not isinstance(ft, list):
        return None
    return tuple(sorted(zip(ft[0::2], ft[1::2])))


def _scripting_denied(e: Exception) -> bool:
    text = str(e).lower()
    # "Unknown Redis command called from script" / "can't run this command": a command the script
    # calls (OBJECT ENCODING, DUMP) is renamed or denied; the pipelined path then does without it.
    return any(s in text for s in ("unknown command", "noperm", "no permissions", "disabled", "not allowed",
                                   "unknown redis command", "can't run this command"))


def probe_by_reads(client: redis.Redis, keys: list[bytes], chunk: int, max_bytes: int,
                   field_ttls: bool = False) -> list[KeyState]:
    """The Lua probe's result computed with ordinary pipelined commands."""
    p = client.pipeline(transaction=False)
    for k in keys:
        p.type(k)
        p.pttl(k)
    head = p.execute()
    types = [_s(t) for t in head[0::2]]
    ttls = [int(t) for t in head[1::2]]
    p = client.pipeline(transaction=False)
    for k, t in zip(keys, types):
        p.execute_command(SIZE_COMMAND.get(t, "EXISTS"), k)
    sizes = [int(n) if isinstance(n, int) else 0 for n in p.execute(raise_on_error=False)]
    out = []
    for k, t, ttl, n in zip(keys, types, ttls, sizes):
        small = (t == "string" and n <= max_bytes) or (t in CONTAINERS and n <= chunk)
        value = read_small(client, k, t) if small else None
        d = canonical_digest(t, value).encode() if small else b""
        ft: tuple | None = ()
        if field_ttls and t == "hash":
            ft = _field_ttls_read(client, k, value) if small else None
        out.append(KeyState(t, ttl, n if t != "none" else 0, d, ft))
    return out


def _field_ttls_read(client: redis.Redis, key: bytes, value: Any) -> tuple:
    fields = list(value) if isinstance(value, dict) else list(value[0::2])
    times = fieldttl.expiry_times(client, key, fields)
    return tuple(sorted((f, t) for f, t in zip(fields, times) if t > 0))


def read_small(client: redis.Redis, key: bytes, type_: str) -> Any:
    """The whole value of a small key, in the server's natural order."""
    if type_ == "string":
        return client.get(key)
    if type_ == "hash":
        return client.execute_command("HGETALL", key, NEVER_DECODE=True)
    if type_ == "set":
        return client.execute_command("SMEMBERS", key)
    if type_ == "zset":
        return _flat(client.zrange(key, 0, -1, withscores=True, score_cast_func=bytes))
    if type_ == "list":
        return client.lrange(key, 0, -1)
    raise ValueError(f"no small read for {type_}")


def _flat(pairs) -> list:
    return [x for pair in pairs for x in pair]


def _enc(b: bytes) -> bytes:
    return str(len(b)).encode() + b":" + b


def _score(s: bytes | float) -> bytes:
    try:
        return b"%.17g" % float(s)
    except (TypeError, ValueError):
        return s if isinstance(s, bytes) else str(s).encode()


def canonical_digest(type_: str, value: Any) -> str:
    """The same digest the Lua probe computes (for a server with a bytewise collation)."""
    if type_ == "string":
        return hashlib.sha1(hll_masked(value or b"")).hexdigest()
    if type_ == "hash":
        items = value.items() if isinstance(value, dict) else zip(value[0::2], value[1::2])
        parts = sorted(_enc(f) + b"=" + _enc(v) for f, v in items)
    elif type_ == "set":
        parts = sorted(_enc(m) for m in value)
    elif type_ == "zset":
        parts = [_enc(m) + b"=" + _score(s) for m, s in zip(value[0::2], value[1::2])]
    elif type_ == "list":
        parts = [_enc(v) for v in value]
    else:
        return ""
    return hashlib.sha1(b",".join(parts)).hexdigest()


# --- chunked reads (used by the copy of big keys and by compare) ----------------------------


def _by_cursor(scan: Callable[[int], tuple[int, Any]]) -> Iterator[Any]:
    """Non-empty parts of a cursor scan (HSCAN, SSCAN) until the cursor comes back to 0."""
    cursor = 0
    while True:
        cursor, part = scan(cursor)
        if part:
            yield part
        if cursor == 0:
            return


def _by_offset(read: Callable[[int, int], Any], size: int) -> Iterator[Any]:
    """Non-empty parts of an inclusive offset range read (LRANGE, ZRANGE, GETRANGE) until a short one."""
    start = 0
    while True:
        part = read(start, start + size - 1)
        if part:
            yield part
        if len(part) < size:
            return
        start += size


def scan_hash(client: redis.Redis, key: bytes, chunk: int) -> Iterator[dict[bytes, bytes]]:
    return _by_cursor(lambda cursor: client.hscan(key, cursor, count=chunk))


def scan_set(client: redis.Redis, key: bytes, chunk: int) -> Iterator[list[bytes]]:
    return (list(part) for part in _by_cursor(lambda cursor: client.sscan(key, cursor, count=chunk)))


def range_zset(client: redis.Redis, key: bytes, chunk: int) -> Iterator[list[tuple[bytes, float]]]:
    """Members with scores in rank order; rank ranges can shift under writes (verify catches it)."""
    return _by_offset(lambda a, b: client.zrange(key, a, b, withscores=True), chunk)


def range_list(client: redis.Redis, key: bytes, chunk: int) -> Iterator[list[bytes]]:
    return _by_offset(lambda a, b: client.lrange(key, a, b), chunk)


def range_string(client: redis.Redis, key: bytes, chunk_bytes: int) -> Iterator[bytes]:
    return _by_offset(lambda a, b: client.getrange(key, a, b), chunk_bytes)


def range_stream(client: redis.Redis, key: bytes, chunk: int) -> Iterator[list[tuple[bytes, dict]]]:
    """Entries by ID range: each chunk starts just after the last ID seen."""
    start = b"-"
    while True:
        part = client.xrange(key, min=start, max=b"+", count=chunk)
        if part:
            yield part
        if len(part) < chunk:
            return
        start = b"(" + part[-1][0]


def stream_meta(client: redis.Redis, key: bytes) -> dict[str, Any]:
    """The parts of a stream that are not entries: last ID, groups, their consumers and PELs."""
    info = client.xinfo_stream(key)
    groups = []
    for g in client.xinfo_groups(key):
        name = g["name"]
        consumers = sorted((c["name"], int(c["pending"])) for c in client.xinfo_consumers(key, name))
        groups.append({"name": name, "last_delivered_id": g["last-delivered-id"], "pending": int(g["pending"]),
                       "entries_read": g.get("entries-read"), "consumers": consumers})
    groups.sort(key=lambda g: g["name"])
    return {"last_generated_id": info["last-generated-id"], "groups": groups}


def stream_meta_for_compare(meta: dict[str, Any]) -> dict[str, Any]:
    # entries-read is absent before Redis 7.0 and may be unknown (None) after a copy.
    return {"last_generated_id": meta["last_generated_id"],
            "groups": [{k: v for k, v in g.items() if k != "entries_read"} for g in meta["groups"]]}


def hll_masked(v: bytes) -> bytes:
    """A HyperLogLog without its cached cardinality (header bytes 8-15), which PFCOUNT rewrites."""
    if len(v) >= 16 and v[:4] == b"HYLL":
        return v[:8] + v[16:]
    return v


def value_preview(client: redis.Redis, key: bytes, type_: str, limit: int = 10) -> str:
    """A short rendering of a value, for reports made with --show-values only."""
    try:
        if type_ == "string":
            v = client.getrange(key, 0, 199)
            return repr(v)
        if type_ == "hash":
            return repr(dict(list(client.hscan(key, 0, count=limit)[1].items())[:limit]))
        if type_ == "set":
            return repr(sorted(client.sscan(key, 0, count=limit)[1])[:limit])
        if type_ == "zset":
            return repr(client.zrange(key, 0, limit - 1, withscores=True))
        if type_ == "list":
            return repr(client.lrange(key, 0, limit - 1))
        if type_ == "stream":
            return repr(client.xrange(key, count=limit))
        if type_ == "ReJSON-RL":  # a JSON document (migrator/data/modtypes.py), as the server serialises it
            return repr((client.execute_command("JSON.GET", key, "$") or b"")[:200])
    except redis.exceptions.RedisError as e:
        return f"(unreadable: {e})"
    return "(none)"
