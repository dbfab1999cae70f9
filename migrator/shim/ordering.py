"""Per-key order across connections: an entry takes its keys from the shim's ``Sequencer``.

An entry that goes to both sides and writes (or is a compared read) is held back
(``DEFERRED`` payloads) until its keys are granted; a connection requests its entries' keys in
its own command order (``ungranted``).
"""

from __future__ import annotations

from typing import Any

from migrator.shim.commands import SOURCE, Cls
from migrator.shim.entry import DEFERRED, WRITE_LIKE, Entry
from migrator.shim.sequencer import GRANTED, Request


class Ordering:
    """The session's use of the shim's sequencer: its entries' keys requested in command order."""

    def _lock_keys(self, keys: list[bytes]) -> list:
        """Keys as the sequencer names them: the source's database identifies the key."""
        db = self._db(SOURCE)
        return keys if not db else [(db, k) for k in keys]

    def _entry_spec(self, e: Entry) -> list[tuple[Any, bool]] | None:
        """(key, exclusive) pairs for one command or a transaction; [] a barrier; None no ordering needed."""
        if e.tx is None:
            keys = e.c.keys(e.args) if e.c is not None else []
            if not keys:
                return [] if e.write else None  # a keyless write orders against everything
            excl = e.write
            if len(keys) == 1:
                return [(self._lock_keys(keys)[0], excl)]
            return [(k, excl) for k in dict.fromkeys(self._lock_keys(keys))]
        return self._tx_spec(e.tx)

    def _tx_spec(self, commands: list[list[bytes]]) -> list[tuple[Any, bool]] | None:
        classify = self.shim.table.classify
        spec: dict[Any, bool] = {}
        for args in commands:
            c = classify(args)
            write = c.cls in WRITE_LIKE
            keys = c.keys(args)
            if not keys:
                if write:
                    return []
                continue
            for k in self._lock_keys(keys):
                spec[k] = spec.get(k, False) or write
        return list(spec.items()) if spec else None

    def _sequence(self, e: Entry, spec: list | None, excl: bool | None = None) -> None:
        """Take the entry's keys now, or hold it (and the connection's later commands) back.

        ``spec``: (key, exclusive) pairs, or plain keys all taken as ``excl``; None: nothing to take.
        """
        if spec is None:
            return
        req = Request(self, spec, self._granted, excl)
        req.data = e
        e.req = req
        if not spec and e.cls is Cls.SCRIPT:
            # A keyless script orders against everything, but one running for long (a busy
            # script) must not hold every other client here: past shadow_timeout the others go
            # on to the servers, which answer -BUSY as they would without the shim.
            req.lift_after = self.shim.shadow_timeout
        if self.ungranted or not self.shim.seq.acquire(req):
            e.saved = e.payload
            e.payload = [DEFERRED, DEFERRED]
            self.ungranted.append(e)

    def _granted(self, req: Request) -> None:
        """The sequencer's callback: a held-back entry may go."""
        e = req.data
        if e is None:
            return  # released already (its entry settled)
        if self.closed or e.pending == 0:
            self.shim.seq.release(req)
            return
        if e.saved is not None:
            e.payload, e.saved = e.saved, None
        if self.ungranted and self.ungranted[0] is e and not e.bprobe:
            self.ungranted.popleft()
            self._request_next()
        self._after_io()

    def _request_next(self) -> None:
        """Request the keys of the connection's next held-back entries, in order, until one waits."""
        q = self.ungranted
        seq = self.shim.seq
        while q:
            e = q[0]
            req = e.req
            if req is None:
                return  # a blocking command that has not returned yet
            if req.state == 0:
                if not seq.acquire(req):
                    return
                if e.saved is not None:
                    e.payload, e.saved = e.saved, None
            elif req.state != GRANTED:
                return
            if e.bprobe:
                return  # a blocking command: what follows waits until it has returned
            q.popleft()
