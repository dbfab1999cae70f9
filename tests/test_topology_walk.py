"""The phase walk on Sentinel and cluster deployments: the mirror strategy they force, the sides
gates read over every cluster primary, topology changes recorded as evidence, and the walk from
the CLI between real clusters."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import redis

from migrator import command, playbook, replication, sides, topology_watch
from migrator.cluster import format_ranges, key_slot, parse_nodes
from migrator.data import check, sync
from migrator.state import StateStore
from tests.conftest import write_playbook
from tests.helpers import AckingShim, run_cli, wait_for

A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)


def nodes_text(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def line(nid: str, port: int, role: str, primary: str = "-", slots: str = "") -> str:
    flags = "master" if role == "primary" else "slave"
    return f"{nid} 127.0.0.1:{port}@{port + 10000} {flags} {primary} 0 0 1 connected {slots}".strip()


BEFORE = nodes_text(line(A, 7001, "primary", slots="0-8191"), line(B, 7002, "primary", slots="8192-16383"),
                    line(C, 7003, "replica", A), line(D, 7004, "replica", B))


def test_diff_names_a_reshard_with_its_slots_and_both_owners():
    """A slot range that moved between two live primaries is a reshard naming the slots, the old and the new owner."""
    after = nodes_text(line(A, 7001, "primary", slots="0-99 200-8191"), line(B, 7002, "primary", slots="100-199 8192-16383"),
                       line(C, 7003, "replica", A), line(D, 7004, "replica", B))
    changes = topology_watch.diff("target", topology_watch.view(parse_nodes(BEFORE)), topology_watch.view(parse_nodes(after)))
    assert [(c.kind, c.slots) for c in changes] == [("reshard", ((100, 199),))]
    assert changes[0].text == "target: slots 100-199 moved from aaaaaaaa at 127.0.0.1:7001 to bbbbbbbb at 127.0.0.1:7002"
    assert not changes[0].may_lose_writes


def test_diff_names_a_failover_of_a_shard_and_a_shard_without_primary():
    """A replica taking over its primary's slots is a failover (old -> new address); slots with no live primary are lost."""
    failed_over = nodes_text(line(C, 7003, "primary", slots="0-8191"), line(B, 7002, "primary", slots="8192-16383"),
                             line(A, 7001, "replica", C), line(D, 7004, "replica", B))
    v0, v1 = topology_watch.view(parse_nodes(BEFORE)), topology_watch.view(parse_nodes(failed_over))
    [c] = topology_watch.diff("source", v0, v1)
    assert (c.kind, c.slots, c.may_lose_writes) == ("failover", ((0, 8191),), True)
    assert "failover of shard 0-8191: 127.0.0.1:7001 -> 127.0.0.1:7003" in c.text
    down = nodes_text(line(A, 7001, "primary", slots="0-8191").replace("master", "master,fail"),
                      line(B, 7002, "primary", slots="8192-16383"), line(C, 7003, "replica", A))
    v2 = topology_watch.view(parse_nodes(down))
    assert v2["uncovered"] == [[0, 8191]]
    [lost] = topology_watch.diff("source", v0, v2)
    assert lost.kind == "lost" and "slots 0-8191 have no live primary" in lost.text
    assert topology_watch.diff("source", v0, topology_watch.view(parse_nodes(BEFORE))) == []


def test_diff_names_a_slot_in_flight_and_the_union_of_changed_slots():
    """A slot marked MIGRATING is named as a reshard in flight; changed_slots unions every change's ranges."""
    moving = BEFORE.replace("0-8191", f"0-8191 [5->-{B}]").replace("8192-16383", f"8192-16383 [5-<-{A}]")
    changes = topology_watch.diff("target", topology_watch.view(parse_nodes(BEFORE)), topology_watch.view(parse_nodes(moving)))
    assert [(c.kind, c.slots) for c in changes] == [("migrating", ((5, 5),))]
    assert "aaaaaaaa -> bbbbbbbb" in changes[0].text
    both = changes + topology_watch.diff("target", topology_watch.view(parse_nodes(BEFORE)), topology_watch.view(parse_nodes(
        BEFORE.replace("0-8191", "0-9").replace("8192-16383", "10-16383"))))
    assert topology_watch.changed_slots(both) == [(5, 5), (10, 8191)]
    assert topology_watch.changed_slots([c.to_json() for c in both]) == [(5, 5), (10, 8191)]


