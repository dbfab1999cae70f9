"""Copy keys from one server to another: DUMP/RESTORE where the target accepts the source's
payloads, a type-aware copy otherwise, and big keys in chunks through a temporary key.

Expiry travels as an absolute time (RESTORE ... ABSTTL, PEXPIREAT), taken from the source's
clock in the same Lua call that reads the key, so a slow copy does not stretch TTLs. Hash
field TTLs travel inside a DUMP payload where the target reads it (Valkey 9 → Valkey 9), and
as ``HPEXPIREAT`` in the type-aware copy (``fieldttl``); a target without field expiry gets
such a hash refused with a per-key error, never a copy without its field TTLs. A key
missing on the source is deleted on the target: copying "nothing" is part of copying.

Nothing here decides whether a copy is *right*: under live mirrored writes a copy can race a
write, and ``sync`` verifies every copied key afterwards (see docs/data.md).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import hiredis
import redis

from migrator.data import fastcall, fieldttl, modtypes, streams, values
from migrator.data.keyspace import TMP_PREFIX, prefetch

DUMP, STRUCT = "dump", "struct"

# The read: per key, its PTTL and DUMP payload, or [type, size] when it is not DUMPed (missing,
# big, or read for a type-aware copy); the source's time (ms) and how many keys were not DUMPed first.
_READ_FN = r"""
local function read(keys, maxn, maxb, dump)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local size = {string='STRLEN', hash='HLEN', list='LLEN', set='SCARD', zset='ZCARD', stream='XLEN'}
  -- Compact encodings are small by construction (the server converts a value past its
  -- *-max-listpack-* limits), so such keys need no size check before their DUMP (whose first
  -- byte tells the type). Other encodings suggest a type, checked by its size command: hashtable
  -- is a set or a hash, raw a string or a module type; a wrong guess is settled by TYPE.
  local compact = {listpack=true, ziplist=true, intset=true, embstr=true, int=true}
  local guess = {quicklist='list', skiplist='zset', raw='string', stream='stream', hashtable='set'}
  -- Module types copied type-aware even by a DUMP copy (modtypes.TYPED): never DUMPed.
  local typed = {['ReJSON-RL']=true}
  local out, special = {now, 0}, 0
  for i, k in ipairs(keys) do
    local enc = redis.call('OBJECT', 'ENCODING', k)
    local j = 2 * i + 1
    if not enc then
      out[j], out[j + 1] = -2, {'none', 0}
      special = special + 1
    elseif dump and compact[enc] then
      out[j], out[j + 1] = redis.call('PTTL', k), redis.call('DUMP', k)
    else
      local ty, n = guess[enc], 0
      if ty then
        n = redis.pcall(size[ty], k)
        if type(n) ~= 'number' then ty = nil end
      end
      if not ty then
        ty = redis.call('TYPE', k)['ok']
        n = size[ty] and redis.call(size[ty], k) or 0
      end
      local big = (ty == 'string' and n > maxb) or (ty ~= 'string' and n > maxn)
      if dump and not big and not typed[ty] then
        out[j], out[j + 1] = redis.call('PTTL', k), redis.call('DUMP', k)
      else
        out[j], out[j + 1] = redis.call('PTTL', k), {ty, n}
        special = special + 1
      end
    end
  end
  out[2] = special
  return out
