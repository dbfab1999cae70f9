"""Test helpers shared by several test files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from migrator import registry
from migrator.state import StateStore, iso, now


def run_cli(*args: str, playbook: Path | None = None, env: dict | None = None, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m migrator`` as a real process (exit codes, output and kill -9 are real)."""
    cmd = [sys.executable, "-m", "migrator"]
    if playbook is not None:
        cmd += ["-p", str(playbook)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=full_env, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)


def start_cli(*args: str, playbook: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "migrator", "-p", str(playbook), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


class AckingShim:
    """Plays a shim's part of the acknowledgement protocol (registry file + heartbeat), no proxying.

    Used to test the state machine's waiting and reverting; the real shim is tested in
    test_shim*. ``stuck = True`` makes it stop applying new generations while still heartbeating
    (alive but behind), which is what a hung routing switch looks like.
    """

    def __init__(self, state_dir: Path, migration: str, shim_id: str = "test-shim") -> None:
        self.store = StateStore(state_dir, migration)
        self.state_dir = state_dir
        self.stuck = False
        self.refuse_hold = False  # never reports "held" (a shim that cannot drain)
        self.owed = 0  # shadow writes it reports as still pending while holding
        st = self.store.load()
        self.record = registry.ShimRecord(
            id=shim_id, pid=os.getpid(), host=socket.gethostname(), listen="127.0.0.1:0", admin="127.0.0.1:0",
            started_at=iso(now()), heartbeat_at=iso(now()), applied_phase=st.phase.value,
            applied_generation=st.generation)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        held_since = None
        while not self._stop.is_set():
            if not self.stuck:
                try:
                    st = self.store.load()
                except Exception:  # noqa: BLE001 - the state is being replaced; next tick
                    st = None
                if st is not None:
                    self.record.applied_phase, self.record.applied_generation = st.phase.value, st.generation
                    if st.barrier and not self.refuse_hold:
                        if self.record.barrier_id != st.barrier.id:
                            held_since = time.monotonic()
                        self.record.barrier_id, self.record.barrier_state = st.barrier.id, "held"
                        self.record.pending_shadow = self.owed
                    elif self.record.barrier_state == "held":
                        self.record.barrier_state = "released"
                        self.record.last_pause_ms = (time.monotonic() - held_since) * 1000
            registry.write(self.state_dir, self.record)
            time.sleep(0.01)

    def __enter__(self) -> "AckingShim":
        registry.write(self.state_dir, self.record)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        registry.remove(self.state_dir, self.record.id)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def restart_empty(server) -> None:
    """kill -9 a real server and start the same binary on the same port with no data (a cache without persistence).

    The ``RunningServer`` object is updated in place, so the fixture that started it stops the new process.
    """
    import shutil

    from migrator import servers

    old_dir, owned = server.dir, server._owns_dir
    server.proc.kill()
    server.proc.wait(10)
    for stream in (server.proc.stdout, server.proc.stderr):
        if stream:
            stream.close()
    fresh = servers.start(server.binary, port=server.port, password=server.password)
    server.proc, server.dir, server._owns_dir = fresh.proc, fresh.dir, True
    if owned:
        shutil.rmtree(old_dir, ignore_errors=True)