def cluster_side(role: str, text: str, run_ids: dict[str, str], keys: int = 10, at: str = "2026-01-01T00:00:00.000Z"):
    """A probed cluster side as ``migrator.sides`` records it, from CLUSTER NODES text."""
    topo = parse_nodes(text)
    nodes = {n.id: {"address": n.address, "run_id": run_ids[n.id], "started_at": "2025-12-01T00:00:00.000Z",
                    "uptime_s": 100, "keys": keys, "slots": format_ranges(n.slots)} for n in topo.primaries()}
    total = keys * len(nodes)
    return sides.Side(role, "redis://x", True, keys=total, dbs={"0": total}, probed_at=at,
                      cluster={"view": topology_watch.view(topo), "nodes": nodes})


FAILED_OVER = nodes_text(line(C, 7003, "primary", slots="0-8191"), line(B, 7002, "primary", slots="8192-16383"),
                         line(A, 7001, "replica", C), line(D, 7004, "replica", B))


def test_restarts_are_judged_per_cluster_node_and_a_promoted_replica_is_not_one():
    """Same node id with another run_id is a restart naming the node; a replica promoted by a failover is not a restart."""
    ids = {A: "r-a-1", B: "r-b-1", C: "r-c-1"}
    then = cluster_side("target", BEFORE, ids)
    again = cluster_side("target", BEFORE, {**ids, B: "r-b-2"}, keys=0)
    [why] = sides.restarted_since({"target": again}, then.probed_at, {"target": then})
    assert why.startswith("the target node bbbbbbbb at 127.0.0.1:7002 (slots 8192-16383) restarted (run_id r-b-1 → r-b-2")
    assert "0 keys now, 10 then" in why
    promoted = cluster_side("target", FAILED_OVER, ids)
    assert sides.restarted_since({"target": promoted}, then.probed_at, {"target": then}) == []
    assert [c.kind for c in sides.topology_changes({"target": promoted}, {"target": then})] == ["failover"]


def test_a_check_is_voided_by_a_change_after_it_began_even_when_undone_but_not_by_one_it_already_saw(tmp_path):
    """consistency's topology rule: a failover and failback journaled after the check began void it; a change journaled late, on the layout the check already ran on, does not."""
    from migrator.data.gates import topology_since
    from migrator.gates import GateContext
    from migrator.state import State, now

    pb = playbook.load(write_playbook(tmp_path / "m.yaml", "redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"))
    store = StateStore(pb.state_path, pb.name)
    store.save(State(pb.name))
    ids = {A: "ra", B: "rb", C: "rc"}
    before, after = cluster_side("source", BEFORE, ids), cluster_side("source", FAILED_OVER, ids)
    report = {"sides": {"source": before.to_json()}, "started_at": "2026-01-01T00:00:10.000Z"}

    def ctx_now(side):
        return GateContext(pb, store, store.load(), now(), _sides={"source": side})

    assert topology_since(ctx_now(before), report, report["started_at"]) == ([], [])
    for t, old, new in (("2026-01-01T00:00:20.000Z", before, after), ("2026-01-01T00:00:30.000Z", after, before)):
        store.journal(topology_watch.EVENT, seen_at=t, views={"source": new.cluster["view"]},
                      changes=[c.to_json() for c in sides.topology_changes({"source": new}, {"source": old})])
    changes, slots = topology_since(ctx_now(before), report, report["started_at"])
    assert [c["kind"] for c in changes] == ["failover"] and slots == [(0, 8191)]
    # A check that began after the failover (recording it) is not voided by the journal's late record of it.
    later = {"sides": {"source": after.to_json()}, "started_at": "2026-01-01T00:00:15.000Z"}
    store2 = StateStore(tmp_path / "s2", pb.name)
    store2.save(State(pb.name))
    store2.journal(topology_watch.EVENT, seen_at="2026-01-01T00:00:20.000Z", views={"source": after.cluster["view"]},
                   changes=[c.to_json() for c in sides.topology_changes({"source": after}, {"source": before})])
    ctx2 = GateContext(pb, store2, store2.load(), now(), _sides={"source": after})
    assert topology_since(ctx2, later, later["started_at"]) == ([], [])


