"""Keys the shim recorded as dirty (a mirrored write it could not apply or confirm on the target).

Interface agreed with the shim (until ``migrator.shim`` offers its own API): the shim writes
files ``state_dir/dirty/*.jsonl`` *complete* (temp file + rename) and never touches them again;
each line is ``{"db": 0, "key": "<base64 of the key's bytes>"}``. ``migrator sync --dirty``
re-copies the keys of the files present when it starts and deletes those files afterwards, so
keys recorded meanwhile wait for the next run.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

DIRTY_DIR = "dirty"


@dataclass
class DirtyKeys:
    files: list[Path] = field(default_factory=list)
    keys: dict[int, set[bytes]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.keys.values())


def dirty_dir(state_dir: Path | str) -> Path:
    return Path(state_dir) / DIRTY_DIR


def list_dirty(state_dir: Path | str) -> DirtyKeys:
    """Every dirty key recorded so far, by database, and the files they came from."""
    out = DirtyKeys()
    d = dirty_dir(state_dir)
    if not d.is_dir():
        return out
    for f in sorted(d.glob("*.jsonl")):
        out.files.append(f)
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            out.keys.setdefault(int(entry.get("db", 0)), set()).add(base64.b64decode(entry["key"]))
    return out


def clear_dirty(dirty: DirtyKeys) -> None:
    """Forget the files whose keys were re-copied (and verified)."""
    for f in dirty.files:
        f.unlink(missing_ok=True)


def record_dirty(state_dir: Path | str, name: str, keys: list[tuple[int, bytes]]) -> Path:
    """Write one dirty-key file the way the shim does (used by tests and by tooling)."""
    from migrator.state import atomic_write_text

    lines = [json.dumps({"db": db, "key": base64.b64encode(k).decode()}) for db, k in keys]
    path = dirty_dir(state_dir) / f"{name}.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
