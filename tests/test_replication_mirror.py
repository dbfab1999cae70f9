"""Mirroring by replication: the strategy decision, attaching the target, its full sync, the gates,
``sync``/``check``/``status`` in this strategy, and the rollback to compatible, on real servers."""
from __future__ import annotations

import contextlib
import json
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


def _pb(make_playbook, src, tgt, strategy="auto", steps=None, sync=None, **replication_cfg):
    return playbook.load(make_playbook(src, tgt, shim={"ack_timeout": "5s"}, steps=steps or {}, sync=sync or {},
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


def _all_pass(names, ctx):
    from migrator.gates import GateResult

    return [GateResult(n, True, "not evaluated (test)") for n in names]


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
    assert said[-1]["strategy"] == "replication" and said[-1]["evidence"].startswith("replication: PSYNC present")
    attached = [e for e in store.read_journal() if e["event"] == "replica-attached"]
    assert len(attached) == 1 and "the target now replicates the source" in attached[0]["evidence"]
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
    with AckingShim(pb.state_path, pb.name):
        with pytest.raises(command.GatesFailed) as e:
            command.advance(pb)
        gate = next(g for g in e.value.results if g.name == "mirror_strategy")
        assert not gate.passed and "the source has no PSYNC" in gate.evidence, gate.evidence
        # The step's own re-check, should the source change between the gates and the attach:
        with pytest.raises(command.RefusedError) as e:
            command.advance(pb, evaluate=_all_pass)
    assert "abandoned, phase unchanged: start_mirror failed" in str(e.value) and "the source has no PSYNC" in str(e.value)
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
        assert "gate(s) failed: mirror_strategy" in out.stderr, out.stdout + out.stderr
        assert "the target holds 1 key(s) and REPLICAOF would discard them" in out.stdout + out.stderr
        with pytest.raises(command.RefusedError) as e:
            command.advance(pb, evaluate=_all_pass)
    assert ("abandoned, phase unchanged: start_mirror failed: the target holds 1 key(s) and REPLICAOF would discard "
            "them") in str(e.value)
    assert StateStore(pb.state_path, pb.name).load().phase == Phase.COMPATIBLE
    assert tgt.client().get("precious") == b"1" and tgt.client().info("replication")["role"] == "master"

    pb = _pb(make_playbook, src, tgt, replace_target_data=True, steps={"compatibility": {"allow_non_empty_target": True}})
    with AckingShim(pb.state_path, pb.name):
        command.advance(pb)
    assert _wait_gate(pb, "replica_in_sync").passed
    assert tgt.client().get("precious") is None and tgt.client().dbsize() == 120


def test_a_stalled_full_sync_and_one_past_its_timeout_are_reported(server_factory, make_playbook):
    """A full sync that makes no progress (the source's RDB child is slowed to 5 s a key) fails
    replica_in_sync as stalled after mirror.replication.stall_timeout, then as past sync_timeout;
    `migrator sync --wait` stops on it with exit 1."""
    src = _source(server_factory, "redis-7.0")
    tgt = server_factory("valkey-9.1")
    _fill(src.client(), 20)
    pb = _pb(make_playbook, src, tgt, stall_timeout="1s", sync_timeout="8s")
    _to_compatible(pb)
    src.client().config_set("rdb-key-save-delay", "5000000")  # µs per key, in the RDB child only
    with AckingShim(pb.state_path, pb.name):
        command.advance(pb)
    g = _gate(pb, "replica_in_sync")
    assert not g.passed and ("initial full sync in progress" in g.evidence or "link down" in g.evidence), g.evidence
    if g.data["since_attach_s"] < 0.8:  # (a loaded machine may take longer to get here)
        assert g.data["problem"] is None, g.evidence
    time.sleep(2.5)
    g = _gate(pb, "replica_in_sync")
    # (sync_timeout is 8 s so that a loaded machine still reads "stalled" here, not "timed-out")
    assert not g.passed and g.data["problem"] == "stalled", g.evidence
    assert "no progress for 1 s (mirror.replication.stall_timeout)" in g.evidence
    out = run_cli("sync", "--wait", playbook=pb.path)
    # (STALLED, or TIMED-OUT when a loaded machine starts the CLI late: either ends the wait)
    assert out.returncode == 1 and out.stdout.startswith(("STALLED: initial full sync in progress",
                                                           "TIMED-OUT: initial full sync in progress")), out.stdout
    assert "nothing copied" in out.stdout
    time.sleep(max(0.0, 8.5 - g.data["since_attach_s"]))
    g = _gate(pb, "replica_in_sync")
    assert not g.passed and g.data["problem"] == "timed-out" and "past mirror.replication.sync_timeout (8 s)" in g.evidence


def test_a_target_that_cannot_reach_the_source_is_reported_stalled(server_factory, make_playbook):
    """mirror.replication.source_address naming a port where nothing listens: the link never comes up,
    and replica_in_sync says the link has been down since REPLICAOF, stalled after stall_timeout."""
    from migrator import servers

    src = _source(server_factory, "redis-7.0")
    tgt = server_factory("valkey-8.1")
    pb = _pb(make_playbook, src, tgt, source_address=f"127.0.0.1:{servers.free_port()}", stall_timeout="1s")
    _to_compatible(pb)
    with AckingShim(pb.state_path, pb.name):
        command.advance(pb)
    time.sleep(1.5)
    g = _gate(pb, "replica_in_sync")
    assert not g.passed and g.data["problem"] == "stalled" and g.evidence.startswith("replication link down for "), g.evidence


class DelayRelay:
    """A TCP relay on loopback that forwards each byte from the source ``delay`` seconds late: the
    target replicates through it (mirror.replication.source_address), so its lag is real and steady."""

    def __init__(self, port: int, delay: float) -> None:
        import socket

        self.port, self.delay = port, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        self.socks = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while not self.closed.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.port))
            self.socks += [down, up]
            threading.Thread(target=self._pump, args=(down, up, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, self.delay), daemon=True).start()

    def _pump(self, src, dst, delay):
        import queue

        q: queue.Queue = queue.Queue()

        def send():
            while True:
                due, data = q.get()
                if data is None:
                    return
                time.sleep(max(0.0, due - time.monotonic()))
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=send, daemon=True).start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                q.put((0, None))
                return
            q.put((time.monotonic() + delay, data))

    def close(self):
        self.closed.set()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


