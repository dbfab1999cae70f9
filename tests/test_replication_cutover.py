"""The write cutover in the replication strategy, on real servers: the role swap, its fallback to
dual-write, the rollback that swaps back (also with the target killed), ``complete``'s detach, and
kill -9 at each point of the swap.

Each test sets up "mirroring by replication" itself: the target REPLICAOF the source, the initial
sync waited for, and the state recording reads-on-target with the replication strategy.
"""
from __future__ import annotations

import threading
import time

import pytest
import redis

from migrator import command, playbook, replication
from migrator.errors import RefusedError
from migrator.phases import Phase
from migrator.state import MirrorMode, StateStore
from tests.helpers import AckingShim, run_cli, wait_for

FAST = {"repl-diskless-sync-delay": "0"}  # a full sync starts at once (Redis 7.0 waits 5 s by default)
SKIP_DATA_GATES = {"divergence": "t", "latency": "t", "error_rate": "t", "consistency": "t"}
SKIP_DATA_GATES_CLI = ("--override", "divergence", "--override", "latency", "--override", "error_rate",
                       "--override", "consistency", "--reason", "t")
KEYS = 300
EXTRA = 4  # h, l, z, ttl


class Env:
    def __init__(self, src, tgt, pb_path):
        self.src, self.tgt, self.pb_path = src, tgt, pb_path
        self.pb = playbook.load(pb_path)
        self.store = StateStore(self.pb.state_path, self.pb.name)

    @property
    def state(self):
        return self.store.load()

    def roles(self):
        return replication.read(self.src.client()), replication.read(self.tgt.client())

    def advance(self, **overrides):
        if self.state.phase == Phase.WRITES_ON_TARGET:
            overrides = {"consistency": "t", **overrides}
        else:
            overrides = {**SKIP_DATA_GATES, **overrides}
        return command.advance(self.pb, overrides=overrides)

    def rollback(self, **overrides):
        return command.rollback(self.pb, overrides=overrides)

    def action(self, result, name):
        return next(a for a in result.actions if a.name == name)

    def last_swap(self):
        """The newest role swap's journal entry (its evidence, reverse and data)."""
        return next(e for e in reversed(self.store.read_journal()) if e["event"] == "role-swap")


def in_step(primary, replica) -> bool:
    r = replication.read(replica.client())
    return bool(r.link_up and not r.sync_in_progress
                and r.replica_offset == replication.read(primary.client()).master_repl_offset)


@pytest.fixture
def replicating(server_factory, make_playbook):
    """Starts a pair, seeds the source, makes the target its replica and records reads-on-target
    (with a stand-in shim that acknowledges phases and holds)."""
    shims: list[AckingShim] = []

    def make(src_label="redis-7.0", tgt_label="valkey-9.1", tgt_conf=None, max_pause="2s", passwords=(None, None),
             **sections) -> Env:
        src = server_factory(src_label, config=FAST, password=passwords[0])
        tgt = server_factory(tgt_label, config={**FAST, **({"masterauth": passwords[0]} if passwords[0] else {})},
                             conf_lines=tgt_conf, password=passwords[1])
        c = src.client()
        pipe = c.pipeline()
        for i in range(KEYS):
            pipe.set(f"k:{i}", i)
        pipe.hset("h", mapping={"a": 1, "b": 2}).rpush("l", 1, 2, 3).zadd("z", {"m": 1.5}).set("ttl", 1, ex=3600)
        pipe.execute()
        tgt.client().execute_command("REPLICAOF", src.host, src.port)
        wait_for(lambda: in_step(src, tgt), timeout=20, what="the target's initial sync")
        mirror = {"strategy": "replication", **sections.pop("mirror", {})}
        path = make_playbook(src, tgt, mirror=mirror, steps={
            "mirror": {"min_duration": "0s", "min_compared": 0, "latency_floor_ms": 1000},
            "read_cutover": {"min_duration": "0s", "min_compared": 0, "latency_floor_ms": 1000},
            "write_cutover": {"rollback_window": "0s", "max_pause": max_pause}}, **sections)
        env = Env(src, tgt, path)
        st = env.store.load()
        st.phase, st.generation, st.endpoints_hash = Phase.READS_ON_TARGET, 3, env.pb.endpoints_hash()
        st.mirror = MirrorMode("replication", "test fixture: the target replicates the source")
        env.store.save(st)
        shims.append(AckingShim(env.pb.state_path, env.pb.name).__enter__())
        return env

    yield make
    for shim in shims:
        shim.__exit__(None, None, None)


