"""The control plane on etcd: one interface, two backends, leases, a watch, and etcd going away.

Every test runs real etcd members (``tests.etcd_cluster``) and, where shims take part, real
shim processes with their own state folders sharing the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import redis

from migrator import command, gates, playbook, registry, servers
from migrator.errors import LockedError, StateError
from migrator.phases import Phase
from migrator.shim.dirty import DirtyRecorder, clear_dirty, list_dirty
from migrator.shim.divergence import DivergenceRecorder, read_counters
from migrator.state import StateStore, iso, now
from tests.conftest import write_playbook
from tests.etcd_cluster import ETCD, ETCDCTL, EtcdCluster
from tests.helpers import AckingShim, run_cli, start_cli, wait_for

pytestmark = pytest.mark.skipif(not (ETCD and ETCDCTL), reason="etcd is not installed here (Debian: apt-get install "
                                "etcd-server etcd-client); CI installs it and runs these tests")

SKIP_DATA_GATES_AT_WRITE_CUTOVER = ("--override", "divergence", "--override", "latency", "--override", "error_rate",
                                    "--override", "consistency", "--reason", "t")
CRASH_POINTS = ("after-journal", "after-prepare", "after-state", "after-actions", "after-complete")


@pytest.fixture(scope="module")
def etcd():
    """One 3-member cluster for the tests that do not stop members (each uses its own prefix)."""
    cluster = EtcdCluster(3)
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_etcd():
    """A 3-member cluster of this test's own, for tests that kill members."""
    cluster = EtcdCluster(3)
    yield cluster
    cluster.stop()


def control(cluster: EtcdCluster, prefix: str | None = None, **kw) -> dict:
    return {"etcd": {"endpoints": cluster.endpoints, "prefix": prefix or f"/test/{uuid.uuid4().hex[:10]}/",
                     "lease_ttl": "2s", "request_timeout": "1s", **kw}}


def host_playbook(tmp_path, name: str, src, tgt, ctl: dict | None, **sections):
    """A playbook as one host has it: its own state folder, the shared control plane (if any)."""
    (tmp_path / name).mkdir(exist_ok=True)
    extra = {"control": ctl} if ctl else {}
    return write_playbook(tmp_path / name / "migrator.yaml", src, tgt, state_dir=str(tmp_path / name / "state"),
                          **extra, **sections)


def force_phase(pb, phase: Phase) -> StateStore:
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    st.phase, st.generation, st.endpoints_hash = phase, st.generation + 1, pb.endpoints_hash()
    store.save(st)
    return store


def admin_json(addr: str, path: str = "/status") -> dict:
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as r:
        return json.loads(r.read())


