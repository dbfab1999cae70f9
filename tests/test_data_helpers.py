"""Helpers for the sync and check tests (no tests here): every type with TTLs, bulk keys, a mirroring writer."""

from __future__ import annotations

import random
import threading
import time

import redis

from migrator import playbook

FAST = {"shim": {"shadow_timeout": "50ms"}, "check": {"interval": "50ms", "rounds": 2}}


def load(path) -> playbook.Playbook:
    return playbook.load(path)


def populate(c: redis.Redis, prefix: str = "") -> dict[str, str]:
    """One key of each type (some expiring, some with binary data); returns key → type."""
    p = prefix
    c.set(f"{p}str", "hello")
    c.set(f"{p}empty", "")
    c.set(f"{p}bin", bytes(range(256)))
    c.set(f"{p}counter", 41, px=600_000)
    c.hset(f"{p}hash", mapping={"a": "1", "b": "2", "\x00f": "\xff"})
    c.pexpire(f"{p}hash", 300_000)
    c.rpush(f"{p}list", "x", "y", "x", "")
    c.sadd(f"{p}set", "m1", "m2", "m3")
    c.expire(f"{p}set", 1000)
    c.zadd(f"{p}zset", {"a": 1.1, "b": -2.5, "c": float("inf"), "d": 1e-300})
    c.pfadd(f"{p}hll", "u1", "u2", "u3")
    c.xadd(f"{p}stream", {"f": "v1"}, id="1-1")
    c.xadd(f"{p}stream", {"f": "v2"}, id="2-1")
    c.xadd(f"{p}stream", {"f": "v3"}, id="3-1")
    c.xgroup_create(f"{p}stream", "g1", id="0")
    c.xreadgroup("g1", "consumer-a", {f"{p}stream": ">"}, count=2)
    c.xgroup_create(f"{p}stream", "g2", id="$")
    c.xgroup_create(f"{p}empty-stream", "g", id="0", mkstream=True)
    return {f"{p}{k}": t for k, t in [("str", "string"), ("empty", "string"), ("bin", "string"), ("counter", "string"),
                                        ("hash", "hash"), ("list", "list"), ("set", "set"), ("zset", "zset"),
                                        ("hll", "string"), ("stream", "stream"), ("empty-stream", "stream")]}


def bulk(c: redis.Redis, n: int, prefix: str = "k") -> None:
    """``n`` small keys of mixed types, pipelined."""
    p = c.pipeline(transaction=False)
    for i in range(n):
        kind = i % 5
        key = f"{prefix}:{i}"
        if kind == 0:
            p.set(key, f"v{i}")
        elif kind == 1:
            p.hset(key, mapping={"f": i, "g": "x"})
        elif kind == 2:
            p.rpush(key, i, i + 1)
        elif kind == 3:
            p.sadd(key, i, "s")
        else:
            p.zadd(key, {"m": i})
        if i % 7 == 0:
            p.expire(key, 3600)
        if i % 500 == 499:
            p.execute()
    p.execute()


class MirroringWriter(threading.Thread):
    """Applies partial updates to the source and then the target, as the shim mirrors writes.

    The shim bounds how far the target lags: a write not applied there within
    ``shim.shadow_timeout`` marks its key dirty (the repair's business, not the sync's). This
    thread cannot bound its own lag on a loaded machine (the GIL, a descheduled thread), so it
    records the keys whose write took longer than ``lag_bound`` from the source's send to the
    target's reply in ``late``: exactly the keys the shim would have marked dirty.
    """

    def __init__(self, src: redis.Redis, dst: redis.Redis, n_keys: int, prefix: str = "k", seed: int = 7,
                 lag_bound: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.src, self.dst, self.n, self.prefix = src, dst, n_keys, prefix
        self.rng = random.Random(seed)
        self.stop_flag = threading.Event()
        self.ops = 0
        self.lag_bound = lag_bound
        self.late: set[bytes] = set()
        self.late_ops = 0

    def one(self) -> list:
        i = self.rng.randrange(self.n)
        key = f"{self.prefix}:{i}"
        kind = i % 5
        op = self.rng.random()
        if op < 0.05:
            return ["PEXPIRE", key, 500_000 + self.rng.randrange(10_000)]
        if op < 0.08:
            return ["SET", f"new:{self.ops}", "fresh"]
        return {0: ["APPEND", key, "+"], 1: ["HINCRBY", key, "f", 1], 2: ["LPUSH", key, self.ops],
                3: ["SADD", key, f"m{self.ops}"], 4: ["ZINCRBY", key, 1, "m"]}[kind]

    def run(self) -> None:
        while not self.stop_flag.is_set():
            cmd = self.one()
            t0 = time.monotonic()
            self.src.execute_command(*cmd)
            self.dst.execute_command(*cmd)
            if time.monotonic() - t0 > self.lag_bound:
                self.late.add(str(cmd[1]).encode())
                self.late_ops += 1
            self.ops += 1

    def stop(self) -> int:
        self.stop_flag.set()
        self.join(10)
        return self.ops


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
