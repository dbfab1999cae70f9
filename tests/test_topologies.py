"""The test topologies themselves (tests/topologies.py): real sentinels and real clusters."""

from __future__ import annotations

from redis.crc import key_slot


def test_sentinel_group_fails_over_and_keeps_data(sentinel_factory):
    g = sentinel_factory("redis-7.0")
    before = g.primary_address()
    g.client().set("k", "v")
    g.wait_ready()
    after = g.failover()
    assert after != before
    assert g.client().get("k") == b"v"


def test_cluster_covers_every_slot_and_follows_a_migration_and_a_failover(cluster_factory):
    c = cluster_factory("valkey-9.1", primaries=3, replicas=1)
    shards = c.shards()
    assert len(shards) == 3 and all(len(s["replicas"]) == 1 for s in shards)
    assert sum(hi - lo + 1 for s in shards for lo, hi in s["slots"]) == 16384
    rc = c.cluster_client()
    for i in range(100):
        rc.set(f"k{i}", i)
    slot = key_slot(b"k1")
    dest = next(p for p in c.primaries() if p is not c.owner(slot))
    c.migrate_slot(slot, dest)
    c.wait_ok()
    assert c.owner(slot) is dest
    promoted = c.failover(c.primaries()[0])
    c.wait_ok()
    assert promoted in c.primaries()
    rc2 = c.cluster_client()
    assert all(rc2.get(f"k{i}") == str(i).encode() for i in range(100))
    rc.close()
    rc2.close()
