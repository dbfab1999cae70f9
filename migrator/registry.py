"""Where running shims announce themselves and acknowledge the phase they apply.

Each shim keeps one file, ``state_dir/shims/<id>.json``, rewritten atomically at least every
``HEARTBEAT`` seconds and at once after it applies a new phase generation. ``advance`` and
``rollback`` read these files to wait for every shim's acknowledgement; ``status`` shows them.

A shim is *live* while its heartbeat is fresh; *unresponsive* when the heartbeat is stale but
its process may still run (same host and the pid exists, or another host); *dead* when it ran
on this host and its pid is gone (a crash). Dead shims are ignored; unresponsive ones block an
acknowledgement, since they may still route by the old phase.

With the etcd control plane (docs/control.md) the records are etcd keys instead of files, with
the same functions (they take the state folder; ``migrator.control.bound`` finds its backend),
and liveness is a lease (etcd's clock, not the hosts'): a shim is *live* while its lease is, and
*dead* once it expired (``lease_ttl`` without renewing it: killed, frozen, or cut off from
etcd), wherever it ran; it then counts as lost like a crash.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from migrator.control import bound
from migrator.procs import pid_alive
from migrator.state import atomic_write_json, iso, now, parse_iso

SHIMS_DIR = "shims"
HEARTBEAT = 0.5  # seconds between a shim's heartbeats
STALE_AFTER = 5.0  # seconds without a heartbeat before a shim is unresponsive
DEAD_AFTER = 3 * HEARTBEAT  # seconds without a heartbeat before a shim whose pid is gone is dead


@dataclass
class ShimRecord:
    id: str
    pid: int
    host: str
    listen: str
    admin: str
    started_at: str
    heartbeat_at: str
    applied_phase: str
    applied_generation: int
    counters: dict[str, Any] = field(default_factory=dict)
    # The write-switch barrier this shim holds commands for (``barrier_state`` "held" once its
    # in-flight commands and mirror queue drained), with what is still owed to the other side.
    barrier_id: str | None = None
    barrier_state: str | None = None  # "held", "released", "expired"
    pending_shadow: int = 0
    dirty_keys: int = 0
    last_pause_ms: float | None = None
    # With the etcd control plane: whether the shim's lease is alive (None: the folder backend).
    lease_alive: bool | None = None

    def age(self) -> float:
        return (now() - parse_iso(self.heartbeat_at)).total_seconds()

    def liveness(self, stale_after: float = STALE_AFTER) -> str:
        age = self.age()
        if self.lease_alive is False:
            return "dead"  # its lease expired: it stopped renewing it lease_ttl ago, wherever it ran
        if self.lease_alive:
            # It renewed its lease within lease_ttl (etcd's clock): live, whatever the hosts'
            # clocks say about the age of its heartbeat.
            return "live"
        # A missing pid means dead only once the heartbeat has stopped too: a shim in another
        # pid namespace (a container on the host network) shares the host name, not the pids.
        if age > DEAD_AFTER and self.lease_alive is None and self.host == socket.gethostname() and not pid_alive(self.pid):
            return "dead"
        if age <= stale_after:
            return "live"
        return "unresponsive"


def shims_dir(state_dir: Path | str) -> Path:
    return Path(state_dir) / SHIMS_DIR


def write(state_dir: Path | str, record: ShimRecord) -> None:
    """Publish a shim's record (heartbeat, applied phase, counters); with etcd, renew its lease too."""
    record.heartbeat_at = iso(now())
    if (control := bound(state_dir)) is not None:
        control.shim_write(record)
        return
    atomic_write_json(shims_dir(state_dir) / f"{record.id}.json", asdict(record))


def remove(state_dir: Path | str, shim_id: str) -> None:
    if (control := bound(state_dir)) is not None:
        control.shim_remove(shim_id)
        return
    with contextlib.suppress(FileNotFoundError):
        (shims_dir(state_dir) / f"{shim_id}.json").unlink()


