"""Divergences: a JSONL log of each one, and per-generation counters a gate can read.

- ``state_dir/shim/divergences.jsonl``: one line per divergence (time, shim, phase, generation,
  command, key names, kind, each side's reply digest, length and RESP type; the values only with
  ``shim.log_values: true``). Appended by every shim; lines are small single writes.
- ``state_dir/shim/counters/g<generation>.<shim id>.json``: how many replies this shim compared
  and how many diverged while that generation was applied. A restarted shim writes a new file
  and the gate sums them all, so counts survive restarts (up to the last flush, every heartbeat).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migrator.redact import redact
from migrator.shim.compare import KINDS, digest
from migrator.state import atomic_write_json, iso, now

SHIM_DIR = "shim"
LOG_FILE = "divergences.jsonl"
COUNTERS_DIR = "counters"
MAX_LINES_PER_FLUSH = 1000  # a storm of divergences is counted exactly but logged in part
_VALUE_LIMIT = 512


def log_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / SHIM_DIR / LOG_FILE


def counters_dir(state_dir: Path | str) -> Path:
    return Path(state_dir) / SHIM_DIR / COUNTERS_DIR


@dataclass
class PhaseCounters:
    generation: int
    phase: str
    compared: int = 0
    divergent: int = 0
    by_kind: Counter = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "phase": self.phase, "compared": self.compared,
                "divergent": self.divergent, "by_kind": dict(self.by_kind)}


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
        self.current = PhaseCounters(0, "planned")
        self.total_by_kind: Counter = Counter()
        self.total_compared = 0
        self._lines: list[str] = []
        self._suppressed = 0
        self._dirty_generations: dict[int, PhaseCounters] = {}

    def start_generation(self, generation: int, phase: str) -> None:
        if generation != self.current.generation:
            self._dirty_generations[self.current.generation] = self.current
            self.current = self._resume(generation, phase)
        self.current.phase = phase

    def _resume(self, generation: int, phase: str) -> PhaseCounters:
        """This shim's counters for ``generation`` so far: a shim restarted with the same id continues them."""
        pc = PhaseCounters(generation, phase)
        try:
            data = json.loads((counters_dir(self.state_dir) / f"g{generation}.{self.shim_id}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return pc
        pc.compared = int(data.get("compared", 0))
        pc.divergent = int(data.get("divergent", 0))
        pc.by_kind.update({k: int(v) for k, v in (data.get("by_kind") or {}).items()})
        return pc

    def compared(self, n: int = 1) -> None:
        self.current.compared += n
        self.total_compared += n

    def record(self, *, kind: str, command: bytes, keys: list[bytes], db: int, source_raw: bytes | None,
               target_raw: bytes | None) -> None:
        self.current.divergent += 1
        self.current.by_kind[kind] += 1
        self.total_by_kind[kind] += 1
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
        for snap in snaps:
            atomic_write_json(counters_dir(self.state_dir) / f"g{snap['generation']}.{self.shim_id}.json",
                              {**snap, "shim": self.shim_id, "updated_at": iso(now()), "ts": time.time()})


def read_counters(state_dir: Path | str, generation: int) -> dict[str, Any]:
    """The sum over every shim (running or gone) of the counters for ``generation``."""
    total = {"generation": generation, "compared": 0, "divergent": 0, "by_kind": {k: 0 for k in KINDS}, "shims": 0}
    d = counters_dir(state_dir)
    if not d.is_dir():
        return total
    for f in d.glob(f"g{generation}.*.json"):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        total["shims"] += 1
        total["compared"] += int(data.get("compared", 0))
        total["divergent"] += int(data.get("divergent", 0))
        for k, v in (data.get("by_kind") or {}).items():
            total["by_kind"][k] = total["by_kind"].get(k, 0) + int(v)
    return total


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
