"""The latency and error-rate gates: measured by a real shim process between real servers, over the phase.

The shim runs in its own process, as in production: a shim thread inside the test process
shares the GIL with the test's client, and a shadow reply arriving while the client runs waits
a switch interval (5 ms) to be read, which would be measured as target latency.
"""

from __future__ import annotations

import threading

import pytest
import redis

from migrator import playbook, registry
from migrator.demo import ShimProcess
from migrator.gates import GateContext
from migrator.phases import STEPS, Phase
from migrator.shim import gates as shim_gates
from migrator.shim.metrics import Histogram
from migrator.state import StateStore, now
from tests.helpers import DelayingForwarder, wait_for

SETS, GETS = 150, 150


class ProcEnv:
    """``migrator shim`` in a child process in front of two servers; phases set through the state, gates read."""

    def __init__(self, pb_path, log) -> None:
        self.pb = playbook.load(pb_path)
        self.store = StateStore(self.pb.state_path, self.pb.name)
        self.proc = ShimProcess(pb_path, log)
        self.proc.wait_registered(self.pb.state_path)
        self.clients: list[redis.Redis] = []

    def client(self) -> redis.Redis:
        host, port = self.pb.shim.listen.rsplit(":", 1)
        c = redis.Redis(host=host, port=int(port), socket_timeout=10)
        self.clients.append(c)
        return c

    def set_phase(self, phase: Phase) -> None:
        st = self.store.load()
        st.phase, st.generation, st.phase_since = phase, st.generation + 1, now().isoformat()
        self.store.save(st)
        ack = registry.await_ack(self.pb.state_path, st.generation, 10)
        assert ack.ok, ack.evidence()

    def gate(self, name: str):
        return shim_gates.__dict__[name](GateContext(self.pb, self.store, self.store.load(), now()))

    def counted(self, name: str, n: int):
        """The gate's result once the shim's heartbeat has persisted at least ``n`` commands."""
        box = []

        def enough() -> bool:
            r = self.gate(name)
            box[:] = [r]
            d = r.data
            return (d.get("commands") if name == "error_rate" else d["target"]["count"]) >= n

        wait_for(enough, timeout=10, what=f"{n} commands counted for {name}")
        return box[0]

    def close(self) -> None:
        for c in self.clients:
            c.close()
        assert self.proc.stop() == 0


@pytest.fixture
def proc_env(make_playbook, tmp_path):
    made: list[ProcEnv] = []

    def make(source, target, **sections) -> ProcEnv:
        e = ProcEnv(make_playbook(source, target, **sections), tmp_path / f"shim{len(made)}.log")
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def _traffic(env, prefix: str = "k", sets: int = SETS, gets: int = GETS) -> int:
    c = env.client()
    for i in range(sets):
        c.set(f"{prefix}{i}", i)
    for i in range(gets):
        c.get(f"{prefix}{i}")
    return sets + gets


@pytest.fixture
def forwarder():
    made: list[DelayingForwarder] = []

    def make(server, delay: float = 0.005) -> DelayingForwarder:
        f = DelayingForwarder(server.port, delay)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def test_the_gates_guard_both_cutovers():
    """The read cutover and the write cutover both require the latency and error_rate gates."""
    by_name = {s.name: s for s in STEPS}
    for name in ("read_cutover", "write_cutover"):
        assert {"latency", "error_rate"} <= set(by_name[name].gates)


def test_quantiles_are_interpolated_inside_their_bucket():
    """The gate's quantiles interpolate inside a bucket: 100 replies at 3 ms give a p50 between 2.5 and 5 ms, not 5 ms."""
    h = Histogram()
    h.observe(0.003, 100)
    assert 0.0025 < h.estimate(0.5) < 0.005 and h.estimate(0.5) < h.estimate(0.99) <= 0.005
    h.observe(10.0)  # beyond the last bucket
    assert h.estimate(0.999) == float("inf") and Histogram().estimate(0.5) is None


def test_a_healthy_pair_passes_both_gates_in_both_phases(server_factory, proc_env):
    """Through the shim to two healthy local servers, latency and error_rate pass in mirroring and reads-on-target,
    with both sides' p50/p99 and the command counts in the evidence."""
    # A floor of 10 ms: on a loaded 2-core machine three of 300 loopback replies taking 2 ms is a
    # scheduling hiccup, not a slow target (CI failed once on p99 2.27 ms vs 0.23 ms). The gate's
    # failing side, with the default 1 ms floor, is the next tests'.
    env = proc_env(server_factory("redis-7.0"), server_factory("valkey-9.1"),
                   steps={"mirror": {"min_duration": "0s", "min_compared": 200, "latency_floor_ms": 10},
                          "read_cutover": {"min_duration": "0s", "min_compared": 200, "latency_floor_ms": 10}})
    env.set_phase(Phase.MIRRORING)
    few = env.gate("latency")
    assert not few.passed and "only 0 commands answered by both sides" in few.evidence
    assert "steps.mirror.min_compared" in few.evidence
    n = _traffic(env)
    lat, err = env.counted("latency", n), env.counted("error_rate", n)
    assert lat.passed, lat.evidence
    assert err.passed, err.evidence
    # every SET and every (sampled, compare_reads 1.0) GET went to both sides
    assert lat.data["source"]["count"] == lat.data["target"]["count"] >= SETS + GETS
    assert "p50 target" in lat.evidence and "p99 target" in lat.evidence and "vs source" in lat.evidence
    assert "target error rate 0.000%" in err.evidence and err.data["commands"] >= SETS + GETS
    env.set_phase(Phase.READS_ON_TARGET)
    assert not env.gate("latency").passed  # a new phase: measured anew
    n = _traffic(env, "r")
    lat, err = env.counted("latency", n), env.counted("error_rate", n)
    assert lat.passed and "steps.read_cutover.max_latency_ratio" in lat.evidence, lat.evidence
    assert err.passed and "steps.read_cutover.max_error_rate" in err.evidence, err.evidence


