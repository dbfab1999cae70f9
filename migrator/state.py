"""The persisted state of one migration, in ``state_dir``.

- ``state.json``: the current phase, its generation (bumped on every phase change, which is
  what shims acknowledge), when it began, the transition in progress if any, and the history.
  Written atomically: temp file, fsync, rename, fsync of the folder.
- ``journal.jsonl``: append-only, one JSON object per line, fsynced; every transition's start
  (with the gates' evidence, overrides, operator and hashes), completion and refusals.
- ``lock``: held by ``advance``/``rollback`` so two runs cannot interleave.

Every write is redacted: no secret reaches these files.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from migrator.errors import LockedError, StateError
from migrator.phases import INITIAL, Phase
from migrator.redact import redact

STATE_FILE = "state.json"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "lock"
LOCK_OWNER_FILE = "lock.owner"
INTENT_FILE = "intent.json"  # the step an advance/rollback means to take (command._write_intent)
FORMAT_VERSION = 1


def now() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def operator() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass
class Transition:
    """A phase change that was recorded but whose actions have not all finished."""

    id: str
    step: str
    direction: str  # "advance" or "rollback"
    from_phase: str
    to_phase: str
    started_at: str
    # A rollback from reads-on-target that keeps the mirror's clock (see gates.mirror_clock).
    mirror_clock_since: str | None = None


@dataclass
class Barrier:
    """Asks every shim to hold new client commands and drain in-flight ones (the write switch).

    Shims hold until the state's generation moves past ``generation`` (the new phase, or the
    barrier lifted) or until ``deadline``, whichever comes first: a crashed ``advance`` can
    never hold clients longer than the playbook's ``write_cutover.max_pause``.
    """

    id: str
    generation: int
    deadline: str
    purpose: str


@dataclass
class MirrorMode:
    """How the second server is kept in step, decided when mirroring begins (shims route by it).

    ``strategy``: "replication" (the target replicates the source; shims write to the source
    only) or "dual-write" (shims write to both). ``reverse``: set at the write cutover, how the
    source is kept in step for the rollback window: "replication" (the source replicates the
    target) or "dual-write" (the fallback when the source cannot replicate the target).
    """

    strategy: str
    why: str = ""
    reverse: str | None = None
    reverse_why: str = ""
    # Source settings the write cutover's role swap changed (name → value before), put back by
    # the rollback and by ``complete`` (migrator.roleswap).
    restore: dict[str, str] = field(default_factory=dict)


@dataclass
class State:
    migration: str
    phase: Phase = INITIAL
    generation: int = 0
    phase_since: str = field(default_factory=lambda: iso(now()))
    created_at: str = field(default_factory=lambda: iso(now()))
    endpoints_hash: str = ""
    transition: Transition | None = None
    barrier: Barrier | None = None
    mirror: MirrorMode | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["phase"] = self.phase.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> State:
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported state format version {d.get('version')!r}")
        t = d.get("transition")
        b = d.get("barrier")
        m = d.get("mirror")
        return cls(
            migration=d["migration"],
            phase=Phase(d["phase"]),
            generation=int(d["generation"]),
            phase_since=d["phase_since"],
            created_at=d["created_at"],
            endpoints_hash=d.get("endpoints_hash", ""),
            transition=Transition(**t) if t else None,
            barrier=Barrier(**b) if b else None,
            mirror=MirrorMode(**m) if m else None,
            history=list(d.get("history", [])),
        )

    @property
    def phase_started(self) -> datetime:
        return parse_iso(self.phase_since)

    @property
    def mirror_started(self) -> datetime | None:
        """When writes began to reach both servers without a break (None before mirroring).

        Mirroring continues through reads-on-target and writes-on-target and their rollbacks;
        only a rollback to ``compatible`` (or earlier) stops it.
        """
        if self.phase in (Phase.PLANNED, Phase.COMPATIBLE):
            return None
        for h in reversed(self.history):
            if h.get("to") == Phase.MIRRORING.value and h.get("from") == Phase.COMPATIBLE.value:
                return parse_iso(h["started_at"])
        t = self.transition
        if t and t.to_phase == Phase.MIRRORING.value and t.from_phase == Phase.COMPATIBLE.value:
            return parse_iso(t.started_at)
        return self.phase_started if self.phase == Phase.MIRRORING else None


class StateStore:
    """Reads and writes one migration's state folder.

    The control plane's interface (docs/control.md): when the playbook names an etcd cluster
    (``control.etcd``; ``migrator.control.bound``), the same methods keep the state, journal,
    lock and intent in etcd (``self.control``, a ``migrator.control.etcd.EtcdControl``): the
    state with compare-and-swap, the lock on a lease. The folder still holds the reports.
    """

    def __init__(self, state_dir: Path | str, migration: str) -> None:
        from migrator import control

        self.dir = Path(state_dir)
        self.migration = migration
        self.control = control.bound(state_dir)  # None: the folder holds everything
        self._rev = 0  # with etcd: the state key's revision when this store last read or wrote it

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def journal_path(self) -> Path:
        return self.dir / JOURNAL_FILE

    @property
    def reports_dir(self) -> Path:
        return self.dir / "reports"

    @property
    def where(self) -> str:
        """Where the state is kept, for messages."""
        return f"etcd {self.control.key('state')}" if self.control is not None else str(self.state_path)

    # --- state ---------------------------------------------------------------------------
    def exists(self) -> bool:
        if self.control is not None:
            return self.control.get("state", "read the state") is not None
        return self.state_path.exists()

    def load(self) -> State:
        """The current state; a fresh ``planned`` state if none was written yet (nothing is created)."""
        if self.control is not None:
            return self._load_etcd()
        try:
            raw = self.state_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if self._steps_journaled():
                # A step was started, and the state is written before that is journaled: it went
                # missing (a restore in progress, a mistake). Reading it as "planned" would route
                # every write to the source only, whatever phase the migration is in.
                raise StateError(f"{self.state_path} is missing but {self.journal_path.name} records steps; "
                                 "restore state.json (from a backup) before going on") from None
            return State(migration=self.migration)
        try:
            state = State.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"{self.state_path}: state file is unreadable ({e}); restore it from the journal or a backup") from None
        if state.migration != self.migration:
            raise StateError(
                f"{self.state_path}: belongs to migration {state.migration!r}, not {self.migration!r}; "
                "use a different state_dir for each migration"
            )
        return state

    def _load_etcd(self) -> State:
        got = self.control.get("state", "read the state")
        if got is None:
            self._rev = 0
            if self._steps_journaled():
                raise StateError(f"{self.where} is missing but the journal under {self.control.prefix} records steps; "
                                 "restore the state key (from a backup) before going on")
            return State(migration=self.migration)
        raw, self._rev = got
        return self.parse(raw)

    def parse(self, raw: bytes | str) -> State:
        """A state read from etcd (``load``, or a shim's watch)."""
        try:
            state = State.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"{self.where}: state is unreadable ({e}); restore it from the journal or a backup") from None
        if state.migration != self.migration:
            raise StateError(f"{self.where}: belongs to migration {state.migration!r}, not {self.migration!r}; "
                             "use a different control.etcd.prefix for each migration")
        return state

    def _steps_journaled(self) -> bool:
        return any(e.get("event") == "transition-started" for e in self.read_journal())

    def save(self, state: State) -> None:
        if self.control is not None:
            # Compare-and-swap: refused if anyone wrote the state since this store read it.
            value = json.dumps(redact(state.to_json()), indent=2, default=str) + "\n"
            self._rev = self.control.save_state(value, self._rev, self.where)
            return
        atomic_write_json(self.state_path, state.to_json())

    # --- journal -------------------------------------------------------------------------
    def journal(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event to the journal and fsync it before returning."""
        entry = {"time": iso(now()), "event": event, "migration": self.migration, **fields}
        line = json.dumps(redact(entry), sort_keys=False, default=str)
        if self.control is not None:
            self.control.journal_append(entry["time"], line)
            return entry
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def read_journal(self) -> list[dict[str, Any]]:
        """Every journal entry; a torn last line (a crash mid-append) is skipped, not fatal."""
        entries: list[dict[str, Any]] = []
        if self.control is not None:
            for raw in self.control.journal_lines():
                with contextlib.suppress(ValueError):
                    entries.append(json.loads(raw))
            return entries
        try:
            with self.journal_path.open(encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
        except FileNotFoundError:
            pass
        return entries

    # --- lock ----------------------------------------------------------------------------
    def running(self) -> str | None:
        """Who holds the migration's lock now (an advance or rollback in progress), or None."""
        if self.control is not None:
            return self.control.lock_owner()
        owner_file = self.dir / LOCK_OWNER_FILE
        if not owner_file.exists():
            return None
        lock = FileLock(str(self.dir / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return self._owner()
        lock.release()
        return None  # left behind by a run that was killed

    def _owner(self) -> str:
        """What the lock's holder wrote about itself."""
        with contextlib.suppress(OSError):
            return (self.dir / LOCK_OWNER_FILE).read_text().strip() or "owner unknown"
        return "owner unknown"

    @contextlib.contextmanager
    def locked(self, what: str) -> Iterator[None]:
        """Hold the migration's lock, or fail at once naming who holds it."""
        if self.control is not None:
            with self.control.hold_lock(f"{what} by {operator()} pid {os.getpid()} since {iso(now())}"):
                yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.dir / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise LockedError(
                f"another migrator run holds the lock on {self.dir} ({self._owner()}); "
                "wait for it to finish and try again"
            ) from None
        try:
            with contextlib.suppress(OSError):
                (self.dir / LOCK_OWNER_FILE).write_text(f"{what} by {operator()} pid {os.getpid()} since {iso(now())}\n")
            yield
        finally:
            with contextlib.suppress(OSError):
                (self.dir / LOCK_OWNER_FILE).unlink()
            lock.release()

    # --- intent (see command._write_intent) --------------------------------------------
    def write_intent(self, data: dict[str, Any]) -> None:
        if self.control is not None:
            self.control.put_json("intent", data, "record the run's intent")
            return
        atomic_write_json(self.dir / INTENT_FILE, data)

    def read_intent(self) -> dict[str, Any] | None:
        if self.control is not None:
            return self.control.get_json("intent", "read the run's intent")
        try:
            return json.loads((self.dir / INTENT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def clear_intent(self) -> None:
        if self.control is not None:
            self.control.delete("intent", "clear the run's intent")
            return
        (self.dir / INTENT_FILE).unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so that a reader (or a crash) sees the old file or the new one, never a mix."""
    atomic_write_text(path, json.dumps(redact(data), indent=2, default=str) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
