"""The ledger test: walk the whole migration through the CLI, with rollbacks and a shim restart,
while concurrent clients write through the shim; then audit every acknowledged write.

Runs for Redis 7.0 → Valkey 9.1, Redis 6.2 → Valkey 8.1 and Redis 7.0 → Valkey 8.1.
"""

from __future__ import annotations

import json
import time

import pytest

from migrator import demo, playbook, registry
from migrator.state import StateStore
from migrator.workload import Workload
from tests.helpers import run_cli, wait_for

LEDGER_PAIRS = [("redis-7.0", "valkey-9.1"), ("redis-6.2", "valkey-8.1"), ("redis-7.0", "valkey-8.1")]


def step(path, *args) -> dict:
    """Run one CLI command that must succeed; return its JSON output (or {})."""
    out = run_cli(*args, playbook=path, timeout=180)
    assert out.returncode == 0, f"migrator {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return json.loads(out.stdout) if "--output" in args else {}


def phase_of(pb) -> str:
    return StateStore(pb.state_path, pb.name).load().phase.value


def wait_time_gate(path, seconds: float) -> None:
    """The playbook's time gates are 2s: wait them out (advance re-checks them honestly)."""
    time.sleep(seconds)


@pytest.mark.slow
@pytest.mark.parametrize("source_label,target_label", LEDGER_PAIRS, ids=lambda x: x)
def test_every_acknowledged_write_survives_the_whole_walk(server_factory, tmp_path, source_label, target_label):
    """Through advance, sync, check, two rollbacks and a shim restart, no acknowledged write is lost and no client sees an error."""
    src, tgt = server_factory(source_label), server_factory(target_label)
    demo.seed(src.client(), 600)
    path = demo.write_playbook(tmp_path, src, tgt)
    doc = json.loads(path.read_text())
    doc["steps"]["mirror"]["min_duration"] = "2s"
    doc["steps"]["read_cutover"]["min_duration"] = "2s"
    doc["steps"]["write_cutover"]["rollback_window"] = "2s"
    path.write_text(json.dumps(doc))
    pb = playbook.load(path)
    shim = demo.ShimProcess(path, tmp_path / "shim.log")
    workload = None
    try:
        shim.wait_registered(pb.state_path)
        workload = Workload(f"redis://{pb.shim.listen}/0", clients=3, rate=150.0, seed=11).start()

        step(path, "advance", "--yes")  # planned → compatible (the real pre-flight)
        step(path, "advance", "--yes")  # → mirroring
        sync = step(path, "sync", "--output", "json")
        assert sync["complete"] is True
        step(path, "sync", "--dirty")  # keys the shim marked while the copy ran
        step(path, "check", "--full")
        wait_time_gate(path, 2.2)
        step(path, "advance", "--yes")  # → reads-on-target
        assert phase_of(pb) == "reads-on-target"

        step(path, "rollback", "--yes")  # reads-on-target → mirroring, at once
        assert phase_of(pb) == "mirroring"
        step(path, "sync", "--dirty")
        step(path, "check", "--full")
        wait_time_gate(path, 2.2)
        step(path, "advance", "--yes")  # → reads-on-target again
        step(path, "check", "--full")
        wait_time_gate(path, 2.2)
        cut = step(path, "advance", "--yes", "--output", "json")  # → writes-on-target, behind the barrier
        assert cut["to_phase"] == "writes-on-target"
        pause = next(a for a in cut["actions"] if a["action"] == "write_pause")

        # Restart the shim while Valkey is authoritative: clients reconnect, the new shim
        # resumes writes-on-target from the state.
        assert shim.stop() == 0
        shim = demo.ShimProcess(path, tmp_path / "shim2.log")
        shim.wait_registered(pb.state_path)
        wait_for(lambda: all(r.applied_phase == "writes-on-target" for r in registry.active(pb.state_path)),
                 what="the restarted shim to apply writes-on-target")

        step(path, "rollback", "--yes")  # writes-on-target → reads-on-target: source provably in sync
        assert phase_of(pb) == "reads-on-target"
        step(path, "check", "--full")
        wait_time_gate(path, 2.2)  # the read cutover's observation period starts again
        step(path, "advance", "--yes")  # → writes-on-target again
        wait_time_gate(path, 2.2)
        # Completion stops writes to the source, so the last full check of both sides is taken
        # with the clients stopped.
        workload.stop()
        step(path, "check", "--full")
        step(path, "advance", "--yes")  # → completed
        assert phase_of(pb) == "completed"

        audit = workload.audit(tgt.client())
        assert audit.ops > 200
        assert audit.errors == [], audit.errors[:5]
        assert audit.ok, audit.problems[:10]
        final = run_cli("check", "--full", playbook=path)
        assert final.returncode == 0, final.stdout + final.stderr
        assert pause["data"]["max_pause_ms"] < 5000
    finally:
        if workload is not None:
            workload.stop()
        shim.stop()
