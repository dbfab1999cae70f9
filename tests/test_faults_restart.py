"""The fault ledger: a server that restarts empty in the middle of each two-sided phase.

A cache without persistence that crashes, or a failover onto an empty replica, comes back with
a new run_id and none of the data a sync copied. Evidence gathered before it (sync, check,
repairs) no longer says anything about it: every gate that moves authority must refuse until
the data is back, and no acknowledged write may be lost. Concurrent clients write through a real
shim all along (the ledger workload), and every acknowledged write is audited at the end.
"""

from __future__ import annotations

import json
import time

import pytest

from migrator import demo, playbook
from migrator.state import StateStore
from migrator.workload import Workload
from tests.helpers import restart_empty, run_cli


def step(path, *args, code: int = 0) -> str:
    out = run_cli(*args, playbook=path, timeout=180)
    assert out.returncode == code, f"migrator {' '.join(args)} exited {out.returncode}, not {code}:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def phase_of(pb) -> str:
    return StateStore(pb.state_path, pb.name).load().phase.value


def status(path) -> dict:
    return json.loads(step(path, "status", "--output", "json").split("\n", 1)[0] if False else
                      run_cli("status", "--output", "json", playbook=path).stdout)


@pytest.fixture
def walk(server_factory, tmp_path):
    """A Redis 7.0 → Valkey 9.1 migration in mirroring, synced and checked, with the ledger workload running through a shim."""
    made = {}

    def start():
        src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
        demo.seed(src.client(), 2000)
        path = demo.write_playbook(tmp_path, src, tgt)
        doc = json.loads(path.read_text())
        for s in ("mirror", "read_cutover"):
            doc["steps"][s]["min_duration"] = "0s"
        doc["steps"]["write_cutover"]["rollback_window"] = "0s"
        path.write_text(json.dumps(doc))
        pb = playbook.load(path)
        shim = demo.ShimProcess(path, tmp_path / "shim.log")
        made["shim"] = shim
        shim.wait_registered(pb.state_path)
        workload = Workload(f"redis://{pb.shim.listen}/0", clients=3, rate=150.0, seed=5).start()
        made["workload"] = workload
        step(path, "advance", "--yes", "--override", "compatibility", "--reason", "the pre-flight is tested in test_compat")
        step(path, "advance", "--yes")  # → mirroring
        step(path, "sync")
        step(path, "sync", "--dirty")
        step(path, "check", "--full")
        time.sleep(1.0)  # replies compared after the sync finished
        return src, tgt, path, pb, workload

    yield start
    if "workload" in made:
        made["workload"].stop()
    if "shim" in made:
        made["shim"].stop()


def repair_by_sync(path) -> None:
    step(path, "sync")
    step(path, "sync", "--dirty")
    step(path, "check", "--full")
    time.sleep(1.0)


@pytest.mark.slow
def test_a_target_restarted_empty_in_mirroring_blocks_the_read_cutover_until_synced_again(walk):
    """In mirroring, a target restarted empty voids the sync and check: advance refuses, naming the restart, until a new sync and check."""
    src, tgt, path, pb, workload = walk()
    restart_empty(tgt)
    time.sleep(1.5)  # clients keep writing through the shim meanwhile
    run_cli("sync", "--dirty", playbook=path, timeout=180)  # what the operator in the audit did: not enough
    out = step(path, "advance", "--yes", code=1)
    assert "restarted" in out and "sync_complete" in out and "key_counts" in out, out
    assert phase_of(pb) == "mirroring"
    st = status(path)
    assert any("restarted" in a for a in st["alerts"]), st["alerts"]
    assert "NOT known to be in sync" in st["other_side"]

    repair_by_sync(path)
    step(path, "advance", "--yes")
    assert phase_of(pb) == "reads-on-target"
    workload.stop()
    audit = workload.audit(tgt.client())
    assert audit.ok, audit.problems[:5]
    assert src.client().dbsize() == tgt.client().dbsize()


@pytest.mark.slow
def test_a_target_restarted_empty_in_reads_on_target_blocks_the_write_cutover(walk):
    """In reads-on-target, a target restarted empty voids the check: write authority is refused until the data is back."""
    src, tgt, path, pb, workload = walk()
    step(path, "advance", "--yes")  # → reads-on-target
    step(path, "check", "--full")
    import redis

    app = redis.Redis.from_url(f"redis://{pb.shim.listen}/0", socket_timeout=5)
    app.set("probe:restart", "before")
    restart_empty(tgt)
    time.sleep(1.5)
    # The shim saw the new run_id and marked the database dirty: reads fall back to the source
    # instead of answering nil from the emptied target.
    assert [app.get("probe:restart") for _ in range(20)] == [b"before"] * 20
    app.close()
    out = step(path, "advance", "--yes", code=1)
    assert "restarted" in out and "consistency" in out and "key_counts" in out, out
    assert phase_of(pb) == "reads-on-target"

    repair_by_sync(path)  # sync is allowed: the source is still authoritative
    step(path, "advance", "--yes")
    assert phase_of(pb) == "writes-on-target"
    workload.stop()
    for server in (src, tgt):
        audit = workload.audit(server.client())
        assert audit.ok, (server.label, audit.problems[:5])


@pytest.mark.slow
def test_a_target_restarted_empty_in_writes_on_target_cannot_complete_and_rolls_back_to_the_source(walk):
    """In writes-on-target, a target restarted empty cannot complete; the rollback onto the source, which holds every write, works."""
    src, tgt, path, pb, workload = walk()
    step(path, "advance", "--yes")  # → reads-on-target
    step(path, "check", "--full")
    step(path, "advance", "--yes")  # → writes-on-target
    step(path, "check", "--full")
    restart_empty(tgt)
    time.sleep(1.5)
    out = step(path, "advance", "--yes", code=1)  # → completed: refused
    assert "restarted" in out and "key_counts" in out and "roll back to the source" in out, out
    assert phase_of(pb) == "writes-on-target"
    before = src.client().dbsize()
    out = step(path, "check", "--full", "--repair", code=1)  # would copy the empty target onto the source
    assert "check --repair refused" in out and "target" in out, out
    assert src.client().dbsize() >= before

    out = step(path, "rollback", "--yes", "--override", "no_dirty_keys", "--reason",
               "the target lost its data; the source has every write")
    assert phase_of(pb) == "reads-on-target"
    step(path, "rollback", "--yes")  # reads back on the source at once
    assert phase_of(pb) == "mirroring"
    workload.stop()
    audit = workload.audit(src.client())
    assert audit.ok, audit.problems[:5]
    repair_by_sync(path)
    assert step(path, "check", "--full")
