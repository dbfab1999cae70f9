"""Hash field TTLs (Redis 7.4+, Valkey 9.0+): read with the values, written as absolute times, compared.

A hash field may expire on its own (``HEXPIRE`` …). A plain ``HGETALL``/``HSET`` copy would drop
every such expiry silently, so the type-aware copy reads each field's absolute expiry
(``HPEXPIRETIME``) in the same script as the values and writes it with ``HPEXPIREAT``: a slow
copy does not stretch it, and a field expiring between two reads cannot be copied without its
TTL. A target without field expiry (Valkey 8.x, Redis before 7.4) cannot hold such a hash: the
key is refused with an error naming it (``TargetLacksFieldTTLs``), never written without them.

Without scripting, the fields' expiries are read by a second pipelined call after the values;
that is safe too: a field that expired in between answers -2 and is left out, and any other
change between the reads is a write, which the verification after the copy catches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis

from migrator.data import fastcall

PER_CALL = 1000  # fields per HPEXPIRETIME/HPEXPIREAT (a Lua unpack() is bounded too)
_PROBE_KEY = b"__migrator:fieldttl-probe"

# Per key: {HGETALL flat reply, HPEXPIRETIME per field in the same order}.
_READ_LUA = r"""
local per = tonumber(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  local a = redis.call('HGETALL', k)
  local t = {}
  local j = 1
  while j <= #a do
    local f = {}
    local last = math.min(#a, j + 2 * per - 1)
    for m = j, last, 2 do f[#f + 1] = a[m] end
    local r = redis.call('HPEXPIRETIME', k, 'FIELDS', #f, unpack(f))
    for m = 1, #r do t[#t + 1] = r[m] end
    j = last + 1
  end
  out[i] = {a, t}
end
return out
"""


class TargetLacksFieldTTLs(redis.exceptions.ResponseError):
    """The source hash has fields with TTLs and the target has no hash field expiry."""


def refusal(n_fields: int) -> str:
    return (f"hash has {n_fields} field(s) with a TTL and the target has no hash field expiry (HPEXPIREAT, "
            "Redis 7.4+/Valkey 9.0+): not copied, as the copy would drop the TTLs; use a target that has them "
            "or remove the field TTLs (HPERSIST) on the source")


def supported(client: redis.Redis) -> bool:
    """Whether the server has hash field expiry: it knows ``HPEXPIRETIME``.

    ``COMMAND INFO`` says so without touching a key; where COMMAND is refused (a managed
    service), ``HPEXPIRETIME`` itself is tried on a key nobody uses: an unknown command says no;
    a cluster redirect or an ACL refusal says yes (a server looks the command up first). Any
    other error is raised: guessing could drop field TTLs silently.
    """
    try:
        reply = fastcall.call(client, b"COMMAND", b"INFO", b"HPEXPIRETIME")
        if isinstance(reply, list) and len(reply) == 1:
            return bool(reply[0])
    except redis.exceptions.ResponseError:
        pass  # COMMAND refused or renamed: ask the command itself
    try:
        fastcall.call(client, b"HPEXPIRETIME", _PROBE_KEY, b"FIELDS", 1, b"f")
        return True
    except redis.exceptions.ResponseError as e:
        text = str(e).lower()
        if "unknown command" in text:
            return False
        if text.startswith(("moved", "ask", "crossslot", "noperm")) or "no permissions" in text:
            return True
        raise


def split(flat: list, times: list) -> tuple[dict[bytes, bytes], dict[bytes, int]]:
    """(values, {field: absolute expiry ms}) from HGETALL's flat reply and HPEXPIRETIME's; a field
    that answered -2 (expired meanwhile) is left out of both."""
    values: dict[bytes, bytes] = {}
    expiry: dict[bytes, int] = {}
    for f, v, t in zip(flat[0::2], flat[1::2], times):
        t = int(t)
        if t == -2:
            continue
        values[f] = v
        if t > 0:
            expiry[f] = t
    return values, expiry


def read_hashes(client: redis.Redis, keys: list[bytes],
                undeclared: bool = False) -> dict[bytes, tuple[dict[bytes, bytes], dict[bytes, int]]]:
    """Each hash's values and its fields' absolute expiries, read in one script (pipelined reads
    where scripting is refused). ``undeclared``: a cluster node's batch of keys of several slots,
    passed as arguments (``fastcall.register``)."""
    if not keys:
        return {}
    try:
        rows = fastcall.evalsha(client, fastcall.register(client, _READ_LUA, undeclared), keys, [PER_CALL])
    except redis.exceptions.ResponseError as e:
        text = str(e).lower()  # scripting refused (as ``values._scripting_denied`` tells it): read without
        if not any(s in text for s in ("unknown command", "noperm", "no permissions", "disabled", "not allowed")):
            raise
        return _read_pipelined(client, keys)
    return {k: split(flat, times) for k, (flat, times) in zip(keys, rows)}


def _read_pipelined(client: redis.Redis, keys: list[bytes]) -> dict:
    p = client.pipeline(transaction=False)
    for k in keys:
        p.execute_command("HGETALL", k, NEVER_DECODE=True)
    flats = p.execute()
    out = {}
    for k, flat in zip(keys, flats):
        flat = [x for pair in flat.items() for x in pair] if isinstance(flat, dict) else list(flat)
        out[k] = split(flat, expiry_times(client, k, flat[0::2]))
    return out


def expiry_times(client: redis.Redis, key: bytes, fields: list[bytes]) -> list[int]:
    """``HPEXPIRETIME`` for ``fields`` (any number): -2 no such field, -1 no TTL, else ms since epoch."""
    out: list[int] = []
    for i in range(0, len(fields), PER_CALL):
        part = fields[i:i + PER_CALL]
        out += [int(t) for t in fastcall.call(client, b"HPEXPIRETIME", key, b"FIELDS", len(part), *part)]
    return out


def expire_commands(key: bytes, expiry: dict[bytes, int]) -> Iterable[list[Any]]:
    """``HPEXPIREAT`` commands giving each field its absolute expiry (fields sharing one grouped)."""
    by_time: dict[int, list[bytes]] = {}
    for f, at in expiry.items():
        by_time.setdefault(at, []).append(f)
    for at, fields in sorted(by_time.items()):
        for i in range(0, len(fields), PER_CALL):
            part = fields[i:i + PER_CALL]
            yield [b"HPEXPIREAT", key, b"%d" % at, b"FIELDS", b"%d" % len(part), *part]


def differences(src: dict[bytes, int], dst: dict[bytes, int], tolerance_ms: int) -> list[tuple[bytes, str, int | None]]:
    """Fields whose expiry differs: (field, how, delta ms or None), in field order."""
    out = []
    for f in sorted(set(src) | set(dst)):
        a, b = src.get(f), dst.get(f)
        if a is None:
            out.append((f, "expires only on the target", None))
        elif b is None:
            out.append((f, "expires only on the source", None))
        elif abs(b - a) > tolerance_ms:
            out.append((f, f"expiry differs by {(b - a) / 1000:+.3f}s", b - a))
    return out


def field_name(f: bytes, limit: int = 60) -> str:
    """A field's name for a report line (shortened)."""
    text = repr(f)[2:-1]
    return text if len(text) <= limit else text[:limit] + "…"
