"""The compatibility pre-flight on Redis Cluster deployments, against real local clusters (tests/topologies.py)."""

from __future__ import annotations

import json
import sys

import pytest
import redis

from migrator import compat, playbook, reports, servers
from migrator.cluster import format_ranges, key_slot, parse_nodes
from migrator.compat.canary import CANARY_PREFIX
from migrator.compat.cluster import ClusterView, NodeProbe, project
from migrator.compat.model import FAIL, PASS, UNKNOWN, WARN
from tests.helpers import run_cli
from tests.test_compat import APP_TEST


def load(cluster, n: int, *, size: int = 100, tag: str = "") -> None:
    """``n`` string keys (and a few of every other type) spread over every shard, as an application writes them."""
    rc = cluster.cluster_client()
    try:
        pipe = rc.pipeline()
        for i in range(n):
            pipe.set(f"{tag}k{i}", b"x" * size)
        pipe.execute()
        rc.hset("h", mapping={"a": "1"})
        rc.rpush("l", "x")
        rc.sadd("s", "m")
        rc.zadd("z", {"m": 1.0})
        rc.xadd("x", {"f": "v"})
    finally:
        rc.close()


def canaries_left(*clusters) -> list:
    return [k for c in clusters for n in c.nodes for k in c.node_client(n).keys(CANARY_PREFIX + "*")]


def run(make_playbook, source, target, /, **sections):
    pb = playbook.load(make_playbook(source, target, **sections))
    return pb, compat.run(pb, write_report=False)


def not_passed(result) -> list:
    return [(c.name, c.status, c.evidence) for c in result.checks if c.status != PASS]


