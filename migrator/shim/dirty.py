"""Dirty keys: keys whose latest write could not be applied to the shadow side.

A write the shadow did not apply (it was down, timed out, errored, did not know the command, or
the mirror queue was full) leaves the two sides different for that key. The key is recorded
here, never dropped silently; the ``no_dirty_keys`` gate blocks the next cutover until a repair
(``migrator sync``'s repair) has copied the key again and cleared it.

Files, in ``state_dir/dirty/``:

- ``<shim id>.jsonl``: appended by one shim: ``{"ts", "time", "db", "key" | "key_b64",
  "reason", "command", "shim"}``; ``"scope": "db"`` with no key when a keyless write (FLUSHDB,
  SWAPDB...) was lost, meaning the whole database must be repaired.
- ``cleared.jsonl``: appended by ``clear_dirty``: ``{"ts", "db", "key"}`` or ``{"ts", "all": true}``.

A key is dirty when its newest mark is newer than its newest clear, so a key that becomes dirty
again while a repair runs stays dirty. Python API: ``list_dirty``, ``count_dirty``,
``clear_dirty`` (see docs/shim.md).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator.state import iso, now

DIRTY_DIR = "dirty"
CLEARED_FILE = "cleared.jsonl"
DB_SCOPE = None  # the "key" of a whole-database mark


@dataclass(frozen=True)
class DirtyKey:
    db: int
    key: bytes | None  # None: the whole database
    reason: str
    command: str
    since: float  # epoch seconds of the newest mark
    shim: str

    @property
    def display(self) -> str:
        if self.key is None:
            return f"db{self.db}:*"
        return f"db{self.db}:{self.key.decode('utf-8', 'backslashreplace')}"


def dirty_dir(state_dir: Path | str) -> Path:
    return Path(state_dir) / DIRTY_DIR


def _encode_key(key: bytes | None) -> dict[str, Any]:
    if key is None:
        return {"scope": "db"}
    try:
        text = key.decode("utf-8")
        if text.isprintable():
            return {"key": text}
    except UnicodeDecodeError:
        pass
    return {"key_b64": base64.b64encode(key).decode()}


def _decode_key(d: dict[str, Any]) -> bytes | None:
    if "key" in d and d["key"] is not None:
        return d["key"].encode("utf-8")
    if "key_b64" in d:
        return base64.b64decode(d["key_b64"])
    return None


def _append(path: Path, lines: list[str], fsync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, ("\n".join(lines) + "\n").encode())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue
    except FileNotFoundError:
        return


def list_dirty(state_dir: Path | str) -> list[DirtyKey]:
    """Every key that is dirty now, across all shims (oldest mark first)."""
    d = dirty_dir(state_dir)
    if not d.is_dir():
        return []
    cleared_all = 0.0
    cleared: dict[tuple[int, bytes | None], float] = {}
    for c in _read_jsonl(d / CLEARED_FILE):
        ts = float(c.get("ts", 0))
        if c.get("all"):
            cleared_all = max(cleared_all, ts)
        else:
            k = (int(c.get("db", 0)), _decode_key(c))
            cleared[k] = max(cleared.get(k, 0.0), ts)
    latest: dict[tuple[int, bytes | None], DirtyKey] = {}
    for f in sorted(d.glob("*.jsonl")):
        if f.name == CLEARED_FILE:
            continue
        for m in _read_jsonl(f):
            ts = float(m.get("ts", 0))
            k = (int(m.get("db", 0)), _decode_key(m))
            if ts <= cleared_all or ts <= cleared.get(k, 0.0):
                continue
            old = latest.get(k)
            if old is None or ts > old.since:
                latest[k] = DirtyKey(k[0], k[1], m.get("reason", ""), m.get("command", ""), ts, m.get("shim", ""))
    return sorted(latest.values(), key=lambda x: x.since)


def count_dirty(state_dir: Path | str) -> int:
    return len(list_dirty(state_dir))


def clear_dirty(state_dir: Path | str, keys: Iterable[tuple[int, bytes | None]] | None = None,
                before: float | None = None) -> int:
    """Mark keys repaired: ``keys`` as (db, key) pairs (key None: the whole-db mark), or all.

    ``before`` is when the repair read the dirty list (epoch seconds, default now): marks made
    after it stay, since those writes may have happened after the repair copied the key.
    Returns how many lines were written.
    """
    ts = time.time() if before is None else float(before)
    path = dirty_dir(state_dir) / CLEARED_FILE
    if keys is None:
        _append(path, [json.dumps({"ts": ts, "time": iso(now()), "all": True})])
        return 1
    lines = [json.dumps({"ts": ts, "db": int(db), **_encode_key(key)}) for db, key in keys]
    if lines:
        _append(path, lines)
    return len(lines)


class DirtyRecorder:
    """One shim's dirty marks: an in-memory set (to route reads of dirty keys) and buffered appends."""

    def __init__(self, state_dir: Path | str, shim_id: str) -> None:
        self.state_dir = Path(state_dir)
        self.shim_id = shim_id
        self.path = dirty_dir(state_dir) / f"{shim_id}.jsonl"
        self.keys: set[tuple[int, bytes | None]] = set()
        self.marked_total = 0
        self._lines: list[str] = []
        self._cleared_mtime = 0

    def add(self, db: int, keys: list[bytes], reason: str, command: bytes) -> None:
        ts = time.time()
        cmd = command.decode("utf-8", "replace").upper()
        for key in keys or [None]:
            self.marked_total += 1
            self.keys.add((db, key))
            self._lines.append(json.dumps({"ts": ts, "time": iso(now()), "db": db, **_encode_key(key), "reason": reason,
                                           "command": cmd, "shim": self.shim_id}))

    def is_dirty(self, db: int, keys: list[bytes]) -> bool:
        if (db, None) in self.keys:
            return True
        return any((db, k) in self.keys for k in keys)

    def take(self) -> list[str]:
        """The buffered marks, handed over for ``write`` (called on the event loop's thread)."""
        lines, self._lines = self._lines, []
        return lines

    def write(self, lines: list[str]) -> None:
        """Persist marks (fsynced: a mark must survive a crash). Blocking I/O: run off the loop."""
        if lines:
            _append(self.path, lines)

    def flush(self) -> None:
        self.write(self.take())

    def refresh(self) -> None:
        """Forget keys a repair cleared (checked cheaply by the cleared file's mtime). Blocking I/O."""
        try:
            mtime = (dirty_dir(self.state_dir) / CLEARED_FILE).stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime != self._cleared_mtime:
            self._cleared_mtime = mtime
            self.flush()
            self.keys = {(d.db, d.key) for d in list_dirty(self.state_dir)}
