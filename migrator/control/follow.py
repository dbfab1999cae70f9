"""A shim's view of the state on the etcd control plane: a watch, not a poll."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from migrator.errors import StateError, UnreachableError
from migrator.state import State, StateStore


class StateFollower:
    """Follows the state key for a shim: a watch (a thread), re-read after every break or ``idle`` seconds.

    ``latest()`` returns a newer state than the last one returned, or None; ``reachable`` says
    whether the last attempt to read or watch reached a member (False: the shim keeps routing
    the phase it applied last).
    """

    def __init__(self, store: StateStore, idle: float = 5.0, on_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self.idle = idle
        self.on_change = on_change
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._state: State | None = None
        self._rev = 0
        self._taken_rev = 0
        self.reachable = True
        self.unreachable_since: float | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="migrator-state-watch", daemon=True)

    def start(self, state: State, rev: int) -> None:
        self._state, self._rev, self._taken_rev = state, rev, rev
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def latest(self) -> State | None:
        with self._lock:
            if self._rev > self._taken_rev and self._state is not None:
                self._taken_rev = self._rev
                return self._state
        return None

    def _offer(self, raw: bytes | None, rev: int) -> None:
        if raw is None or rev <= self._rev:
            return
        try:
            state = self.store.parse(raw)
        except StateError as e:
            self.store.control.log.error("shim.state_unreadable", error=str(e))
            return
        with self._lock:
            self._state, self._rev = state, rev
        if self.on_change is not None:
            self.on_change()

    def _ok(self) -> None:
        if not self.reachable:
            self.store.control.log.info("shim.control_reachable", after_s=round(time.monotonic() - (self.unreachable_since or 0), 1))
        self.reachable, self.unreachable_since, self.error = True, None, None

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                got = self.store.control.get("state", "read the state")
                if got is not None:
                    self._offer(*got)
                self._ok()
                backoff = 0.2
                start = self._rev + 1 if got is not None else self.store.control.revision() + 1
                for raw, rev in self.store.control.watch("state", start, self._stop, self.idle):
                    self._offer(raw, rev)
                self._stop.wait(0.05)  # a watch that ends at once (canceled, compacted) does not become a busy poll
            except (UnreachableError, StateError) as e:
                if self.reachable:
                    self.unreachable_since = time.monotonic()
                    self.store.control.log.error("shim.control_unreachable", error=str(e))
                self.reachable, self.error = False, str(e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception as e:  # noqa: BLE001 - the follower must outlive anything transient
                self.store.control.log.error("shim.watch_failed", error=f"{type(e).__name__}: {e}")
                self._stop.wait(1.0)
