"""A running sync's or check's progress, published for ``migrator status --watch``.

While it runs, ``migrator sync`` (or ``check``) rewrites ``state_dir/<kind>/progress.json``
atomically at most once a second: its pid and host, keys done of the expected total, and the
rate over the last ``WINDOW_S`` seconds. When it ends (however it ends, bar a SIGKILL) the file
says so. A reader that finds a file of a process that is gone reports it as interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from migrator.procs import pid_alive
from migrator.state import atomic_write_json, iso, now

FILE = "progress.json"
EVERY_S = 1.0  # at most one write a second
WINDOW_S = 30.0  # the rate (and so the ETA) is measured over this much recent progress
STALE_S = 30.0  # a running job whose file is older than this is reported as stalled


def path(state_dir: Path | str, kind: str) -> Path:
    return Path(state_dir) / kind / FILE


class Publisher:
    """Writes one job's progress file; ``update`` is cheap to call per batch."""

    def __init__(self, state_dir: Path | str, kind: str, mode: str) -> None:
        self.path = path(state_dir, kind)
        self.kind, self.mode = kind, mode
        self.started_at = iso(now())
        self.t0 = time.monotonic()
        self.done = self.total = 0
        self.samples: deque[tuple[float, int]] = deque()
        self.last_write = 0.0
        self.shards: list[dict] | None = None  # a cluster sync: per source shard (``cluster_sync``)

    def set_shards(self, rows: list[dict]) -> None:
        self.shards = rows

    def update(self, done: int, total: int | None = None, force: bool = False) -> None:
        self.done = done
        if total is not None:
            self.total = total
        t = time.monotonic()
        if not force and t - self.last_write < EVERY_S:
            return
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[0][0] > WINDOW_S:
            self.samples.popleft()
        self._write("running")
        self.last_write = t

    def rate(self) -> float:
        """Keys a second over the recent window (0 until two samples a moment apart exist)."""
        if len(self.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return max(0.0, (d1 - d0) / (t1 - t0)) if t1 > t0 else 0.0

    def finish(self, outcome: str) -> None:
        self._write(outcome)

    def _write(self, outcome: str) -> None:
        rate = self.rate()
        left = max(0, self.total - self.done)
        try:
            atomic_write_json(self.path, {
                "kind": self.kind, "mode": self.mode, "pid": os.getpid(), "host": socket.gethostname(),
                "started_at": self.started_at, "updated_at": iso(now()), "ts": time.time(),
                "elapsed_s": round(time.monotonic() - self.t0, 1), "done": self.done, "total": self.total,
                "rate": round(rate, 1), "eta_s": round(left / rate, 1) if rate > 0 and outcome == "running" else None,
                "outcome": outcome, **({"shards": self.shards} if self.shards is not None else {}),
            })
        except OSError:  # progress is for the operator's eyes: never fail the job over it
            pass


def read(state_dir: Path | str, kind: str) -> dict[str, Any] | None:
    """The last published progress of ``kind``, with ``state``: running, stalled, interrupted,
    or the outcome it ended with (complete, incomplete, failed); None if it never ran."""
    try:
        data = json.loads(path(state_dir, kind).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    outcome = data.get("outcome", "running")
    age = max(0.0, time.time() - float(data.get("ts", 0)))
    state = outcome
    if outcome == "running":
        if data.get("host") == socket.gethostname() and not pid_alive(int(data.get("pid", 0))):
            state = "interrupted"
        elif age > STALE_S:
            state = "stalled"
    total, done = int(data.get("total") or 0), int(data.get("done") or 0)
    data["state"] = state
    data["age_s"] = round(age, 1)
    data["percent"] = round(min(100.0, 100.0 * done / total), 1) if total else None
    if state != "running":
        data["eta_s"] = None
    return data