def admin_text(addr: str, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as r:
        return r.read().decode()


class ShimProcess:
    """``migrator shim`` as its own process, on its own ports."""

    def __init__(self, path, env: dict | None = None) -> None:
        self.listen = f"127.0.0.1:{servers.free_port()}"
        self.admin = f"127.0.0.1:{servers.free_port()}"
        self.proc = start_cli("shim", "--listen", self.listen, "--admin", self.admin, playbook=path, env=env)
        self.port = int(self.listen.rsplit(":", 1)[1])

    def status(self) -> dict:
        return admin_json(self.admin)

    def wait_up(self, timeout: float = 30) -> ShimProcess:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"shim exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                return self.status()["applied_generation"] >= 0
            except OSError:
                return False
        wait_for(up, timeout=timeout, interval=0.1, what="the shim to start")
        return self

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return (self.proc.stdout.read() if self.proc.stdout else "") + (self.proc.stderr.read() if self.proc.stderr else "")


@pytest.fixture
def shims():
    started: list[ShimProcess] = []

    def start(path, env: dict | None = None) -> ShimProcess:
        s = ShimProcess(path, env)
        started.append(s)
        return s.wait_up()

    yield start
    for s in started:
        s.stop()


# --- the interface, on both backends --------------------------------------------------------


@pytest.fixture(params=["local", "etcd"])
def two_hosts(request, tmp_path):
    """Two playbooks of one migration as two hosts see it (separate folders; with etcd, one prefix)."""
    ctl = control(request.getfixturevalue("etcd")) if request.param == "etcd" else None
    if ctl is None:  # the folder backend is shared by sharing the folder
        a = host_playbook(tmp_path, "a", "redis://127.0.0.1:1", "redis://127.0.0.1:2", None)
        return playbook.load(a), playbook.load(a)
    a = host_playbook(tmp_path, "a", "redis://127.0.0.1:1", "redis://127.0.0.1:2", ctl)
    b = host_playbook(tmp_path, "b", "redis://127.0.0.1:1", "redis://127.0.0.1:2", ctl)
    return playbook.load(a), playbook.load(b)


def test_state_journal_and_intent_contract(two_hosts):
    """A fresh store reads planned without writing; what one host saves and journals the other reads, in order."""
    pa, pb_ = two_hosts
    a, b = StateStore(pa.state_path, pa.name), StateStore(pb_.state_path, pb_.name)
    assert not a.exists() and a.load().phase == Phase.PLANNED and not b.exists()
    st = a.load()
    st.phase, st.generation = Phase.COMPATIBLE, 1
    a.save(st)
    assert b.exists() and b.load().phase == Phase.COMPATIBLE and b.load().generation == 1
    for i in range(25):
        (a if i % 2 else b).journal("step", n=i)
    assert [e["n"] for e in b.read_journal()] == list(range(25)) == [e["n"] for e in a.read_journal()]
    a.write_intent({"direction": "advance", "to": "mirroring"})
    assert b.read_intent()["to"] == "mirroring"
    b.clear_intent()
    assert a.read_intent() is None


def test_lock_contract(two_hosts):
    """While one run holds the lock, ``running()`` names it on every host and a second run is refused at once."""
    pa, pb_ = two_hosts
    a, b = StateStore(pa.state_path, pa.name), StateStore(pb_.state_path, pb_.name)
    assert b.running() is None
    with a.locked("advance"):
        assert "advance by" in b.running() and f"pid {os.getpid()}" in b.running()
        t0 = time.monotonic()
        with pytest.raises(LockedError, match="holds the lock"), b.locked("rollback"):
            pass
        assert time.monotonic() - t0 < 3
    assert b.running() is None
    with b.locked("rollback"):
        pass


def test_registry_dirty_marks_and_counters_contract(two_hosts):
    """A shim's record, dirty marks and divergence counters written on one host are read (and cleared) on the other."""
    pa, pb_ = two_hosts
    rec = registry.ShimRecord(id="shim-x", pid=os.getpid(), host=socket.gethostname(), listen="127.0.0.1:1", admin="",
                              started_at=iso(now()), heartbeat_at=iso(now()), applied_phase="mirroring",
                              applied_generation=3)
    registry.write(pa.state_path, rec)
    [seen] = registry.read_all(pb_.state_path)
    assert (seen.id, seen.applied_generation, seen.liveness()) == ("shim-x", 3, "live")
    assert registry.await_ack(pb_.state_path, 3, timeout=1).ok
    dirty = DirtyRecorder(pa.state_path, "shim-x")
    dirty.add(0, [b"k1", b"k2"], "target timed out", b"set")
    dirty.flush()
    assert {d.key for d in list_dirty(pb_.state_path)} == {b"k1", b"k2"}
    assert clear_dirty(pb_.state_path, [(0, b"k1")]) == 1
    assert {d.key for d in list_dirty(pa.state_path)} == {b"k2"}
    div = DivergenceRecorder(pa.state_path, "shim-x")
    div.start_generation(3, "mirroring")
    div.compared(7)
    div.flush()
    assert read_counters(pb_.state_path, 3)["compared"] == 7
    registry.remove(pa.state_path, "shim-x")
    assert registry.read_all(pb_.state_path) == []


def test_two_advances_on_two_hosts_cannot_both_win(etcd, tmp_path):
    """Two runs that read the same state: the second save is refused (compare-and-swap), nothing of it is written."""
    ctl = control(etcd)
    pa = playbook.load(host_playbook(tmp_path, "a", "redis://127.0.0.1:1", "redis://127.0.0.1:2", ctl))
    pb_ = playbook.load(host_playbook(tmp_path, "b", "redis://127.0.0.1:1", "redis://127.0.0.1:2", ctl))
    a, b = StateStore(pa.state_path, pa.name), StateStore(pb_.state_path, pb_.name)
    sa, sb = a.load(), b.load()
    sa.phase, sa.generation = Phase.COMPATIBLE, 1
    sb.phase, sb.generation = Phase.COMPATIBLE, 1
    a.save(sa)
    with pytest.raises(StateError, match="changed since this run read it"):
        b.save(sb)
    assert b.load().generation == 1 and not (pb_.state_path / "state.json").exists()


def test_a_killed_lock_holder_is_released_by_its_lease(etcd, tmp_path):
    """A run killed -9 on another host keeps its lock only until its lease expires (lease_ttl), then a new run takes it."""
    path = host_playbook(tmp_path, "a", "redis://127.0.0.1:1", "redis://127.0.0.1:2", control(etcd))
    code = ("import sys, time, socket\n"
            "socket.gethostname = lambda: 'another-host'\n"  # its pid cannot be checked from here
            "from migrator import playbook\nfrom migrator.state import StateStore\n"
            "pb = playbook.load(sys.argv[1])\n"
            "with StateStore(pb.state_path, pb.name).locked('advance'):\n"
            "    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        pb = playbook.load(path)
        store = StateStore(pb.state_path, pb.name)
        assert "advance by" in store.running()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: store.running() is None, timeout=10, interval=0.1, what="the lease to expire")
        released = time.monotonic() - t0
        assert released <= 2 + 2.5, f"released after {released:.1f}s with lease_ttl 2s"
        with store.locked("advance"):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_playbook_control_section_is_validated(tmp_path):
    """``control.etcd`` is checked like every field: each problem names its file and line."""
    path = write_playbook(tmp_path / "m.yaml", "redis://127.0.0.1:1", "redis://127.0.0.1:2",
                          control={"etcd": {"endpoints": ["user:pw@127.0.0.1:2379"], "prefix": "nope",
                                            "password_env": "MIGRATOR_TEST_UNSET_ETCD_PW"}})
    out = run_cli("status", playbook=path)
    assert out.returncode == 2, out.stderr
    assert "control.etcd.endpoints" in out.stderr and "control.etcd.prefix" in out.stderr
    assert all(str(path) in line and ":" in line for line in out.stderr.strip().splitlines() if "control.etcd" in line)
    assert "pw@" not in out.stderr


# --- shims as separate processes -------------------------------------------------------------


@pytest.fixture
def redis_pair(server_factory):
    return server_factory("redis-7.0"), server_factory("valkey-9.1")


def test_shims_on_two_hosts_follow_one_migration_and_a_killed_one_is_lost_after_its_lease(
        etcd, redis_pair, tmp_path, shims):
    """Two shim processes with their own folders acknowledge each phase through etcd (a watch, not a poll);
    one killed -9 is dead once its lease expires, so acks skip it and no_lost_shims names it."""
    src, tgt = redis_pair
    ctl = control(etcd)
    paths = [host_playbook(tmp_path, h, src.url, tgt.url, ctl, shim={"ack_timeout": "5s"}) for h in ("a", "b")]
    pb = playbook.load(paths[0])
    force_phase(pb, Phase.COMPATIBLE)
    a, b = shims(paths[0]), shims(paths[1])
    t0 = time.monotonic()
    result = command.advance(pb)
    took = time.monotonic() - t0
    assert result.to_phase == Phase.MIRRORING and "2 of 2 shim(s) applied" in result.actions[0].evidence
    # The safety-net re-read comes every 2 s here (lease_ttl): faster than that is the watch.
    assert took < 1.5, f"the acknowledgement took {took:.1f}s"
    assert a.status()["phase"] == b.status()["phase"] == "mirroring"
    assert not (tmp_path / "a" / "state" / "state.json").exists()  # the state lives in etcd only
    r = redis.Redis(port=a.port)
    r.set("through-a", "1")
    assert tgt.client().get("through-a") == b"1"
    a.kill()
    t_kill = time.monotonic()
    def liveness_of_a():
        return next((s.liveness() for s in registry.read_all(pb.state_path) if s.listen == a.listen), None)
    wait_for(lambda: liveness_of_a() == "dead", timeout=10, interval=0.1, what="the killed shim's lease to expire")
    dead_after = time.monotonic() - t_kill
    assert dead_after <= 2 + 2.5, f"dead after {dead_after:.1f}s with lease_ttl 2s"
    [lost] = [s for s in registry.read_all(pb.state_path) if s.listen == a.listen]
    assert lost.id not in {s.id for s in registry.active(pb.state_path)}
    ctx = gates.make_context(pb, StateStore(pb.state_path, pb.name), StateStore(pb.state_path, pb.name).load(),
                             read_only=True)
    [nls] = gates.evaluate(("no_lost_shims",), ctx)
    assert not nls.passed and lost.id in nls.evidence
    back = command.rollback(pb)  # only the live shim must acknowledge
    assert back.to_phase == Phase.COMPATIBLE and "1 of 1 shim(s) applied" in back.actions[0].evidence
    assert b.status()["phase"] == "compatible"


def test_one_member_killed_during_a_write_cutover(fresh_etcd, redis_pair, tmp_path, shims):
    """kill -9 of the member the shim and advance talk to, while the shims hold for the write switch:
    the client fails over, the switch completes and no write through the shim is lost."""
    src, tgt = redis_pair
    path = host_playbook(tmp_path, "a", src.url, tgt.url, control(fresh_etcd), shim={"ack_timeout": "5s"},
                         steps={"write_cutover": {"rollback_window": "0s", "max_pause": "3s"}})
    pb = playbook.load(path)
    store = force_phase(pb, Phase.READS_ON_TARGET)
    shim = shims(path)
    r = redis.Redis(port=shim.port)
    for i in range(50):
        r.set(f"k{i}", i)
    proc = start_cli("advance", "--yes", *SKIP_DATA_GATES_AT_WRITE_CUTOVER, playbook=path)
    wait_for(lambda: store.load().barrier is not None or proc.poll() is not None, timeout=30, interval=0.01,
             what="the hold for the write switch")
    assert proc.poll() is None, "advance finished before the member could be killed during the switch"
    fresh_etcd.kill(0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    for i in range(50, 100):
        r.set(f"k{i}", i)
    assert store.load().phase == Phase.WRITES_ON_TARGET
    wait_for(lambda: shim.status()["applied_phase"] == "writes-on-target", timeout=10)
    assert all(tgt.client().get(f"k{i}") == str(i).encode() for i in range(100))
    assert all(src.client().get(f"k{i}") == str(i).encode() for i in range(100))
    assert shim.status()["control"]["reachable"] is True


def test_all_members_down_advance_refuses_and_shims_keep_routing(fresh_etcd, redis_pair, tmp_path, shims):
    """With every member down, advance exits 3 in one line and changes nothing; the shim keeps mirroring
    and says so in /status and /metrics; when etcd returns it resumes and the next step goes through."""
    src, tgt = redis_pair
    path = host_playbook(tmp_path, "a", src.url, tgt.url, control(fresh_etcd), shim={"ack_timeout": "5s"})
    pb = playbook.load(path)
    force_phase(pb, Phase.COMPATIBLE)
    shim = shims(path)
    command.advance(pb)
    wait_for(lambda: shim.status()["applied_phase"] == "mirroring", timeout=10)
    before = StateStore(pb.state_path, pb.name).load().generation
    fresh_etcd.kill_all()
    out = run_cli("advance", "--yes", playbook=path)
    assert out.returncode == 3, out.stdout + out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "etcd control plane unreachable" in line
    wait_for(lambda: shim.status()["control"]["reachable"] is False, timeout=15, interval=0.2,
             what="the shim to notice etcd is down")
    st = shim.status()
    assert "routing the last applied phase mirroring" in st["control"]["note"] and st["applied_phase"] == "mirroring"
    assert "migrator_shim_control_up 0.0" in admin_text(shim.admin)
    r = redis.Redis(port=shim.port)
    r.set("while-etcd-down", "1")
    assert src.client().get("while-etcd-down") == b"1" and tgt.client().get("while-etcd-down") == b"1"
    fresh_etcd.restart_all()
    wait_for(lambda: shim.status()["control"]["reachable"] is True, timeout=20, interval=0.2,
             what="the shim to reach etcd again")
    assert StateStore(pb.state_path, pb.name).load().generation == before
    back = command.rollback(pb)
    assert back.to_phase == Phase.COMPATIBLE and "1 of 1 shim(s) applied" in back.actions[0].evidence
    assert shim.status()["applied_phase"] == "compatible"


OVERRIDES = {"divergence": "t", "latency": "t", "error_rate": "t", "consistency": "t"}


def _advance_killed_at(path: str, point: str) -> None:
    """In a forked child: advance, killed -9 by ``command.crashpoint`` at ``point``."""
    from migrator import control

    control._BOUND.clear()  # the parent's HTTP connections are not this process's
    os.environ["MIGRATOR_CRASH_AT"] = point
    command.advance(playbook.load(path), overrides=OVERRIDES)
    os._exit(0)  # not reached when the point is on the way


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_advance_killed_at_each_crash_point_with_etcd(etcd, redis_pair, tmp_path, point):
    """advance killed -9 at each crash point of the write switch, with etcd as the store: the lock is not
    left behind and running the command again finishes the step (or says it was done)."""
    import multiprocessing

    src, tgt = redis_pair
    path = host_playbook(tmp_path, "a", src.url, tgt.url, control(etcd), shim={"ack_timeout": "3s"},
                         steps={"write_cutover": {"rollback_window": "0s", "max_pause": "2s"}})
    pb = playbook.load(path)
    store = force_phase(pb, Phase.READS_ON_TARGET)
    with AckingShim(pb.state_path, pb.name):
        child = multiprocessing.get_context("fork").Process(target=_advance_killed_at, args=(str(path), point))
        child.start()
        child.join(60)
        assert child.exitcode == -signal.SIGKILL
        again = command.advance(playbook.load(path), overrides=OVERRIDES)
    assert again.to_phase == Phase.WRITES_ON_TARGET
    st = store.load()
    assert st.phase == Phase.WRITES_ON_TARGET and st.transition is None and st.barrier is None
    assert store.running() is None
    events = [e["event"] for e in store.read_journal()]
    assert events.count("transition-completed") == 1, events
    if point == "after-complete":
        assert again.already_done and "was interrupted after it reached writes-on-target" in again.already_done


def test_no_credential_in_etcd_logs_or_journal(fresh_etcd, redis_pair, tmp_path, shims):
    """With etcd authentication on, the password (from the environment) reaches neither etcd's keys, nor
    the journal, nor the shim's and commands' output; a wrong one is refused with exit 3 in one line."""
    src, tgt = redis_pair
    secret = "etcd-pw-" + uuid.uuid4().hex
    prefix = "/authed/"
    fresh_etcd.enable_auth("migrator", secret, prefix)
    env = {"MIGRATOR_TEST_ETCD_PW": secret}
    ctl = control(fresh_etcd, prefix, username="migrator", password_env="MIGRATOR_TEST_ETCD_PW")
    path = host_playbook(tmp_path, "a", src.url, tgt.url, ctl, shim={"ack_timeout": "5s"})
    os.environ["MIGRATOR_TEST_ETCD_PW"] = secret
    try:
        pb = playbook.load(path)
        force_phase(pb, Phase.COMPATIBLE)
        shim = ShimProcess(path, env)
        try:
            shim.wait_up()
            out = run_cli("advance", "--yes", playbook=path, env=env)
            assert out.returncode == 0, out.stderr
            wait_for(lambda: shim.status()["applied_phase"] == "mirroring", timeout=10)
            status = json.dumps(command.status(pb))
            history = json.dumps(command.history(pb))
        finally:
            shim_output = shim.stop()
        dump = fresh_etcd.dump()
        assert any(k.startswith(prefix + "journal/") for k, _ in dump) and any(k == prefix + "state" for k, _ in dump)
        local = [p.read_text(errors="replace") for p in (tmp_path / "a" / "state").rglob("*") if p.is_file()]
        everything = "\n".join([*(k + v for k, v in dump), out.stdout, out.stderr, status, history, shim_output, *local])
        assert secret not in everything
        bad = run_cli("status", playbook=path, env={"MIGRATOR_TEST_ETCD_PW": "wrong"})
        assert bad.returncode == 3 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "control.etcd.username and password_env" in bad.stderr and "wrong" not in bad.stderr
    finally:
        os.environ.pop("MIGRATOR_TEST_ETCD_PW", None)


def test_a_large_flush_of_dirty_marks_is_split_into_files_etcd_accepts(two_hosts):
    """Thousands of marks in one flush become several files of at most 256 KB (an etcd value is limited
    to 1.5 MB), and every mark is read back on the other host."""
    from migrator.control import files
    from migrator.shim.dirty import MAX_FILE_BYTES, dirty_dir

    pa, pb_ = two_hosts
    dirty = DirtyRecorder(pa.state_path, "shim-big")
    keys = [f"key-{i:06d}-".encode() + b"x" * 120 for i in range(6000)]
    dirty.add(0, keys, "mirror queue full", b"set")
    dirty.flush()
    written = files.listdir(dirty_dir(pb_.state_path))
    assert len(written) >= 4 and all(len(files.read_text(f).encode()) <= MAX_FILE_BYTES for f in written)
    assert {d.key for d in list_dirty(pb_.state_path)} == set(keys)
