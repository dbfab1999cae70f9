"""Keys the shim recorded as dirty, seen from the repair (``migrator sync --dirty``).

The files in ``state_dir/dirty/`` and their API belong to the shim (``migrator.shim.dirty``, in
the format agreed with this module): complete ``*.jsonl`` files of marks ``{"db", "key"
(base64), "ts", ...}``, and ``*.dbwide`` marks for a lost write without keys (FLUSHDB...),
which only a full sync repairs. Here marks are grouped by database for the repair, and cleared
once repaired — only those made before they were listed, so a key marked again while it was
being copied stays dirty.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from migrator.data.keyspace import Selection


@dataclass
class DirtyKeys:
    listed_at: float  # epoch seconds
    keys: dict[int, set[bytes]] = field(default_factory=dict)
    whole_dbs: set[int] = field(default_factory=set)  # lost writes without keys: need a full sync

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.keys.values()) + len(self.whole_dbs)


def _any_marks(state_dir: Path | str) -> bool:
    """Whether the folder holds any mark file (spares loading the shim's package when not)."""
    from migrator.control import files

    return any(not p.name.startswith(".") for p in files.listdir(Path(state_dir) / "dirty"))


def list_dirty(state_dir: Path | str, since: float = 0.0) -> DirtyKeys:
    """The dirty marks made at or after ``since`` (epoch seconds), by database."""
    out = DirtyKeys(listed_at=time.time())
    if not _any_marks(state_dir):
        return out
    from migrator.shim.dirty import list_dirty as shim_list  # the shim owns the files

    for mark in shim_list(state_dir):
        if mark.since < since:
            continue
        if mark.key is None:
            out.whole_dbs.add(mark.db)
        else:
            out.keys.setdefault(mark.db, set()).add(mark.key)
    return out


def clear_repaired(state_dir: Path | str, dirty: DirtyKeys, still_dirty: set[tuple[int, bytes]]) -> int:
    """Clear the listed key marks that were repaired (not ``still_dirty``); returns how many."""
    from migrator.shim.dirty import clear_dirty as shim_clear

    done = [(db, k) for db, keys in dirty.keys.items() for k in keys if (db, k) not in still_dirty]
    return shim_clear(state_dir, done, before=dirty.listed_at) if done else 0


def clear_covered(state_dir: Path | str, before: float, covered: Callable[[int, bytes | None], bool]) -> int:
    """After a complete full sync whose pass started at ``before``: the marks made earlier on keys
    (or whole databases) it ``covered`` are repaired by it."""
    if not _any_marks(state_dir):
        return 0
    from migrator.shim.dirty import clear_dirty as shim_clear
    from migrator.shim.dirty import list_dirty as shim_list

    done = [(m.db, m.key) for m in shim_list(state_dir) if m.since < before and covered(m.db, m.key)]
    return shim_clear(state_dir, done, before=before) if done else 0


def clear_walked(state_dir: Path | str, before: float, dbs: list[int], selection: Selection) -> int:
    """After a complete walk (a full sync pass, or an exhaustive clean check) that began at
    ``before``: marks made earlier on keys it walked — ``selection``'s keys in ``dbs``, and whole
    databases if it selected everything — are repaired by it."""
    everything = selection.include == ["*"] and not selection.exclude

    def covered(db: int, key: bytes | None) -> bool:
        return db in dbs and (everything if key is None else selection.wants(key))

    return clear_covered(state_dir, before, covered)
