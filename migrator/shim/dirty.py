"""Dirty keys: keys whose latest write could not be applied to the shadow side.

A write the shadow did not apply (it was down, timed out, errored, did not know the command, or
the mirror queue was full) leaves the two sides different for that key. The key is recorded
here, never dropped silently; the ``no_dirty_keys`` gate blocks the next cutover until a repair
(``migrator sync --dirty``) has copied the key again and cleared it.

Files, in ``state_dir/dirty/`` — the format agreed with ``migrator.data.dirty`` (the repair):

- ``<shim id>.<ns>.jsonl``: the marks of one flush, written complete (temp file, fsync, rename)
  and never modified; one line per key: ``{"db": 0, "key": "<base64>", "reason", "command",
  "ts", "time", "shim"}``. The repair re-copies the keys of the files present when it starts
  and deletes those files, so keys marked meanwhile wait for its next run.
- ``<shim id>.<ns>.dbwide``: the same for a write without keys (FLUSHDB, SWAPDB, FUNCTION...)
  that was lost: the whole database ``db`` needs a full sync. Not ``*.jsonl``, so a key repair
  does not take it for done; clear it with ``clear_dirty`` after a full sync.

Python API (see docs/shim.md): ``list_dirty``, ``count_dirty``, ``clear_dirty``.

With the etcd control plane the same files are etcd keys (``migrator.control.files``), so the
marks of shims on every host reach ``advance``'s gate and the repair; marks that could not be
written while etcd was out of reach are kept and written with the next flush.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from migrator.control import files
from migrator.errors import MigratorError
from migrator.state import iso, now

DIRTY_DIR = "dirty"
KEYS_SUFFIX = ".jsonl"
DBWIDE_SUFFIX = ".dbwide"
MAX_FILE_BYTES = 256 * 1024  # a flush with more marks is written as several files


@dataclass(frozen=True)
class DirtyKey:
    db: int
    key: bytes | None  # None: the whole database
    reason: str
    command: str
    since: float  # epoch seconds of the newest mark
    shim: str
    file: Path

    @property
    def display(self) -> str:
        if self.key is None:
            return f"db{self.db}:*"
        return f"db{self.db}:{self.key.decode('utf-8', 'backslashreplace')}"


def dirty_dir(state_dir: Path | str) -> Path:
    return Path(state_dir) / DIRTY_DIR


def _files(state_dir: Path | str) -> list[Path]:
    return [p for p in files.listdir(dirty_dir(state_dir)) if p.suffix in (KEYS_SUFFIX, DBWIDE_SUFFIX)
            and not p.name.startswith(".")]


def _read(path: Path) -> list[dict]:
    out = []
    try:
        text = files.read_text(path)
    except FileNotFoundError:
        return out  # taken by a repair meanwhile
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _mark(entry: dict, path: Path) -> DirtyKey:
    key = base64.b64decode(entry["key"]) if entry.get("key") is not None else None
    return DirtyKey(int(entry.get("db", 0)), key, entry.get("reason", ""), entry.get("command", ""),
                    float(entry.get("ts", 0)), entry.get("shim", ""), path)


def list_dirty(state_dir: Path | str) -> list[DirtyKey]:
    """Every key (or whole database) that is dirty now, across all shims, oldest first."""
    latest: dict[tuple[int, bytes | None], DirtyKey] = {}
    for f in _files(state_dir):
        for entry in _read(f):
            m = _mark(entry, f)
            old = latest.get((m.db, m.key))
            if old is None or m.since > old.since:
                latest[(m.db, m.key)] = m
    return sorted(latest.values(), key=lambda x: x.since)


def count_dirty(state_dir: Path | str) -> int:
    return len(list_dirty(state_dir))


def clear_dirty(state_dir: Path | str, keys: Iterable[tuple[int, bytes | None]] | None = None,
                before: float | None = None) -> int:
    """Mark keys repaired: ``keys`` as (db, key) pairs (key None: a whole-database mark), or all.

    Only marks made up to ``before`` (epoch seconds; default now) are cleared: pass the time the
    repair listed the dirty keys, so a key written again while it was being copied stays dirty.
    Returns how many marks were removed.
    """
    cutoff = time.time() if before is None else float(before)
    wanted = None if keys is None else {(int(db), k) for db, k in keys}
    removed = 0
    for f in _files(state_dir):
        entries = _read(f)
        keep = []
        for e in entries:
            m = _mark(e, f)
            if m.since <= cutoff and (wanted is None or (m.db, m.key) in wanted):
                removed += 1
            else:
                keep.append(e)
        if len(keep) == len(entries):
            continue
        if keep:
            files.write_text(f, "".join(json.dumps(e) + "\n" for e in keep))
        else:
            files.unlink(f)
    return removed


class DirtyRecorder:
    """One shim's dirty marks: an in-memory set (to route reads of dirty keys) and buffered files."""

    def __init__(self, state_dir: Path | str, shim_id: str) -> None:
        self.state_dir = Path(state_dir)
        self.shim_id = shim_id
        self.keys: dict[tuple[int, bytes | None], float] = {}  # (db, key) -> newest mark's time
        self.marked_total = 0
        self.covered_before = 0.0  # marks older than the last complete full sync's pass
        self._lines: list[tuple[bool, str]] = []  # (whole database?, line)
        self._unsent: list[tuple[bool, str]] = []  # marks a failed write left (the control plane was out of reach)
        self._write_lock = threading.Lock()
        self._dir_mtime = 0

    def add(self, db: int, keys: list[bytes], reason: str, command: bytes) -> None:
        ts = time.time()
        cmd = command.decode("utf-8", "replace").upper()
        for key in keys or [None]:
            self.marked_total += 1
            self.keys[(db, key)] = ts
            entry = {"db": db, "key": base64.b64encode(key).decode() if key is not None else None, "reason": reason,
                     "command": cmd, "ts": ts, "time": iso(now()), "shim": self.shim_id}
            self._lines.append((key is None, json.dumps(entry)))

    def is_dirty(self, db: int, keys: list[bytes]) -> bool:
        if (db, None) in self.keys:
            return True
        return any((db, k) in self.keys for k in keys)

    def take(self) -> list[tuple[bool, str]]:
        """The buffered marks, handed over for ``write`` (called on the event loop's thread)."""
        lines, self._lines = self._lines, []
        return lines

    def write(self, lines: list[tuple[bool, str]]) -> None:
        """Persist marks as new complete files (a mark must survive a crash). Blocking I/O: off the loop.

        Marks that cannot be written (etcd out of reach) are kept for the next call, not dropped.
        """
        with self._write_lock:
            lines, self._unsent = self._unsent + list(lines), []
            stamp = time.time_ns()
            # Files of at most MAX_FILE_BYTES (an etcd value is limited to 1.5 MB by default).
            chunks: list[tuple[bool, list[tuple[bool, str]]]] = []
            for dbwide in (False, True):
                size = MAX_FILE_BYTES
                for x in lines:
                    if x[0] is not dbwide:
                        continue
                    if size + len(x[1]) + 1 > MAX_FILE_BYTES:
                        chunks.append((dbwide, []))
                        size = 0
                    chunks[-1][1].append(x)
                    size += len(x[1]) + 1
            for i, (dbwide, part) in enumerate(chunks):
                suffix = DBWIDE_SUFFIX if dbwide else KEYS_SUFFIX
                try:
                    files.write_text(dirty_dir(self.state_dir) / f"{self.shim_id}.{stamp + i}{suffix}",
                                     "".join(line + "\n" for _w, line in part))
                except MigratorError:
                    self._unsent = [x for _d, rest in chunks[i:] for x in rest]  # kept for the next call
                    raise

    def flush(self) -> None:
        self.write(self.take())

    def refresh(self) -> None:
        """Re-read the marks when the folder changed (a repair deleted files). Call on the loop's thread."""
        self.adopt(self.scan())

    def scan(self) -> tuple[int, list[DirtyKey]] | None:
        """The marks written now, if the folder changed since the last ``adopt`` (blocking: may run off the loop)."""
        mtime = files.signature(dirty_dir(self.state_dir))
        if mtime == self._dir_mtime:
            return None
        return mtime, list_dirty(self.state_dir)

    def adopt(self, scanned: tuple[int, list[DirtyKey]] | None) -> None:
        """Take the marks ``scan`` read, with those not written yet. Call on the loop's thread."""
        if scanned is None:
            return
        self._dir_mtime, marks = scanned
        keys = {(d.db, d.key): d.since for d in marks if d.since >= self.covered_before}
        for _wide, line in self._unsent + self._lines:  # marks not written yet
            m = json.loads(line)
            keys[(m["db"], base64.b64decode(m["key"]) if m["key"] is not None else None)] = m["ts"]
        self.keys = keys

    def covered_by_sync(self, pass_started: float) -> None:
        """A complete full sync whose pass started at ``pass_started`` repaired every older mark."""
        if pass_started > self.covered_before:
            self.covered_before = pass_started
            self.keys = {k: ts for k, ts in self.keys.items() if ts >= pass_started}
