"""The command line as an operator meets it: on a terminal, interrupted, on a busy port, on empty data.

The CLI runs as a real process. ``run_on_pty`` gives it a pseudo-terminal for stdin, stdout and
stderr, as a shell does, so the code paths taken only on a terminal (rich progress bars and
tables) run too.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from migrator import registry, reports
from migrator.data import check, sync
from migrator.data import checkpoint as cpmod
from migrator.data import dirty
from migrator.data import gates as data_gates
from migrator.errors import EXIT_INTERRUPTED
from migrator.gates import make_context
from migrator.phases import Phase
from migrator.state import State, StateStore, iso, now
from tests.helpers import run_cli, wait_for
from tests.test_data_helpers import FAST, bulk, load

REPO = Path(__file__).resolve().parent.parent
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def run_on_pty(*args: str, playbook: Path, timeout: float = 120) -> tuple[int, str]:
    """Run ``python -m migrator -p PLAYBOOK ARGS`` with a pseudo-terminal as stdin/stdout/stderr;
    returns the exit code and the output with terminal escapes removed."""
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(playbook), *args], stdin=follower,
                            stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: every holder of the terminal has closed it
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"migrator {' '.join(args)} did not finish within {timeout}s: {out[-2000:]!r}")
        return proc.wait(timeout=10), _ANSI.sub("", out.decode("utf-8", "replace"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


def _mirroring(pb) -> StateStore:
    """The state of a migration that is mirroring since now (the phase sync and check gate)."""
    store = StateStore(pb.state_path, pb.name)
    store.save(State(migration=pb.name, phase=Phase.MIRRORING, phase_since=iso(now())))
    return store


def test_commands_that_draw_progress_and_tables_work_on_a_terminal(server_factory, make_playbook):
    """advance, compat, sync, check and status exit 0 with sane output when run on a terminal."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    bulk(src.client(), 5000)
    path = make_playbook(src, dst, **FAST)
    rc, out = run_on_pty("advance", "--yes", playbook=path)
    assert rc == 0, out
    assert "moved planned → compatible" in out
    rc, out = run_on_pty("compat", playbook=path)
    assert rc == 0, out
    assert "Compatibility:" in out and "report compat-" in out
    rc, out = run_on_pty("sync", playbook=path)
    assert rc == 0, out
    assert "Traceback" not in out and "PASS: 5,000 keys copied" in out, out
    rc, out = run_on_pty("check", "--full", playbook=path)
    assert rc == 0, out
    assert "PASS: 0 mismatches in 5,000 keys" in out, out
    rc, out = run_on_pty("status", playbook=path)
    assert rc == 0, out
    assert "Phase: compatible" in out, out