class Writer(threading.Thread):
    """Writes SET w:<n> n straight to the source (bypassing any shim), recording what was acknowledged."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.client = server.client(socket_timeout=10)
        self.acked: list[int] = []
        self.readonly_after: list[int] = []  # writes refused with READONLY
        self.other_errors: list[str] = []
        self.stop = threading.Event()

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                self.client.set(f"w:{n}", n)
                if self.readonly_after:
                    self.other_errors.append(f"w:{n} acknowledged after a READONLY")
                self.acked.append(n)
            except redis.exceptions.ReadOnlyError:
                self.readonly_after.append(n)
            except redis.exceptions.RedisError as e:
                self.other_errors.append(str(e))
            time.sleep(0.0005)


PAIRS = [("redis-7.0", "valkey-9.1"), ("redis-7.0", "valkey-8.1"), ("redis-6.2", "valkey-9.1")]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_write_cutover_swaps_roles_by_partial_resync_losing_no_write(replicating, pair):
    """With a writer bypassing the shims on the source, the cutover makes the target the primary and the
    source its replica by partial resync: every acknowledged write is on the target, later writes to the
    source get READONLY, and the servers' write pause is measured and kept within max_pause."""
    env = replicating(*pair)
    writer = Writer(env.src)
    writer.start()
    wait_for(lambda: len(writer.acked) > 200, what="the writer under way")
    result = env.advance()
    wait_for(lambda: len(writer.readonly_after) >= 5, what="READONLY for writes sent to the source")
    writer.stop.set()
    writer.join(timeout=10)
    assert result.to_phase == Phase.WRITES_ON_TARGET
    s, t = env.roles()
    assert t.role == "master" and s.replicates(env.tgt.host, env.tgt.port) and s.link_up
    st = env.state
    assert st.mirror.reverse == "replication", st.mirror.reverse_why
    assert "partial resync" in st.mirror.reverse_why and "sync_full 0→0" in st.mirror.reverse_why
    assert not writer.other_errors, writer.other_errors[:3]
    tc = env.tgt.client()
    missing = [n for n in writer.acked if tc.get(f"w:{n}") != str(n).encode()]
    assert not missing, f"{len(missing)} acknowledged write(s) missing on the target, e.g. {missing[:5]}"
    assert tc.dbsize() == env.src.client().dbsize() == KEYS + EXTRA + len(writer.acked)
    release = env.action(result, "release_pause")
    pause_ms = release.data["server_pause_ms"]
    print(f"\n{pair}: source writes paused {pause_ms} ms; {len(writer.acked)} writes acknowledged, "
          f"{len(writer.readonly_after)} refused READONLY; {st.mirror.reverse_why}")
    assert 0 < pause_ms < 2000
    tc.set("after", "1")  # the source follows the new primary
    wait_for(lambda: env.src.client().get("after") == b"1", what="the source replicating the target")


