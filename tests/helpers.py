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


class DelayingForwarder:
    """A TCP forwarder on a free loopback port that delays each chunk, each way, by ``delay`` seconds.

    Put in front of a server it makes that server slow as the shim sees it (a loaded or distant
    host). Runs its own asyncio loop in a thread; ``close()`` (or the ``with`` block) stops it and
    every connection it holds.
    """

    def __init__(self, port: int, delay: float = 0.005) -> None:
        import asyncio
        import threading

        self.upstream, self.delay = port, delay
        self.loop = asyncio.new_event_loop()
        self._conns: set = set()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, name="delaying-forwarder", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _pipe(self, reader, writer) -> None:
        # Each chunk is written ``delay`` after it arrived, in order, without waiting for the one
        # before: added latency, not a queue (timers with equal delays fire in the order set).
        loop = self.loop
        try:
            while data := await reader.read(65536):
                loop.call_later(self.delay, writer.write, data)
        except (ConnectionError, OSError):
            pass
        finally:
            loop.call_later(self.delay, writer.close)

    async def _serve(self, creader, cwriter) -> None:
        import asyncio

        try:
            ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            cwriter.close()
            return
        self._conns.update((cwriter, uwriter))
        await asyncio.gather(self._pipe(creader, uwriter), self._pipe(ureader, cwriter))
        self._conns.difference_update((cwriter, uwriter))

    def close(self) -> None:
        import asyncio

        async def stop() -> None:
            self.server.close()
            for w in list(self._conns):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> DelayingForwarder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
