"""The cutover protocol where it can go wrong: stalls, crashes, lagging or foreign shims, lost state.

Each test was first written as a failing demonstration of a bug (a review of the state machine),
then kept as the regression test of its fix.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from datetime import timedelta

import pytest
import redis

from migrator import command, playbook, registry
from migrator.errors import RefusedError
from migrator.phases import Phase
from migrator.shim.server import ShimThread
from migrator.state import Barrier, StateStore, iso, now
from tests.helpers import AckingShim, run_cli, start_cli, wait_for

SKIP_DATA_GATES_AT_WRITE_CUTOVER = ("--override", "divergence", "--override", "latency", "--override", "error_rate",
                                    "--override", "consistency", "--reason", "t")


def force_phase(pb, phase):
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    st.phase, st.generation, st.endpoints_hash = phase, st.generation + 1, pb.endpoints_hash()
    store.save(st)
    return store


@pytest.fixture
def servers_pb(server_factory, make_playbook):
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    return make_playbook(src, tgt, shim={"ack_timeout": "2s"}, steps={
        "mirror": {"min_duration": "0s", "min_compared": 0, "latency_floor_ms": 1000},
        "read_cutover": {"min_duration": "0s", "min_compared": 0, "latency_floor_ms": 1000},
        "write_cutover": {"rollback_window": "0s", "max_pause": "1s"}})


def write_dirty_mark(state_dir, key=b"k"):
    d = state_dir / "dirty"
    d.mkdir(parents=True, exist_ok=True)
    line = {"db": 0, "key": base64.b64encode(key).decode(), "reason": "source timed out", "command": "SET",
            "ts": time.time(), "time": iso(now()), "shim": "test-shim"}
    (d / f"test-shim.{uuid.uuid4().hex}.jsonl").write_text(json.dumps(line) + "\n")


def test_a_write_switch_is_not_reverted_onto_a_side_that_missed_a_write(servers_pb):
    """The switch to writes-on-target is written, a shim never acknowledges it and the source meanwhile
    missed a write (dirty): putting reads-on-target back would make the stale source authoritative,
    so the switch stays (with its transition pending), and the run exits 4 saying why."""
    pb = playbook.load(servers_pb)
    store = force_phase(pb, Phase.READS_ON_TARGET)

    class StickOnSwitch(AckingShim):
        def _loop(self):
            orig_load = self.store.load

            def load():
                st = orig_load()
                if st.phase == Phase.WRITES_ON_TARGET and not self.stuck:
                    write_dirty_mark(pb.state_path)
                    self.stuck = True
                    return None
                return st
            self.store = type("S", (), {"load": staticmethod(load)})()
            super()._loop()

    with StickOnSwitch(pb.state_path, pb.name):
        out = run_cli("advance", "--yes", *SKIP_DATA_GATES_AT_WRITE_CUTOVER, playbook=servers_pb)
    assert out.returncode == 4, out.stdout + out.stderr
    assert "not reverted to reads-on-target because no_dirty_keys" in out.stderr
    st = store.load()
    assert st.phase == Phase.WRITES_ON_TARGET and st.transition is not None
    assert command.history(pb)[-1]["event"] == "transition-stalled"


def test_a_barrier_never_holds_clients_longer_than_max_pause(servers_pb):
    """A barrier deadline far ahead (another host's clock, or this one stepped back) is capped at max_pause."""
    pb = playbook.load(servers_pb)
    store = force_phase(pb, Phase.READS_ON_TARGET)
    with ShimThread(pb) as shim:
        st = store.load()
        st.barrier = Barrier(id="b1", generation=st.generation + 1, deadline=iso(now() + timedelta(seconds=8)),
                             purpose="advance write authority")
        st.generation += 1
        store.save(st)
        wait_for(lambda: shim.call(lambda: shim.shim.holding), timeout=5)
        c = redis.Redis(host="127.0.0.1", port=shim.port, socket_timeout=15, retry_on_timeout=False)
        t0 = time.monotonic()
        try:
            c.set("x", "1")
        finally:
            took = time.monotonic() - t0
            st = store.load()
            st.barrier, st.generation = None, st.generation + 1
            store.save(st)
        assert took < pb.steps.write_cutover.max_pause.total_seconds() + 1.0


def test_a_shim_refuses_to_start_on_other_endpoints_than_the_migrations(servers_pb, server_factory):
    """As advance and rollback refuse a playbook whose servers changed mid-migration, so does a shim."""
    pb = playbook.load(servers_pb)
    force_phase(pb, Phase.WRITES_ON_TARGET)
    other = server_factory("valkey-9.1")
    doc = json.loads(servers_pb.read_text())
    doc["target"]["url"] = other.url
    servers_pb.write_text(json.dumps(doc))
    out = run_cli("shim", playbook=servers_pb, timeout=30)
    assert out.returncode == 4 and "differ from the ones this migration started with" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_status_after_a_kill_during_a_revert_says_the_phase_was_put_back(servers_pb):
    """kill -9 while a revert waits for acknowledgements: status must not claim nothing was applied."""
    pb = playbook.load(servers_pb)
    store = force_phase(pb, Phase.MIRRORING)
    g0 = store.load().generation
    with AckingShim(pb.state_path, pb.name) as shim:
        shim.stuck = True
        proc = start_cli("advance", "--yes", "--override", "sync_complete", "--override", "divergence",
                         "--override", "latency", "--override", "error_rate", "--override", "consistency",
                         "--override", "shim_ack", "--reason", "t", playbook=servers_pb)
        wait_for(lambda: store.load().generation == g0 + 2, timeout=20, what="the revert")
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert command.history(pb)[-1]["event"] == "transition-reverting"
    st = json.loads(run_cli("status", "--output", "json", playbook=servers_pb).stdout)
    assert "nothing was applied" not in st["note"] and "was interrupted" in st["note"], st["note"]
    assert st["phase"] == "mirroring"


def test_a_dry_run_writes_nothing_to_the_journal(servers_pb):
    pb = playbook.load(servers_pb)
    force_phase(pb, Phase.COMPATIBLE)
    out = run_cli("advance", "--yes", "--override", "shim_running", "--reason", "t", playbook=servers_pb,
                  env={"MIGRATOR_CRASH_AT": "after-state"})
    assert out.returncode == -signal.SIGKILL
    before = (pb.state_path / "journal.jsonl").read_bytes()
    run_cli("rollback", "--yes", "--dry-run", playbook=servers_pb)
    assert (pb.state_path / "journal.jsonl").read_bytes() == before


def test_complete_is_not_reverted_when_a_shim_lags(server_factory, make_playbook):
    """Shims that applied completed stopped writing to the source at once: going back to
    writes-on-target would let a later rollback lose those writes. Completed stays; exit 4 names the laggard."""
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    path = make_playbook(src, tgt, shim={"ack_timeout": "2s"})
    pb = playbook.load(path)
    store = force_phase(pb, Phase.WRITES_ON_TARGET)
    with AckingShim(pb.state_path, pb.name, shim_id="stuck-shim") as stuck:
        wait_for(lambda: all(r.applied_generation == store.load().generation for r in registry.active(pb.state_path)))
        stuck.stuck = True
        out = run_cli("advance", "--yes", "--override", "consistency", "--reason", "t", playbook=path)
    assert out.returncode == 4 and "the phase stays completed" in out.stderr and "stuck-shim" in out.stderr, out.stderr
    assert store.load().phase == Phase.COMPLETED and store.load().transition is None
    assert run_cli("rollback", "--yes", playbook=path).returncode == 1


def test_a_heartbeating_shim_counts_even_if_its_pid_is_not_ours(servers_pb):
    """A shim in another pid namespace (a container on the host network) shares the host name, not the
    pids: while it heartbeats it must hold for the switch like any other."""
    pb = playbook.load(servers_pb)
    force_phase(pb, Phase.READS_ON_TARGET)
    with AckingShim(pb.state_path, pb.name, shim_id="good"), AckingShim(pb.state_path, pb.name, shim_id="other-ns") as other:
        other.record.pid = 4_000_000
        other.refuse_hold = True
        time.sleep(0.2)
        other.stuck = True
        wait_for(lambda: any(r.id == "other-ns" and r.age() < 1 for r in registry.read_all(pb.state_path)))
        out = run_cli("advance", "--yes", *SKIP_DATA_GATES_AT_WRITE_CUTOVER, playbook=servers_pb)
    assert out.returncode == 1 and "other-ns" in out.stderr and "phase unchanged" in out.stderr, out.stderr


def test_the_switch_is_not_written_once_the_holds_deadline_is_too_close(servers_pb, monkeypatch):
    """advance stalls between the shims holding and the switch (a GC or fsync stall, SIGSTOP): past the
    deadline the shims released in the old phase, so the switch is abandoned, not reported as done."""
    pb = playbook.load(servers_pb)
    store = force_phase(pb, Phase.READS_ON_TARGET)
    real = registry.await_hold

    def stalled(*a, **kw):
        r = real(*a, **kw)
        time.sleep(pb.steps.write_cutover.max_pause.total_seconds() + 0.5)
        return r
    monkeypatch.setattr(registry, "await_hold", stalled)
    with ShimThread(pb) as shim:
        wait_for(lambda: shim.call(lambda: shim.shim.applied_generation) == store.load().generation)
        with pytest.raises(RefusedError, match="too close"):
            command.advance(pb, overrides={"divergence": "t", "latency": "t", "error_rate": "t", "consistency": "t"})
    st = store.load()
    assert st.phase == Phase.READS_ON_TARGET and st.barrier is None and st.transition is None


def test_status_says_a_running_advance_is_in_progress(servers_pb):
    pb = playbook.load(servers_pb)
    store = force_phase(pb, Phase.MIRRORING)
    with AckingShim(pb.state_path, pb.name) as shim:
        shim.stuck = True
        proc = start_cli("advance", "--yes", "--override", "sync_complete", "--override", "divergence",
                         "--override", "latency", "--override", "error_rate", "--override", "consistency",
                         "--override", "shim_ack", "--reason", "t", playbook=servers_pb)
        wait_for(lambda: store.load().transition is not None, timeout=20)
        st = json.loads(run_cli("status", "--output", "json", playbook=servers_pb).stdout)
        proc.communicate(timeout=30)
    assert st["note"].startswith("in progress: advance by"), st["note"]


def test_a_running_shim_keeps_its_phase_when_state_json_goes_missing(servers_pb):
    pb = playbook.load(servers_pb)
    store = force_phase(pb, Phase.WRITES_ON_TARGET)
    with ShimThread(pb) as shim:
        time.sleep(0.4)
        os.rename(store.state_path, store.state_path.with_suffix(".bak"))
        time.sleep(0.5)
        phase = shim.call(lambda: shim.shim.phase)
        os.rename(store.state_path.with_suffix(".bak"), store.state_path)
    assert phase == Phase.WRITES_ON_TARGET


def test_a_missing_state_json_after_a_step_is_an_error_not_a_fresh_migration(servers_pb):
    pb = playbook.load(servers_pb)
    force_phase(pb, Phase.COMPATIBLE)
    assert run_cli("advance", "--yes", "--override", "shim_running", "--reason", "t", playbook=servers_pb).returncode == 0
    (pb.state_path / "state.json").unlink()
    out = run_cli("status", playbook=servers_pb)
    assert out.returncode == 4 and "is missing" in out.stderr, out.stderr


def test_sync_is_refused_once_the_target_is_authoritative_and_check_repair_mends_the_source(server_factory, make_playbook):
    """writes-on-target: a dirty key means the source missed a write. `sync --dirty` (source → target)
    would overwrite the acknowledged value; it is refused. `check --full --repair` copies target → source,
    and its clean result clears the mark, so the rollback's no_dirty_keys passes."""
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    path = make_playbook(src, tgt)
    pb = playbook.load(path)
    force_phase(pb, Phase.WRITES_ON_TARGET)
    src.client().set("k", "old")
    tgt.client().set("k", "new")
    write_dirty_mark(pb.state_path, b"k")
    for args in (("sync", "--dirty"), ("sync",)):
        out = run_cli(*args, playbook=path)
        assert out.returncode == 1 and "target is authoritative" in out.stderr, out.stderr
        assert tgt.client().get("k") == b"new"
    out = run_cli("check", "--full", "--repair", playbook=path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert src.client().get("k") == b"new"
    from migrator.shim.dirty import count_dirty
    assert count_dirty(pb.state_path) == 0


def test_a_shim_killed_in_writes_on_target_blocks_the_rollback_until_a_full_check_repairs(server_factory, make_playbook,
                                                                                          tmp_path):
    """A shim killed -9 takes with it the source writes it had queued (nothing records them): the
    rollback is refused by no_lost_shims until a full check has repaired the source and found both sides equal."""
    from migrator.demo import ShimProcess
    from migrator.servers import free_port
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    path = make_playbook(src, tgt, shim={"ack_timeout": "3s"})
    pb = playbook.load(path)
    force_phase(pb, Phase.WRITES_ON_TARGET)
    a = ShimProcess(path, tmp_path / "a.log", listen=f"127.0.0.1:{free_port()}")
    b = ShimProcess(path, tmp_path / "b.log")  # another shim, which lives on
    try:
        a.wait_registered(pb.state_path, 30)
        b.wait_registered(pb.state_path, 30)
        ca = redis.Redis.from_url(f"redis://{a.listen}/0", socket_timeout=5)
        ca.set("warm", "1")
        src.client().execute_command("CLIENT", "PAUSE", "1500", "WRITE")  # the source is slow for a moment
        ca.set("k", "acked")  # acknowledged by the target (authoritative); the source write is queued
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        time.sleep(2)
        assert tgt.client().get("k") == b"acked" and src.client().get("k") is None
        out = run_cli("rollback", "--yes", playbook=path)
        assert out.returncode == 1 and "failed: no_lost_shims" in out.stderr, out.stdout + out.stderr
        assert "stopped without draining" in out.stdout
        assert run_cli("check", "--full", "--repair", playbook=path).returncode == 0
        assert src.client().get("k") == b"acked"
        assert run_cli("check", "--full", playbook=path).returncode == 0
        out = run_cli("rollback", "--yes", playbook=path)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        b.stop()
        a.stop()


def test_a_reverted_rollback_out_of_mirroring_restarts_the_mirror_clock(servers_pb):
    """A rollback mirroring → compatible reverted (a shim did not acknowledge): the shims that applied it
    stopped mirroring meanwhile, so a sync from before the gap no longer satisfies sync_complete."""
    pb = playbook.load(servers_pb)
    store = force_phase(pb, Phase.COMPATIBLE)
    with AckingShim(pb.state_path, pb.name, shim_id="a"), AckingShim(pb.state_path, pb.name, shim_id="b") as b:
        assert run_cli("advance", "--yes", playbook=servers_pb).returncode == 0
        first = store.load().mirror_started
        sync = run_cli("sync", playbook=servers_pb)
        assert sync.returncode == 0, sync.stdout + sync.stderr
        time.sleep(0.2)
        b.stuck = True
        t_gap = now()
        out = run_cli("rollback", "--yes", playbook=servers_pb)
        assert out.returncode == 1 and "reverted to mirroring" in out.stderr, out.stderr
    st = store.load()
    assert st.phase == Phase.MIRRORING
    p = json.loads(run_cli("plan", "--output", "json", playbook=servers_pb).stdout)
    g = {x["gate"]: x for x in p["gates"]}["sync_complete"]
    print(g)
    assert not g["passed"], f"sync_complete accepts a sync from before the mirroring gap: {g['evidence']}"
    assert st.mirror_started >= t_gap, (
        f"mirroring stopped at {t_gap} (shim a applied compatible) but mirror_started is still {first}")


def test_a_record_with_fields_this_version_does_not_know_still_counts(tmp_path):
    """A newer shim's record (an extra field) is read, not skipped: a skipped shim would be left out
    of the write switch's barrier and of the acknowledgements."""
    (tmp_path / "shims").mkdir()
    rec = {"id": "newer", "pid": 1, "host": "elsewhere", "listen": "127.0.0.1:1", "admin": "", "started_at": iso(now()),
           "heartbeat_at": iso(now()), "applied_phase": "mirroring", "applied_generation": 3, "from_the_future": True}
    (tmp_path / "shims" / "newer.json").write_text(json.dumps(rec))
    assert [r.id for r in registry.active(tmp_path)] == ["newer"]


def test_a_state_file_older_than_the_journal_is_refused(servers_pb):
    """state.json restored from an old backup: its generation is behind what the journal records as
    written, so shims may route by a newer phase. advance refuses (exit 4) and status says why."""
    pb = playbook.load(servers_pb)
    store = force_phase(pb, Phase.COMPATIBLE)
    backup = store.state_path.read_bytes()
    assert run_cli("advance", "--yes", "--override", "shim_running", "--reason", "t", playbook=servers_pb).returncode == 0
    store.state_path.write_bytes(backup)
    out = run_cli("advance", "--yes", playbook=servers_pb)
    assert out.returncode == 4 and "older than the migration" in out.stderr, out.stderr
    st = json.loads(run_cli("status", "--output", "json", playbook=servers_pb).stdout)
    assert "older than the migration" in st["note"]
