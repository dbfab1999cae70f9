"""Files the shims share with the commands: in the state folder, or in etcd when it is bound.

The dirty-key marks (``state_dir/dirty/``) and the divergence counters
(``state_dir/shim/counters/``) are written by every shim and read by ``advance``, ``status``
and the repair, possibly on other hosts. Their modules name them by path as before; these
functions keep them under ``files/<path relative to the state folder>`` in etcd when the
folder's control plane is etcd (``migrator.control.bound``), and on disk otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

from migrator import control


def _remote(path: Path) -> tuple[object, str] | None:
    """(etcd control, path relative to its state folder) if ``path`` lies in a folder bound to etcd."""
    if not control._BOUND:
        return None
    p = Path(path).resolve()
    for base, ctl in list(control._BOUND.items()):
        if p == base or base in p.parents:
            return ctl, p.relative_to(base).as_posix()
    return None


def listdir(folder: Path) -> list[Path]:
    """The files directly in ``folder`` (none if it does not exist), sorted by name."""
    r = _remote(folder)
    if r is not None:
        ctl, rel = r
        return [Path(folder) / name.rsplit("/", 1)[-1] for name in ctl.file_list(rel)]
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def read_text(path: Path) -> str:
    """The file's text; FileNotFoundError if there is none."""
    r = _remote(path)
    if r is not None:
        ctl, rel = r
        text = ctl.file_get(rel)
        if text is None:
            raise FileNotFoundError(str(path))
        return text
    return Path(path).read_text(encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    """Write the whole file at once (a reader sees the old text or the new, never a mix)."""
    r = _remote(path)
    if r is not None:
        ctl, rel = r
        ctl.file_put(rel, text)
        return
    from migrator.state import atomic_write_text

    atomic_write_text(Path(path), text)


def unlink(path: Path) -> None:
    """Remove the file if it is there."""
    r = _remote(path)
    if r is not None:
        ctl, rel = r
        ctl.file_delete(rel)
        return
    Path(path).unlink(missing_ok=True)


def signature(folder: Path) -> int:
    """A number that changes when a file in ``folder`` is added, rewritten or removed."""
    r = _remote(folder)
    if r is not None:
        ctl, rel = r
        return ctl.files_revision(rel)
    try:
        return os.stat(folder).st_mtime_ns
    except FileNotFoundError:
        return 0
