"""The migration's control plane: where its state, journal, lock, intent and shim registry live.

Two backends behind one interface (``migrator.state.StateStore``'s methods and the functions of
``migrator.registry``):

- the state folder (``state_dir``; the default, unchanged on disk);
- etcd (``control: {etcd: ...}`` in the playbook; ``migrator.control.etcd``), shared by every
  host that runs a shim or a command.

A playbook that names etcd *binds* its state folder to the etcd backend when it is loaded
(``bind``). Code that is handed only the state folder (``registry.read_all(state_dir)``) asks
``bound(state_dir)`` which backend serves it, so every call site works with both backends
unchanged. The folder itself still holds what stays local: reports, logs, progress files.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

_BOUND: dict[Path, Any] = {}  # state folder -> migrator.control.etcd.EtcdControl
_LOCK = threading.Lock()


def _key(state_dir: Path | str) -> Path:
    return Path(state_dir).resolve()


def bind(pb: Any) -> Any:
    """Bind ``pb``'s state folder to its etcd control plane (no connection is made yet), or unbind it."""
    etcd = pb.control.etcd
    key = _key(pb.state_path)
    with _LOCK:
        if etcd is None:
            _BOUND.pop(key, None)
            return None
        from migrator.control.etcd import EtcdControl

        current = _BOUND.get(key)
        if current is not None and current.same_config(pb):
            return current
        if current is not None:
            current.close()
        _BOUND[key] = control = EtcdControl(pb.control.etcd, pb.name)
        return control


def _after_fork() -> None:
    """A forked child (``shim --workers``) opens its own connections and takes its own leases."""
    for ctl in _BOUND.values():
        ctl.forget_connections()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def bound(state_dir: Path | str) -> Any:
    """The etcd control plane serving ``state_dir``, or None (the folder itself holds everything)."""
    if not _BOUND:
        return None
    return _BOUND.get(_key(state_dir))