def _writer(client, stop, acked):
    i = 0
    while not stop.is_set():
        client.set(f"w:{i % 500}", i)
        client.incr("w:counter")
        acked.append(i)
        i += 1


def test_check_is_clean_under_a_running_writer_and_sync_and_status_report_the_lag(server_factory, make_playbook, request):
    """With a writer hammering the source (so the replica always lags a little), `check --full` reports
    no mismatch (lag is waited out, never counted); `sync` copies nothing and exits 0 once in sync;
    `status` shows the strategy, the link and both offsets."""
    src = _source(server_factory, "redis-7.0")
    tgt = server_factory("valkey-9.1")
    _fill(src.client(), 2000)
    relay = DelayRelay(src.port, 0.3)  # the replica trails the source by 300 ms
    request.addfinalizer(relay.close)
    pb = _pb(make_playbook, src, tgt, source_address=relay.address)
    _to_mirroring(pb)
    assert _wait_gate(pb, "replica_in_sync").passed
    out = run_cli("sync", playbook=pb.path)
    assert out.returncode == 0 and out.stdout.startswith("IN SYNC: replica in sync, lag "), out.stdout + out.stderr
    stop, acked = threading.Event(), []
    w = threading.Thread(target=_writer, args=(src.client(), stop, acked))
    w.start()
    try:
        time.sleep(0.3)
        src.client().mset({f"late:{i}": "reaches the replica 300 ms later" for i in range(50)})
        res = check_mod.run(pb, full=True, rounds=1, interval=0.0)
        st = command.status(pb)
    finally:
        stop.set()
        w.join()
    assert len(acked) > 500
    assert res.mismatches == [] and res.checked >= 2400, res.summary
    # Keys written within the lag differed at first and were equal once the replica had caught up.
    assert res.transient + res.in_flux > 0, res.summary
    r = st["replication"]
    assert r["strategy"] == "replication" and r["link"] == "up" and r["source_offset"] > 0 and r["target_offset"] > 0
    out = run_cli("status", playbook=pb.path)
    assert "Mirror strategy: replication" in out.stdout and "link up" in out.stdout, out.stdout
    assert _wait_gate(pb, "replica_in_sync").passed
    assert tgt.client().get("w:counter") == src.client().get("w:counter") == str(len(acked)).encode()
    out = run_cli("check", "--repair", playbook=pb.path)  # nothing may be copied onto a read-only replica
    assert out.returncode == 1 and "the target replicates the source (mirror strategy replication)" in out.stderr


