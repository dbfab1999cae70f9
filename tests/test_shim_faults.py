"""The shim under faults and bad input: servers down or hanging, malformed clients, limits, auth, signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import timedelta

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migrator import playbook, registry
from migrator.phases import Phase
from migrator.shim import list_dirty
from migrator.state import Barrier, StateStore, iso, now
from tests.test_shim_e2e import wait_for


def raw_exchange(port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    """Send bytes on a fresh socket and read until the shim closes it (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except TimeoutError:
            chunks.append(b"<timeout>")
        return b"".join(chunks)


def test_source_down_gives_clients_connection_errors_promptly(server_factory, envs):
    """With the source killed, clients get connection errors (as without the shim) and nothing hangs."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    env = envs(source, target)
    env.set_phase(Phase.MIRRORING)
    c = env.client(retry=Retry(NoBackoff(), 0))  # no client-side retries: measure the shim alone
    c.set("k", 1)
    source.proc.kill()
    source.proc.wait()
    t0 = time.monotonic()
    for _ in range(3):
        with pytest.raises(redis.ConnectionError):
            c.set("k", 2)
    assert time.monotonic() - t0 < 2.0


def test_malformed_client_is_disconnected_and_others_are_unaffected(server_factory, envs):
    """A client sending bytes that are not RESP gets an error and is disconnected; another client carries on."""
    env = envs(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    env.set_phase(Phase.MIRRORING)
    good = env.client()
    good.set("g", 1)
    reply = raw_exchange(env.port, b"*1\r\n$x\r\n")
    assert reply.startswith(b"-ERR Protocol error") and b"<timeout>" not in reply
    reply = raw_exchange(env.port, b"*2\r\n:1\r\n:2\r\n")
    assert reply.startswith(b"-ERR Protocol error")
    assert good.get("g") == b"1"
    assert env.stats().refused["protocol-error"] == 2


def test_request_size_limit_refuses_and_disconnects(server_factory, envs):
    """A request over shim.max_request_bytes is refused with a clear error; smaller ones pass."""
    env = envs(server_factory("redis-7.0"), server_factory("valkey-9.1"), shim={"max_request_bytes": 4096})
    c = env.client()
    c.set("small", "x" * 100)
    reply = raw_exchange(env.port, b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$100000\r\n" + b"x" * 20000)
    assert b"max_request_bytes" in reply
    assert env.source.client().exists("big") == 0 and c.get("small") == b"x" * 100


def test_client_auth_is_required_when_a_password_is_set(server_factory, envs):
    """With shim.password, commands need AUTH (or HELLO AUTH); a wrong password is refused."""
    env = envs(server_factory("redis-7.0"), server_factory("valkey-9.1"), shim={"password": "shim-pass"})
    with pytest.raises(redis.AuthenticationError):
        env.client().ping()  # no AUTH: NOAUTH
    with pytest.raises(redis.AuthenticationError):
        env.client(password="wrong").ping()
    assert env.client(password="shim-pass").set("a", 1)
    c3 = env.client(password="shim-pass", protocol=3)
    assert c3.get("a") == b"1"
    assert env.stats().refused["wrong-password"] >= 1


def test_upstream_credentials_come_from_the_playbook(server_factory, envs):
    """The shim authenticates to password-protected servers itself, including on connections opened later."""
    source = server_factory("redis-7.0", password="src-pw")
    target = server_factory("valkey-9.1", password="tgt-pw")
    env = envs(source, target)
    c = env.client()
    c.set("x", 1)
    env.set_phase(Phase.MIRRORING)
    c.set("y", 2)
    assert target.client().get("y") == b"2"


def test_a_hanging_target_costs_at_most_the_shadow_timeout_and_marks_keys_dirty(server_factory, envs):
    """With the target frozen after the read cutover, writes are acknowledged after shadow_timeout and their keys are dirty."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    env = envs(source, target, shim={"shadow_timeout": "300ms"})
    env.set_phase(Phase.MIRRORING)
    env.set_phase(Phase.READS_ON_TARGET)
    c = env.client()
    c.set("warm", 1)
    os.kill(target.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert c.set("frozen", 1)
        assert time.monotonic() - t0 < 0.3 + 0.5
        # The key's last write did not reach the target: it is read from the source.
        assert c.get("frozen") == b"1"
    finally:
        os.kill(target.proc.pid, signal.SIGCONT)
    env.flush()
    assert (0, b"frozen") in {(d.db, d.key) for d in list_dirty(env.pb.state_path)}
    assert env.stats().shadow_failures[("target", "timeout")] >= 1


def test_commands_unknown_to_a_side_are_reported_not_dropped(server_factory, envs):
    """A command the source does not know is answered by the source's own error and counted."""
    env = envs(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    with pytest.raises(redis.ResponseError, match="unknown command"):
        c.execute_command("HGETDEL", "h", "FIELDS", "1", "f")
    assert env.stats().unknown[("source", "hgetdel")] == 1
    status = json.loads(env.admin("/status"))
    assert status["unknown_commands"]["source:hgetdel"] == 1


def test_unsupported_commands_are_refused_with_a_clear_error(server_factory, envs):
    """MONITOR and CLIENT TRACKING would desynchronise the stream: the shim refuses them, clearly."""
    env = envs(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    c = env.client()
    with pytest.raises(redis.ResponseError, match="not supported through the shim"):
        c.execute_command("CLIENT", "TRACKING", "on")
    assert c.ping()


def test_write_switch_barrier_holds_drains_reports_and_releases_into_the_new_phase(server_factory, envs):
    """Under a barrier the shim holds new commands, reports 'held', and releases them routed by the new phase."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    env = envs(source, target)
    env.set_phase(Phase.MIRRORING)
    env.set_phase(Phase.READS_ON_TARGET)
    c = env.client()
    c.set("n", 1)
    store = env.store
    st = store.load()
    barrier = Barrier(id=uuid.uuid4().hex[:12], generation=st.generation + 1,
                      deadline=iso(now() + timedelta(seconds=5)), purpose="test write authority")
    st.barrier, st.generation = barrier, barrier.generation
    store.save(st)
    held = registry.await_hold(env.pb.state_path, barrier.id, 3)
    assert held.ok, held.evidence()
    result: list = []
    import threading

    t = threading.Thread(target=lambda: result.append(c.incr("n")))
    t.start()
    time.sleep(0.2)
    assert not result and source.client().get("n") == b"1"  # held, not sent
    target.client().set("n", 41)  # makes the answering side visible
    st = store.load()
    st.phase, st.generation, st.barrier = Phase.WRITES_ON_TARGET, st.generation + 1, None
    store.save(st)
    t.join(3)
    assert result == [42]  # routed by the new phase: the target answered
    ack = registry.await_ack(env.pb.state_path, st.generation, 3)
    (rec,) = ack.acked
    assert rec.barrier_state == "released" and rec.last_pause_ms >= 200


def test_a_barrier_past_its_deadline_releases_by_itself(server_factory, envs):
    """If the switch never comes, held clients are released at the barrier's deadline in the old phase."""
    env = envs(server_factory("redis-7.0"), server_factory("valkey-9.1"))
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    st = env.store.load()
    barrier = Barrier(id="b1", generation=st.generation + 1, deadline=iso(now() + timedelta(milliseconds=600)), purpose="test")
    st.barrier, st.generation = barrier, barrier.generation
    env.store.save(st)
    assert registry.await_hold(env.pb.state_path, "b1", 2).ok
    t0 = time.monotonic()
    assert c.set("late", 1)
    assert 0.2 < time.monotonic() - t0 < 2.0
    assert env.target.client().get("late") == b"1"  # still mirroring


def _run_cli_shim(pb_path, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "migrator", "--log-format", "json", "--log-level", "info", "-p",
                             str(pb_path), "shim", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _stop(proc) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_cli_shim_drains_on_sigterm_exits_0_and_resumes_the_phase_when_restarted(server_factory, make_playbook):
    """``migrator shim`` registers, serves, exits 0 on SIGTERM (record removed), and a restart resumes the phase."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb_path = make_playbook(source, target)
    pb = playbook.load(pb_path)
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    st.phase, st.generation = Phase.MIRRORING, 3
    store.save(st)
    proc = _run_cli_shim(pb_path)
    try:
        wait_for(lambda: registry.read_all(pb.state_path), timeout=15, what="shim registered")
        (rec,) = registry.read_all(pb.state_path)
        assert rec.applied_phase == "mirroring" and rec.applied_generation == 3
        c = redis.Redis.from_url(f"redis://{pb.shim.listen}/0")
        c.set("via-cli", 1)
        c.close()
        assert target.client().get("via-cli") == b"1"
    finally:
        code = _stop(proc)
    assert code == 0
    assert registry.read_all(pb.state_path) == []


def test_workers_share_the_port_and_their_metrics_add_up(server_factory, make_playbook):
    """With --workers 2 each worker registers and acknowledges, the supervisor's /metrics adds their counts, and it warns that ordering is per worker."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb_path = make_playbook(source, target)
    pb = playbook.load(pb_path)
    proc = _run_cli_shim(pb_path, "--workers", "2")
    try:
        wait_for(lambda: len(registry.read_all(pb.state_path)) == 2, timeout=20, what="two workers registered")
        clients = [redis.Redis.from_url(f"redis://{pb.shim.listen}/0") for _ in range(8)]
        for i, c in enumerate(clients):
            c.set(f"w{i}", i)
        store = StateStore(pb.state_path, pb.name)
        st = store.load()
        st.phase, st.generation = Phase.MIRRORING, st.generation + 1
        store.save(st)
        assert registry.await_ack(pb.state_path, st.generation, 5).ok
        for c in clients:
            c.close()

        def total_writes() -> float:
            with urllib.request.urlopen(f"http://{pb.shim.admin}/metrics", timeout=5) as r:
                text = r.read().decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith('migrator_shim_commands_total{class="write",side="source"}'))

        wait_for(lambda: total_writes() == 8, timeout=5, what="metrics from both workers")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    # Per-key ordering holds within one process only: the operator is told so at start-up.
    assert b"shim.workers_unordered" in out and b"single shim process" in out


def test_client_side_tls(server_factory, envs, tmp_path):
    """With shim.tls, clients connect over TLS and the shim still routes their commands."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a certificate")
    key, cert = tmp_path / "shim.key", tmp_path / "shim.crt"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    env = envs(server_factory("redis-7.0"), server_factory("valkey-9.1"),
               shim={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    env.set_phase(Phase.MIRRORING)
    c = env.client(ssl=True, ssl_ca_certs=str(cert), ssl_check_hostname=False)
    assert c.set("tls", 1) and c.get("tls") == b"1"
    assert env.target.client().get("tls") == b"1"
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=env.port, socket_timeout=2, retry=Retry(NoBackoff(), 0)).ping()  # plaintext is refused


def test_shadow_reconnects_with_backoff_and_replays_connection_state(server_factory, envs):
    """After the target comes back, the shim reconnects by itself and replays SELECT/CLIENT SETNAME before mirroring again."""
    source, target = server_factory("redis-7.0"), server_factory("valkey-9.1")
    env = envs(source, target)
    env.set_phase(Phase.MIRRORING)
    c = env.client(db=2, client_name="app-1", single_connection_client=True)
    c.set("before", 1)
    port = target.port
    target.proc.kill()
    target.proc.wait()
    c.set("while-down", 1)  # no error for the client; marked dirty
    revived = server_factory("valkey-9.1", port=port)

    def mirrored() -> bool:
        c.set("after", "x")
        return revived.client(db=2).get("after") == b"x"

    wait_for(mirrored, timeout=10, what="writes mirrored again after the target came back")
    names = [cl["name"] for cl in revived.client().client_list() if cl.get("db") == "2"]
    assert "app-1" in names
    env.flush()
    assert (2, b"while-down") in {(d.db, d.key) for d in list_dirty(env.pb.state_path)}
