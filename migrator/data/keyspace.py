"""Which keys are in scope (include/exclude patterns, databases) and SCAN over them."""

from __future__ import annotations

import queue
import re
import threading
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterator

import redis

from migrator.data import fastcall
from migrator.playbook import SyncConfig

# Temporary keys that a big-key copy builds before renaming them over the real key. They are
# never copied nor compared: a run that was killed may leave one behind (see ``copy``).
TMP_PREFIX = b"__migrator_tmp__:"


def _as_text(key: bytes) -> str:
    # latin-1 maps every byte to one character, so glob patterns match byte for byte.
    return key.decode("latin-1")


@dataclass
class Selection:
    """The keys a sync or check covers: include/exclude globs (Redis glob syntax) and databases."""

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    databases: list[int] | None = None

    @classmethod
    def from_config(cls, cfg: SyncConfig) -> "Selection":
        return cls(include=list(cfg.include) or ["*"], exclude=list(cfg.exclude), databases=cfg.databases)

    @property
    def scan_match(self) -> str | None:
        """A MATCH pattern SCAN can apply server-side (only when one include pattern is given)."""
        return self.include[0] if len(self.include) == 1 and self.include[0] != "*" else None

    def wants(self, key: bytes) -> bool:
        if key.startswith(TMP_PREFIX):
            return False
        text = _as_text(key)
        if not any(_glob(p, text) for p in self.include):
            return False
        return not any(_glob(p, text) for p in self.exclude)

    def filter(self, keys: list[bytes]) -> list[bytes]:
        if self.include == ["*"] and not self.exclude:
            if TMP_PREFIX not in b"\n".join(keys):  # the common case, without a loop in Python
                return keys
            return [k for k in keys if not k.startswith(TMP_PREFIX)]
        return [k for k in keys if self.wants(k)]


def _glob(pattern: str, text: str) -> bool:
    # Redis globs escape with backslash; fnmatch has no escapes but [x] quotes a character.
    if "\\" in pattern:
        pattern = re.sub(r"\\(.)", lambda m: "[" + m.group(1) + "]" if m.group(1) not in "]!^" else m.group(1), pattern)
    return fnmatchcase(text, pattern)


def keyspace_sizes(client: redis.Redis) -> dict[int, int]:
    """Keys per logical database, from INFO keyspace (databases without keys are absent)."""
    info = client.info("keyspace")
    out: dict[int, int] = {}
    for name, value in info.items():
        if name.startswith("db") and isinstance(value, dict):
            out[int(name[2:])] = int(value.get("keys", 0))
    return out


def databases(selection: Selection, *clients: redis.Redis) -> list[int]:
    """The databases to cover: the playbook's list, else every database with keys on any side."""
    if selection.databases is not None:
        return sorted(set(selection.databases))
    dbs: set[int] = set()
    for c in clients:
        dbs.update(keyspace_sizes(c))
    return sorted(dbs)


def scan_batches(client: redis.Redis, selection: Selection, cursor: int = 0, count: int = 500) -> Iterator[tuple[int, list[bytes]]]:
    """Yield ``(cursor_after, keys)`` per SCAN call from ``cursor`` until the scan is complete.

    ``cursor_after`` is what a resumed scan starts from; 0 means the scan is finished.
    """
    match = selection.scan_match
    tail = (b"MATCH", match, b"COUNT", count) if match else (b"COUNT", count)
    started = False
    while not started or cursor != 0:
        started = True
        reply = fastcall.call(client, b"SCAN", cursor, *tail)
        cursor = int(reply[0])
        yield cursor, selection.filter(reply[1])


def prefetch(batches: Iterator, depth: int = 4) -> Iterator:
    """Run a batch iterator (SCAN) in a thread, ``depth`` batches ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)

    t = threading.Thread(target=produce, name="migrator-scan", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


# A SCAN cursor means something on one server only: sync and check walk a database again when
# the source's primary changed during the walk (a Sentinel failover, a restart), at most this
# many times before they give up.
MAX_SOURCE_CHANGES = 5


def server_run_id(client: redis.Redis) -> str | None:
    """The ``run_id`` of the server ``client`` reaches now; None when it cannot be read."""
    try:
        return str(client.info("server").get("run_id") or "") or None
    except redis.exceptions.RedisError:
        return None