def test_replication_is_refused_for_sentinel_and_cluster_sides_with_the_reason(tmp_path):
    """auto decides dual-write for a Sentinel or cluster side, saying why; an explicit replication is refused (not ok)."""
    pb_path = write_playbook(tmp_path / "m.yaml", "redis://127.0.0.1:1/0", "", mirror={"strategy": "auto"},
                             target={"sentinel": {"addresses": ["127.0.0.1:2", "127.0.0.1:3"], "master_name": "m"}})
    pb = playbook.load(pb_path)
    why = replication.topology_why(pb, None, None)
    assert why == replication.TOPOLOGY_WHY[("target", "sentinel")]
    allowed = replication.SyncAllowed(True, "PSYNC allowed")
    auto = replication.decide("auto", allowed, True, "loads RDB", topology=why)
    assert (auto.strategy, auto.ok) == ("dual-write", True) and auto.why == f"auto chose dual-write: {why}"
    forced = replication.decide("replication", allowed, True, "loads RDB", topology=why)
    assert not forced.ok and "cannot work: the target is Sentinel-managed" in forced.why
    seeded = write_playbook(tmp_path / "c.yaml", "", "redis://127.0.0.1:4/0", mirror={"strategy": "auto"},
                            source={"url": "redis://127.0.0.1:5/0", "seeds": ["127.0.0.1:6"]})
    # Without a server to ask, the playbook's seeds say "cluster".
    assert replication.topology_why(playbook.load(seeded), None, None) == replication.TOPOLOGY_WHY[("source", "cluster")]


def test_a_cluster_side_is_read_over_every_primary_and_decides_dual_write(cluster_factory, server_factory, tmp_path):
    """Keys are summed over every primary (the DBSIZEs), each node is named by id and run_id, and a cluster on either side makes auto dual-write and replication fail, in the gate and in the pre-flight."""
    from migrator.compat import run as compat_run
    from migrator.connect import connect

    cl = cluster_factory("redis-7.0", primaries=3, replicas=0)
    other = server_factory("valkey-9.1")
    rc = cl.cluster_client()
    for i in range(300):
        rc.set(f"k{i}", i)
    rc.close()
    path = write_playbook(tmp_path / "m.yaml", "", other.url, source=cl.endpoint(), mirror={"strategy": "auto"})
    pb = playbook.load(path)
    side = sides.probe(pb.source, "source")
    per_node = {}
    for n in cl.nodes:
        with contextlib.closing(cl.node_client(n)) as c:
            per_node[cl.node_id(n)] = (c.dbsize(), c.info("server")["run_id"])
    assert side.reachable and side.keys == 300 == sum(k for k, _ in per_node.values())
    assert {nid: (n["keys"], n["run_id"]) for nid, n in side.cluster["nodes"].items()} == per_node
    assert side.describe() == "source: cluster of 3 primaries (0 replicas), all 16384 slots, 300 keys"

    src, tgt = connect(pb.source, "source"), connect(pb.target, "target")
    try:
        d = replication.fresh_decision(pb, src, tgt)
        assert (d.strategy, d.ok) == ("dual-write", True)
        assert "the source is a Redis Cluster: a replica of one node would get one shard" in d.why
        swapped = playbook.load(write_playbook(tmp_path / "s.yaml", other.url, "", target=cl.endpoint(),
                                               mirror={"strategy": "replication"}))
        d2 = replication.fresh_decision(swapped, tgt, src)
        assert not d2.ok and "the target is a Redis Cluster" in d2.why
    finally:
        src.close()
        tgt.close()

    # A reshard in flight between two nodes other than the URL's: only their own views mark the slot.
    a, b = cl.owner(6000), cl.owner(12000)
    assert cl.nodes[0] not in (a, b)
    with contextlib.closing(cl.node_client(a)) as ac, contextlib.closing(cl.node_client(b)) as bc:
        bc.execute_command("CLUSTER", "SETSLOT", 6000, "IMPORTING", cl.node_id(a))
        ac.execute_command("CLUSTER", "SETSLOT", 6000, "MIGRATING", cl.node_id(b))
    moving = sides.probe(pb.source, "source")
    assert moving.cluster["view"]["migrating"] == [[6000, cl.node_id(a), cl.node_id(b)]]
    [change] = sides.topology_changes({"source": moving}, {"source": side})
    assert change.kind == "migrating" and change.slots == ((6000, 6000),)

    refused = playbook.load(write_playbook(tmp_path / "r.yaml", "", other.url, source=cl.endpoint(),
                                           mirror={"strategy": "replication"}))
    result = compat_run(refused)
    check = next(c for c in result.checks if c.name == "mirror.strategy")
    assert check.status == "fail" and "the source is a Redis Cluster" in check.evidence
    assert "PSYNC" not in check.remediation  # the fix for a topology is dual-write, not permissions


