"""Module data types the copy and the comparison handle type-aware: JSON documents.

A JSON key (TYPE ``ReJSON-RL``, written by RedisJSON or valkey-json) is never DUMPed for a copy:
nothing documents that a RedisJSON payload RESTOREs on valkey-json (or the other way round), so
the copy reads the document with ``JSON.GET key $`` and writes it with ``JSON.SET key $ doc``
(and ``PEXPIREAT`` for the expiry read with the key), in one MULTI/EXEC per key on the target.
A target without the JSON commands gets no such key: each is reported as a copy error naming the
key and the reason, and the sync ends incomplete (exit 1).

The comparison parses both documents and compares them canonically: object member order and
number formatting (``1``, ``1.0``, ``1e0``) do not matter; a difference is reported with the
JSONPath of the first place the documents differ, and never with a value.

A document is read and written whole (JSON has no chunked reader): its size is bounded by what
the server accepts in one reply (RedisJSON's own limits).
"""

from __future__ import annotations

import json
from typing import Any

import hiredis
import redis

from migrator.data import fastcall

JSON_TYPE = "ReJSON-RL"
# TYPE names the copy handles here, never by DUMP/RESTORE.
TYPED = frozenset({JSON_TYPE})

JSON_FIX = "load a JSON module (valkey-json) on the target"


