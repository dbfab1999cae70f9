"""The shim's view of each side's health: only the side itself failing makes it down for everyone."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migrator import registry
from migrator.phases import Phase
from migrator.shim import list_dirty
from tests.test_shim_e2e import wait_for


def _one_side_refuses_readonly(source, target) -> bool:
    """Whether READONLY is accepted by exactly one of the two servers (cluster mode off on both)."""
    answers = []
    for s in (source, target):
        try:
            s.client().execute_command("READONLY")
            answers.append(True)
        except redis.ResponseError:
            answers.append(False)
    return answers[0] != answers[1]


def test_readonly_refused_by_one_side_does_not_fail_that_side_for_other_connections(server_factory, envs):
    """READONLY accepted by one side and refused by the other resets nothing for other clients: their SETs reach both sides, 0 dirty marks."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    env = envs(source, target)
    env.set_phase(Phase.MIRRORING)
    # The premise, checked on the servers themselves: one side accepts READONLY, the other refuses.
    assert _one_side_refuses_readonly(source, target)
    c = env.client(retry=Retry(NoBackoff(), 0))
    try:
        c.execute_command("READONLY")
    except redis.ResponseError:
        pass  # the source (the answering side) refused it: the client sees what Redis says
    for i in range(20):
        c.set(f"same:{i}", i)  # the READONLY connection keeps working too
    sets = 0
    for i in range(200):
        fresh = env.client(retry=Retry(NoBackoff(), 0))
        fresh.set(f"k:{i}", i)
        fresh.close()
        sets += 1
    # Reconnecting the READONLY connection's shadow must not replay what that side refused.
    c.connection_pool.disconnect()
    c.set("after-reconnect", 1)
    env.flush()
    st = env.stats()
    assert sum(st.dirty_marked.values()) == 0, dict(st.dirty_marked)
    assert env.thread.call(lambda: env.thread.shim.health[1].failures) == 0
    assert env.thread.call(lambda: env.thread.shim.health[0].failures) == 0
    tc = target.client()
    assert sum(tc.exists(f"k:{i}") for i in range(200)) == sets
    assert sum(tc.exists(f"same:{i}") for i in range(20)) == 20
    assert tc.get("after-reconnect") == b"1"


def test_stopped_target_in_reads_on_target_bounds_every_wait_by_shadow_timeout(server_factory, envs):
    """With the target frozen (SIGSTOP) after the read cutover, an INCR returns within about shadow_timeout and reads are answered by the source."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    env = envs(source, target, shim={"shadow_timeout": "500ms"})
    env.set_phase(Phase.MIRRORING)
    c = env.client(retry=Retry(NoBackoff(), 0))
    c.set("n", 5)
    c.set("r", "x")
    env.set_phase(Phase.READS_ON_TARGET)
    assert c.get("r") == b"x"
    os.kill(target.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert c.incr("n") == 6  # the source answers; the target's copy times out
        incr_s = time.monotonic() - t0
        t0 = time.monotonic()
        assert c.get("n") == b"6"  # the source answers a read the target does not
        read_s = time.monotonic() - t0
        fresh = env.client(retry=Retry(NoBackoff(), 0))
        t0 = time.monotonic()
        assert fresh.get("r") == b"x"
        fresh_s = time.monotonic() - t0
        print(f"INCR {incr_s:.3f} s, GET {read_s:.3f} s, GET on a fresh connection {fresh_s:.3f} s")
        assert incr_s < 1.5 and read_s < 1.5 and fresh_s < 1.5, (incr_s, read_s, fresh_s)
    finally:
        os.kill(target.proc.pid, signal.SIGCONT)
    # The INCR's target copy is on record as not applied.
    env.flush()
    assert any(d.key == b"n" for d in list_dirty(env.pb.state_path))


@pytest.mark.parametrize("phase", [Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET])
def test_target_restarted_empty_marks_its_keyspace_dirty_and_blocks_the_gate(server_factory, envs, phase):
    """A target killed -9 and restarted empty on the same port in a two-sided phase is noticed by its new run_id: every database is marked dirty with a reason naming both run_ids, and no_dirty_keys refuses."""
    import json

    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    env = envs(source, target)
    env.set_phase(Phase.MIRRORING)
    if phase is not Phase.MIRRORING:
        env.set_phase(phase)
    c = env.client()
    for i in range(100):
        c.set(f"k:{i}", i)
    env.flush()
    assert list_dirty(env.pb.state_path) == []
    assert env.gate("no_dirty_keys").passed
    old_run_id = target.client().info("server")["run_id"]
    target.proc.kill()
    target.proc.wait()
    restarted = server_factory("valkey-9.1", port=target.port)  # empty: persistence is off
    new_run_id = restarted.client().info("server")["run_id"]
    assert new_run_id != old_run_id and restarted.client().dbsize() == 0
    # Traffic through the shim: its target connections reconnect to the new process.
    for i in range(100, 120):
        try:
            c.set(f"k:{i}", i)
        except redis.ConnectionError:
            pass  # (a client that retries sees nothing; the shim noticed either way)
    wait_for(lambda: any(d.key is None for d in list_dirty(env.pb.state_path)) or env.flush(), timeout=10,
             what="a whole-database dirty mark")
    wide = [d for d in list_dirty(env.pb.state_path) if d.key is None]
    assert wide and wide[0].db == 0
    assert old_run_id in wide[0].reason and new_run_id in wide[0].reason and "target-restarted" in wide[0].reason
    gate = env.gate("no_dirty_keys")
    assert not gate.passed and "target-restarted" in gate.evidence
    status = json.loads(env.admin("/status"))
    restarts = status["sides"]["target"]["restarts"]
    assert restarts and restarts[-1]["old_run_id"] == old_run_id and restarts[-1]["new_run_id"] == new_run_id
    assert status["sides"]["target"]["run_id"] == new_run_id
    assert b'migrator_shim_side_restarts_total{side="target"} 1.0' in env.admin("/metrics")
    records = registry.read_all(env.pb.state_path)
    assert any(e["new_run_id"] == new_run_id for r in records for e in r.counters.get("side_restarts", []))