end
"""

_READ_LUA = _READ_FN + r"""
return read(KEYS, tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1')
"""

# One SCAN step and the DUMP read of the keys it returned, in one call: the keys do not travel to
# this process and back before they are read. ARGV: chunk, chunk bytes, cursor, count, MATCH
# pattern or '', the temporary-key prefix (never copied). Returns {cursor, keys, read reply}.
_SCAN_READ_LUA = _READ_FN + r"""
local sc
if ARGV[5] ~= '' then sc = redis.call('SCAN', ARGV[3], 'MATCH', ARGV[5], 'COUNT', ARGV[4])
else sc = redis.call('SCAN', ARGV[3], 'COUNT', ARGV[4]) end
local keys, prefix = {}, ARGV[6]
for _, k in ipairs(sc[2]) do
  if string.sub(k, 1, #prefix) ~= prefix then keys[#keys + 1] = k end
end
return {sc[1], keys, read(keys, tonumber(ARGV[1]), tonumber(ARGV[2]), true)}
"""

# ARGV holds (absolute expiry or 0, payload) per key; an empty payload deletes the key.
# The last ARGV says whether to return each key's new DUMP CRC64 (its ``Signature``).
_RESTORE_LUA = r"""
local out = {}
local sign = ARGV[#ARGV] == '1'
for i, k in ipairs(KEYS) do
  local at, payload = ARGV[2 * i - 1], ARGV[2 * i]
  local r
  if payload == '' then r = redis.pcall('DEL', k)
  else r = redis.pcall('RESTORE', k, at, payload, 'REPLACE', 'ABSTTL') end
  if type(r) == 'table' and r.err then out[i] = r.err
  elseif sign then
    local d = redis.call('DUMP', k)
    out[i] = 'OK:' .. (d and string.sub(d, -8) or '')
  else out[i] = 'OK' end
end
return out
"""


@dataclass(slots=True)
class Snap:
    """One key as read from the source: what to write, and when it expires (ms since epoch, 0 = never).

    ``raw_type`` is the TYPE reply, or empty when the key was read without TYPE (its DUMP's first
    byte tells then): ``type`` is worked out only when asked, as most snaps only pass through.
    ``size`` (elements, or bytes of a string) is known only for a key that was not DUMPed.
    """

    key: bytes
    raw_type: bytes | str
    size: int
    expire_at: int
    payload: bytes | None = None
    big: bool = False  # too many elements (or bytes) to read at once: copied in chunks

    @property
    def type(self) -> str:
        t = _TYPES.get(self.raw_type) if isinstance(self.raw_type, bytes) else self.raw_type
        if t:
            return t
        if self.payload:
            return _RDB_TYPES.get(self.payload[0], "unknown")
        return values._s(self.raw_type)


@dataclass(frozen=True)
class Signature:
    """What a key looked like on both sides right after its copy: its DUMP's CRC64, and expiry.

    If, later, both sides still show these, neither was written since, so they are equal. The
    CRC64 that ends every DUMP payload is a checksum of the serialised value that the server
    computes anyway: cheaper than hashing the payload again.
    """

    source: bytes
    target: bytes
    expire_at: int


def dump_crc(payload: bytes | None) -> bytes:
    return payload[-8:] if payload else b""


@dataclass
class CopyResult:
    copied: int = 0
    deleted: int = 0
    big: int = 0
    bytes: int = 0
    errors: dict[bytes, str] = field(default_factory=dict)
    signatures: dict[bytes, Signature] = field(default_factory=dict)

    def add(self, other: "CopyResult") -> None:
        self.copied += other.copied
        self.deleted += other.deleted
        self.big += other.big
        self.bytes += other.bytes  # errors stay with the batch that met them


def tmp_key(key: bytes) -> bytes:
    """Where a big key is built before it is renamed over the real one; unique per process.

    It carries the key's hash tag (``{...}``), so that on a cluster it lies in the key's slot
    and the final RENAME is not cross-slot."""
    tag = hash_tag(key)
    braced = b"{" + tag + b"}" if b"}" not in tag else b""
    return TMP_PREFIX + braced + hashlib.sha1(key).hexdigest().encode() + b":" + str(os.getpid()).encode()


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` a cluster hashes to find its slot: the first ``{...}`` if not empty, else all of it."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def rdb_version(payload: bytes) -> int:
    """The RDB version in a DUMP payload's footer (2 bytes little-endian before the CRC64)."""
    return int.from_bytes(payload[-10:-8], "little")


def _payload_rejected(err: str) -> bool:
    return "payload version" in err.lower() or "bad data format" in err.lower()


class Copier:
    """Copies batches of keys of one database from ``src`` to ``dst``.

    ``method`` is DUMP or STRUCT; a DUMP copier falls back to STRUCT for good the first time
    the target rejects a payload's version (the batch is then copied type-aware).
    """

    def __init__(self, src: redis.Redis, dst: redis.Redis, method: str, chunk: int = 1000,
                 chunk_bytes: int = 1 << 20, sign: bool = True, undeclared: tuple[bool, bool] = (False, False)) -> None:
        self.src, self.dst = src, dst
        self.sign = sign  # return Signatures (for a verifier without a WriteWatch)
        self.method = method
        self.chunk, self.chunk_bytes = chunk, chunk_bytes
        # (source, target) is a cluster node: a batch may hold keys of several of its slots, passed
        # to the scripts as arguments (``fastcall.register``).
        self.undeclared = undeclared
        self._read = fastcall.register(src, _READ_LUA, undeclared[0])
        self._scan_read = src.register_script(_SCAN_READ_LUA)
        self._restore = fastcall.register(dst, _RESTORE_LUA, undeclared[1])
        self.lua = True
        self.json = modtypes.JsonCopier(src, dst)
        self._field_ttls: dict[str, bool] = {}  # "src"/"dst" → has hash field expiry (asked once)

    def field_ttls(self, side: str) -> bool:
        """Whether the source (``"src"``) or target (``"dst"``) has hash field expiry."""
        if side not in self._field_ttls:
            self._field_ttls[side] = fieldttl.supported(self.src if side == "src" else self.dst)
        return self._field_ttls[side]

    # --- reading -------------------------------------------------------------------------
    def read(self, keys: list[bytes]) -> list[Snap]:
        dump = self.method == DUMP
        if self.lua:
            try:
                rows = self.read_flat(keys, dump)
                return _snaps(keys, rows[0], rows[2:], self.chunk, self.chunk_bytes)
            except redis.exceptions.ResponseError as e:
                if not values._scripting_denied(e):
                    raise
                self.lua = False
        return self._read_pipelined(keys, dump)

    def read_flat(self, keys: list[bytes], dump: bool) -> list:
        """The read script's reply: the source's time (ms), how many keys were not DUMPed, then per
        key its PTTL and its DUMP payload, or [type, size] when it was not DUMPed (missing, big, or
        read for a type-aware copy)."""
        return fastcall.evalsha(self.src, self._read, keys, [self.chunk, self.chunk_bytes, 1 if dump else 0])

    def scan_read(self, cursor: int, count: int, match: str | None) -> tuple[int, list[bytes], list]:
        """One SCAN step and the DUMP read of its keys (temporary keys left out), in one call on the
        source: (cursor after, keys, ``read_flat``'s reply for them). Copy them with ``write_flat``."""
        cursor_after, keys, flat = fastcall.evalsha(self.src, self._scan_read, [], [
            self.chunk, self.chunk_bytes, cursor, count, match or "", TMP_PREFIX])
        return int(cursor_after), keys, flat

    def _read_pipelined(self, keys: list[bytes], dump: bool) -> list[Snap]:
        states = values.probe_by_reads(self.src, keys, 0, 0)  # sizes and TTLs only
        now_s, now_us = self.src.time()
        now = now_s * 1000 + now_us // 1000
        rows = []
        for k, st in zip(keys, states):
            big = (st.type == "string" and st.size > self.chunk_bytes) or (st.type != "string" and st.size > self.chunk)
            payload = self.src.dump(k) if dump and st.exists and not big and st.type not in modtypes.TYPED else None
            rows += [st.pttl, payload if payload is not None else [st.type, st.size]]
        return _snaps(keys, now, rows, self.chunk, self.chunk_bytes)

    # --- writing -------------------------------------------------------------------------
    def copy(self, keys: list[bytes]) -> CopyResult:
        """Copy ``keys`` as they are now on the source (missing ones are deleted on the target)."""
        if self.method == DUMP and self.lua and keys:
            try:
                flat = self.read_flat(keys, True)
            except redis.exceptions.ResponseError:
                return self.write(self.read(keys))  # read() decides between scripting and pipelines
            return self.write_flat(keys, flat)
        return self.write(self.read(keys))

    def write_flat(self, keys: list[bytes], flat: list) -> CopyResult:
        """Write what ``read_flat`` (or ``scan_read``) returned for ``keys`` (read with DUMP).

        The common case on plain lists, without a Snap per key: every key present and small, and
        every RESTORE accepted. Anything else takes the general path with what was read.
        """
        if not keys:
            return CopyResult()
        now, special, ttls, payloads = flat[0], flat[1], flat[2::2], flat[3::2]
        if special or self.sign or self.method != DUMP:  # a key missing or big, or signatures wanted
            return self.write(_snaps(keys, now, flat[2:], self.chunk, self.chunk_bytes))
        replies = restore(self.dst, keys, [now + ttl if ttl > 0 else 0 for ttl in ttls], payloads)
        if replies.count(b"OK") == len(replies):
            return CopyResult(copied=len(keys), bytes=sum(map(len, payloads)))
        result = CopyResult()
        retry = self._absorb(_snaps(keys, now, flat[2:], self.chunk, self.chunk_bytes), replies, result)
        if retry:
            self._write_struct(retry, result)
        return result

    def write(self, snaps: list[Snap]) -> CopyResult:
        """Write what ``read`` returned (big keys are read and written chunk by chunk here)."""
        result = CopyResult()
        small = [s for s in snaps if not s.big]
        if any(s.payload is None and s.type in modtypes.TYPED for s in small):
            self.json.copy([s for s in small if s.type in modtypes.TYPED], result)
            small = [s for s in small if s.type not in modtypes.TYPED]
        if self.method == DUMP:
            retry = self._write_dump(small, result)
        else:
            retry = small
        if retry:
            self._write_struct(retry, result)
        for s in snaps:
            if s.big:
                self._copy_big(s, result)
        return result

    def _write_dump(self, snaps: list[Snap], result: CopyResult) -> list[Snap]:
        """RESTORE the batch; returns the snaps the target rejected (to copy type-aware)."""
        if not snaps:
            return []
        keys = [s.key for s in snaps]
        if self.sign and self.lua:
            # RESTORE and the DUMP that signs it in one script: nothing may land in between.
            args: list[Any] = []
            for s in snaps:
                args += [s.expire_at, s.payload or b""]
            args.append(1)
            replies = fastcall.evalsha(self.dst, self._restore, keys, args)
        else:
            replies = restore(self.dst, keys, [s.expire_at for s in snaps], [s.payload or b"" for s in snaps])
        return self._absorb(snaps, replies, result)

    def _absorb(self, snaps: list[Snap], replies: list[bytes], result: CopyResult) -> list[Snap]:
        """Count the RESTORE replies; returns the snaps whose payload the target rejected."""
        retry = []
        for s, reply in zip(snaps, replies):
            if reply.startswith(b"OK"):
                if reply.startswith(b"OK:"):
                    result.signatures[s.key] = Signature(dump_crc(s.payload), reply[3:], s.expire_at)
                gone = s.payload is None  # missing on the source: deleted on the target
                result.deleted += gone
                result.copied += not gone
                result.bytes += len(s.payload or b"")
            elif _payload_rejected(values._s(reply)) and s.payload and s.payload[0] in _RDB_MODULE:
                # A module value the target cannot load says nothing about the core types' format.
                result.errors[s.key] = (f"module data rejected by the target (is the module that defines its type "
                                        f"loaded there?): {values._s(reply)}")
            elif _payload_rejected(values._s(reply)):
                self.method = STRUCT  # this target cannot read the source's format at all
                retry.append(s)
            else:
                result.errors[s.key] = values._s(reply)
        return retry

    def _write_struct(self, snaps: list[Snap], result: CopyResult) -> None:
        """Small keys, each in one MULTI/EXEC so a reader never sees it half written."""
        readable = [s for s in snaps if s.type in values.CONTAINERS or s.type == "string"]
        # Hashes on a source with field expiry: values and field TTLs in one script per batch.
        with_ttls = [s for s in readable if s.type == "hash"] if readable and self.field_ttls("src") else []
        hashes = fieldttl.read_hashes(self.src, [s.key for s in with_ttls], self.undeclared[0])
        readable = [s for s in readable if s.key not in hashes]
        p = self.src.pipeline(transaction=False)
        for s in readable:
            _queue_small_read(p, s)
        read = dict(zip((s.key for s in readable), p.execute()))
        for s in snaps:
            if s.type == "none":
                self.dst.delete(s.key)
                result.deleted += 1
            elif s.key in hashes:
                value, expiry = hashes[s.key]
                if expiry and not self.field_ttls("dst"):
                    result.errors[s.key] = fieldttl.refusal(len(expiry))
                    continue
                result.bytes += _write_small(self.dst, s, value, expiry)
                result.copied += 1
            elif s.key in read:
                result.bytes += _write_small(self.dst, s, read[s.key])
                result.copied += 1
            elif s.type == "stream":
                self._copy_big(s, result)
            else:
                result.errors[s.key] = f"type {s.type} cannot be copied type-aware and the target rejects its DUMP"

    def _copy_big(self, s: Snap, result: CopyResult) -> None:
        try:
            field_ttls = s.type == "hash" and self.field_ttls("src")
            written = copy_big(self.src, self.dst, s, self.chunk, self.chunk_bytes,
                               field_ttls=(field_ttls, field_ttls and self.field_ttls("dst")))
            result.bytes += written or 0
            result.copied += 1
            result.big += 1
        except redis.exceptions.ResponseError as e:
            result.errors[s.key] = str(e)
            if isinstance(e, fieldttl.TargetLacksFieldTTLs):
                self.dst.delete(tmp_key(s.key))  # the partial copy is not renamed over anything


_RESTORE = b"*6\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$7\r\nREPLACE\r\n$6\r\nABSTTL\r\n"
_RESTORE_NO_TTL = b"*6\r\n$7\r\nRESTORE\r\n$%d\r\n%b\r\n$1\r\n0\r\n$%d\r\n%b\r\n$7\r\nREPLACE\r\n$6\r\nABSTTL\r\n"
_DEL = b"*2\r\n$3\r\nDEL\r\n$%d\r\n%b\r\n"


def restore(dst: redis.Redis, keys: list[bytes], expire_at: list[int], payloads: list[bytes]) -> list[bytes]:
    """``RESTORE key at payload REPLACE ABSTTL`` per key (``DEL`` where the payload is empty), in
    one pipeline; b"OK" per key, or the error's text.

    Plain commands rather than a script: on Valkey 9.1 a pipelined RESTORE costs the server about
    a quarter less CPU than the same RESTORE called from Lua, and the keys are independent.
    """
    parts = []
    for k, at, p in zip(keys, expire_at, payloads):
        if not p:
            parts.append(_DEL % (len(k), k))
        elif at:
            a = b"%d" % at
            parts.append(_RESTORE % (len(k), k, len(a), a, len(p), p))
        else:
            parts.append(_RESTORE_NO_TTL % (len(k), k, len(p), p))
    replies = fastcall.pipeline(dst, b"".join(parts), len(parts))
    if replies.count(b"OK") == len(replies):
        return replies
    return [str(r).encode() if isinstance(r, Exception) else b"OK" for r in replies]  # DEL replies a count


_RDB_MODULE = (6, 7)  # RDB_TYPE_MODULE(_2): a DUMP of module data
_TYPES = {t.encode(): t for t in ("none", "string", "hash", "list", "set", "zset", "stream")}
# RDB object type (a DUMP payload's first byte) → Redis type, for keys read without TYPE.
_RDB_TYPES = {0: "string", 1: "list", 2: "set", 3: "zset", 4: "hash", 5: "zset", 6: "module", 7: "module",
              9: "hash", 10: "list", 11: "set", 12: "zset", 13: "hash", 14: "list", 15: "stream", 16: "hash",
              17: "zset", 18: "list", 19: "stream", 20: "set", 21: "stream", 22: "hash", 23: "hash", 24: "hash",
              25: "hash"}


def _snaps(keys: list[bytes], now: int, flat: list, chunk: int, chunk_bytes: int) -> list[Snap]:
    """Snaps from the read script's flat reply: PTTL, then payload or [type, size], per key."""
    out = []
    append = out.append
    for k, ttl, payload in zip(keys, flat[0::2], flat[1::2]):
        at = now + ttl if ttl > 0 else 0
        if isinstance(payload, list):  # missing, big, or read for a type-aware copy: worth a closer look
            ty, n = payload
            snap = Snap(k, ty, n, at)
            t = snap.type
            snap.big = n > chunk_bytes if t == "string" else (t != "none" and n > chunk)
        else:
            snap = Snap(k, b"", 0, at, payload)
        append(snap)
    return out


def _queue_small_read(p, s: Snap) -> None:
    if s.type == "string":
        p.get(s.key)
    elif s.type == "hash":
        p.hgetall(s.key)
    elif s.type == "set":
        p.smembers(s.key)
    elif s.type == "zset":
        p.zrange(s.key, 0, -1, withscores=True, score_cast_func=bytes)
    else:
        p.lrange(s.key, 0, -1)


def _write_small(dst: redis.Redis, s: Snap, value: Any, field_expiry: dict[bytes, int] | None = None) -> int:
    """Replace the key with ``value`` atomically (hash fields with their absolute expiries); returns
    bytes written. An emptied key is deleted."""
    p = dst.pipeline(transaction=True)
    p.delete(s.key)
    size = _queue_write(p, s.key, s.type, value)
    if size is not None:
        for command in fieldttl.expire_commands(s.key, field_expiry or {}):
            p.execute_command(*command)
    if size is not None and s.expire_at:
        p.pexpireat(s.key, s.expire_at)
    p.execute()
    return size or 0


def _queue_write(p, key: bytes, type_: str, value: Any) -> int | None:
    """Queue the commands that add ``value`` (a chunk) to ``key``; its size in bytes, None if nothing."""
    if value is None or (type_ != "string" and len(value) == 0):
        return None
    if type_ == "string":
        p.append(key, value)  # creates the key even for an empty string
        return len(value)
    if type_ == "hash":
        p.hset(key, mapping=value)
        return sum(len(f) + len(v) for f, v in value.items())
    if type_ == "set":
        p.sadd(key, *value)
        return sum(len(m) for m in value)
    if type_ == "zset":
        args: list[Any] = []
        for m, score in value:
            args += [score, m]
        p.execute_command("ZADD", key, *args)
        return sum(len(m) + 8 for m, _ in value)
    if type_ == "list":
        p.rpush(key, *value)
        return sum(len(v) for v in value)
    raise ValueError(f"cannot write type {type_}")


# --- big keys: chunks into a temporary key, renamed over the real one --------------------------


def copy_big(src: redis.Redis, dst: redis.Redis, s: Snap, chunk: int, chunk_bytes: int,
             field_ttls: tuple[bool, bool] = (False, False)) -> int | None:
    """Copy one key of any size with memory bounded by ``chunk``; bytes written, None if it was gone.

    The value is built in a temporary key and RENAMEd over the real key at the end, so readers
    of the target never see a half-copied key. The chunks are read at different moments, so a
    key written meanwhile may be copied inconsistently: the caller verifies it afterwards.
    ``field_ttls``: whether (the source, the target) has hash field expiry; a hash's chunks then
    carry their fields' expiries, and a target without it refuses a hash that has any.
    """
    tmp = tmp_key(s.key)
    dst.delete(tmp)
    if s.type == "stream":
        written = streams.copy_stream(src, dst, s.key, tmp, chunk)
    else:
        written = _copy_chunks(src, dst, s, tmp, chunk, chunk_bytes, field_ttls)
    if not dst.exists(tmp):  # the source key vanished or emptied while we read it
        dst.delete(s.key)
        return None
    if s.expire_at:
        dst.pexpireat(tmp, s.expire_at)
    dst.rename(tmp, s.key)
    return written


def _parts(src: redis.Redis, s: Snap, chunk: int, chunk_bytes: int,
           field_ttls: tuple[bool, bool] = (False, False)) -> Iterator[tuple[bytes, list]]:
    """(write command, arguments) per chunk of a big key, from raw replies: the elements are
    passed through as the server sent them (scores too), with no per-element parsing. A hash's
    chunk on a source with field expiry is followed by its fields' ``HPEXPIREAT``s."""
    k = s.key
    if s.type == "string":
        for part in values.range_string(src, k, chunk_bytes):
            yield b"APPEND", [part]
    elif s.type in ("hash", "set"):
        scan, write = (b"HSCAN", b"HSET") if s.type == "hash" else (b"SSCAN", b"SADD")
        cursor = b"0"
        while True:
            cursor, part = fastcall.call(src, scan, k, cursor, b"COUNT", chunk)
            if part and s.type == "hash" and field_ttls[0]:
                yield from _hash_chunk_with_ttls(src, k, part, field_ttls[1])
            elif part:
                yield write, part
            if cursor == b"0":
                return
    elif s.type in ("zset", "list"):
        start = 0
        while True:
            if s.type == "zset":
                part = fastcall.call(src, b"ZRANGE", k, start, start + chunk - 1, b"WITHSCORES")
                if part and isinstance(part[0], list):  # RESP3: [member, score] pairs
                    part = [x for pair in part for x in pair]
                args = [None] * len(part)
                args[0::2], args[1::2] = part[1::2], part[0::2]  # member, score → score, member
                n = len(part) // 2
            else:
                args = part = fastcall.call(src, b"LRANGE", k, start, start + chunk - 1)
                n = len(part)
            if args:
                yield (b"ZADD" if s.type == "zset" else b"RPUSH"), args
            if n < chunk:
                return
            start += chunk
    else:
        raise redis.exceptions.ResponseError(f"type {s.type} is too big to DUMP and has no type-aware copy")


def _hash_chunk_with_ttls(src: redis.Redis, key: bytes, part: list, target_has_them: bool) -> Iterator[tuple[bytes, list]]:
    """An HSCAN chunk as HSET, then HPEXPIREAT per expiry time; a field that expired since the
    HSCAN (-2) is left out, and a field TTL the target cannot hold stops the copy of the key."""
    vals, expiry = fieldttl.split(part, fieldttl.expiry_times(src, key, part[0::2]))
    if expiry and not target_has_them:
        raise fieldttl.TargetLacksFieldTTLs(fieldttl.refusal(len(expiry)) + " (at least; big hash read in chunks)")
    if vals:
        yield b"HSET", [x for pair in vals.items() for x in pair]
    for command in fieldttl.expire_commands(key, expiry):
        yield command[0], command[2:]  # the key is the temporary one, added by the writer


def _copy_chunks(src, dst, s: Snap, tmp: bytes, chunk: int, chunk_bytes: int,
                 field_ttls: tuple[bool, bool] = (False, False)) -> int:
    """Write each chunk while the next ones are read and packed (a reader thread, two chunks
    ahead at most); the writes are pipelined (a chunk is sent before the previous one's reply is
    read), so the target does not wait for this process between chunks."""

    def packed() -> Iterator[tuple[bytes, int]]:
        for command, args in _parts(src, s, chunk, chunk_bytes, field_ttls):
            try:
                size = sum(map(len, args))
            except TypeError:  # RESP3 sends scores as doubles
                size = sum(len(a) if isinstance(a, bytes) else 8 for a in args)
            yield hiredis.pack_command((command, tmp, *args)), size

    written = 0
    with fastcall.Pipelined(dst, depth=2) as out:
        for command, size in prefetch(packed(), depth=2):
            out.send(command)
            written += size
    return written


# --- method detection ----------------------------------------------------------------------------


# The compatibility report names methods for people; this module's names are shorter.
_REPORT_METHODS = {"dump-restore": DUMP, "type-aware": STRUCT, DUMP: DUMP, STRUCT: STRUCT}


def detect_method(src: redis.Redis, dst: redis.Redis, compat_report: dict | None,
                  rollback: bool = False) -> tuple[str, str]:
    """DUMP if the target accepts the source's payloads, else STRUCT; with the reason.

    ``rollback``: the copy runs target → source, so the report's ``rollback_copy_method`` applies.
    """
    field_name = "rollback_copy_method" if rollback else "copy_method"
    reported = _REPORT_METHODS.get((compat_report or {}).get(field_name) or "")
    if reported:
        return reported, f"{field_name} from compatibility report {compat_report.get('id')}"
    payload = _small_payload(src)
    if payload is None:
        return DUMP, "no small key to probe with; DUMP assumed (a rejected payload switches to the type-aware copy)"
    version = rdb_version(payload)
    probe = TMP_PREFIX + b"probe:" + str(os.getpid()).encode()
    try:
        dst.execute_command("RESTORE", probe, 0, payload, "REPLACE")
    except redis.exceptions.ResponseError as e:
        return STRUCT, f"target rejects the source's DUMP payload (RDB version {version}): {e}"
    finally:
        dst.delete(probe)
    return DUMP, f"target accepts the source's DUMP payload (RDB version {version})"


def _small_payload(src: redis.Redis, tries: int = 20) -> bytes | None:
    """The DUMP of some small key (never of a big one: that could be gigabytes)."""
    use_object = True
    for _ in range(tries):
        key = src.randomkey()
        if key is None:
            return None
        if use_object:
            try:
                encoding = values._s(src.object("encoding", key) or b"")
                small = encoding in ("listpack", "ziplist", "intset", "embstr", "int")
            except redis.exceptions.ResponseError as e:
                if not values._scripting_denied(e):  # OBJECT renamed or denied (a managed service)
                    raise
                use_object = False
        if not use_object:  # without OBJECT: the type and size commands say what is small
            st = values.probe_by_reads(src, [key], 0, 0)[0]
            small = st.exists and st.size <= (_SMALL_STRING if st.type == "string" else _SMALL_ELEMENTS)
        if small:
            payload = src.dump(key)
            if payload is not None:
                return payload
    return None


# Without OBJECT ENCODING, a key this small (bytes of a string, elements otherwise) is probed with.
_SMALL_STRING, _SMALL_ELEMENTS = 4096, 128