def test_a_sentinel_source_enters_mirroring_by_dual_write_and_refuses_replication(sentinel_factory, server_factory,
                                                                                     tmp_path):
    """Entering mirroring from a Sentinel-managed source: auto journals dual-write with the Sentinel reason; an explicit replication is refused by the mirror_strategy gate with it."""
    g = sentinel_factory("redis-7.0", replicas=1, sentinels=3)
    tgt = server_factory("valkey-9.1")
    for sub in ("r", "a"):
        (tmp_path / sub).mkdir()
    forced = write_playbook(tmp_path / "r" / "m.yaml", "", tgt.url, source=g.endpoint(), mirror={"strategy": "replication"})
    auto = write_playbook(tmp_path / "a" / "m.yaml", "", tgt.url, source=g.endpoint(), mirror={"strategy": "auto"})
    why = "the source is Sentinel-managed: a failover would leave the target replicating a demoted primary"
    for path in (forced, auto):
        command.advance(playbook.load(path), overrides={"compatibility": "the Sentinel pre-flight is tested apart"})
    pb = playbook.load(forced)
    with AckingShim(pb.state_path, pb.name):
        out = run_cli("advance", "--yes", "--output", "json", playbook=forced)
        assert out.returncode == 1, out.stdout + out.stderr
        gate = next(x for x in json.loads(out.stdout)["gates"] if x["gate"] == "mirror_strategy")
        assert not gate["passed"] and f"cannot work: {why}" in gate["evidence"]
    pb = playbook.load(auto)
    with AckingShim(pb.state_path, pb.name):
        cli(auto, "advance", "--yes")
    chosen = [e for e in StateStore(pb.state_path, pb.name).read_journal() if e["event"] == "mirror-strategy"]
    assert [(e["strategy"], e["topology"]) for e in chosen] == [("dual-write", why)]
    assert StateStore(pb.state_path, pb.name).load().mirror.strategy == "dual-write"


def restart_node_empty(node) -> None:
    """kill -9 one cluster node and start it again at once on the same port and folder: it keeps
    its node id (nodes.conf) and comes back with no data (no persistence), still owning its slots."""
    from migrator import servers

    node.proc.kill()
    node.proc.wait(10)
    for stream in (node.proc.stdout, node.proc.stderr):
        if stream:
            stream.close()
    fresh = servers.start(node.binary, port=node.port, password=node.password, dir=node.dir, config={
        "cluster-enabled": "yes", "cluster-node-timeout": "2000", "repl-diskless-sync-delay": "0",
        "cluster-require-full-coverage": "yes", "cluster-config-file": "nodes.conf"})
    node.proc = fresh.proc


