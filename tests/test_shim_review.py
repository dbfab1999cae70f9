"""Regressions found in review, against real Redis (source) and Valkey (target) servers."""

from __future__ import annotations

import socket
import time

import redis

from migrator.phases import Phase
from migrator.shim import list_dirty
from tests.test_shim_e2e import make_env, one_env, wait_for  # noqa: F401


def raw(env):
    conn = redis.Connection(port=env.port, socket_timeout=5)
    conn.connect()
    return conn


def cmd(conn, *args):
    conn.send_command(*args)
    try:
        return conn.read_response()
    except redis.ResponseError as e:
        return e


def enter(env, phase):
    order = [Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET]
    for p in order[: order.index(phase) + 1]:
        env.set_phase(p)


def dirty(env):
    return [(d.db, d.key, d.reason) for d in list_dirty(env.pb.state_path)]


def test_blmpop_direction_is_read_after_the_keys_even_for_a_key_named_left(one_env):
    """BLMPOP 0 1 left RIGHT pops the right end; the target must lose the same element."""
    env = one_env
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    c.rpush("left", "a", "b", "c")
    assert c.execute_command("BLMPOP", 0, 1, "left", "RIGHT") == [b"left", [b"c"]]
    time.sleep(0.3)
    assert env.source.client().lrange("left", 0, -1) == [b"a", b"b"]
    assert env.target.client().lrange("left", 0, -1) == [b"a", b"b"]
