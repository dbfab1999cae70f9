"""Sync and check between real local clusters (tests/topologies.py): per shard, routed by slot, while
the topology changes (failover and slot migration on the source, slot migration on the target)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from migrator import cluster, reports
from migrator.data import check, checkpoint, cluster_sync, sync
from tests.helpers import run_cli
from tests.test_data_helpers import FAST, bulk, load, populate, wait_for

N = 3000


@pytest.fixture(scope="module")
def clusters():
    """Local clusters shared by this module's tests (starting 14 nodes takes seconds): ``get(label, primaries)``
    returns one emptied (FLUSHALL on every primary) and healthy; all are stopped at the end. The test that moves
    slots and fails a primary over runs last."""
    from migrator import servers
    from tests import topologies

    started: dict[tuple[str, int], topologies.LocalCluster] = {}

    def get(label: str, primaries: int):
        if servers.find(label) is None:
            pytest.skip(f"no {label} binary here")
        cl = started.get((label, primaries))
        if cl is None:
            cl = started[(label, primaries)] = topologies.start_cluster(label, primaries=primaries, replicas=1)
        for p in cl.primaries():
            with contextlib.closing(cl.node_client(p)) as c:
                c.flushall()
        cl.wait_ok()
        return cl

    yield get
    for cl in started.values():
        cl.stop()


def keys_on(cl) -> int:
    """Keys on every primary of a local cluster."""
    total = 0
    for p in cl.primaries():
        with contextlib.closing(cl.node_client(p)) as c:
            total += c.dbsize()
    return total


def fill(cl, n: int = N) -> int:
    """``n`` small keys of mixed types, one key of each type (streams, HLL, binary), and a big list and hash
    (copied in chunks through a temporary key in the key's slot); returns the number of keys."""
    rc = cl.cluster_client()
    try:
        bulk(rc, n)
        populate(rc, "t:")
        rc.rpush("big:list", *range(2500))
        rc.hset("{big}:hash", mapping={f"f{i}": i for i in range(1500)})
    finally:
        rc.close()
    return keys_on(cl)


@pytest.mark.parametrize("target_label,replicas", [("valkey-9.1", False), ("valkey-8.1", True)],
                         ids=["to-valkey-9.1", "to-valkey-8.1-from-replicas"])
def test_cluster_sync_copies_every_key_and_check_names_mismatches_by_slot(clusters, make_playbook, target_label, replicas):
    """Redis 7.0 3x1 -> Valkey 4x1: sync copies every key (one reader per source shard), a full check finds 0
    mismatches, then a changed and a deleted key on one target shard and a key only on the target are named with their slots."""
    src = clusters("redis-7.0", 3)
    dst = clusters(target_label, 4)
    total = fill(src)
    path = make_playbook(src, dst, sync={"read_from_replicas": replicas}, **FAST)
    out = run_cli("sync", "--output", "json", playbook=path, timeout=180)
    assert out.returncode == 0, out.stderr + out.stdout
    report = json.loads(out.stdout)
    assert report["complete"] and report["keys"] == total
    assert keys_on(dst) == total
    shards = report["shards"]
    assert [s["slots"] for s in shards] == ["0-5460", "5461-10922", "10923-16383"]
    assert sum(s["keys"] for s in shards) == total and all(s["slots_done"] == s["slots_total"] for s in shards)
    assert all(s["reader"].endswith("(replica)") == replicas for s in shards), shards
    assert all(s["keys"] > 0 for s in shards)
    status = run_cli("status", playbook=path)  # per-shard progress, from the progress file the sync left
    for s in shards:
        assert f"shard {s['address']} slots {s['slots']}: {s['slots_total']:,}/{s['slots_total']:,} slots done" \
            in status.stdout, status.stdout

    pb = load(path)
    res = check.run(pb, full=True)
    assert res.clean and res.checked == total, res.summary
    assert {s["slots"] for s in res.shards if s["side"] == "target"} == {"0-4095", "4096-8191", "8192-12287", "12288-16383"}

    rc = dst.cluster_client()
    try:
        rc.set("k:5", "planted")  # k:5 is a string
        rc.delete("k:6")
        rc.set("only:on:target", "x")
    finally:
        rc.close()
    out = run_cli("check", "--full", "--output", "json", playbook=path)
    assert out.returncode == 1, out.stderr + out.stdout
    data = json.loads(out.stdout)
    found = {m["key"]: (m["kind"], m["slot"]) for m in data["mismatches"]}
    assert found == {"k:5": ("value", cluster.key_slot("k:5")), "k:6": ("missing", cluster.key_slot("k:6")),
                     "only:on:target": ("extra", cluster.key_slot("only:on:target"))}
    owner = next(s for s in data["shards"] if s["side"] == "target" and s["address"].endswith(
        f":{dst.owner(cluster.key_slot('only:on:target')).port}"))
    assert owner["missing_elsewhere"] == 1 and owner["mismatches"] >= 1


def test_killed_cluster_sync_resumes_by_slot(clusters, make_playbook):
    """A cluster sync killed with SIGKILL mid-copy resumes from the verified slots of each shard: every key
    lands, and the second run copies only what the first had not confirmed."""
    src = clusters("redis-7.0", 3)
    dst = clusters("valkey-9.1", 4)
    total = fill(src, 4000)
    path = make_playbook(src, dst, **FAST)
    pb = load(path)
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(path), "sync", "--rate", "1500", "--batch", "20"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        def some_done():
            cp = checkpoint.load(pb.state_path)
            return cp is not None and sum(e["keys"] for e in cp.shards.values()) >= total // 4
        assert wait_for(some_done, timeout=60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    cp = checkpoint.load(pb.state_path)
    confirmed = sum(e["keys"] for e in cp.shards.values())
    on_target = keys_on(dst)
    assert 0 < confirmed <= on_target < total
    res = sync.run(pb)
    assert res.resumed and res.complete and res.runs == 2
    assert keys_on(dst) == total and res.keys == total
    # Copied again: only the keys the first run had copied but not yet confirmed (about its last second of
    # copying); no key of a confirmed slot is copied again.
    twice = on_target - confirmed
    print(f"killed run confirmed {confirmed} keys ({on_target} on the target), the resumed run copied {res.run_keys} "
          f"of {total}: {twice} copied twice")
    assert res.run_keys == total - confirmed
    assert twice <= 1500 * 2, (confirmed, on_target, res.run_keys, total)
    assert check.run(pb, full=True).clean


def test_cluster_dirty_keys_are_recopied_by_slot(clusters, make_playbook):
    """``sync --dirty`` on clusters re-copies the shim's dirty keys, each read from and written to its slot's owners."""
    from migrator.data import dirty
    from tests.test_data_sync import _mark_dirty

    src = clusters("redis-7.0", 3)
    dst = clusters("valkey-9.1", 4)
    fill(src, 300)
    pb = load(make_playbook(src, dst, **FAST))
    assert sync.run(pb).complete
    changed = [f"k:{i}".encode() for i in (0, 5, 10, 15)]  # strings, in slots of different shards on both sides
    assert len({src.owner(cluster.key_slot(k)).port for k in changed}) > 1
    rc = src.cluster_client()
    try:
        for k in changed:
            rc.set(k, b"changed while the shim could not mirror")
        rc.delete("k:20")
    finally:
        rc.close()
    _mark_dirty(pb, [(0, k) for k in changed] + [(0, b"k:20")])
    res = sync.run(pb, dirty=True)
    assert res.complete and res.keys == 5 and res.deleted == 1
    tc = dst.cluster_client()
    try:
        assert all(tc.get(k) == b"changed while the shim could not mirror" for k in changed) and not tc.exists("k:20")
    finally:
        tc.close()
    assert dirty.list_dirty(pb.state_path).count == 0


def test_sync_between_a_standalone_server_and_a_cluster_both_ways(server_factory, clusters, make_playbook, tmp_path):
    """A standalone source syncs onto a cluster target (each SCAN step routed by slot), and a cluster source onto a
    standalone target; each check is clean and every key is there."""
    single = server_factory("redis-7.0")
    cl = clusters("valkey-9.1", 4)
    c = single.client()
    bulk(c, 1500)
    populate(c, "t:")
    total = c.dbsize()
    path = make_playbook(single, cl, **FAST)
    res = sync.run(load(path))
    assert res.complete and res.keys == total and keys_on(cl) == total
    assert check.run(load(path), full=True).clean

    back = server_factory("valkey-8.1")
    (tmp_path / "state").rename(tmp_path / "state-1")
    path = make_playbook(cl, back, **FAST)
    res = sync.run(load(path))
    assert res.complete and res.keys == total and back.client().dbsize() == total
    assert check.run(load(path), full=True).clean

    # A cluster has database 0 only: selecting another is a usage error (exit 2) for sync and check alike.
    from migrator.errors import UsageError

    path = make_playbook(cl, back, sync={"databases": [0, 2]}, **FAST)
    with pytest.raises(UsageError, match="only database 0"):
        sync.run(load(path))
    with pytest.raises(UsageError, match="only database 0"):
        check.run(load(path), full=True)


def test_cluster_sync_verifies_batches_against_mirrored_writes(clusters, make_playbook, monkeypatch):
    """A mirrored update landing between a batch's read and its write (batches of several slots per node pair) is
    found by the verification on the slots' owners and the key copied again: the end is clean."""
    from tests.test_data_sync import RacingCopier

    src = clusters("redis-7.0", 3)
    dst = clusters("valkey-9.1", 4)
    fill(src, 1000)
    pb = load(make_playbook(src, dst, **FAST))
    monkeypatch.setattr(sync, "Copier", RacingCopier)
    RacingCopier.raced = set()
    res = sync.run(pb, batch=50)
    assert res.complete and len(RacingCopier.raced) > 50 and res.recopied > 0, res
    result = check.run(pb, full=True, interval=0.05)
    assert result.clean, [(m.key, m.detail) for m in result.mismatches]


def test_cluster_sync_follows_failover_and_slot_migrations(clusters, make_playbook, monkeypatch):
    """During a throttled sync a source primary fails over, a slot with keys migrates on the source and another on
    the target: every key is still copied (the moved slots re-planned, MOVED/ASK followed), and a full check is clean."""
    src = clusters("redis-7.0", 3)
    dst = clusters("valkey-9.1", 4)
    total = fill(src, 4000)
    path = make_playbook(src, dst, **FAST)
    pb = load(path)
    monkeypatch.setattr(cluster_sync, "MIGRATION_WAIT_S", 30.0)  # a slot left unowned fails the test in time
    shards = src.shards()
    # Slots near the end of their shards (each reader goes through its slots in order), holding keys.
    hot = [cluster.key_slot(f"k:{i}") for i in range(4000)]
    moved_src = max(s for s in hot if s <= shards[1]["slots"][0][1])  # shard 2's last slot with keys
    # The target's last shard's last slot with keys: read late by source shard 3's reader (its primary is not
    # disturbed), which meets the redirect when it writes there with the slot map of its round's start.
    moved_dst = max(hot)
    events: list[tuple[str, float]] = []
    failed: list[BaseException] = []

    def disturb():
        try:
            time.sleep(0.8)
            src.failover(shards[0]["primary"])
            events.append(("source failover", time.monotonic()))
            src.migrate_slot(moved_src, shards[2]["primary"])
            events.append((f"source slot {moved_src} migrated", time.monotonic()))
            dst.migrate_slot(moved_dst, dst.primaries()[0])
            events.append((f"target slot {moved_dst} migrated", time.monotonic()))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failed.append(e)

    t = threading.Thread(target=disturb)
    t0 = time.monotonic()
    t.start()
    try:
        res = sync.run(pb, rate=1000, batch=20)
        ended = time.monotonic()
    finally:
        t.join(60)
    assert not failed, failed
    assert res.complete, (res.errors[:5], res.unsettled[:5])
    # Every event happened while the sync ran, and it re-planned the shard whose primary failed over.
    assert len(events) == 3 and all(t0 < at < ended for _what, at in events), (events, t0, ended)
    assert res.replanned or any(s["state"] == "stopped" for s in res.shards), res.shards
    assert any(f"shard {shards[2]['primary'].host}:{shards[2]['primary'].port}:" in e for e in res.replanned), \
        res.replanned  # the target's redirect met, and the slot written to its new owner in the next round
    print(f"events at {[(w, round(at - t0, 2)) for w, at in events]} s, sync ended at {ended - t0:.2f} s; "
          f"re-planned: {res.replanned}")
    assert keys_on(dst) == total
    src.wait_ok()
    dst.wait_ok()
    assert check.run(pb, full=True).clean
    assert reports.load(pb.state_path, res.report_id)["keys"] == total

    # A slot migrated on the target while a (throttled) check runs is compared again, and the report says so.
    again = min(s for s in hot if s >= 8192)
    mover = threading.Thread(target=lambda: (time.sleep(0.5), dst.migrate_slot(again, dst.primaries()[0])))
    mover.start()
    try:
        chk = check.run(pb, full=True, rate=2000)
    finally:
        mover.join(60)
    assert chk.clean, [(m.key, m.detail) for m in chk.mismatches]
    assert again in cluster_sync.slots_set(chk.recovered), chk.recovered
    assert f"slots {chk.recovered} moved during the check and were compared again" in chk.summary
