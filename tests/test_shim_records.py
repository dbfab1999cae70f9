"""What the shim records in state_dir: dirty keys (shared with the repair), divergences and their counters, gates."""

from __future__ import annotations

import json
import time
from datetime import timedelta

from migrator import playbook, reports
from migrator.data import dirty as repair_dirty
from migrator.gates import GateContext
from migrator.phases import Phase
from migrator.shim import clear_dirty, count_dirty, list_dirty
from migrator.shim import gates as shim_gates
from migrator.shim.dirty import DirtyRecorder
from migrator.shim.divergence import DivergenceRecorder, read_counters, read_log
from migrator.state import StateStore, iso, now
from tests.conftest import write_playbook


def test_dirty_marks_are_listed_by_key_and_readable_by_the_repair(tmp_path):
    """Marks persist as complete files the repair (migrator.data.dirty) reads; binary keys survive."""
    rec = DirtyRecorder(tmp_path, "shim-a")
    rec.add(0, [b"user:1", b"\xff\x00bin"], "target-down", b"set")
    rec.add(2, [b"user:1"], "shadow-timeout", b"hset")
    rec.flush()
    listed = {(d.db, d.key): d for d in list_dirty(tmp_path)}
    assert set(listed) == {(0, b"user:1"), (0, b"\xff\x00bin"), (2, b"user:1")}
    assert listed[(2, b"user:1")].reason == "shadow-timeout" and listed[(2, b"user:1")].command == "HSET"
    assert repair_dirty.list_dirty(tmp_path).keys == {0: {b"user:1", b"\xff\x00bin"}, 2: {b"user:1"}}


def test_a_repair_deleting_files_clears_only_what_it_read(tmp_path):
    """Files written after the repair listed them stay: a key dirtied during the repair is still dirty."""
    rec = DirtyRecorder(tmp_path, "shim-a")
    rec.add(0, [b"a"], "target-down", b"set")
    rec.flush()
    taken = repair_dirty.list_dirty(tmp_path)
    time.sleep(0.01)
    rec.add(0, [b"b"], "target-down", b"set")
    rec.flush()
    repair_dirty.clear_repaired(tmp_path, taken, still_dirty=set())
    assert [d.key for d in list_dirty(tmp_path)] == [b"b"]
    rec.refresh()
    assert set(rec.keys) == {(0, b"b")}


def test_clear_dirty_respects_before_and_key_selection(tmp_path):
    """clear_dirty removes the named keys marked up to ``before`` and nothing else."""
    rec = DirtyRecorder(tmp_path, "shim-a")
    rec.add(0, [b"a", b"b"], "x", b"set")
    rec.flush()
    cutoff = time.time()
    time.sleep(0.01)
    rec.add(0, [b"a"], "x", b"set")  # dirtied again after the repair listed it
    rec.flush()
    assert clear_dirty(tmp_path, [(0, b"a"), (0, b"b")], before=cutoff) == 2
    assert [d.key for d in list_dirty(tmp_path)] == [b"a"]
    assert clear_dirty(tmp_path) == 1 and count_dirty(tmp_path) == 0


def test_keyless_lost_writes_mark_the_whole_database(tmp_path):
    """A lost FLUSHDB marks the whole database: the repair sees it as such, and a key repair does not clear it."""
    rec = DirtyRecorder(tmp_path, "shim-a")
    rec.add(3, [], "target-down", b"flushdb")
    rec.flush()
    assert [d.display for d in list_dirty(tmp_path)] == ["db3:*"]
    taken = repair_dirty.list_dirty(tmp_path)
    assert taken.keys == {} and taken.whole_dbs == {3}
    assert repair_dirty.clear_repaired(tmp_path, taken, still_dirty=set()) == 0
    assert [d.display for d in list_dirty(tmp_path)] == ["db3:*"]
    assert rec.is_dirty(3, [b"anything"]) and not rec.is_dirty(0, [b"anything"])