def test_redis70_cluster_to_valkey91_cluster_with_more_shards_passes_from_the_cli(cluster_factory, make_playbook):
    """Redis 7.0 3x1 → Valkey 9.1 4x1: every node identified, every cluster check passes, commandstats summed over the primaries, from `migrator compat` and `plan`."""
    source, target = cluster_factory("redis-7.0", primaries=3, replicas=1), cluster_factory("valkey-9.1", primaries=4)
    load(source, 300)
    rc = source.cluster_client()
    # The application's multi-key command, on keys of one slot, on every source primary.
    tags = {}
    for i in range(200):
        tags.setdefault(source.owner(key_slot(f"{{t{i}}}")).port, f"t{i}")
    assert len(tags) == 3
    for tag in tags.values():
        rc.mget(f"{{{tag}}}a", f"{{{tag}}}b")
    rc.close()
    path = make_playbook(source, target)

    out = run_cli("compat", "--output", "json", playbook=path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert data["verdict"] != "fail", [(c["name"], c["evidence"]) for c in data["checks"] if c["status"] == FAIL]
    for name in ("topology", "cluster.nodes", "cluster.slots", "cluster.replicas", "cluster.memory",
                 "cluster.commands", "keyspace", "data.format", "commands.missing", "config", "modules"):
        assert checks[name]["status"] == PASS, (name, checks[name]["evidence"])
    nodes = checks["cluster.nodes"]["data"]
    assert [n["server"] for n in nodes["source"]["nodes"]] == ["redis 7.0.15"] * 6
    assert {n["server"] for n in nodes["target"]["nodes"]} == {"valkey 9.1.2"} and len(nodes["target"]["nodes"]) == 8
    assert {n["rdb_version"] for n in nodes["source"]["nodes"]} == {10}
    # Summed over the three primaries (each ran one MGET), not read from the playbook's node only.
    assert checks["commands.missing"]["data"]["executed"]["mget"] == 3
    assert "mget (3 calls)" in checks["cluster.commands"]["evidence"]
    assert data["keyspace"]["source"]["user_keys"] == 305  # every primary sampled
    assert checks["data.format"]["data"]["copy_method"] == "dump-restore"
    assert len(checks["cluster.memory"]["data"]["shards"]) == 4
    assert canaries_left(source, target) == []
    # The Markdown and HTML reports carry every node and each target shard's memory projection.
    folder = reports.reports_dir(playbook.load(path).state_path)
    md = (folder / f"{data['report_id']}.md").read_text()
    page = (folder / f"{data['report_id']}.html").read_text()
    assert "## Cluster nodes" in md and "## Memory per target shard" in md and md.count("| redis 7.0.15 |") == 6
    assert "<h2>Cluster nodes</h2>" in page and page.count("<td>valkey 9.1.2</td>") == 8

    # A second run does not take the first run's own calls (MEMORY USAGE, DUMP, SCAN...) for the application's.
    again = compat.run(playbook.load(path), write_report=False)
    assert "memory|usage" not in again.check("commands.behaviour").data["differences"]
    left_out = again.check("commands.missing").data["migrator_calls_left_out"]
    assert left_out.get("memory|usage", 0) > 0 and left_out.get("cluster|countkeysinslot", 0) >= 16384
    assert again.check("commands.missing").data["executed"]["mget"] == 3

    plan = run_cli("plan", playbook=path)
    assert plan.returncode == 0, plan.stderr
    assert "compatibility report" in plan.stdout


def test_redis70_cluster_to_valkey81_cluster_with_more_shards_passes(cluster_factory, make_playbook, tmp_path):
    """Redis 7.0 3x1 → Valkey 8.1 4x1 with passwords passes when the playbook's node is down but a seed answers;
    canaries are routed to the slot owners on both sides and removed; the app's tests run on a local scratch Valkey
    seeded from every source primary."""
    source = cluster_factory("redis-7.0", password="src-secret")
    target = cluster_factory("valkey-8.1", primaries=4, password="src-secret")
    load(source, 100)
    down = f"redis://:src-secret@127.0.0.1:{servers.free_port()}/0"  # nothing listens there
    script = tmp_path / "app_test.py"
    script.write_text(APP_TEST)
    _pb, result = run(make_playbook, source, target, source={"url": down, "seeds": source.seeds[:2]},
                      steps={"compatibility": {"test_command": [sys.executable, str(script)], "scratch": "local",
                                               "scratch_seed": 30}})
    assert result.verdict != "fail", not_passed(result)
    assert len(result.check("cluster.nodes").data["source"]["nodes"]) == 6
    # The scratch Valkey was seeded with keys read from whichever source primary holds each one.
    tests = result.check("tests")
    assert tests.status == PASS and tests.data["seed"]["copied"] == 30, tests.evidence
    assert "dbsize 31" in tests.data["run"]["tail"]  # the 30 seeded keys and the test's own
    assert all(result.check(n).status == PASS for n in (
        "cluster.nodes", "cluster.slots", "cluster.replicas", "cluster.memory", "data.format")), not_passed(result)
    fmt = result.check("data.format")
    assert fmt.data["rdb_versions"] == {"source": 10, "target": 11}
    assert {t["type"] for t in fmt.data["forward"]["transfers"]} == {"string", "hash", "list", "set", "zset", "stream"}
    assert canaries_left(source, target) == []


def test_cluster_faults_are_named(cluster_factory, make_playbook):
    """An uncovered target slot and a slot left MIGRATING on a source primary fail by number, shards without a
    replica warn by address, a small maxmemory on one target shard fails naming it, the multi-key command
    and the CROSSSLOT errors the application caused are named, and a function library missing on some target
    primaries fails naming them."""
    source = cluster_factory("redis-7.0", primaries=3, replicas=0)
    target = cluster_factory("valkey-9.1", primaries=4, replicas=1)
    load(source, 6000, size=1000)
    # The application: an MSET within one hash tag, and a cross-slot MGET the source refused.
    rc = source.cluster_client()
    rc.mset({"{u1}a": 1, "{u1}b": 2})
    rc.close()
    seed = source.node_client(source.nodes[0])
    a, b = next((f"a{i}", f"b{i}") for i in range(100) if
                source.owner(key_slot(f"a{i}")) is source.nodes[0] is source.owner(key_slot(f"b{i}"))
                and key_slot(f"a{i}") != key_slot(f"b{i}"))
    with pytest.raises(redis.exceptions.ClusterCrossSlotError):
        seed.mget(a, b)
    # A reshard left half-done on a primary that is not the playbook's node.
    third = source.primaries()[2]
    moving = next(s for lo, hi in source.shards()[2]["slots"] for s in range(lo, hi + 1))
    source.node_client(third).execute_command("CLUSTER", "SETSLOT", moving, "MIGRATING",
                                              source.node_id(source.primaries()[0]))
    # Slot 100 unassigned on every target node.
    for n in target.nodes:
        target.node_client(n).execute_command("CLUSTER", "DELSLOTS", 100)
    # A function library on every source primary, loaded on only two of the four target primaries.
    lib = "#!lua name=applib\nredis.register_function('one', function() return 1 end)"
    for p in source.primaries():
        source.node_client(p).function_load(lib)
    for p in target.primaries()[:2]:
        target.node_client(p).function_load(lib)
    # One target shard with room for less than its share of the source's data.
    small = target.primaries()[1]
    used = int(target.node_client(small).info("memory")["used_memory"])
    target.node_client(small).config_set("maxmemory", used + 1024 * 1024)

    _pb, result = run(make_playbook, source, target)
    assert result.verdict == "fail"
    slots = result.check("cluster.slots")
    assert slots.status == FAIL
    assert "the target has 1 slot no live primary owns: 100" in slots.evidence
    assert f"the source has slots being resharded: {moving} (127.0.0.1:{third.port} → " in slots.evidence
    replicas = result.check("cluster.replicas")
    assert replicas.status == WARN
    assert all(f"127.0.0.1:{p.port} (slots " in replicas.evidence for p in source.primaries())
    memory = result.check("cluster.memory")
    assert memory.status == FAIL and f"over maxmemory: 127.0.0.1:{small.port} (slots " in memory.evidence
    shares = {s["address"]: s for s in memory.data["shards"]}
    # ~6000 keys of ~1 KiB over 4 target shards: about 1.5 MiB each, more than the 1 MiB of room left.
    assert all(1.2e6 < s["share"] < 2.0e6 for s in shares.values()), shares
    assert [a for a, s in shares.items() if s["status"] == FAIL] == [f"127.0.0.1:{small.port}"]
    cmds = result.check("cluster.commands")
    assert cmds.status == WARN and "mset (1 call)" in cmds.evidence
    assert "CROSSSLOT 1 time" in cmds.evidence and cmds.data["crossslot_errors"] == 1
    functions = result.check("functions")
    lacking = [f"127.0.0.1:{p.port}" for p in target.primaries()[2:]]
    assert functions.status == FAIL and f"applib is missing or different on {', '.join(lacking)}" in functions.evidence
    # A write could meet the unowned slot: the writing checks are skipped, saying why.
    fmt = result.check("data.format")
    assert fmt.status == UNKNOWN and "cluster slot coverage check failed" in fmt.evidence


def test_standalone_source_to_cluster_target_names_cross_slot_commands(server_factory, cluster_factory, make_playbook):
    """A standalone Redis → a Valkey cluster is allowed with a warning: the application's multi-key and
    not-cluster-safe commands are named, keys outside database 0 fail (cluster-databases is 1), canaries go to the
    owning target node."""
    source = server_factory("redis-7.0")
    target = cluster_factory("valkey-9.1", primaries=3, replicas=0)
    c = source.client()
    for i in range(50):
        c.set(f"k{i}", "v")
    c.mget("k1", "k2")
    c.keys("k*")
    source.client(db=1).set("other", "1")
    _pb, result = run(make_playbook, source, target, steps={"compatibility": {"test_command": "true"}})
    tests = result.check("tests")
    assert tests.status == UNKNOWN and "the target is a cluster" in tests.evidence and "scratch" in tests.remediation
    topology = result.check("topology")
    assert topology.status == WARN and "cluster-aware client" in topology.evidence
    cmds = result.check("cluster.commands")
    assert cmds.status == WARN
    assert "mget (1 call)" in cmds.evidence and "fails with CROSSSLOT" in cmds.evidence
    assert "keys (1 call): sees only the keys of the node it reaches" in cmds.evidence
    config = result.check("config")
    assert config.status == FAIL
    assert "the source has keys in db 1, the target has only 1 databases (in cluster mode: cluster-databases" \
        in config.evidence and "set cluster-databases 16 on every target node" in config.remediation
    assert result.check("cluster.replicas").status == WARN
    memory = result.check("cluster.memory")
    assert memory.status == PASS and len(memory.data["shards"]) == 3
    assert result.check("data.format").status == PASS, result.check("data.format").evidence
    assert [k for n in target.nodes for k in target.node_client(n).keys(CANARY_PREFIX + "*")] == []


def test_cluster_source_to_standalone_target_warns_about_the_client(server_factory, cluster_factory, make_playbook):
    """A Redis cluster → one Valkey server warns that the application must switch to a standalone client, and
    the target's maxmemory is compared with the source's memory summed over its primaries."""
    source = cluster_factory("redis-7.0", primaries=3, replicas=0)
    target = server_factory("valkey-9.1")
    load(source, 30)
    _pb, result = run(make_playbook, source, target)
    topology = result.check("topology")
    assert topology.status == WARN and "standalone client" in topology.evidence
    assert result.check("data.format").status == PASS, result.check("data.format").evidence
    assert result.check("keyspace").data["source"]["user_keys"] == 35
    assert "summed over the source primaries" in result.check("cluster.memory").evidence


def _view(text: str, memory: dict[str, dict]) -> ClusterView:
    t = parse_nodes(text)
    return ClusterView("target", None, t, [NodeProbe(n, None, memory=memory.get(n.id, {})) for n in t.nodes])


def test_memory_projection_maps_source_slots_onto_the_target_layout():
    """Each target shard's share is the bytes of the source slots it owns plus its used memory, failing above maxmemory and warning under 25% headroom."""
    view = _view("a 127.0.0.1:1@2 master - 0 0 1 connected 0-8191\n"
                 "b 127.0.0.1:3@4 master - 0 0 2 connected 8192-12287\n"
                 "c 127.0.0.1:5@6 master - 0 0 3 connected 12288-16383\n",
                 {"a": {"used_memory": 100, "maxmemory": 0}, "b": {"used_memory": 100, "maxmemory": 1000},
                  "c": {"used_memory": 100, "maxmemory": 600}})
    per_slot = {0: 500.0, 9000: 950.0, 13000: 420.0}
    got = {p.address: (p.share, p.projected, p.status) for p in project(per_slot, view)}
    assert got == {"127.0.0.1:1": (500, 600, PASS), "127.0.0.1:3": (950, 1050, FAIL),
                   "127.0.0.1:5": (420, 520, WARN)}
    assert format_ranges(view.topology.primaries()[1].slots) == "8192-12287"


def test_cluster_node_with_no_slots_fails_coverage_and_skips_writes(server_factory, make_playbook):
    """A cluster-enabled node that owns no slot is identified as a cluster, fails slot coverage naming 0-16383, and the checks that write are skipped."""
    source = server_factory("redis-7.0", config={"cluster-enabled": "yes"})
    target = server_factory("valkey-9.1")
    _pb, result = run(make_playbook, source, target)
    assert result.check("topology").status == WARN
    slots = result.check("cluster.slots")
    assert slots.status == FAIL and "16384 slots no live primary owns: 0-16383" in slots.evidence
    assert result.check("data.format").status == UNKNOWN and "skipped" in result.check("data.format").evidence


def test_nodes_check_names_mixed_versions_and_a_primary_that_cannot_be_read():
    """Nodes of one side on different versions warn naming each node; a primary that does not answer fails naming it."""
    from types import SimpleNamespace

    from migrator.compat.cluster import nodes_check
    from migrator.compat.identify import Identity

    t = parse_nodes("a 10.0.0.1:7000@17000 master - 0 0 1 connected 0-8191\n"
                    "b 10.0.0.2:7000@17000 master - 0 0 2 connected 8192-16383\n"
                    "c 10.0.0.3:7000@17000 slave a 0 0 1 connected\n")
    ident = {v: Identity("redis", v, "cluster", "master", v) for v in ("7.0.15", "7.2.4")}
    nodes = [NodeProbe(t.nodes[0], None, ident["7.0.15"], modules=[]),
             NodeProbe(t.nodes[1], None, error="connection refused"),
             NodeProbe(t.nodes[2], None, ident["7.2.4"], modules=[])]
    probe = SimpleNamespace(clusters={"source": ClusterView("source", None, t, nodes)}, facts={})
    check = nodes_check(probe)
    assert check.status == FAIL
    assert "source 10.0.0.2:7000 (primary) could not be read: connection refused" in check.evidence
    assert "the source's nodes run different versions: redis 7.0.15 on 10.0.0.1:7000; redis 7.2.4 on 10.0.0.3:7000" \
        in check.evidence


def test_no_cluster_node_or_seed_answering_exits_3_naming_them(make_playbook):
    """When neither the playbook's node nor any seed answers, migrator compat exits 3 with one line naming the seeds tried."""
    dead = [servers.free_port() for _ in range(4)]
    path = make_playbook(f"redis://127.0.0.1:{dead[0]}/0", f"redis://127.0.0.1:{dead[3]}/0",
                         source={"url": f"redis://127.0.0.1:{dead[0]}/0",
                                 "seeds": [f"127.0.0.1:{dead[1]}", f"127.0.0.1:{dead[2]}"]})
    out = run_cli("compat", playbook=path)
    assert out.returncode == 3 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith(f"FAILED: source redis://127.0.0.1:{dead[0]}/0: cannot connect")
    assert f"no seed answered either (127.0.0.1:{dead[1]}, 127.0.0.1:{dead[2]})" in out.stderr


def test_topology_check_allows_cluster_pairs_and_still_refuses_a_replica_target():
    """Cluster↔cluster passes (even from a replica seed), standalone↔cluster warns, a read-only standalone target of a cluster fails."""
    from migrator.compat.identify import Identity, topology_check

    def ident(mode: str, role: str = "master") -> Identity:
        return Identity("valkey", "9.1.2", mode, role, "7.2.4")

    assert topology_check(ident("cluster"), ident("cluster", "slave")).status == PASS
    assert topology_check(ident("standalone"), ident("cluster")).status == WARN
    assert topology_check(ident("cluster"), ident("standalone")).status == WARN
    replica = topology_check(ident("cluster"), ident("standalone", "slave"))
    assert replica.status == FAIL and "replica (read-only)" in replica.evidence
    assert topology_check(ident("sentinel"), ident("cluster")).status == FAIL
