"""The target's copy in the replication strategy: the server's own full sync, watched, not made.

In this strategy ``migrator sync`` copies nothing: the target replicates the source, so its
initial copy is the server's full sync and every later write arrives by replication. This
module reads where that stands (``status``) and waits for it (``watch``), for the
``replica_in_sync`` gate, ``migrator sync`` and ``migrator status``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from migrator import replication
from migrator.connect import connect
from migrator.playbook import Playbook
from migrator.state import State, StateStore, parse_iso


def status(pb: Playbook, store: StateStore, timeout: float | None = None) -> replication.SyncState:
    """How far the target's replication of the source is, read fresh from both servers (raises
    UnreachableError if one does not answer)."""
    att = replication.attachment(store.read_journal()) or {}
    host, port = replication.source_address(pb)
    extra = {"socket_connect_timeout": timeout, "socket_timeout": timeout} if timeout else {}
    source = connect(pb.source, "source", **extra)
    try:
        target = connect(pb.target, "target", **extra)
    except BaseException:
        source.close()
        raise
    try:
        cfg = pb.mirror.replication
        return replication.sync_progress(
            source, target, host, port, attached_at=parse_iso(att["time"]).timestamp() if att.get("time") else None,
            sync_full_at_attach=att.get("source_sync_full"), sync_timeout=cfg.sync_timeout.total_seconds(),
            stall_timeout=cfg.stall_timeout.total_seconds())
    finally:
        source.close()
        target.close()


def watch(pb: Playbook, store: StateStore, *, wait: bool = False, timeout: float | None = None, interval: float = 1.0,
          on_update: Callable[[replication.SyncState], Any] | None = None) -> replication.SyncState:
    """The target's sync now; with ``wait``, until it is in sync, a problem is found (stalled,
    looping, past ``sync_timeout``, not replicating) or ``timeout`` seconds pass."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = status(pb, store)
        if on_update:
            on_update(st)
        if st.in_sync or st.problem or not wait or (deadline is not None and time.monotonic() >= deadline):
            return st
        time.sleep(interval)


def summary(pb: Playbook, store: StateStore, state: State, timeout: float | None = None) -> dict[str, Any] | None:
    """What ``migrator status`` shows of the strategy: which, why, and while the target replicates the
    source, its link, offsets and lag (None before the strategy is decided)."""
    from migrator.errors import UnreachableError
    from migrator.phases import Phase

    m = state.mirror
    if m is None:
        return None
    out: dict[str, Any] = {"strategy": m.strategy, "why": m.why, "reverse": m.reverse, "reverse_why": m.reverse_why}
    if m.strategy == "replication" and state.phase in (Phase.MIRRORING, Phase.READS_ON_TARGET):
        try:
            st = status(pb, store, timeout)
        except UnreachableError as e:
            out.update(in_sync=False, evidence=f"not read: {e.message}")
        else:
            out.update(in_sync=st.in_sync, problem=st.problem, evidence=st.evidence, **st.data)
    return out