def test_divergence_log_never_holds_values_unless_asked(tmp_path):
    """Divergence lines carry digests and lengths; values appear only with log_values."""
    for log_values in (False, True):
        d = tmp_path / str(log_values)
        rec = DivergenceRecorder(d, "s1", log_values=log_values)
        rec.start_generation(4, "mirroring")
        rec.compared()
        rec.record(kind="different-value", command=b"get", keys=[b"k"], db=0, source_raw=b"$6\r\nsecret\r\n",
                   target_raw=b"$5\r\nother\r\n")
        rec.flush()
        (line,) = read_log(d)
        assert line["kind"] == "different-value" and line["keys"] == ["k"] and line["generation"] == 4
        assert line["source"]["length"] == 12 and len(line["source"]["digest"]) == 16
        assert ("secret" in json.dumps(line)) is log_values


def test_counters_are_summed_over_shims_and_kept_per_generation(tmp_path):
    """Counters from several shims add up per generation; another generation is separate."""
    for shim_id, compared, divergent in (("a", 100, 1), ("b", 50, 0)):
        rec = DivergenceRecorder(tmp_path, shim_id)
        rec.start_generation(2, "mirroring")
        for _ in range(compared):
            rec.compared()
        for _ in range(divergent):
            rec.record(kind="type", command=b"get", keys=[], db=0, source_raw=b"+x\r\n", target_raw=b"*0\r\n")
        rec.start_generation(3, "reads-on-target")
        rec.compared()
        rec.flush()
    g2 = read_counters(tmp_path, 2)
    assert (g2["compared"], g2["divergent"], g2["by_kind"]["type"], g2["shims"]) == (150, 1, 1, 2)
    assert read_counters(tmp_path, 3)["compared"] == 2


def _ctx(tmp_path, phase, generation, **sections):
    pb = playbook.load(write_playbook(tmp_path / "m.yaml", "redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0", **sections))
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    st.phase, st.generation = phase, generation
    return GateContext(pb, store, st, now()), pb


def test_divergence_gate_uses_the_step_limit_of_the_phase_being_left(tmp_path):
    """The gate compares the rate with steps.mirror / steps.read_cutover max_divergence_rate and says so."""
    ctx, pb = _ctx(tmp_path, Phase.MIRRORING, 5, steps={"mirror": {"max_divergence_rate": 0.001}})
    assert not shim_gates.divergence(ctx).passed  # no shim reported anything
    rec = DivergenceRecorder(pb.state_path, "s")
    rec.start_generation(5, "mirroring")
    for _ in range(10_000):
        rec.compared()
    for _ in range(3):
        rec.record(kind="different-value", command=b"get", keys=[b"k"], db=0, source_raw=b"+a\r\n", target_raw=b"+b\r\n")
    rec.flush()
    r = shim_gates.divergence(ctx)
    assert r.passed and "0.03% (3 in 10,000 compared) <= 0.10%" in r.evidence
    ctx2, _ = _ctx(tmp_path, Phase.READS_ON_TARGET, 5)
    r2 = shim_gates.divergence(ctx2)
    assert not r2.passed and "> 0.00% (steps.read_cutover.max_divergence_rate)" in r2.evidence


def test_no_dirty_keys_gate_names_a_few_keys(tmp_path):
    """The gate fails with the count and a few key names while keys are dirty, and passes once cleared."""
    ctx, pb = _ctx(tmp_path, Phase.MIRRORING, 1)
    rec = DirtyRecorder(pb.state_path, "s")
    rec.add(0, [b"k%d" % i for i in range(8)], "target-down", b"set")
    rec.flush()
    r = shim_gates.no_dirty_keys(ctx)
    assert not r.passed and r.evidence.startswith("8 dirty key(s)") and "db0:k0" in r.evidence and ", ..." in r.evidence
    clear_dirty(pb.state_path)
    assert shim_gates.no_dirty_keys(ctx).passed


def _sync_report(state_dir, finished_at: str) -> str:
    rid = reports.new_id("sync")
    reports.write(state_dir, {"id": rid, "kind": "sync", "migration": "test-migration", "created_at": finished_at,
                              "verdict": "pass", "summary": "copied", "mode": "full", "complete": True,
                              "finished_at": finished_at}, "# sync", "<p>sync</p>")
    return rid