def test_a_slow_target_fails_the_latency_gate(server_factory, proc_env, forwarder):
    """A target 5 ms per chunk slower (a delaying forwarder in front of it) fails the latency gate in mirroring,
    as the shadow, and in reads-on-target; its p50 is shown at 5 ms or more against a sub-millisecond source."""
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    slow = forwarder(tgt)
    defaults = {"min_duration": "0s", "min_compared": 0}  # (and the default latency_floor_ms, 1 ms)
    env = proc_env(src, slow.url, steps={"mirror": defaults, "read_cutover": defaults})
    env.set_phase(Phase.MIRRORING)
    lat = env.counted("latency", _traffic(env, sets=100, gets=100))
    assert not lat.passed, lat.evidence
    assert "the target is slower than the source allows" in lat.evidence and "steps.mirror.max_latency_ratio" in lat.evidence
    assert lat.data["target"]["p50"] >= 0.005 and lat.data["source"]["p50"] < 0.001, lat.data
    assert lat.data["target"]["count"] == lat.data["source"]["count"] >= 200
    assert env.gate("error_rate").passed  # slow is not wrong
    env.set_phase(Phase.READS_ON_TARGET)
    lat = env.counted("latency", _traffic(env, "r", sets=40, gets=40))
    assert not lat.passed and lat.data["target"]["p50"] >= 0.005, lat.evidence


def test_a_target_refusing_a_command_fails_the_error_gate(server_factory, proc_env):
    """A target whose ACL refuses INCRBY, which the source accepts, fails error_rate naming INCRBY and the rate;
    latency still passes."""
    src = server_factory("redis-7.0")
    tgt = server_factory("valkey-9.1", conf_lines=["user default on nopass ~* &* +@all -incrby"])
    env = proc_env(src, tgt)
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    for i in range(100):
        c.set(f"k{i}", i)
    for i in range(10):
        assert c.incrby(f"n{i}", 2) == 2  # the client hears the source
    err = env.counted("error_rate", 110)
    assert not err.passed, err.evidence
    assert err.data["target_errors"] == 10 and 110 <= err.data["commands"] <= 112  # (+ the client's handshake)
    assert "target error rate 9.0" in err.evidence and "INCRBY 10" in err.evidence
    assert "> 0.100% (steps.mirror.max_error_rate)" in err.evidence
    assert env.gate("latency").passed


def test_a_command_the_target_lacks_counts_as_its_error(server_factory, proc_env):
    """A command renamed away on the target is not sent to it, and counts against the error gate as one it refused."""
    src = server_factory("redis-7.0")
    tgt = server_factory("valkey-9.1", conf_lines=['rename-command INCRBY ""'])
    env = proc_env(src, tgt, steps={"mirror": {"min_duration": "0s", "min_compared": 0, "max_error_rate": 0.05}})
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    for i in range(50):
        c.set(f"k{i}", i)
    for i in range(5):
        c.incrby(f"n{i}", 1)
    err = env.counted("error_rate", 55)
    assert not err.passed and err.data["target_lacks"] == 5 and err.data["target_errors"] == 5, err.evidence
    assert "not sent to the target: it does not have the command" in err.evidence and "INCRBY 5" in err.evidence


def test_a_blocking_wait_is_not_counted_as_latency(server_factory, proc_env):
    """A BLPOP that waited 300 ms for its data is not the source's latency: the source's p99 stays under 100 ms."""
    env = proc_env(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    env.set_phase(Phase.MIRRORING)
    waiter, pusher = env.client(), env.client()
    pusher.ping()
    timer = threading.Timer(0.3, pusher.rpush, ("q", "x"))
    timer.start()
    assert waiter.blpop(["q"], timeout=5) == (b"q", b"x")
    timer.join()
    n = _traffic(env, sets=30, gets=0)
    err = env.counted("error_rate", n + 2)  # (the RPUSH and the BLPOP count for errors)
    lat = env.gate("latency")
    assert err.passed and lat.passed, lat.evidence
    assert lat.data["source"]["p99"] < 0.1 and lat.data["source"]["count"] >= n, lat.data
