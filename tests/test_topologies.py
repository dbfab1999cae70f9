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


def test_cluster_module_reads_the_topology_and_notices_a_migration(cluster_factory, tmp_path):
    """migrator.cluster discovers every node from one seed, maps all slots and names the slots a reshard moved."""
    from migrator import cluster
    from migrator.playbook import Endpoint

    c = cluster_factory("redis-7.0", primaries=3, replicas=1)
    ep = Endpoint(url=c.url, seeds=c.seeds[1:3])
    before = cluster.discover(ep)
    assert len(before.primaries()) == 3 and not before.uncovered()
    assert all(len(before.replicas_of(p)) == 1 for p in before.primaries())
    slot = cluster.key_slot("k1")
    owner = before.owner(slot)
    assert (owner.host, owner.port) == (c.owner(slot).host, c.owner(slot).port)
    dest = next(p for p in c.primaries() if p is not c.owner(slot))
    c.migrate_slot(slot, dest)
    c.wait_ok()
    after = cluster.discover(ep)
    assert after.signature() != before.signature()
    assert before.moved_slots(after) == [(slot, slot)]
    rc = cluster.cluster_client(ep)
    try:
        rc.set("k1", "v")
        assert rc.get("k1") == b"v"
    finally:
        rc.close()


def test_parse_nodes_reads_migrating_and_importing_markers():
    """A slot in flight shows in both nodes' views, and a node without its own IP takes the one connected to."""
    from migrator.cluster import parse_nodes

    text = ("a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-100 [101->-b2]\n"
            "b2 127.0.0.1:7001@17001 master - 0 0 2 connected 101-16383 [101-<-a1]\n"
            "c3 127.0.0.1:7002@17002 slave a1 0 0 1 connected\n")
    t = parse_nodes(text)
    assert t.migrating == {101: ("a1", "b2")} and t.importing == {101: ("a1", "b2")}
    assert t.owner(101).id == "b2" and t.replicas_of("a1")[0].port == 7002 and not t.uncovered()
    fresh = parse_nodes("z9 :0@0 myself,master - 0 0 0 connected\n", connected_to=("10.0.0.1", 6379))
    assert fresh.nodes[0].address == "10.0.0.1:6379" and fresh.uncovered() == [(0, 16383)]


def test_make_playbook_takes_topologies(sentinel_factory, cluster_factory, make_playbook):
    """A SentinelGroup and a LocalCluster give make_playbook their own endpoint mappings, and they load."""
    from migrator.playbook import load

    g = sentinel_factory("redis-7.0", replicas=1, sentinels=3)
    c = cluster_factory("valkey-9.1", primaries=3, replicas=0)
    pb = load(make_playbook(g, c))
    assert pb.source.kind == "sentinel" and pb.source.sentinel.addresses == g.addresses
    assert pb.source.display == f"sentinel://{','.join(g.addresses)}/mymaster/0"
    assert pb.target.url == c.url and pb.target.seeds == c.seeds[1:3]
