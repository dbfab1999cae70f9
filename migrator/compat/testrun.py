"""Running the user's test command against a scratch server, and seeding that server first.

The command gets ``REDIS_URL`` and ``VALKEY_URL`` pointing at the scratch server; a string runs
through the shell, a list as argv. Output (stdout and stderr together) goes to a temporary
file so a chatty suite cannot block on a full pipe; its tail and the exit code are reported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta

import redis

from migrator.compat import typecopy
from migrator.compat.dataformat import DUMP_RESTORE, TYPE_AWARE
from migrator.compat.probe import Probe
from migrator.compat.rpc import first_line
from migrator.compat.scratch import Scratch
from migrator.redact import redact

TAIL_LINES = 40
TAIL_BYTES = 16 * 1024


@dataclass
class TestRun:
    command: str | list[str]
    exit_code: int | None  # None when it timed out or could not start
    timed_out: bool
    duration_s: float
    tail: str
    error: str = ""

    def to_json(self) -> dict:
        return self.__dict__.copy()


def run_command(command: str | list[str], url: str, timeout: timedelta) -> TestRun:
    env = {**os.environ, "REDIS_URL": url, "VALKEY_URL": url}
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(command, shell=isinstance(command, str), env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            return TestRun(command, None, False, 0.0, "", f"could not start: {e}")
        timed_out = False
        try:
            proc.wait(timeout=timeout.total_seconds())
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        return TestRun(command, None if timed_out else proc.returncode, timed_out,
                       round(time.monotonic() - started, 3), _tail(out))


def _kill_group(proc: subprocess.Popen) -> None:
    """The test command may have started children (a shell, a test runner): stop them all."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - TAIL_BYTES))
    # Redacted at once: a suite may print REDIS_URL, which can carry the target's password.
    return redact("\n".join(f.read().decode("utf-8", "replace").splitlines()[-TAIL_LINES:]))


def seed(probe: Probe, scratch: Scratch, n: int) -> dict:
    """Copy up to ``n`` sampled source keys into the scratch server, by the copy method the data check chose."""
    method = probe.facts.get("copy_method") or TYPE_AWARE
    clients: dict[int, redis.Redis] = {}
    copied, skipped = 0, {}
    for db, key in _pick(probe, n):
        if db not in clients:
            clients[db] = _scratch_db(scratch, db)
        try:
            _copy_key(probe.key_client("source", db, key), clients[db], key, method)
            copied += 1
        except (redis.exceptions.ResponseError, ValueError) as e:
            reason = first_line(e)
            skipped[reason] = skipped.get(reason, 0) + 1
    for client in clients.values():
        if client is not scratch.client:
            client.close()
    return {"requested": n, "copied": copied, "method": method, "skipped": skipped}


def _copy_key(src: redis.Redis, dst: redis.Redis, key: bytes, method: str) -> None:
    if method == DUMP_RESTORE:
        payload, pttl = src.dump(key), int(src.pttl(key))
        if payload is None:
            return
        try:
            dst.restore(key, max(pttl, 0), payload, replace=True)
            return
        except redis.exceptions.ResponseError:
            pass  # a local scratch binary older than the target may refuse the payload: copy by type instead
    kind, value, pttl = typecopy.read(src, key)
    if kind != "none":
        typecopy.write(dst, key, kind, value, pttl)


def _pick(probe: Probe, n: int) -> list[tuple[int, bytes]]:
    """Up to ``n`` sampled keys, spread over the databases in proportion to the sample."""
    keys = [(d.db, k) for d in probe.source_keys.dbs.values() for k in d.sampled]
    step = max(1, len(keys) // n) if n else 1
    return keys[::step][:n]


def _scratch_db(scratch: Scratch, db: int) -> redis.Redis:
    pool = scratch.client.connection_pool
    if pool.connection_kwargs.get("db", 0) == db:
        return scratch.client
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class,
                                                            **{**pool.connection_kwargs, "db": db}))


def describe(run: TestRun) -> str:
    cmd = run.command if isinstance(run.command, str) else " ".join(run.command)
    if run.error:
        return f"`{cmd}` {run.error}"
    if run.timed_out:
        return f"`{cmd}` timed out after {run.duration_s:.0f}s"
    return f"`{cmd}` exited {run.exit_code} after {run.duration_s:.1f}s"

