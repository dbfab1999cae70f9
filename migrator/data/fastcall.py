"""EVALSHA with many arguments, packed in one C call.

redis-py packs a command argument by argument in Python; for a batch script with thousands of
arguments (keys, payloads, CRCs) that is most of the client's CPU. ``hiredis.pack_command``
packs the whole tuple at once. Connections still come from the client's pool.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis
from redis.commands.core import Script


def evalsha(client: redis.Redis, script: Script, keys: list, args: list) -> Any:
    """Run ``script`` like ``script(keys=keys, args=args)``, loading it if the server lost it."""
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
