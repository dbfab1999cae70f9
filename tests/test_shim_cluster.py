"""The shim as a cluster facade: real local clusters on either side (tests/topologies.py)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from migrator.cluster import key_slot
from migrator.phases import Phase

pytestmark = pytest.mark.timeout(300)


def _cluster_client(env, **kw) -> redis.RedisCluster:
    c = redis.RedisCluster(host="127.0.0.1", port=env.port, socket_timeout=10, **kw)
    env.clients.append(c)
    return c


def _value(cluster, key: str):
    """``key``'s value read from the node that owns its slot (no shim in between)."""
    with cluster.cluster_client() as c:
        return c.get(key)


def test_redis_cluster_client_works_through_the_shim_in_every_phase(cluster_factory, make_env):
    """redis-py's RedisCluster sees the shim as a one-node cluster and its SET/GET/MGET/pipeline/transaction in one slot reach both clusters in every two-sided phase."""
    source = cluster_factory("redis-7.0", primaries=3, replicas=1)
    target = cluster_factory("valkey-9.1", primaries=4, replicas=1)
    env = make_env(source, target)
    env.set_phase(Phase.MIRRORING)
    rc = _cluster_client(env)
    assert [(n.host, n.port) for n in rc.get_nodes()] == [("127.0.0.1", env.port)]
    for phase in (Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET):
        if phase is not Phase.MIRRORING:
            env.set_phase(phase)
        p = phase.value
        for i in range(200):
            assert rc.set(f"{p}:k{i}", i)
        assert rc.get(f"{p}:k7") == b"7"
        assert rc.mset({f"{{{p}}}:a": 1, f"{{{p}}}:b": 2})
        assert rc.mget(f"{{{p}}}:a", f"{{{p}}}:b") == [b"1", b"2"]
        pipe = rc.pipeline(transaction=False)
        for i in range(50):
            pipe.incr(f"{p}:ctr{i}")
        assert pipe.execute() == [1] * 50
        tx = rc.pipeline(transaction=True)
        tx.set(f"{{{p}}}:t1", "x").incr(f"{{{p}}}:t2").get(f"{{{p}}}:t1")
        assert tx.execute() in ([True, 1, b"x"], [b"OK", 1, b"x"])  # redis-py's cluster transaction leaves SET raw
        for cl in (source, target):
            with cl.cluster_client() as c:
                assert c.get(f"{p}:k199") == b"199"
                assert c.get(f"{p}:ctr49") == b"1"
                assert c.mget(f"{{{p}}}:t1", f"{{{p}}}:t2") == [b"x", b"1"]
    assert env.stats().topology_changes == {} or sum(env.stats().topology_changes.values()) == 0
