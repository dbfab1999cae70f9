"""EVALSHA with many arguments, packed in one C call; pipelines of pre-packed commands.

redis-py packs a command argument by argument in Python; for a batch script with thousands of
arguments (keys, payloads, CRCs) that is most of the client's CPU. ``hiredis.pack_command``
packs the whole tuple at once. ``pipeline`` sends many commands packed by the caller and reads
their replies straight from the connection's hiredis reader (redis-py's per-reply path costs
microseconds each). Connections still come from the client's pool.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis
from redis.commands.core import Script

try:
    from redis._parsers.hiredis import NOT_ENOUGH_DATA
except ImportError:  # another redis-py layout: replies are read one by one through redis-py
    NOT_ENOUGH_DATA = None


# Makes a script callable with its keys as arguments (``register(..., undeclared=True)``): ARGV is
# [n, key 1 … key n, the script's own arguments …] and the script sees the KEYS and ARGV it expects.
# A cluster node runs a script without a shebang over keys of several of its slots when none are
# declared (declared keys must share one slot): one call per node instead of one per slot.
_UNDECLARED = """local n, K, A = tonumber(ARGV[1]), {}, {}
for i = 2, n + 1 do K[#K + 1] = ARGV[i] end
for i = n + 2, #ARGV do A[#A + 1] = ARGV[i] end
local KEYS, ARGV = K, A
"""


def register(client: redis.Redis, text: str, undeclared: bool = False) -> Script:
    """``client.register_script(text)``; with ``undeclared`` the keys are passed as arguments (``evalsha``
    does it), for a batch of keys of several slots of one cluster node."""
    if not undeclared:
        return client.register_script(text)
    script = client.register_script(_UNDECLARED + text)
    script.undeclared = True
    return script


def evalsha(client: redis.Redis, script: Script, keys: list, args: list) -> Any:
    """Run ``script`` like ``script(keys=keys, args=args)``, loading it if the server lost it."""
    if getattr(script, "undeclared", False):
        keys, args = [], [len(keys), *keys, *args]
    packed = hiredis.pack_command((b"EVALSHA", script.sha, len(keys), *keys, *args))
    try:
        return _send(client, packed)
    except redis.exceptions.NoScriptError:
        client.script_load(script.script)
        return _send(client, packed)


def _send(client: redis.Redis, packed: bytes) -> Any:
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([packed])
        return conn.read_response()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def call(client: redis.Redis, *args: Any) -> Any:
    """One command, packed by hiredis, with its raw reply (bytes and lists, no redis-py parsing)."""
    return _send(client, hiredis.pack_command(args))


def pipeline(client: redis.Redis, packed: bytes, n: int) -> list:
    """Send ``packed`` (``n`` commands in RESP) and return their ``n`` replies in order; an error
    reply is returned as an exception instance, not raised."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command([packed])
        parser = conn._parser
        reader = getattr(parser, "_reader", None)
        if NOT_ENOUGH_DATA is None or reader is None or not hasattr(parser, "read_from_socket"):
            return [_read_one(conn) for _ in range(n)]
        out = []
        append, gets, more = out.append, reader.gets, parser.read_from_socket
        for _ in range(n):
            reply = gets()
            while reply is NOT_ENOUGH_DATA:
                more()
                reply = gets()
            if isinstance(reply, redis.exceptions.ConnectionError):
                raise reply
            append(reply)
        return out
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def _read_one(conn) -> object:
    try:
        return conn.read_response()
    except redis.exceptions.ResponseError as e:
        return e


class Pipelined:
    """Pre-packed commands sent on one connection without waiting for each reply: at most
    ``depth`` stay unanswered; an error reply is raised. Leaving the block reads the rest.

    For a sequence of writes that must apply in order (the chunks of a big key): the server
    always has the next one queued while this process prepares the one after.
    """

    def __init__(self, client: redis.Redis, depth: int = 2) -> None:
        self.pool = client.connection_pool
        self.depth = depth
        self.pending = 0
        self.conn: Any = None

    def __enter__(self) -> "Pipelined":
        self.conn = self.pool.get_connection()
        return self

    def send(self, packed: bytes) -> None:
        self.conn.send_packed_command([packed])
        self.pending += 1
        while self.pending > self.depth:
            self._read()

    def _read(self) -> None:
        self.pending -= 1
        self.conn.read_response()  # raises the error of an error reply

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            while exc_type is None and self.pending:
                self._read()
        finally:
            if self.pending:  # replies left unread (after an error): the connection cannot be reused
                self.conn.disconnect()
            self.pool.release(self.conn)