def test_rollback_to_compatible_detaches_the_target_which_keeps_its_data(server_factory, make_playbook):
    """Rolling back mirroring → compatible runs REPLICAOF NO ONE on the target (it keeps the keys it
    has) and forgets the strategy; advancing again re-attaches it (replace_target_data, as it holds keys)."""
    src = _source(server_factory, "redis-6.2")
    tgt = server_factory("valkey-9.1")
    _fill(src.client(), 500)
    pb = _pb(make_playbook, src, tgt)
    _to_mirroring(pb)
    assert _wait_gate(pb, "replica_in_sync").passed
    with AckingShim(pb.state_path, pb.name):
        r = command.rollback(pb)
    assert r.to_phase == Phase.COMPATIBLE
    assert "stopped replicating" in r.actions[-1].evidence and "keeps its data" in r.actions[-1].evidence
    info = tgt.client().info("replication")
    assert info["role"] == "master" and tgt.client().dbsize() == 600
    st = StateStore(pb.state_path, pb.name).load()
    assert st.mirror is None
    pb = _pb(make_playbook, src, tgt, replace_target_data=True)
    with AckingShim(pb.state_path, pb.name):
        command.advance(pb)
    src.client().set("after", "re-attach")
    assert _wait_gate(pb, "replica_in_sync").passed and tgt.client().get("after") == b"re-attach"


def test_compat_accepts_a_target_replicating_this_source(server_factory, make_playbook):
    """While the target replicates the source (mirroring), compat's topology and keyspace checks pass
    and say so, where a target replicating another server would fail."""
    src = _source(server_factory, "redis-7.0")
    tgt = server_factory("valkey-9.1")
    _fill(src.client(), 50)
    pb = _pb(make_playbook, src, tgt)
    _to_mirroring(pb)
    assert _wait_gate(pb, "replica_in_sync").passed
    res = compat.run(pb, write_report=False)
    topo, keys = res.check("topology"), res.check("keyspace")
    assert topo.status == compat.PASS and "the target replicates this source" in topo.evidence, topo.evidence
    assert keys.status == compat.PASS and "replicated from the source" in keys.evidence, keys.evidence
    res = compat.run(_pb(make_playbook, src, tgt, "dual-write"), write_report=False)
    assert res.check("topology").status == compat.FAIL


def test_advance_and_rollback_killed_at_each_point_finish_when_run_again(server_factory, make_playbook):
    """kill -9 of `advance` (compatible → mirroring) at each crash point of attaching, and of `rollback`
    (mirroring → compatible) after the phase is written and after its actions: the state stays valid, and
    running the same command again finishes, sending REPLICAOF once per attach."""
    src = _source(server_factory, "redis-7.0")
    tgt = server_factory("valkey-9.1")
    _fill(src.client(), 200)
    pb = _pb(make_playbook, src, tgt, replace_target_data=True)
    _to_compatible(pb)
    store = StateStore(pb.state_path, pb.name)
    with AckingShim(pb.state_path, pb.name):
        for point, rollback_crash in (("after-attach", None), ("after-prepare", "after-state"),
                                      ("after-state", "after-actions")):
            if store.load().phase == Phase.MIRRORING:
                command.rollback(pb)
            out = run_cli("advance", "--yes", playbook=pb.path, env={"MIGRATOR_CRASH_AT": point})
            assert out.returncode == -9, (point, out.stdout + out.stderr)
            st = store.load()
            assert st.phase == (Phase.MIRRORING if point == "after-state" else Phase.COMPATIBLE), point
            assert tgt.client().info("replication")["role"] == "slave", point  # attached before the crash
            out = run_cli("advance", "--yes", playbook=pb.path)
            assert out.returncode == 0, (point, out.stdout + out.stderr)
            st = store.load()
            assert st.phase == Phase.MIRRORING and st.transition is None and st.mirror.strategy == "replication", point
            assert _wait_gate(pb, "replica_in_sync").passed, point
            if rollback_crash:
                out = run_cli("rollback", "--yes", playbook=pb.path, env={"MIGRATOR_CRASH_AT": rollback_crash})
                assert out.returncode == -9, (rollback_crash, out.stdout + out.stderr)
                assert store.load().phase == Phase.COMPATIBLE
                out = run_cli("rollback", "--yes", playbook=pb.path)
                assert out.returncode == 0, (rollback_crash, out.stdout + out.stderr)
                st = store.load()
                assert st.phase == Phase.COMPATIBLE and st.transition is None and st.mirror is None, rollback_crash
                assert tgt.client().info("replication")["role"] == "master", rollback_crash
    attached = [e for e in store.read_journal() if e["event"] == "replica-attached"]
    assert len(attached) == 3  # one per crashed advance: each re-run found the target already attached
    assert tgt.client().dbsize() == 240


