"""The lab application's test suite: the commands its workload sends, against the server in REDIS_URL.

The lab playbook's compatibility step runs it against the (still empty) Valkey target, as
`steps.compatibility.test_command`; it cleans up its keys.
"""

import os
import sys

import redis

r = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
prefix = "lab-app-test:"
failed = []


def check(name, got, want):
    if got != want:
        failed.append(f"{name}: got {got!r}, expected {want!r}")


try:
    check("INCR", [r.incr(prefix + "n"), r.incr(prefix + "n")], [1, 2])
    r.rpush(prefix + "l", "a", "b")
    check("RPUSH/LRANGE", r.lrange(prefix + "l", 0, -1), ["a", "b"])
    r.hset(prefix + "h", "f", "1")
    check("HSET/HGETALL", r.hgetall(prefix + "h"), {"f": "1"})
    r.set(prefix + "s", "v", ex=3600)
    r.expire(prefix + "s", 7200)
    check("SET EX/EXPIRE/TTL", 3600 < r.ttl(prefix + "s") <= 7200, True)
    r.sadd(prefix + "set", "m1", "m2")
    popped = r.spop(prefix + "set")
    check("SADD/SPOP", r.smembers(prefix + "set") | {popped}, {"m1", "m2"})
    pipe = r.pipeline(transaction=True)
    pipe.incr(prefix + "tx")
    pipe.rpush(prefix + "txl", "t1")
    check("MULTI/EXEC", pipe.execute(), [1, 1])
finally:
    r.delete(*(prefix + k for k in ("n", "l", "h", "s", "set", "tx", "txl")))

server = r.info("server")
name = f"{server.get('server_name', 'redis')} {server.get('valkey_version') or server.get('redis_version')}"
for line in failed:
    print(f"FAILED {line}")
print(f"lab app test suite: {6 - len(failed)} of 6 checks passed against {name}")
sys.exit(1 if failed else 0)