def _s(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def document(reply: Any) -> bytes | None:
    """The document inside a ``JSON.GET key $`` reply (a JSON array holding it), as the server
    serialised it; None when the key is missing."""
    if reply is None:
        return None
    raw = reply if isinstance(reply, bytes) else str(reply).encode()
    raw = raw.strip()
    if not (raw.startswith(b"[") and raw.endswith(b"]")):
        raise ValueError("JSON.GET $ did not reply with a JSON array")
    inner = raw[1:-1].strip()
    if not inner:  # "[]": the root path matched nothing, i.e. no document
        return None
    return inner


def missing_json_commands(dst: redis.Redis) -> str | None:
    """Why the target cannot take JSON documents, or None if it can (or cannot tell: the write
    itself then says). Asked with ``COMMAND INFO``, the server's own table."""
    try:
        info = fastcall.call(dst, b"COMMAND", b"INFO", b"JSON.GET", b"JSON.SET")
    except redis.exceptions.ResponseError:
        return None  # COMMAND refused or renamed (managed services): try the write
    absent = [name for name, entry in zip(("JSON.GET", "JSON.SET"), info or []) if not entry]
    if absent:
        return f"the target has no {' or '.join(absent)} command ({JSON_FIX})"
    return None


class JsonCopier:
    """Copies JSON keys from ``src`` to ``dst`` with JSON.GET/JSON.SET; one per ``Copier``."""

    def __init__(self, src: redis.Redis, dst: redis.Redis) -> None:
        self.src, self.dst = src, dst
        self._refusal: str | None | bool = False  # False: not asked yet

    def refusal(self) -> str | None:
        if self._refusal is False:
            self._refusal = missing_json_commands(self.dst)
        return self._refusal  # type: ignore[return-value]

    def copy(self, snaps: list, result) -> None:
        """Copy each snap (a JSON key read by ``Copier.read``) into ``result`` (a ``CopyResult``):
        copied, deleted (gone from the source), or an error naming the reason."""
        if not snaps:
            return
        reason = self.refusal()
        if reason:
            for s in snaps:
                result.errors[s.key] = f"JSON document (type {JSON_TYPE}) not copied: {reason}"
            return
        reads = fastcall.pipeline(self.src, b"".join(hiredis.pack_command((b"JSON.GET", s.key, b"$")) for s in snaps),
                                  len(snaps))
        _raise_redirects(reads)
        writes, shapes = [], []
        for s, reply in zip(snaps, reads):
            if isinstance(reply, Exception):
                # WRONGTYPE: rewritten as another type since it was read; the verification that
                # follows every copy sees the difference and copies it again by its new type.
                result.errors[s.key] = f"JSON document could not be read on the source: {reply}"
                continue
            try:
                doc = document(reply)
            except ValueError as e:
                result.errors[s.key] = f"JSON document could not be read on the source: {e}"
                continue
            cmds: list[tuple] = [(b"MULTI",), (b"DEL", s.key)]
            if doc is not None:
                cmds.append((b"JSON.SET", s.key, b"$", doc))
                if s.expire_at:
                    cmds.append((b"PEXPIREAT", s.key, s.expire_at))
            cmds.append((b"EXEC",))
            writes.append(b"".join(hiredis.pack_command(c) for c in cmds))
            shapes.append((s, len(cmds), doc))
        if not writes:
            return
        replies = fastcall.pipeline(self.dst, b"".join(writes), sum(n for _, n, _ in shapes))
        _raise_redirects(replies)
        at = 0
        for s, n, doc in shapes:
            mine, at = replies[at:at + n], at + n
            error = _first_error(mine)
            if error is not None:
                result.errors[s.key] = f"JSON document not copied: {_explain(error)}"
            elif doc is None:
                result.deleted += 1
            else:
                result.copied += 1
                result.bytes += len(doc)


# Replies that mean "ask another node": raised, so a cluster sync re-plans its round (cluster_sync)
# rather than recording the key as failed.
_REDIRECTS = (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
              redis.exceptions.ClusterDownError)


def _raise_redirects(replies: list) -> None:
    for r in replies:
        for x in (r if isinstance(r, list) else [r]):
            if isinstance(x, _REDIRECTS):
                raise x


def _first_error(replies: list) -> Exception | None:
    for r in replies:
        if isinstance(r, Exception):
            return r
        if isinstance(r, list):
            for x in r:
                if isinstance(x, Exception):
                    return x
    return None


def _explain(error: Exception) -> str:
    text = str(error)
    if "unknown command" in text.lower():
        return f"the target has no JSON.SET command ({JSON_FIX})"
    return text


# --- comparison --------------------------------------------------------------------------------


def parse(reply: Any) -> Any:
    """The document of a ``JSON.GET key $`` reply, parsed (numbers as int or float)."""
    doc = document(reply)
    return None if doc is None else json.loads(doc)


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def _member(path: str, name: str) -> str:
    if name.isidentifier():
        return f"{path}.{name}"
    return f"{path}[{json.dumps(name)}]"


def first_difference(a: Any, b: Any, path: str = "$") -> str | None:
    """Where two parsed JSON documents first differ, as ``JSONPath: what`` (no values); None if
    they are equal canonically (member order and number formatting aside)."""
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        return f"{path}: {ka} on source, {kb} on target"
    if ka == "object":
        for name in sorted(a.keys() | b.keys()):
            if name not in b:
                return f"{_member(path, name)}: missing on target"
            if name not in a:
                return f"{_member(path, name)}: only on target"
            d = first_difference(a[name], b[name], _member(path, name))
            if d:
                return d
        return None
    if ka == "array":
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        if len(a) != len(b):
            return f"{path}: {len(a)} elements on source, {len(b)} on target"
        return None
    if a != b:
        return f"{path}: {ka} values differ"
    return None


def compare_json(src: redis.Redis, dst: redis.Redis, key: bytes, _chunk: int = 0, _chunk_bytes: int = 0) -> str | None:
    """None if the JSON documents at ``key`` are equal canonically, else ``JSON mismatch at PATH``."""
    a = parse(fastcall.call(src, b"JSON.GET", key, b"$"))
    try:
        b = parse(fastcall.call(dst, b"JSON.GET", key, b"$"))
    except redis.exceptions.ResponseError as e:
        return f"JSON document could not be read on the target: {_explain(e)}"
    d = first_difference(a, b)
    return f"JSON mismatch at {d}" if d else None


COMPARERS = {JSON_TYPE: compare_json}