def test_fallback_to_dual_write_when_the_source_would_need_a_full_sync(replicating):
    """A target that refuses PSYNC makes the source fall back to a full sync it cannot load (Valkey's RDB):
    migrator sees the full sync start, detaches the source again with its data intact (swapdb), and the
    rollback window is kept by dual-write, which the evidence says."""
    env = replicating("redis-7.0", "valkey-9.1", tgt_conf=['rename-command PSYNC ""'])
    before = env.src.client().config_get("repl-diskless-load")["repl-diskless-load"]
    result = env.advance()
    st = env.state
    assert st.mirror.reverse == "dual-write"
    assert "fell back to dual-write" in st.mirror.reverse_why and "full sync" in st.mirror.reverse_why
    assert "the source still holds its data" in st.mirror.reverse_why
    s, t = env.roles()
    assert s.role == "master" and t.role == "master"
    sc = env.src.client()
    assert sc.dbsize() == env.tgt.client().dbsize() == KEYS + EXTRA
    assert sc.get("k:7") == b"7" and sc.hgetall("h") == {b"a": b"1", b"b": b"2"}
    assert not (env.src.dir / "dump.rdb").exists()  # no Valkey RDB left that Redis would refuse to start with
    assert st.mirror.restore == {"repl-diskless-load": before}
    swap = env.last_swap()
    assert swap["data"]["resync"] == "none" and swap["reverse"] == "dual-write"
    assert result.to_phase == Phase.WRITES_ON_TARGET
    # Rolling back keeps mirroring by dual-write (no full sync, no stale reads) and restores the setting.
    env.rollback()
    st = env.state
    assert st.phase == Phase.READS_ON_TARGET and st.mirror.strategy == "dual-write" and st.mirror.reverse is None
    assert sc.config_get("repl-diskless-load")["repl-diskless-load"] == before and st.mirror.restore == {}


def test_fallback_when_the_source_cannot_reach_the_target(replicating, server_factory):
    """A source that cannot reach the target (mirror.replication.target_address to a closed port) does not
    resync within the budget: it is detached again and the rollback window is kept by dual-write."""
    from migrator.servers import free_port

    env = replicating(max_pause="1s", mirror={"replication": {"target_address": f"127.0.0.1:{free_port()}"}})
    t0 = time.monotonic()
    env.advance()
    took = time.monotonic() - t0
    st = env.state
    assert st.mirror.reverse == "dual-write" and "no partial resync within" in st.mirror.reverse_why, st.mirror.reverse_why
    s, _ = env.roles()
    assert s.role == "master" and env.src.client().dbsize() == KEYS + EXTRA
    assert took < 10


@pytest.mark.parametrize("pair", [("redis-7.0", "valkey-9.1"), ("redis-6.2", "valkey-9.1")], ids=lambda p: f"{p[0]}->{p[1]}")
def test_rollback_reverses_the_roles_and_a_second_cutover_swaps_again(replicating, pair):
    """Rolling back makes the source the primary and the target its replica again (with the data written
    on the target meanwhile), the evidence says how the target resumed, and advancing again swaps again."""
    env = replicating(*pair)
    env.advance()
    tc = env.tgt.client()
    for i in range(50):
        tc.set(f"t:{i}", i)
    result = env.rollback()
    assert result.to_phase == Phase.READS_ON_TARGET
    s, t = env.roles()
    assert s.role == "master" and t.replicates(env.src.host, env.src.port)
    swap = env.last_swap()
    # Partial resync counted on the source, or the target's stream carried on through the promotion
    # (none counted): either way no full sync.
    assert "roles reversed" in swap["evidence"], swap["evidence"]
    assert ("partial resync" in swap["data"]["resync"] or "no full sync" in swap["data"]["resync"]), swap["data"]
    assert "full sync under way" not in swap["data"]["resync"]
    assert env.state.mirror.reverse is None and env.state.mirror.restore == {}
    sc = env.src.client()
    assert sc.get("t:49") == b"49" and sc.dbsize() == tc.dbsize() == KEYS + EXTRA + 50
    sc.set("back", "1")
    wait_for(lambda: tc.get("back") == b"1", what="the target replicating the source again")
    env.advance()
    assert env.state.mirror.reverse == "replication"
    assert env.roles()[0].replicates(env.tgt.host, env.tgt.port)