def test_ctrl_c_during_sync_exits_130_and_the_resumed_pass_reports_every_key(server_factory, make_playbook):
    """SIGINT mid-sync: one line with the resume command, exit 130; the resume's report and gate count the whole pass."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    n = 60_000
    bulk(src.client(), n)
    path = make_playbook(src, dst, **FAST)
    pb = load(path)
    store = _mirroring(pb)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(path), "sync", "--rate", "15000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        # Interrupt once the checkpoint records progress, well before the end (4 s at this rate).
        wait_for(lambda: (cp := cpmod.load(pb.state_path)) is not None and sum(d.keys for d in cp.dbs.values()) > 5000,
                 timeout=30, what="the sync's checkpoint to record progress")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, (out, err)
    assert "Aborted" not in err and "Traceback" not in err, err
    assert f"resume with `migrator sync -p {path}`" in err, err
    cp = cpmod.load(pb.state_path)
    before = sum(d.keys for d in cp.dbs.values())
    assert 0 < before < n and not cp.finished
    assert dst.client().dbsize() < n

    res = run_cli("sync", playbook=path, env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    report = reports.latest(pb.state_path, "sync")
    assert report["resumed"] and report["runs"] == 2
    assert report["keys"] == n, report["summary"]
    assert report["run_keys"] < n  # the second run copied only the rest
    assert f"{n:,} keys copied" in report["summary"] and "over 2 runs" in report["summary"]
    assert dst.client().dbsize() == n
    gate = data_gates.sync_complete(make_context(pb, store, store.load()))
    assert gate.passed and f"{n:,} keys copied" in gate.evidence, gate.evidence


def _mark_dirty(pb, marks):
    """Record dirty marks the way a running shim does (its own recorder writes the files)."""
    from migrator.shim.dirty import DirtyRecorder

    recorder = DirtyRecorder(pb.state_path, "shim-test")
    for db, key in marks:
        recorder.add(db, [key], "shadow timeout", b"DEL")
    recorder.flush()


def test_check_of_an_empty_keyspace_is_consistent_and_repair_clears_the_marks(server_factory, make_playbook):
    """Both sides empty: 0 of 0 differ (exact), the consistency gate passes, and marks on keys now gone are cleared."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = load(make_playbook(src, dst, **FAST))
    store = _mirroring(pb)
    _mark_dirty(pb, [(0, b"deleted-on-both"), (2, b"also-gone")])
    time.sleep(0.01)  # the marks are older than the check
    res = check.run(pb, full=True, repair=True)
    assert res.verdict == "pass" and res.exhaustive and res.checked == 0 and res.bound == 0.0, res.summary
    assert dirty.list_dirty(pb.state_path).count == 0
    gate = data_gates.consistency(make_context(pb, store, store.load()))
    assert gate.passed and "0 mismatches in 0 keys" in gate.evidence, gate.evidence
    # The same through the CLI: exit 0, no warning.
    out = run_cli("check", "--output", "json", playbook=pb.path, env={"PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["verdict"] == "pass"


def test_check_of_an_empty_target_with_a_full_source_is_not_consistent(server_factory, make_playbook):
    """A target that is empty while the source holds keys fails the check and the gate, sampled or walked."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    bulk(src.client(), 3000)
    pb = load(make_playbook(src, dst, **FAST))
    store = _mirroring(pb)
    for kw in ({"full": True}, {"sample": 200}):
        res = check.run(pb, **kw)
        assert res.verdict == "fail" and res.mismatches and res.bound > 0, res.summary
        gate = data_gates.consistency(make_context(pb, store, store.load()))
        assert not gate.passed, gate.evidence


def _addr(hostport: str) -> tuple[str, int]:
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shim_on_a_port_in_use_exits_2_with_one_line(server_factory, make_playbook):
    """`migrator shim` on a client or admin port another process holds: one line naming it, exit 2, nothing left running."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    path = make_playbook(src, dst, **FAST)
    pb = load(path)
    # The playbook's own ports were free when it was written, not reserved: the kernel may hand
    # one of them to the holder, and then the shim fails on the other flag's port first.
    own = {_addr(pb.shim.listen)[1], _addr(pb.shim.admin)[1]}
    spares = []
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    while holder.getsockname()[1] in own:
        spares.append(holder)
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
    for spare in spares:
        spare.close()
    with holder:
        holder.listen()
        busy = f"127.0.0.1:{holder.getsockname()[1]}"
        env = {"PYTHONPATH": str(REPO)}
        res = run_cli("shim", "--listen", busy, playbook=path, env=env, timeout=60)
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert lines[0] == (f"FAILED: cannot listen on {busy} (shim.listen or --listen): address already in use; "
                            "stop what holds it or choose another address with --listen")
        res = run_cli("shim", "--admin", busy, playbook=path, env=env, timeout=60)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [
            f"FAILED: cannot listen on {busy} (shim.admin or --admin): address already in use; stop what holds it "
            "or choose another address with --admin, or --admin '' to disable it"], res.stderr
        # With --workers, the supervisor checks the address before forking, and stops the workers
        # it started when its admin address is taken.
        for flag in ("--listen", "--admin"):
            res = run_cli("shim", "--workers", "2", flag, busy, playbook=path, env=env, timeout=60)
            assert res.returncode == 2, res.stderr
            assert "Traceback" not in res.stderr
            assert res.stderr.strip().splitlines()[-1].startswith(f"FAILED: cannot listen on {busy} "), res.stderr
        # The client port it did bind before the admin one failed is free again; no shim is registered.
        with socket.socket() as probe:
            probe.bind(_addr(pb.shim.listen))
        assert registry.read_all(pb.state_path) == []


def test_shim_says_where_it_listens_and_warns_only_about_commands_the_target_lacks(server_factory, make_playbook):
    """At start the shim prints its client and admin addresses, and no warning lists the target's own newer commands."""
    src, dst = server_factory("redis-6.2"), server_factory("valkey-9.1")
    path = make_playbook(src, dst, **FAST)
    pb = load(path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "--log-format", "json", "-p", str(path), "shim"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        assert line.strip() == (f"shim listening on {pb.shim.listen} (admin {pb.shim.admin}); "
                                "SIGTERM or Ctrl-C drains and stops it"), line
        c = socket.create_connection(_addr(pb.shim.listen))
        c.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert c.recv(64) == b"+PONG\r\n"
        c.close()
    finally:
        out, err = _stop(proc)
    assert proc.returncode == 0, err
    unknown = [json.loads(ln) for ln in err.splitlines() if '"shim.commands_unknown"' in ln]
    # Valkey 9.1 has commands Redis 6.2 lacks (HEXPIRE, HGETDEL, WAITAOF...): the application never used them.
    assert all(u["side"] == "target" for u in unknown), unknown


def _executed(result) -> dict[str, int]:
    """Commands in the source's statistics the pre-flight attributes to the application, without
    connection setup (HELLO, PING, INFO...: every client's, migrator's own connections' included)."""
    from migrator.compat.commands import CONNECTION_SETUP

    (missing,) = [c for c in result.checks if c.name == "commands.missing"]
    return {n: c for n, c in missing.data["executed"].items() if n not in CONNECTION_SETUP}


def test_compat_does_not_count_migrators_own_commands_as_the_applications(server_factory, make_playbook):
    """A second compat run, and one after a sync and a check, see the same application commands as the first."""
    from migrator import compat

    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    app = src.client()
    for i in range(300):
        app.set(f"s:{i}", "v")
        app.hset(f"h:{i}", "f", i)
    app.get("s:0")
    pb = load(make_playbook(src, dst, **FAST))
    first = _executed(compat.run(pb))
    assert {"set": 300, "hset": 300, "get": 1}.items() <= first.items()
    assert not {"dump", "scan", "pttl", "memory|usage", "object|encoding"} & set(first)
    second = _executed(compat.run(pb))
    assert second == first
    _mirroring(pb)
    assert sync.run(pb).complete and check.run(pb, full=True).clean
    third = _executed(compat.run(pb))
    assert third == first
    # The application's later calls still count, migrator's own never.
    app.set("late", "x")
    app.dump("late")
    fourth = _executed(compat.run(pb))
    assert fourth["set"] == 301 and fourth["dump"] == 1, fourth


def test_ctrl_c_during_check_exits_130_not_the_refused_code(server_factory, make_playbook):
    """SIGINT to a running check: 'interrupted (Ctrl-C)' and exit 130, not click's 'Aborted.' and 1."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    bulk(src.client(), 20_000)
    path = make_playbook(src, dst, **FAST)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(path), "check", "--full", "--rate", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        # Interrupt once it walks the keyspace (10 s at this rate).
        wait_for(lambda: "cmdstat_scan" in src.client().info("commandstats"), timeout=30, what="the check's SCAN")
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, (out, err)
    assert err.strip().splitlines()[-1] == "interrupted (Ctrl-C)", err
