"""What a server says about its own replication: role, link, offsets and replication ids.

This module reads; the modules that change roles (attaching the target, the write cutover's
role swap) build on it. Offsets are the truth (``WAIT`` is unreliable from a connection that
wrote nothing): a replica is in step with its primary when its ``slave_repl_offset`` equals the
primary's ``master_repl_offset``, read twice with nothing written in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReplStatus:
    """One reading of ``INFO replication`` (plus the sync counters of ``INFO stats``)."""

    role: str  # "master" or "slave"
    master_repl_offset: int
    master_replid: str
    master_replid2: str
    second_repl_offset: int
    # As a replica (None on a primary):
    master_host: str | None = None
    master_port: int | None = None
    link_up: bool | None = None  # master_link_status:up
    sync_in_progress: bool | None = None  # master_sync_in_progress:1 (a full sync is loading)
    replica_offset: int | None = None  # slave_repl_offset: how far it has applied its primary's stream
    sync_read_bytes: int | None = None  # master_sync_read_bytes, during a full sync
    sync_total_bytes: int | None = None  # master_sync_total_bytes (-1 when unknown: diskless)
    link_down_since: int | None = None  # master_link_down_since_seconds
    # As a primary: its replicas, as ``ip:port`` → (state, offset, lag seconds).
    replicas: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    # From INFO stats, when read: full syncs and partial resyncs this server served as a primary.
    sync_full: int | None = None
    sync_partial_ok: int | None = None
    sync_partial_err: int | None = None

    @property
    def is_replica(self) -> bool:
        return self.role == "slave"

    def replicates(self, host: str, port: int) -> bool:
        return self.is_replica and self.master_port == port and (self.master_host or "") == host


def parse(info: dict[str, Any], stats: dict[str, Any] | None = None) -> ReplStatus:
    """A ReplStatus from parsed ``INFO replication`` (and optionally ``INFO stats``) replies."""
    def num(key: str, default: int | None = 0) -> int | None:
        v = info.get(key)
        try:
            return int(v) if v is not None else default
        except (TypeError, ValueError):
            return default

    replicas: dict[str, tuple[str, int, int]] = {}
    for key, value in info.items():
        if key.startswith("slave") and key[5:].isdigit() and isinstance(value, dict):
            addr = f"{value.get('ip')}:{value.get('port')}"
            replicas[addr] = (str(value.get("state", "")), int(value.get("offset", 0) or 0), int(value.get("lag", 0) or 0))
    replica = str(info.get("role", "master")) == "slave"
    s = stats or {}
    return ReplStatus(
        role=str(info.get("role", "master")),
        master_repl_offset=num("master_repl_offset") or 0,
        master_replid=str(info.get("master_replid", "")),
        master_replid2=str(info.get("master_replid2", "")),
        second_repl_offset=num("second_repl_offset", -1) or 0,
        master_host=str(info["master_host"]) if replica and "master_host" in info else None,
        master_port=num("master_port", None) if replica else None,
        link_up=(str(info.get("master_link_status")) == "up") if replica else None,
        sync_in_progress=bool(num("master_sync_in_progress")) if replica else None,
        replica_offset=num("slave_repl_offset", None) if replica else None,
        sync_read_bytes=num("master_sync_read_bytes", None) if replica else None,
        sync_total_bytes=num("master_sync_total_bytes", None) if replica else None,
        link_down_since=num("master_link_down_since_seconds", None) if replica else None,
        replicas=replicas,
        sync_full=int(s["sync_full"]) if "sync_full" in s else None,
        sync_partial_ok=int(s["sync_partial_ok"]) if "sync_partial_ok" in s else None,
        sync_partial_err=int(s["sync_partial_err"]) if "sync_partial_err" in s else None,
    )


def read(client: Any, with_stats: bool = False) -> ReplStatus:
    """Read a server's replication status through a redis-py/valkey-py client."""
    info = client.info("replication")
    return parse(info, client.info("stats") if with_stats else None)