def cli(path: Path, *args: str, ok: bool = True) -> str:
    out = run_cli(*args, playbook=path, timeout=120)
    if ok:
        assert out.returncode == 0, f"migrator {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def test_a_target_node_restarted_empty_is_named_and_voids_the_evidence(server_factory, cluster_factory, tmp_path):
    """A target cluster primary that restarts empty (same node id, new run_id) voids the sync and check by name and fails key_counts."""
    src = server_factory("redis-7.0")
    tgt = cluster_factory("valkey-8.1", primaries=3, replicas=0)
    path = write_playbook(tmp_path / "m.yaml", src.url, "", target=tgt.endpoint())
    pb = playbook.load(path)
    command.advance(pb, overrides={"compatibility": "the cluster pre-flight is tested apart"})
    with AckingShim(pb.state_path, pb.name):
        command.advance(pb)  # → mirroring
        assert sync.run(pb).complete
        assert check.run(pb, full=True).mismatches == []  # both empty: the evidence is taken on these run_ids
        sc, rc = src.client(), tgt.cluster_client()
        for i in range(600):  # what the mirror would have written to both sides
            sc.set(f"k{i}", i)
            rc.set(f"k{i}", i)
        victim = tgt.owner(16383)  # not the node the playbook's URL names: found through the topology
        vid = tgt.node_id(victim)
        restart_node_empty(victim)
        tgt.wait_ok()
        rc.close()
        with pytest.raises(command.GatesFailed) as refused:
            command.advance(pb, overrides=dict.fromkeys(("divergence", "latency", "error_rate"), "no shim proxies it"))
        gates = {g.name: g.to_json() for g in refused.value.results}
        slots = format_ranges(next(sh["slots"] for sh in tgt.shards() if sh["primary"] is victim))
        named = f"the target node {vid[:8]} at {victim.host}:{victim.port} (slots {slots}) restarted"
        for name in ("sync_complete", "consistency"):
            assert not gates[name]["passed"] and named in gates[name]["evidence"], gates[name]
        assert not gates["key_counts"]["passed"]
        assert "target by primary: " in gates["key_counts"]["evidence"]
        assert f"{victim.host}:{victim.port} ({slots}) 0 keys" in gates["key_counts"]["evidence"]
        status = command.status(pb)
        assert any(named in a for a in status["alerts"]), status["alerts"]
        assert status["sides"]["target"]["cluster"]["nodes"][vid]["keys"] == 0