def read_all(state_dir: Path | str) -> list[ShimRecord]:
    records: list[ShimRecord] = []
    known = {f.name for f in fields(ShimRecord)}
    if (control := bound(state_dir)) is not None:
        for raw, alive in control.shim_read_all():
            with contextlib.suppress(TypeError, AttributeError):
                records.append(ShimRecord(**{**{k: v for k, v in raw.items() if k in known}, "lease_alive": alive}))
        return records
    d = shims_dir(state_dir)
    if not d.is_dir():
        return records
    for f in sorted(d.glob("*.json")):
        try:
            raw = json.loads(f.read_text(encoding="utf-8"))
            # Fields this version does not know (a newer shim's) are left out, not the record:
            # a shim skipped here would be skipped by the write switch's barrier too.
            records.append(ShimRecord(**{k: v for k, v in raw.items() if k in known}))
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # vanished meanwhile (a shim stopped), or not a shim record
    return records


def active(state_dir: Path | str, stale_after: float = STALE_AFTER) -> list[ShimRecord]:
    """Shims that are not known to be dead: they must acknowledge a phase change."""
    return [r for r in read_all(state_dir) if r.liveness(stale_after) != "dead"]


@dataclass
class AckResult:
    generation: int
    acked: list[ShimRecord]
    missing: list[ShimRecord]
    waited: float

    @property
    def ok(self) -> bool:
        return not self.missing

    def evidence(self) -> str:
        if not self.acked and not self.missing:
            return "no shim is running"
        parts = [f"{len(self.acked)} of {len(self.acked) + len(self.missing)} shim(s) applied generation {self.generation}"]
        for r in self.missing:
            parts.append(
                f"shim {r.id} ({r.listen}) still at generation {r.applied_generation} ({r.applied_phase}), "
                f"{r.liveness()}, heartbeat {r.age():.1f}s ago"
            )
        return "; ".join(parts)


def await_ack(state_dir: Path | str, generation: int, timeout: float, poll: float = 0.05) -> AckResult:
    """Wait until every active shim has applied ``generation`` (or newer), or the timeout passes."""
    start = time.monotonic()
    while True:
        shims = active(state_dir)
        acked = [r for r in shims if r.applied_generation >= generation]
        missing = [r for r in shims if r.applied_generation < generation]
        waited = time.monotonic() - start
        if not missing or waited >= timeout:
            return AckResult(generation, acked, missing, waited)
        time.sleep(poll)


@dataclass
class HoldResult:
    barrier_id: str
    held: list[ShimRecord]
    missing: list[ShimRecord]
    waited: float
    ignore_dirty: bool = False  # ``no_dirty_keys`` was overridden

    @property
    def ok(self) -> bool:
        return not self.missing and all(r.pending_shadow == 0 and (self.ignore_dirty or r.dirty_keys == 0) for r in self.held)

    def evidence(self) -> str:
        if not self.held and not self.missing:
            return "no shim is running: nothing to hold"
        parts = [f"{len(self.held)} of {len(self.held) + len(self.missing)} shim(s) holding new commands with in-flight drained"]
        owed = [r for r in self.held if r.pending_shadow or (r.dirty_keys and not self.ignore_dirty)]
        for r in owed:
            parts.append(f"shim {r.id} still owes the other side {r.pending_shadow} write(s) and has {r.dirty_keys} dirty key(s)")
        for r in self.missing:
            parts.append(f"shim {r.id} ({r.listen}) did not hold ({r.liveness()}, barrier {r.barrier_state or 'not seen'})")
        return "; ".join(parts)


def await_hold(state_dir: Path | str, barrier_id: str, timeout: float, poll: float = 0.01,
               ignore_dirty: bool = False) -> HoldResult:
    """Wait until every active shim holds for ``barrier_id`` with nothing owed, or the timeout passes."""
    start = time.monotonic()
    while True:
        shims = active(state_dir)
        held = [r for r in shims if r.barrier_id == barrier_id and r.barrier_state == "held"]
        missing = [r for r in shims if r not in held]
        result = HoldResult(barrier_id, held, missing, time.monotonic() - start, ignore_dirty)
        if result.ok or result.waited >= timeout:
            return result
        time.sleep(poll)
