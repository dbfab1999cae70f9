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


def _pb(make_playbook, src, tgt, strategy="auto", **replication_cfg):
    return playbook.load(make_playbook(src, tgt, shim={"ack_timeout": "5s"},
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
