"""Divergences: a JSONL log of each one, and per-generation counters a gate can read.

- ``state_dir/shim/divergences.jsonl``: one line per divergence (time, shim, phase, generation,
  command, key names, kind, each side's reply digest, length and RESP type; the values only with
  ``shim.log_values: true``). Appended by every shim; lines are small single writes.
- ``state_dir/shim/counters/g<generation>.<shim id>.json``: how many replies this shim compared
  and how many diverged while that generation was applied; and, over the commands sent to both
  sides, each side's latency histogram (``migrator.shim.metrics.BUCKETS``) and the errors one
  side returned where the other did not (the ``latency`` and ``error_rate`` gates). A restarted
  shim writes a new file and the gate sums them all, so counts survive restarts (up to the last
  flush, every heartbeat). With the etcd control plane the counter files are etcd keys, shared
  by the shims of every host (``migrator.control.files``); the log stays in each host's folder.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrator import reports
from migrator.control import files
from migrator.errors import MigratorError
from migrator.redact import redact
from migrator.shim.commands import SIDE_NAMES
from migrator.shim.compare import KINDS, digest
from migrator.shim.metrics import Histogram
from migrator.state import iso, now

SHIM_DIR = "shim"
LOG_FILE = "divergences.jsonl"
COUNTERS_DIR = "counters"
MAX_LINES_PER_FLUSH = 1000  # a storm of divergences is counted exactly but logged in part
MAX_ERROR_COMMANDS = 32  # command names kept per tally for the target's one-sided errors (the count is exact)
_VALUE_LIMIT = 512


def log_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / SHIM_DIR / LOG_FILE


def counters_dir(state_dir: Path | str) -> Path:
    return Path(state_dir) / SHIM_DIR / COUNTERS_DIR


@dataclass
class Tally:
    """Replies compared and divergences; ``awaiting_repair``: divergences on a key already marked dirty.

    A key marked dirty is known to differ until a repair re-copies it, and the repair itself
    races live writes until its verification has re-copied the key: writes to it diverge for a
    reason already on record, which the ``no_dirty_keys`` gate holds the cutover for. They are
    logged and shown, not counted in the rate (the divergence that made the key dirty was).

    Over the commands both sides answered (``paired``): each side's latency, the errors only the
    target returned (``target_errors``, by command name in ``target_error_commands``) and only
    the source returned (``source_errors``); ``target_lacks``: commands not sent to the target
    because it does not have them (what it would have refused).
    """

    compared: int = 0
    divergent: int = 0
    by_kind: Counter = field(default_factory=Counter)
    awaiting_repair: int = 0
    paired: int = 0
    target_errors: int = 0
    source_errors: int = 0
    target_lacks: int = 0
    target_error_commands: Counter = field(default_factory=Counter)
    latency: list[Histogram] = field(default_factory=lambda: [Histogram(), Histogram()])

    def to_json(self) -> dict[str, Any]:
        return {"compared": self.compared, "divergent": self.divergent, "by_kind": dict(self.by_kind),
                "awaiting_repair": self.awaiting_repair, "paired": self.paired, "target_errors": self.target_errors,
                "source_errors": self.source_errors, "target_lacks": self.target_lacks,
                "target_error_commands": dict(self.target_error_commands),
                "latency": {SIDE_NAMES[i]: h.to_json() for i, h in enumerate(self.latency)}}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Tally:
        d = d or {}
        t = cls(int(d.get("compared", 0)), int(d.get("divergent", 0)),
                Counter({k: int(v) for k, v in (d.get("by_kind") or {}).items()}), int(d.get("awaiting_repair", 0)),
                int(d.get("paired", 0)), int(d.get("target_errors", 0)), int(d.get("source_errors", 0)),
                int(d.get("target_lacks", 0)),
                Counter({k: int(v) for k, v in (d.get("target_error_commands") or {}).items()}))
        lat = d.get("latency") or {}
        for i, h in enumerate(t.latency):
            h.add(lat.get(SIDE_NAMES[i]) or {})
        return t

    def target_error(self, command: str, n: int = 1) -> None:
        self.target_errors += n
        if command in self.target_error_commands or len(self.target_error_commands) < MAX_ERROR_COMMANDS:
            self.target_error_commands[command] += n


@dataclass
class PhaseCounters:
    """One generation's counts, and the counts since the last complete full sync the shim saw.

    Mirroring starts before the sync has copied the existing keys, so a write to a key the
    target does not have yet differs legitimately; the gate counts from the sync's end when
    there is one (see ``migrator.shim.gates``).
    """

    generation: int
    phase: str
    total: Tally = field(default_factory=Tally)
    sync_id: str | None = None
    after_sync: Tally = field(default_factory=Tally)

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "phase": self.phase, **self.total.to_json(),
                "sync_id": self.sync_id, "after_sync": self.after_sync.to_json()}


def _side(raw: bytes | None, value: Any, log_values: bool) -> dict[str, Any]:
    if raw is None:
        return {"reply": "none"}
    out: dict[str, Any] = {"digest": digest(raw), "length": len(raw), "resp_type": chr(raw[0]) if raw else ""}
    if log_values:
        out["value"] = raw[:_VALUE_LIMIT].decode("utf-8", "backslashreplace")
        if len(raw) > _VALUE_LIMIT:
            out["truncated"] = True
    return out


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


class DivergenceRecorder:
    """Counts comparisons and divergences in memory; ``flush`` persists them (off the event loop)."""

    def __init__(self, state_dir: Path | str, shim_id: str, log_values: bool = False) -> None:
        self.state_dir = Path(state_dir)
        self.shim_id = shim_id
        self.log_values = log_values
        self._sync_id: str | None = None
        self.current = PhaseCounters(0, "planned")
        self._lines: list[str] = []
        self._suppressed = 0
        self._dirty_generations: dict[int, PhaseCounters] = {}
        self._unsent: dict[int, dict[str, Any]] = {}  # counter snapshots a failed write left, by generation

    def start_generation(self, generation: int, phase: str) -> None:
        if generation != self.current.generation:
            self._dirty_generations[self.current.generation] = self.current
            self.current = self._resume(generation, phase)
        self.current.phase = phase

    def _resume(self, generation: int, phase: str) -> PhaseCounters:
        """This shim's counters for ``generation`` so far: a shim restarted with the same id continues them."""
        pc = PhaseCounters(generation, phase, sync_id=self._sync_id)
        try:
            data = json.loads(files.read_text(counters_dir(self.state_dir) / f"g{generation}.{self.shim_id}.json"))
        except (OSError, ValueError, MigratorError):
            return pc
        pc.total = Tally.from_json(data)
        if data.get("sync_id") == self._sync_id:
            pc.after_sync = Tally.from_json(data.get("after_sync"))
        return pc

    @property
    def sync_id(self) -> str | None:
        return self._sync_id

    def sync_finished(self, sync_id: str | None) -> None:
        """A (newer) complete full sync was seen: count anew from now for the gate's sync window."""
        if sync_id != self._sync_id:
            self._sync_id = sync_id
            self.current.sync_id = sync_id
            self.current.after_sync = Tally()

    def compared(self, n: int = 1) -> None:
        cur = self.current
        cur.total.compared += n
        cur.after_sync.compared += n

    def paired(self, latency: tuple[float, float] | None, n: int, target_errors: list[bytes], source_errors: int) -> None:
        """``n`` commands both sides answered, after ``latency`` (source, target) seconds (None: not a
        server's latency, e.g. a blocking command's wait); the names of the commands only the target
        refused, and how many only the source refused."""
        for tally in (self.current.total, self.current.after_sync):
            tally.paired += n
            if latency is not None:
                tally.latency[0].observe(latency[0], n)
                tally.latency[1].observe(latency[1], n)
            if source_errors:
                tally.source_errors += source_errors
            for name in target_errors:
                tally.target_error(_text(name).upper())

    def target_lacks(self, command: bytes) -> None:
        """A command not sent to the target as the shadow: it does not have it (it would have refused it)."""
        for tally in (self.current.total, self.current.after_sync):
            tally.target_lacks += 1
            tally.target_error(_text(command).upper())

    def record(self, *, kind: str, command: bytes, keys: list[bytes], db: int, source_raw: bytes | None,
               target_raw: bytes | None, awaiting_repair: bool = False) -> None:
        """One divergence; ``awaiting_repair``: on a key already marked dirty (logged, not counted, see ``Tally``)."""
        for tally in (self.current.total, self.current.after_sync):
            if awaiting_repair:
                tally.awaiting_repair += 1
            else:
                tally.divergent += 1
                tally.by_kind[kind] += 1
        if len(self._lines) >= MAX_LINES_PER_FLUSH:
            self._suppressed += 1
            return
        entry = {
            "time": iso(now()),
            "shim": self.shim_id,
            "phase": self.current.phase,
            "generation": self.current.generation,
            "command": _text(command).upper(),
            "db": db,
            "keys": [_text(k) for k in keys[:16]],
            "kind": kind,
            "source": _side(source_raw, None, self.log_values),
            "target": _side(target_raw, None, self.log_values),
        }
        if awaiting_repair:
            entry["awaiting_repair"] = True
        if len(keys) > 16:
            entry["keys_total"] = len(keys)
        line = json.dumps(redact(entry))
        self._lines.append(line)

    def take(self) -> tuple[list[str], list[dict[str, Any]]]:
        """What ``write`` persists, taken on the event loop's thread so no update is lost."""
        lines, self._lines = self._lines, []
        suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            lines.append(json.dumps({"time": iso(now()), "shim": self.shim_id, "kind": "suppressed",
                                     "count": suppressed, "note": "more divergences than the log takes per flush"}))
        pending, self._dirty_generations = self._dirty_generations, {}
        snaps = [pc.to_json() for pc in [*pending.values(), self.current]]
        return lines, snaps

    def flush(self) -> None:
        self.write(self.take())

    def write(self, taken: tuple[list[str], list[dict[str, Any]]]) -> None:
        """Append the log lines and rewrite this shim's counter files. Blocking I/O: run off the loop."""
        lines, snaps = taken
        if lines:
            path = log_path(self.state_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, ("\n".join(lines) + "\n").encode())
            finally:
                os.close(fd)
        pending = {**self._unsent, **{s["generation"]: s for s in snaps}}
        self._unsent = {}
        for gen in sorted(pending):
            snap = pending[gen]
            try:
                self._write_counters(snap)
            except MigratorError:
                self._unsent = {g: s for g, s in pending.items() if g >= gen}  # written at the next flush
                raise

    def _write_counters(self, snap: dict[str, Any]) -> None:
        data = {**snap, "shim": self.shim_id, "updated_at": iso(now()), "ts": time.time()}
        files.write_text(counters_dir(self.state_dir) / f"g{snap['generation']}.{self.shim_id}.json",
                         json.dumps(redact(data), indent=2, default=str) + "\n")