def test_the_walk_between_clusters_from_the_cli_records_each_topology_change(cluster_factory, tmp_path):
    """plan, advance, rollback at each step, status and the final report work cluster -> cluster; a target reshard during mirroring and a source failover during reads-on-target are journaled, named in the gates' evidence and void the checks that began before them."""
    src = cluster_factory("redis-7.0", primaries=3, replicas=1)
    tgt = cluster_factory("valkey-9.1", primaries=4, replicas=1)
    path = write_playbook(tmp_path / "m.yaml", "", "", source=src.endpoint(), target=tgt.endpoint(),
                          mirror={"strategy": "auto"})
    pb = playbook.load(path)
    # The shim and the data commands on clusters are built in their own branches: this walk
    # keeps both clusters empty (so sync and check are trivially exact) and lets a stand-in shim
    # acknowledge phases; the comparison gates, which need a proxying shim, are overridden.
    shim_gates = ["--override", "divergence", "--override", "latency", "--override", "error_rate",
                  "--reason", "no cluster shim in this test"]
    plan = cli(path, "plan")
    assert "planned → compatible" in plan
    assert re.search(r"source \S+: redis 7\.0\.\d+ \(cluster\)", plan)
    assert re.search(r"target \S+: valkey 9\.1\.\d+ \(cluster\)", plan)
    cli(path, "advance", "--yes", "--override", "compatibility", "--reason", "the cluster pre-flight is tested apart")
    cli(path, "rollback", "--yes")
    cli(path, "advance", "--yes", "--override", "compatibility", "--reason", "the cluster pre-flight is tested apart")
    with AckingShim(pb.state_path, pb.name):
        out = cli(path, "advance", "--yes", "--output", "json")  # → mirroring
        prep = json.loads(out)
        assert prep["to_phase"] == "mirroring"
        strategy = next(g for g in prep["gates"] if g["gate"] == "mirror_strategy")
        assert "auto chose dual-write: the source is a Redis Cluster" in strategy["evidence"]
        assert "the target is a Redis Cluster" in strategy["evidence"]
        cli(path, "rollback", "--yes")
        cli(path, "advance", "--yes")
        cli(path, "sync")
        cli(path, "check", "--full")
        status = cli(path, "status")
        assert "source: cluster, 3 primaries (3 replicas), all 16384 slots, 0 keys" in status
        assert "target: cluster, 4 primaries (4 replicas), all 16384 slots, 0 keys" in status

        # A slot migrates on the target during mirroring.
        slot = 100
        old_owner = tgt.owner(slot)
        dest = next(p for p in tgt.primaries() if p is not old_owner)
        tgt.migrate_slot(slot, dest)
        tgt.wait_ok()
        moved = f"target: slots {slot} moved from"
        assert moved in cli(path, "status")  # seen (read-only) before anything is journaled
        refused = run_cli("advance", "--yes", *shim_gates, "--output", "json", playbook=path)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        gates = {g["gate"]: g for g in json.loads(refused.stdout)["gates"]}
        assert gates["sides_live"]["passed"] and moved in gates["sides_live"]["evidence"]
        assert f"{dest.host}:{dest.port}" in gates["sides_live"]["evidence"]
        assert not gates["consistency"]["passed"] and "began before the topology changed" in gates["consistency"]["evidence"]
        assert gates["consistency"]["data"]["slots_to_recheck"] == [[slot, slot]]
        entries = StateStore(pb.state_path, pb.name).read_journal()
        [event] = [e for e in entries if e["event"] == topology_watch.EVENT]
        assert event["phase"] == "mirroring" and event["slots"] == [[slot, slot]]
        cli(path, "check", "--full")  # a check on the new layout
        cli(path, "advance", "--yes", *shim_gates)  # → reads-on-target
        cli(path, "rollback", "--yes")  # → mirroring: the reshard is behind the evidence now
        cli(path, "check", "--full")
        cli(path, "advance", "--yes", *shim_gates)  # → reads-on-target
        cli(path, "check", "--full")  # evidence the failover below makes stale

        # A source primary fails over during reads-on-target.
        first = src.primaries()[0]
        shard = format_ranges(next(sh["slots"] for sh in src.shards() if sh["primary"] is first))
        promoted = src.failover(first)
        src.wait_ok()
        failover = f"source: failover of shard {shard}: {first.host}:{first.port} -> {promoted.host}:{promoted.port}"
        refused = run_cli("advance", "--yes", *shim_gates, "--output", "json", playbook=path)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        gates = {g["gate"]: g for g in json.loads(refused.stdout)["gates"]}
        assert failover in gates["sides_live"]["evidence"]
        assert failover in gates["consistency"]["evidence"] and "migrator check --full" in gates["consistency"]["evidence"]
        cli(path, "check", "--full")
        cli(path, "advance", "--yes", *shim_gates)  # → writes-on-target
        # A source failover while the target is authoritative: the promoted replica may lack
        # mirrored writes, so the rollback onto the source waits for a full check after it.
        second = src.owner(16383)
        shard2 = format_ranges(next(sh["slots"] for sh in src.shards() if sh["primary"] is second))
        src.failover(second)
        src.wait_ok()
        refused = run_cli("rollback", "--yes", "--output", "json", playbook=path)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        gate = next(g for g in json.loads(refused.stdout)["gates"] if g["gate"] == "source_reachable")
        assert not gate["passed"] and f"source: failover of shard {shard2}" in gate["evidence"]
        assert "check --full --repair" in gate["evidence"]
        cli(path, "check", "--full")
        cli(path, "rollback", "--yes")  # → reads-on-target
        # Journaled although a rollback's gates do not include sides_live.
        entries = StateStore(pb.state_path, pb.name).read_journal()
        last = [e for e in entries if e["event"] == topology_watch.EVENT][-1]
        assert last["phase"] == "writes-on-target" and last["changes"][0]["kind"] == "failover"
        cli(path, "check", "--full")
        cli(path, "advance", "--yes", *shim_gates)  # → writes-on-target
        cli(path, "check", "--full")
        cli(path, "advance", "--yes")  # → completed
        assert StateStore(pb.state_path, pb.name).load().phase.value == "completed"
        history = cli(path, "history")
        assert failover in history and moved in history
        [final] = json.loads(cli(path, "report", "--kind", "migration", "--output", "json"))
        assert "## Topology changes" in cli(path, "report", final["id"])
        report = json.loads(cli(path, "report", final["id"], "--format", "json"))
        texts = [c["text"] for c in report["topology_changes"]]
        assert any(t.startswith(moved) for t in texts) and any(t.startswith(failover) for t in texts)