def test_rollback_with_the_target_killed_promotes_the_source(replicating):
    """With the target killed (-9) in writes-on-target, the rollback promotes the source, which holds every
    write it had replicated from the target, and says what to do when the target is back."""
    env = replicating()
    env.advance()
    tc = env.tgt.client()
    for i in range(100):
        tc.set(f"t:{i}", i)
    wait_for(lambda: in_step(env.tgt, env.src), what="the source replicating the target")
    env.tgt.proc.kill()
    env.tgt.proc.wait(timeout=10)
    result = env.rollback()
    assert result.to_phase == Phase.READS_ON_TARGET
    s = replication.read(env.src.client())
    assert s.role == "master"
    swap = env.last_swap()
    assert "the target is unreachable" in swap["evidence"] and "promoted the source" in swap["evidence"], swap["evidence"]
    sc = env.src.client()
    assert sc.dbsize() == KEYS + EXTRA + 100 and sc.get("t:99") == b"99"
    sc.set("after", "1")  # it takes writes again


def test_a_broken_reverse_link_is_detected_and_the_rollback_says_what_to_do(replicating):
    """When the source's link breaks for longer than the target's replication backlog (a full sync it cannot
    load then loops), the rollback is refused with what to do; after REPLICAOF NO ONE on the source and a
    check --full --repair (copying the writes it missed from the target), rolling back with
    --override source_keys makes the source the primary, and no write is lost."""
    import signal

    env = replicating()
    env.advance()
    tc, sc = env.tgt.client(), env.src.client()
    tc.config_set("repl-backlog-size", 16384)
    tc.set("x", "y" * 40000)  # the backlog holds just this
    wait_for(lambda: in_step(env.tgt, env.src), what="the source in step")
    env.src.proc.send_signal(signal.SIGSTOP)
    try:
        tc.client_kill_filter(_type="replica")
        for i in range(40):
            tc.set(f"k:{i}", "z" * 1000)  # 40 kB of updates while the source is away: past the backlog, same key count
    finally:
        env.src.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: replication.read(tc, with_stats=True).sync_full >= 1, what="the source asking for a full sync")
    assert sc.get("k:1") == b"1"  # swapdb: the failed load kept its data
    with pytest.raises(RefusedError, match="the source's link to the target is down"):
        env.rollback()
    assert env.state.phase == Phase.WRITES_ON_TARGET
    sc.execute_command("REPLICAOF", "NO", "ONE")
    out = run_cli("check", "--full", "--repair", playbook=env.pb_path)
    assert sc.get("k:39") == b"z" * 1000, out.stdout + out.stderr
    env.rollback(source_keys="repaired from the target")
    s, t = env.roles()
    assert s.role == "master" and t.replicates(env.src.host, env.src.port)
    wait_for(lambda: in_step(env.src, env.tgt), timeout=20, what="the target following the source")
    assert tc.get("k:39") == b"z" * 1000 and tc.dbsize() == sc.dbsize() == KEYS + EXTRA + 1


def test_complete_detaches_the_source_and_restores_its_settings(replicating):
    """``complete`` stops the source replicating the target (REPLICAOF NO ONE) and puts back the
    repl-diskless-load the swap changed; the evidence says so."""
    env = replicating()
    before = env.src.client().config_get("repl-diskless-load")["repl-diskless-load"]
    env.advance()
    assert env.src.client().config_get("repl-diskless-load")["repl-diskless-load"] == "swapdb"
    result = env.advance()
    assert result.to_phase == Phase.COMPLETED
    detach = env.action(result, "detach_source")
    assert "detached the source" in detach.evidence and f"repl-diskless-load {before}" in detach.evidence
    s = replication.read(env.src.client())
    assert s.role == "master"
    assert env.src.client().config_get("repl-diskless-load")["repl-diskless-load"] == before
    assert env.src.client().dbsize() == env.tgt.client().dbsize() == KEYS + EXTRA