def read_counters(state_dir: Path | str, generation: int, after_sync: str | None = None) -> dict[str, Any]:
    """The sum over every shim (running or gone) of the counters for ``generation``.

    With ``after_sync`` (a sync report id), only what was counted after each shim saw that
    sync finish; a shim that had not seen it yet contributes nothing. ``latency`` holds each
    side's summed histogram (``Histogram.to_json``) over the commands sent to both sides.
    """
    total: dict[str, Any] = {"generation": generation, "compared": 0, "divergent": 0, "by_kind": {k: 0 for k in KINDS},
                             "awaiting_repair": 0, "shims": 0, "paired": 0, "target_errors": 0, "source_errors": 0,
                             "target_lacks": 0, "target_error_commands": {}}
    lat = [Histogram(), Histogram()]
    for f in files.listdir(counters_dir(state_dir)):
        if not (f.name.startswith(f"g{generation}.") and f.name.endswith(".json")):
            continue
        try:
            data = json.loads(files.read_text(f))
        except (OSError, ValueError):
            continue
        total["shims"] += 1
        if after_sync is not None:
            data = data.get("after_sync") if data.get("sync_id") == after_sync else {}
        tally = Tally.from_json(data)
        for k in ("compared", "divergent", "awaiting_repair", "paired", "target_errors", "source_errors", "target_lacks"):
            total[k] += getattr(tally, k)
        for k, v in tally.by_kind.items():
            total["by_kind"][k] = total["by_kind"].get(k, 0) + v
        for k, v in tally.target_error_commands.items():
            total["target_error_commands"][k] = total["target_error_commands"].get(k, 0) + v
        for mine, theirs in zip(lat, tally.latency):
            mine.add(theirs.to_json())
    total["latency"] = {SIDE_NAMES[i]: h.to_json() for i, h in enumerate(lat)}
    return total


def latest_complete_sync(state_dir: Path | str) -> dict[str, Any] | None:
    """The newest complete full sync report (written by ``migrator sync``), or None."""
    try:
        return reports.latest(state_dir, "sync", lambda r: r.get("mode") == "full" and bool(r.get("complete")))
    except Exception:  # noqa: BLE001 - unreadable reports: no sync window
        return None


def read_log(state_dir: Path | str) -> list[dict[str, Any]]:
    """Every divergence line (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        with log_path(state_dir).open(encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out