def test_divergence_gate_counts_from_the_end_of_a_full_sync_in_the_phase(tmp_path):
    """Divergences before a complete full sync finished (keys not yet copied) do not count; later ones do."""
    ctx, pb = _ctx(tmp_path, Phase.MIRRORING, 5)
    ctx.state.phase_since = iso(now() - timedelta(minutes=5))
    rec = DivergenceRecorder(pb.state_path, "s")
    rec.start_generation(5, "mirroring")
    rec.record(kind="missing-on-target", command=b"incr", keys=[b"k"], db=0, source_raw=b":5\r\n", target_raw=b":1\r\n")
    rec.compared()
    rid = _sync_report(pb.state_path, iso(now()))
    rec.sync_finished(rid)
    for _ in range(100):
        rec.compared()
    rec.flush()
    r = shim_gates.divergence(ctx)
    assert r.passed and f"since sync {rid} finished" in r.evidence and "(0 in 100 compared)" in r.evidence
    rec.record(kind="different-value", command=b"get", keys=[b"k"], db=0, source_raw=b"+a\r\n", target_raw=b"+b\r\n")
    rec.flush()
    assert not shim_gates.divergence(ctx).passed


def test_dirty_marks_older_than_a_full_sync_pass_are_covered_by_it(tmp_path):
    """Marks made before a complete full sync's pass started do not block; later ones do."""
    ctx, pb = _ctx(tmp_path, Phase.MIRRORING, 1)
    rec = DirtyRecorder(pb.state_path, "s")
    rec.add(0, [b"early"], "divergent-different-value", b"incr")
    rec.flush()
    time.sleep(0.01)
    rid = reports.new_id("sync")
    reports.write(pb.state_path, {"id": rid, "kind": "sync", "migration": "test-migration", "created_at": iso(now()),
                                  "verdict": "pass", "summary": "copied", "mode": "full", "complete": True,
                                  "pass_started_at": iso(now()), "finished_at": iso(now())}, "# s", "<p>s</p>")
    r = shim_gates.no_dirty_keys(ctx)
    assert r.passed and "1 older mark(s) covered by sync" in r.evidence
    time.sleep(0.01)
    rec.add(0, [b"late"], "target-down", b"set")
    rec.flush()
    r = shim_gates.no_dirty_keys(ctx)
    assert not r.passed and "db0:late" in r.evidence and "early" not in r.evidence.split(";")[0]


def test_the_shims_own_dirty_count_drops_marks_a_full_sync_covered(tmp_path):
    """The count a shim reports (and the write switch checks) follows the same sync rule as the gate."""
    rec = DirtyRecorder(tmp_path, "s")
    rec.add(0, [b"old"], "divergent-different-value", b"incr")
    cutoff = time.time()
    time.sleep(0.01)
    rec.add(0, [b"new"], "target-down", b"set")
    rec.covered_by_sync(cutoff)
    assert set(rec.keys) == {(0, b"new")}
    rec.flush()
    rec.refresh()
    assert set(rec.keys) == {(0, b"new")}


def test_divergences_on_keys_awaiting_repair_are_shown_not_counted(tmp_path):
    """A divergence flagged awaiting_repair is logged and named in the evidence, but not in the rate; others count."""
    ctx, pb = _ctx(tmp_path, Phase.MIRRORING, 5)
    rec = DivergenceRecorder(pb.state_path, "s")
    rec.start_generation(5, "mirroring")
    for _ in range(10):
        rec.compared()
    rec.record(kind="different-value", command=b"incr", keys=[b"k"], db=0, source_raw=b":3\r\n", target_raw=b":2\r\n",
               awaiting_repair=True)
    rec.flush()
    r = shim_gates.divergence(ctx)
    assert r.passed and "(0 in 10 compared)" in r.evidence and "1 on keys awaiting repair not counted" in r.evidence
    assert r.data["awaiting_repair"] == 1
    assert [line.get("awaiting_repair") for line in read_log(pb.state_path)] == [True]
    rec.record(kind="different-value", command=b"incr", keys=[b"j"], db=0, source_raw=b":3\r\n", target_raw=b":2\r\n")
    rec.flush()
    r = shim_gates.divergence(ctx)
    assert not r.passed and "(1 in 10 compared)" in r.evidence