def test_the_swap_authenticates_to_a_target_with_a_password_and_stores_no_secret(replicating):
    """With passwords on both servers the source authenticates to the target (masterauth from the target's
    endpoint) and resumes by partial resync; complete puts masterauth back, and no password reaches the
    state or the journal."""
    env = replicating(passwords=("src-secret-1", "tgt-secret-2"))
    env.advance()
    assert env.state.mirror.reverse == "replication", env.state.mirror.reverse_why
    assert env.roles()[0].link_up
    result = env.advance()
    assert "masterauth (empty)" in env.action(result, "detach_source").evidence
    assert env.src.client().config_get("masterauth")["masterauth"] == ""
    for f in (env.store.state_path, env.store.journal_path):
        text = f.read_text()
        assert "src-secret-1" not in text and "tgt-secret-2" not in text


# --- kill -9 at each point of the swap, then the same command again --------------------------------


def _killed(env, direction, point):
    out = run_cli(direction, "--yes", *(SKIP_DATA_GATES_CLI if direction == "advance" else ()), playbook=env.pb_path,
                  env={"MIGRATOR_CRASH_AT": point})
    assert out.returncode == -9, out.stdout + out.stderr
    env.store.load()  # a valid state


def _again(env, direction):
    """The same command again (in this process: it is the function the CLI calls)."""
    return env.advance() if direction == "advance" else env.rollback()


@pytest.mark.parametrize("point", ["swap-after-pause", "swap-after-promote", "swap-after-replicaof", "after-prepare"])
def test_kill_9_during_the_swap_then_advance_again_finishes(replicating, point):
    """advance killed -9 at each point of the role swap leaves a valid state; running it again reads the
    servers' roles and finishes the swap (after a promotion with the source still the primary, it
    re-attaches the target and says to run advance again once it is in sync), losing no key."""
    env = replicating()
    _killed(env, "advance", point)
    assert env.state.phase == Phase.READS_ON_TARGET
    assert "while the servers swapped roles: run `migrator advance` again" in command.status(env.pb)["note"]
    if point == "swap-after-pause":
        t0 = time.monotonic()
        env.src.client().delete("no-such-key")  # a write: waits for the killed run's pause to expire
        assert time.monotonic() - t0 < 2.5  # max_pause is 2 s: the pause expired by itself
    if point == "swap-after-promote":
        with pytest.raises(RefusedError, match="both servers are primaries"):
            _again(env, "advance")
        wait_for(lambda: in_step(env.src, env.tgt), timeout=20, what="the re-attached target in sync")
    _again(env, "advance")
    st = env.state
    assert st.phase == Phase.WRITES_ON_TARGET and st.mirror.reverse == "replication", st.mirror
    s, t = env.roles()
    assert t.role == "master" and s.replicates(env.tgt.host, env.tgt.port)
    assert env.src.client().dbsize() == env.tgt.client().dbsize() == KEYS + EXTRA


@pytest.mark.parametrize("point", ["back-after-pause", "back-after-target-replicaof", "back-after-source-promote"])
def test_kill_9_during_the_swap_back_then_rollback_again_finishes(replicating, point):
    """rollback killed -9 at each point of the swap back (both servers replicas for a moment, never both
    primaries) leaves a valid state; running it again finishes with the source the primary."""
    env = replicating()
    env.advance()
    env.tgt.client().set("on-target", "1")
    _killed(env, "rollback", point)
    assert env.state.phase == Phase.WRITES_ON_TARGET
    _again(env, "rollback")
    st = env.state
    assert st.phase == Phase.READS_ON_TARGET and st.mirror.reverse is None
    s, t = env.roles()
    assert s.role == "master" and t.replicates(env.src.host, env.src.port)
    assert env.src.client().get("on-target") == b"1"
    assert env.src.client().dbsize() == env.tgt.client().dbsize() == KEYS + EXTRA + 1
