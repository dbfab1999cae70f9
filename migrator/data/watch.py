"""Which keys were written on the target while their copy was in flight: keyspace notifications.

The races ``verify`` guards against all end with a mirrored write reaching the *target* between
a batch's read and ``settle`` after its write. So the target's own keyspace events say which
keys of an in-flight batch need the exact comparison; every other key was copied with nothing
racing it. This costs work proportional to the write traffic, not to the keyspace.

- Our own RESTOREs must not count (they would make every key suspicious), and glob patterns
  cannot exclude one channel: the patterns below match every event name except ``restore``.
- Pub/sub delivers in order on one connection, so a message PUBLISHed to our fence channel
  arrives after every event the target emitted before it: after a fence, the events of the
  window are all known.
- Pub/sub is at-most-once: if the subscriber connection breaks, events may be lost, and the
  watch reports itself broken so the caller falls back to comparing every key.

Needs ``CONFIG SET notify-keyspace-events`` on the target (restored afterwards); where CONFIG is
not allowed the watch is unavailable and the caller compares every key.
"""

from __future__ import annotations

import secrets
import threading
import time
import redis

_EXCEPT_RESTORE = ["[^r]*", "r[^e]*", "re[^s]*", "res[^t]*", "rest[^o]*", "resto[^r]*", "restor[^e]*", "restore?*",
                   "r", "re", "res", "rest", "resto", "restor"]
NEEDED_FLAGS = "EA"  # keyevent channels, every class of event


def notify_flags(client: redis.Redis) -> str:
    return client.config_get("notify-keyspace-events").get("notify-keyspace-events", "")


class WriteWatch:
    """Subscribes to one database's keyevent channels and remembers when each key was last written.

    A batch notes ``mark()`` before its keys are read; after a ``fence()``, ``written_since``
    tells which of its keys the target saw written since then. Entries older than every open
    batch are dropped (``forget_before``), so memory follows the write rate, not the keyspace.
    """

    def __init__(self, client: redis.Redis, db: int) -> None:
        self.client = client
        self.db = db
        self.fence_channel = f"__migrator_fence__:{secrets.token_hex(8)}"
        self.broken = False
        self._lock = threading.Lock()
        self._written: dict[bytes, float] = {}  # key → monotonic time its last event arrived
        self._fences: dict[bytes, threading.Event] = {}
        self._pubsub = client.pubsub()
        prefix = f"__keyevent@{db}__:"
        self._pubsub.psubscribe(*(prefix + p for p in _EXCEPT_RESTORE))
        self._pubsub.subscribe(self.fence_channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="migrator-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self._pubsub.get_message(timeout=0.05)
                if msg is None:
                    continue
                if msg["type"] == "pmessage":
                    with self._lock:
                        self._written[msg["data"]] = time.monotonic()
                elif msg["type"] == "message":
                    ev = self._fences.get(msg["data"])
                    if ev:
                        ev.set()
        except (redis.exceptions.RedisError, OSError, ValueError):
            if not self._stop.is_set():
                self.broken = True
            for ev in list(self._fences.values()):
                ev.set()

    @staticmethod
    def mark() -> float:
        """The time to give ``written_since`` for keys about to be read."""
        return time.monotonic()

    def fence(self, timeout: float = 10.0) -> bool:
        """Wait until every event the target emitted so far has been received; False if broken."""
        token = secrets.token_hex(8).encode()
        ev = threading.Event()
        self._fences[token] = ev
        try:
            self.client.publish(self.fence_channel, token)
            if not ev.wait(timeout):
                self.broken = True
        finally:
            self._fences.pop(token, None)
        return not self.broken

    def written_since(self, keys: list[bytes], since: float) -> set[bytes]:
        """Keys among ``keys`` whose last event arrived at or after ``since`` (call after a fence)."""
        with self._lock:
            hit = self._written.keys() & set(keys)
            return {k for k in hit if self._written[k] >= since}

    def forget_before(self, since: float) -> None:
        with self._lock:
            if self._written:
                self._written = {k: t for k, t in self._written.items() if t >= since}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self._pubsub.close()
        except (redis.exceptions.RedisError, OSError):
            pass


def enable(client: redis.Redis) -> str | None:
    """Turn keyevent notifications on; returns the previous flags, or None if CONFIG is not allowed."""
    try:
        before = notify_flags(client)
        covered = "A" in before or set("g$lshzxet") <= set(before)
        if not ("E" in before and covered):
            client.config_set("notify-keyspace-events", before + NEEDED_FLAGS)
        return before
    except redis.exceptions.ResponseError:
        return None


def restore(client: redis.Redis, flags: str) -> None:
    try:
        client.config_set("notify-keyspace-events", flags)
    except redis.exceptions.RedisError:
        pass  # best effort: notifications left on cost the target some CPU, nothing else
