"""Which keys were written on the source around their copy: keyspace notifications.

Every race ``verify`` guards against involves a write W to key K that the mirror applies to the
source at time s and to the target at t (s < t < s + lag), and a copy of K read from the source
at r and written to the target at w:

- r < s, t < w: the copy overwrites W on the target (W may even have been a no-op there, an
  SREM or an EXPIRE on a key not copied yet, so the target need not see any event);
- s < r, t > w: W reaches the target after the copy, which already contained it (twice applied).

In both, the *source* saw W at some s in (r - lag, w). So the source's keyspace events say which
keys of a batch need the exact comparison; every other key was copied with nothing racing it.
This costs work proportional to the source's write traffic, not to the keyspace.

- Pub/sub delivers in order on one connection, so a message PUBLISHed to our fence channel
  arrives after every event the source emitted before it: after a fence, a window is complete.
- Pub/sub is at-most-once: if the subscriber connection breaks, events may be lost, and the
  watch reports itself broken so the caller falls back to comparing every key.

Needs ``CONFIG SET notify-keyspace-events`` on the source (restored afterwards); where CONFIG is
not allowed, or ``--no-keyspace-events`` is given, the caller compares every key instead.
"""

from __future__ import annotations

import secrets
import threading
import time

import redis

NEEDED_FLAGS = "EA"  # keyevent channels, every class of event


def notify_flags(client: redis.Redis) -> str:
    return client.config_get("notify-keyspace-events").get("notify-keyspace-events", "")


class WriteWatch:
    """Subscribes to one database's keyevent channels and remembers when each key was written.

    ``written_since(keys, since)``, called after a ``fence()``, tells which keys had an event
    since then. Entries older than every open window are dropped (``forget_before``), so memory
    follows the write rate, not the keyspace.
    """

    def __init__(self, client: redis.Redis, db: int) -> None:
        self.client = client
        self.fence_channel = f"__migrator_fence__:{secrets.token_hex(8)}"
        self.broken = False
        self._lock = threading.Lock()
        self._written: dict[bytes, float] = {}  # key → arrival time of its latest event
        self._fences: dict[bytes, threading.Event] = {}
        self._pubsub = client.pubsub()
        self._pubsub.psubscribe(f"__keyevent@{db}__:*")
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

    def fence(self, timeout: float = 10.0) -> bool:
        """Wait until every event the server emitted so far has been received; False if broken."""
        token = secrets.token_hex(8).encode()
        ev = threading.Event()
        self._fences[token] = ev
        try:
            self.client.publish(self.fence_channel, token)
            if self._moved():
                self.broken = True  # the source's primary changed (Sentinel): the events are another server's
            elif not ev.wait(timeout):
                self.broken = True
        except redis.exceptions.RedisError:
            self.broken = True  # PUBLISH not allowed, or the connection broke: no fence, no watch
        finally:
            self._fences.pop(token, None)
        return not self.broken

    def _moved(self) -> bool:
        """The client follows a Sentinel primary that is no longer the server this watch listens to."""
        addr = getattr(self.client.connection_pool, "master_address", None)
        conn = getattr(self._pubsub, "connection", None)
        return bool(addr and conn is not None and conn.host and (conn.host, int(conn.port)) != tuple(addr))

    def written_since(self, keys: list[bytes], since: float) -> set[bytes]:
        """Keys among ``keys`` with an event that arrived at or after ``since`` (call after a fence)."""
        with self._lock:
            written = self._written
            if not written:  # the common case while the source is quiet
                return set()
            return {k for k in written.keys() & set(keys) if written[k] >= since}

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
        pass  # best effort: notifications left on cost the server some CPU, nothing else
