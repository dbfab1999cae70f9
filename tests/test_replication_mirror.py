"""Mirroring by replication: the strategy decision, attaching the target, its full sync, the gates,
``sync``/``check``/``status`` in this strategy, and the rollback to compatible, on real servers."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from migrator import command, compat, playbook, replication
from migrator.data import check as check_mod
from migrator.gates import evaluate, make_context
from migrator.phases import Phase
from migrator.state import StateStore
from tests.helpers import AckingShim, run_cli

PAIRS = [("redis-7.0", "valkey-9.1"), ("redis-7.0", "valkey-8.1"), ("redis-6.2", "valkey-9.1")]
NO_PSYNC = ['rename-command PSYNC ""', 'rename-command SYNC ""']


def _source(server_factory, label, **kw):
    src = server_factory(label, **kw)
    # Tests only: Redis 7.0 waits 5 s for more replicas before a diskless full sync.
    src.client().config_set("repl-diskless-sync-delay", "0")
    return src


def _pb(make_playbook, src, tgt, strategy="auto", steps=None, **replication_cfg):
    return playbook.load(make_playbook(src, tgt, shim={"ack_timeout": "5s"}, steps=steps or {},
                                       mirror={"strategy": strategy, "replication": replication_cfg}))


def _fill(client, n, prefix="k"):
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(f"{prefix}:{i}", f"v{i}" * 8)
        if i % 5 == 0:
            pipe.hset(f"h:{prefix}:{i}", mapping={"a": i, "b": "x" * 20})
    pipe.execute()


def _to_mirroring(pb):
    """compatible (compat runs for real) → mirroring, with a shim acknowledging each phase."""
    with AckingShim(pb.state_path, pb.name):
        command.advance(pb)
        return command.advance(pb)


def _gate(pb, name):
    store = StateStore(pb.state_path, pb.name)
    return evaluate((name,), make_context(pb, store, store.load()))[0]


def _wait_gate(pb, name, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        g = _gate(pb, name)
        if g.passed or time.monotonic() > deadline:
            return g
        time.sleep(0.1)


@pytest.mark.parametrize("labels", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_auto_replicates_a_few_thousand_keys_and_the_gate_shows_the_offsets(labels, server_factory, make_playbook):
    """auto picks replication and says why; mirroring attaches the target, whose own full sync copies the
    keys; replica_in_sync passes with 'lag 0 bytes at offset N'; writes made straight to the source reach it."""
    src = _source(server_factory, labels[0])
    tgt = server_factory(labels[1])
    _fill(src.client(), 3000)
    pb = _pb(make_playbook, src, tgt)
    res = compat.run(pb)
    chk = res.check("mirror.strategy")
    assert chk.status == compat.PASS and chk.data["strategy"] == "replication", chk.evidence
    assert "PSYNC present and allowed" in chk.evidence and "loads the source's RDB" in chk.evidence
    out = _to_mirroring(pb)
    store = StateStore(pb.state_path, pb.name)
    assert store.load().mirror.strategy == "replication"
    said = [e for e in store.read_journal() if e["event"] == "mirror-strategy"]
    assert said[-1]["strategy"] == "replication" and "the target now replicates the source" in said[-1]["evidence"]
    assert out.to_phase == Phase.MIRRORING
    g = _wait_gate(pb, "replica_in_sync")
    assert g.passed, g.evidence
    assert g.evidence.startswith("replica in sync, lag 0 bytes at offset ")
    assert tgt.client().dbsize() == src.client().dbsize() == 3600
    src.client().set("bypass", "written straight to the source")
    g = _wait_gate(pb, "replica_in_sync")
    assert g.passed and tgt.client().get("bypass") == b"written straight to the source"
    assert _gate(pb, "sync_complete").passed and "not needed" in _gate(pb, "sync_complete").evidence


def _to_compatible(pb):
    with AckingShim(pb.state_path, pb.name):
        return command.advance(pb)


def test_psync_renamed_away_makes_auto_dual_write_and_replication_fail(server_factory, make_playbook):
    """A source with PSYNC/SYNC renamed away: auto picks dual-write and says why; an explicit
    replication fails the pre-flight with the same reason, and the compatibility step is refused."""
    src = server_factory("redis-7.0", conf_lines=NO_PSYNC)
    tgt = server_factory("valkey-9.1")
    res = compat.run(_pb(make_playbook, src, tgt, "auto"))
    chk = res.check("mirror.strategy")
    assert chk.status == compat.PASS and chk.data["strategy"] == "dual-write", chk.evidence
    assert "auto chose dual-write: the source has no PSYNC/REPLCONF command" in chk.evidence \
        or "auto chose dual-write: the source has no PSYNC command" in chk.evidence
    pb = _pb(make_playbook, src, tgt, "replication")
    res = compat.run(pb)
    chk = res.check("mirror.strategy")
    assert chk.status == compat.FAIL and res.verdict == "fail"
    assert "mirror.strategy is replication but it cannot work: the source has no PSYNC" in chk.evidence
    out = run_cli("advance", "--yes", playbook=pb.path)
    assert out.returncode == 1 and "compatibility" in out.stderr, out.stdout + out.stderr


def test_the_decision_is_made_again_on_fresh_evidence_when_mirroring_begins(server_factory, make_playbook, tmp_path):
    """The pre-flight found PSYNC available; the source then restarted with PSYNC renamed away: entering
    mirroring notices it, auto mirrors by dual-write saying why, and an explicit replication is abandoned."""
    from migrator import servers

    port = servers.free_port()
    src = server_factory("redis-7.0", port=port)
    tgt = server_factory("valkey-9.1")
    pb = _pb(make_playbook, src, tgt, "auto")
    _to_compatible(pb)
    assert compat.run(pb, write_report=False).check("mirror.strategy").data["strategy"] == "replication"
    src.stop()
    src = server_factory("redis-7.0", port=port, conf_lines=NO_PSYNC)

    pb = _pb(make_playbook, src, tgt, "replication")
    with AckingShim(pb.state_path, pb.name), pytest.raises(command.RefusedError) as e:
        command.advance(pb)
    assert "abandoned, phase unchanged" in str(e.value) and "the source has no PSYNC" in str(e.value)
    assert StateStore(pb.state_path, pb.name).load().phase == Phase.COMPATIBLE
    assert tgt.client().info("replication")["role"] == "master"

    pb = _pb(make_playbook, src, tgt, "auto")
    with AckingShim(pb.state_path, pb.name):
        command.advance(pb)
    st = StateStore(pb.state_path, pb.name).load()
    assert st.phase == Phase.MIRRORING and st.mirror.strategy == "dual-write"
    assert "auto chose dual-write: the source has no PSYNC" in st.mirror.why
    assert _gate(pb, "replica_in_sync").evidence.startswith("not the strategy in use")


def test_a_non_empty_target_is_refused_unless_the_playbook_allows_replacing_it(server_factory, make_playbook):
    """REPLICAOF discards the target's data: entering mirroring is abandoned (phase unchanged, one clear
    line) on a target holding keys, and goes ahead with mirror.replication.replace_target_data: true."""
    src = _source(server_factory, "redis-7.0")
    tgt = server_factory("valkey-9.1")
    _fill(src.client(), 100)
    pb = _pb(make_playbook, src, tgt, steps={"compatibility": {"allow_non_empty_target": True}})
    _to_compatible(pb)
    tgt.client().set("precious", "1")
    with AckingShim(pb.state_path, pb.name):
        out = run_cli("advance", "--yes", playbook=pb.path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert ("abandoned, phase unchanged: start_mirror failed: the target holds 1 key(s) and REPLICAOF would discard "
            "them") in out.stderr
    assert StateStore(pb.state_path, pb.name).load().phase == Phase.COMPATIBLE
    assert tgt.client().get("precious") == b"1" and tgt.client().info("replication")["role"] == "master"

    pb = _pb(make_playbook, src, tgt, replace_target_data=True, steps={"compatibility": {"allow_non_empty_target": True}})
    with AckingShim(pb.state_path, pb.name):
        command.advance(pb)
    assert _wait_gate(pb, "replica_in_sync").passed
    assert tgt.client().get("precious") is None and tgt.client().dbsize() == 120