# --- the whole walk through the shim with a cluster client (needs the cluster shim/sync/check) --------


class ClusterLedger:
    """Writers through a cluster-aware client: each RPUSHes its sequence numbers onto a few lists and
    notes which pushes were acknowledged. Every acknowledged push must be on the target at the end."""

    def __init__(self, host: str, port: int, writers: int = 3, lists: int = 24) -> None:
        self.host, self.port, self.lists = host, port, lists
        self.seen_nodes: set[str] = set()  # every node address the clients were pointed at
        self.acked: dict[str, list[int]] = defaultdict(list)
        self.errors: list[str] = []
        self.ops = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(writers)]

    def start(self) -> ClusterLedger:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, w: int) -> None:
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        rc = redis.RedisCluster(host=self.host, port=self.port, socket_timeout=10,
                                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 5))
        n = 0
        try:
            while not self._stop.is_set():
                n += 1
                key = f"ledger:{w}:{n % self.lists}"
                try:
                    rc.rpush(key, n)
                except redis.exceptions.RedisError as e:  # not acknowledged: may or may not be applied
                    with self._lock:
                        self.errors.append(f"{key} {n}: {type(e).__name__}: {e}")
                    time.sleep(0.05)
                    continue
                with self._lock:
                    self.acked[key].append(n)
                    self.ops += 1
                    self.seen_nodes.update(node.name for node in rc.get_nodes())
                time.sleep(0.005)
        finally:
            rc.close()

    def lost(self, client: redis.RedisCluster) -> list[str]:
        """Acknowledged pushes missing from ``client``'s cluster, and lists whose pushes are out of
        order (one writer per key pushes increasing numbers: mirrored writes keep their order)."""
        out = []
        for key, ns in self.acked.items():
            held = [int(v) for v in client.lrange(key, 0, -1)]
            have = set(held)
            out += [f"{key}: {n} lost" for n in ns if n not in have]
            if held != sorted(held):
                out.append(f"{key}: out of order {held}")
        return out