@pytest.mark.parametrize("labels", [("redis-7.0", "valkey-8.1"), ("redis-6.2", "valkey-9.1")],
                         ids=lambda p: f"{p[0]}->{p[1]}")
def test_the_source_users_acl_decides_and_the_target_authenticates_as_that_user(labels, server_factory, make_playbook):
    """A source user denied PSYNC by its ACL (ACL DRYRUN on 7.0, its rules on 6.2) makes auto pick dual-write
    saying so; a user allowed it gets replication, and the target authenticates as that user and password
    (masteruser/masterauth) and comes in sync."""
    acl = ["user app on >app-secret ~* &* +@all -psync -sync", "user mig on >mig-secret ~* &* +@all",
           "user blind on >blind-secret ~* &* +@all -acl"]
    src = server_factory(labels[0], conf_lines=acl)
    src.client().config_set("repl-diskless-sync-delay", "0")
    tgt = server_factory(labels[1], conf_lines=acl)  # the same users (compat's ACL check)
    _fill(src.client(), 100)
    base = f"127.0.0.1:{src.port}/0"
    denied = _pb(make_playbook, f"redis://app:app-secret@{base}", tgt)
    chk = compat.run(denied, write_report=False).check("mirror.strategy")
    assert chk.data["strategy"] == "dual-write", chk.evidence
    assert "the source's ACL denies" in chk.evidence and "'app'" in chk.evidence, chk.evidence
    # A user that may not read ACLs: auto does not bet on replication; an explicit replication warns and stands.
    blind = f"redis://blind:blind-secret@{base}"
    chk = compat.run(_pb(make_playbook, blind, tgt), write_report=False).check("mirror.strategy")
    assert chk.data["strategy"] == "dual-write" and "could not confirm the source allows PSYNC" in chk.evidence, chk.evidence
    chk = compat.run(_pb(make_playbook, blind, tgt, "replication"), write_report=False).check("mirror.strategy")
    assert chk.status == compat.WARN and chk.data["strategy"] == "replication" and chk.data["unconfirmed"], chk.evidence
    pb = _pb(make_playbook, f"redis://mig:mig-secret@{base}", tgt)
    _to_mirroring(pb)
    st = StateStore(pb.state_path, pb.name).load()
    assert st.mirror.strategy == "replication" and "for user 'mig'" in st.mirror.why, st.mirror.why
    g = _wait_gate(pb, "replica_in_sync")
    assert g.passed and tgt.client().dbsize() == 120, g.evidence
    assert tgt.client().config_get("masteruser")["masteruser"] == "mig"


def test_a_target_that_restarted_empty_is_reported_and_reattached_by_rollback_and_advance(server_factory, make_playbook):
    """The target restarts without persistence (empty, no longer a replica): replica_in_sync fails as
    not-replicating and `status` raises it as an alert; rolling back to compatible and advancing again
    re-attaches it, and its full sync brings every key back."""
    from migrator import servers

    src = _source(server_factory, "redis-7.0")
    port = servers.free_port()
    tgt = server_factory("valkey-9.1", port=port)
    _fill(src.client(), 300)
    pb = _pb(make_playbook, src, tgt)
    _to_mirroring(pb)
    assert _wait_gate(pb, "replica_in_sync").passed
    tgt.stop()
    tgt = server_factory("valkey-9.1", port=port)
    g = _gate(pb, "replica_in_sync")
    assert not g.passed and g.data["problem"] == "not-replicating" and "is not a replica" in g.evidence, g.evidence
    assert any(a.startswith("replication: the target is not a replica") for a in command.status(pb)["alerts"])
    with AckingShim(pb.state_path, pb.name):
        r = command.rollback(pb)
        assert "already detached" in r.actions[-1].evidence
        command.advance(pb)
    assert _wait_gate(pb, "replica_in_sync").passed and tgt.client().dbsize() == 360


