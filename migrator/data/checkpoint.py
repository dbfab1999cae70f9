"""The sync's progress in ``state_dir/sync/checkpoint.json``: per-database SCAN cursor and counts.

Written atomically (``atomic_write_json``), so a sync killed at any instant leaves the previous
checkpoint or the new one. The cursor saved is the one *before* the oldest batch not yet
verified, so a resumed sync re-copies (idempotently) rather than skips an unverified batch.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from migrator.state import atomic_write_json, iso, now

SYNC_DIR = "sync"
CHECKPOINT_FILE = "checkpoint.json"
FORMAT = 1


@dataclass
class DbProgress:
    cursor: int = 0
    done: bool = False
    keys: int = 0
    bytes: int = 0


@dataclass
class Checkpoint:
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    started_at: str = field(default_factory=lambda: iso(now()))
    method: str = ""
    method_reason: str = ""
    dbs: dict[int, DbProgress] = field(default_factory=dict)
    unsettled: list[tuple[int, str]] = field(default_factory=list)  # (db, base64 key)
    completed_at: str | None = None
    runs: int = 0
    notify_before: str | None = None  # the target's notify-keyspace-events before the sync changed it
    sides: dict | None = None  # both servers as the pass began: a resume onto a restarted target starts over
    format: int = FORMAT
    # A cluster source: per source node id, {"address", "done": slot ranges verified, "keys", "bytes"}
    # (a SCAN cursor is only valid on its node, so a cluster's progress is kept by slot).
    shards: dict[str, dict] = field(default_factory=dict)

    def db(self, n: int) -> DbProgress:
        return self.dbs.setdefault(n, DbProgress())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dbs"] = {str(k): asdict(v) for k, v in self.dbs.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Checkpoint":
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported checkpoint format {d.get('format')!r}")
        cp = cls(**{k: v for k, v in d.items() if k != "dbs"})
        cp.dbs = {int(k): DbProgress(**v) for k, v in d.get("dbs", {}).items()}
        cp.unsettled = [(int(db), key) for db, key in cp.unsettled]
        return cp

    @property
    def finished(self) -> bool:
        return self.completed_at is not None


def path(state_dir: Path | str) -> Path:
    return Path(state_dir) / SYNC_DIR / CHECKPOINT_FILE


def load(state_dir: Path | str) -> Checkpoint | None:
    """The saved checkpoint, or None if there is none (or it is unreadable: then start over)."""
    try:
        return Checkpoint.from_json(json.loads(path(state_dir).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def save(state_dir: Path | str, cp: Checkpoint) -> None:
    atomic_write_json(path(state_dir), cp.to_json())


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def decode_key(text: str) -> bytes:
    return base64.b64decode(text)