@pytest.mark.slow
@pytest.mark.parametrize("target_label", ["valkey-9.1", "valkey-8.1"])
def test_whole_walk_through_the_shim_between_clusters_loses_no_acknowledged_write(cluster_factory, tmp_path,
                                                                                    target_label):
    """Redis 7.0 3x1 -> Valkey 4x1 through the shim with a RedisCluster ledger, rollbacks, a target reshard during mirroring and a source failover during reads-on-target: 0 acknowledged writes lost."""
    from migrator import demo

    src = cluster_factory("redis-7.0", primaries=3, replicas=1)
    tgt = cluster_factory(target_label, primaries=4, replicas=1)
    seed = src.cluster_client()
    for i in range(500):
        seed.set(f"seed:{i}", i)
    seed.close()
    path = write_playbook(tmp_path / "m.yaml", "", "", source=src.endpoint(), target=tgt.endpoint(),
                          mirror={"strategy": "auto"},
                          # (sections replace write_playbook's whole step: its test-load latency floor is kept)
                          steps={"mirror": {"min_duration": "1s", "min_compared": 0, "latency_floor_ms": 1000},
                                 "read_cutover": {"min_duration": "1s", "min_compared": 0, "latency_floor_ms": 1000},
                                 "write_cutover": {"rollback_window": "1s"}})
    pb = playbook.load(path)
    shim = demo.ShimProcess(path, tmp_path / "shim.log")
    ledger = None
    try:
        shim.wait_registered(pb.state_path)
        host, _, port = pb.shim.listen.rpartition(":")
        ledger = ClusterLedger(host, int(port)).start()
        wait_for(lambda: ledger.ops > 50, 30, what="ledger writes through the shim")
        servers_addr = {f"{n.host}:{n.port}" for n in src.nodes + tgt.nodes}
        assert not ledger.seen_nodes & servers_addr, f"the clients bypass the shim: {sorted(ledger.seen_nodes)}"

        cli(path, "advance", "--yes")  # → compatible (the cluster pre-flight)
        cli(path, "advance", "--yes")  # → mirroring (auto: dual-write)
        cli(path, "sync")
        cli(path, "sync", "--dirty")
        # A slot holding ledger keys migrates on the target while writes are mirrored.
        slot = key_slot("ledger:0:1")
        dest = next(p for p in tgt.primaries() if p is not tgt.owner(slot))
        tgt.migrate_slot(slot, dest)
        tgt.wait_ok()
        cli(path, "sync", "--dirty")
        cli(path, "check", "--full")
        time.sleep(1.2)
        cli(path, "advance", "--yes")  # → reads-on-target
        cli(path, "rollback", "--yes")  # → mirroring
        cli(path, "sync", "--dirty")
        cli(path, "check", "--full")
        time.sleep(1.2)
        cli(path, "advance", "--yes")  # → reads-on-target
        # A source primary fails over while reads are on the target.
        src.failover(src.owner(key_slot("ledger:1:1")))
        src.wait_ok()
        cli(path, "sync", "--dirty")
        cli(path, "check", "--full")
        time.sleep(1.2)
        cli(path, "advance", "--yes")  # → writes-on-target
        cli(path, "rollback", "--yes")  # → reads-on-target
        cli(path, "check", "--full")
        time.sleep(1.2)
        cli(path, "advance", "--yes")  # → writes-on-target
        time.sleep(1.2)
        ledger.stop()
        cli(path, "check", "--full")
        cli(path, "advance", "--yes")  # → completed
        assert StateStore(pb.state_path, pb.name).load().phase.value == "completed"
        # The facade's CLUSTER SLOTS names shim addresses only: a client sent to the servers
        # themselves would bypass the mirror, and this test would prove nothing.
        assert ledger.seen_nodes and not ledger.seen_nodes & servers_addr, ledger.seen_nodes
        rc = tgt.cluster_client()
        try:
            print(f"ledger: {ledger.ops} acknowledged pushes, {len(ledger.errors)} errors, via {sorted(ledger.seen_nodes)}")
            assert ledger.ops > 200
            assert ledger.lost(rc) == []
            assert all(rc.get(f"seed:{i}") == str(i).encode() for i in range(500))
        finally:
            rc.close()
    finally:
        if ledger is not None:
            ledger.stop()
        shim.stop()