def test_a_subset_of_the_keys_is_never_mirrored_by_replication(server_factory, make_playbook):
    """sync.exclude (or sync.databases leaving a database with keys out) selects part of the keyspace, which a
    replica cannot honour: auto picks dual-write saying so, and an explicit replication fails the pre-flight."""
    src = server_factory("redis-7.0")
    tgt = server_factory("valkey-9.1")
    src.client().set("keep", "1")
    src.client(db=3).set("other", "1")
    chk = compat.run(_pb(make_playbook, src, tgt, sync={"exclude": ["tmp:*"]}), write_report=False).check("mirror.strategy")
    assert chk.data["strategy"] == "dual-write" and "sync.include/exclude select a subset" in chk.evidence, chk.evidence
    res = compat.run(_pb(make_playbook, src, tgt, "replication", sync={"databases": [0]}), write_report=False)
    chk = res.check("mirror.strategy")
    assert chk.status == compat.FAIL and "sync.databases leaves out database(s) 3" in chk.evidence, chk.evidence


def test_a_full_sync_that_keeps_restarting_is_reported_looping(server_factory, make_playbook):
    """Writes outgrow the source's replica output buffer during every full sync (256 kB limit, 10 MB/s of
    writes, a slowed RDB child), so each sync is cut and starts over: replica_in_sync names it looping,
    counting the source's full syncs since the attach."""
    src = _source(server_factory, "redis-7.0")
    tgt = server_factory("valkey-9.1")
    _fill(src.client(), 10)
    pb = _pb(make_playbook, src, tgt)
    _to_compatible(pb)
    src.client().config_set("client-output-buffer-limit", "replica 256kb 256kb 0")
    src.client().config_set("rdb-key-save-delay", "50000")
    stop = threading.Event()

    def flood():
        c = src.client()
        i = 0
        while not stop.is_set():
            c.set(f"big:{i % 10}", "y" * 100_000)
            i += 1
            time.sleep(0.01)

    w = threading.Thread(target=flood)
    w.start()
    try:
        with AckingShim(pb.state_path, pb.name):
            command.advance(pb)
        deadline = time.monotonic() + 15
        while (g := _gate(pb, "replica_in_sync")).data.get("problem") != "looping" and time.monotonic() < deadline:
            time.sleep(0.25)
    finally:
        stop.set()
        w.join()
    assert not g.passed and g.data["problem"] == "looping", g.evidence
    assert g.data["full_syncs_since_attach"] >= 3 and "the full sync keeps restarting" in g.evidence, g.evidence


def test_a_reverted_mirror_step_leaves_the_target_attached_until_rollback_to_planned(server_factory, make_playbook):
    """A shim that never acknowledges mirroring makes the step revert to compatible after the target was
    attached: the target stays a replica (harmless, the source alone takes writes; advancing again reuses it),
    and rolling back to planned detaches it."""
    src = _source(server_factory, "redis-7.0")
    tgt = server_factory("valkey-9.1")
    _fill(src.client(), 50)
    pb = playbook.load(make_playbook(src, tgt, shim={"ack_timeout": "1s"}, mirror={"strategy": "auto"}))
    store = StateStore(pb.state_path, pb.name)
    with AckingShim(pb.state_path, pb.name) as shim:
        command.advance(pb)
        shim.stuck = True
        with pytest.raises(command.RefusedError, match="reverted to compatible"):
            command.advance(pb)
        shim.stuck = False
        assert store.load().phase == Phase.COMPATIBLE
        assert tgt.client().info("replication")["role"] == "slave"
        r = command.rollback(pb)
    assert r.to_phase == Phase.PLANNED and "stopped replicating" in r.actions[-1].evidence
    assert tgt.client().info("replication")["role"] == "master" and store.load().mirror is None


def test_plan_names_the_attach_it_would_run_before_recording_mirroring(server_factory, make_playbook):
    """`plan` before the mirror step lists start_mirror (the REPLICAOF) among the actions run before the
    phase is recorded, in text and JSON."""
    src = _source(server_factory, "redis-7.0")
    tgt = server_factory("valkey-9.1")
    pb = _pb(make_playbook, src, tgt)
    _to_compatible(pb)
    out = run_cli("plan", playbook=pb.path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "would take before recording mirroring" in out.stdout
    assert "start_mirror: Decide the mirror strategy on fresh evidence" in out.stdout
    data = json.loads(run_cli("plan", "--output", "json", playbook=pb.path).stdout)
    assert [a["action"] for a in data["prepare"]] == ["start_mirror"]
    assert command.plan(pb, probe=False).prepare == ["start_mirror"]
