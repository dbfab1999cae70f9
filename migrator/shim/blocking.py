"""Blocking commands (BLPOP, BLMOVE...): tried without blocking first, then sent as themselves.

A blocking command sent to both sides is first tried inside MULTI/EXEC while holding its keys
(``_blocking_probe``); if there is nothing to pop it is sent as itself and blocks without
holding anything, and its effect takes its keys ahead of everyone when it returns
(``_blocking_returned``, ``_await_feeder`` for chained moves).
"""

from __future__ import annotations

import contextlib
import time

from migrator.shim.commands import Cls
from migrator.shim.entry import DEFERRED, NULL_REPLIES, Entry
from migrator.shim.resp import encode, is_error
from migrator.shim.sequencer import Request

_MOVES = frozenset({b"blmove", b"brpoplpush"})  # blocking commands that push what they pop


class Blocking:
    """The session's blocking commands: the non-blocking try, then the real one, then its effect."""

    def _blocked(self, classes=(Cls.BLOCKING, Cls.BLOCKING_READ)) -> list[Entry]:
        """Blocking commands sent as themselves (not their non-blocking try) and not returned yet."""
        return [e for e in self.inflight if e.cls in classes and not e.bprobe and e.rep[e.answer] is None]

    def _close_blocked(self, reason: str, classes=(Cls.BLOCKING, Cls.BLOCKING_READ)) -> bool:
        """Close the session if a blocking command is blocked upstream; True if it did."""
        blocked = self._blocked(classes)
        if not blocked:
            return False
        seq = self.shim.seq
        for e in blocked:
            # It may have popped only if a write to its keys is in flight or has just woken it
            # (the sequencer still has the key): otherwise its shadow side lost nothing and is
            # settled as such. (A keyless write, a barrier, may touch it.)
            other = e.shadow
            if (other is not None and e.bkeys is not None and not seq.fence
                    and not any(k in seq.locks for k in e.bkeys)):
                with contextlib.suppress(ValueError):
                    self.up[other].out.remove(e)
                self._finish_side(e, other)
        self._flush_client()
        self.close(reason)
        return True

    def _blocking_probe(self, e: Entry, side: int) -> bool:
        """The non-blocking try of a blocking command answered; False: it is being sent for real.

        Inside MULTI/EXEC a blocking command does not block. If it popped something, that is
        its answer, taken while it held its keys: its effect follows in order. If there was
        nothing, the command is sent again as itself, at the head of its side's queue, and its
        keys released: nothing could change them meanwhile, so it blocks until a later write
        wakes it, and that write hands the key over to its effect (see sequencer).
        """
        e.bprobe = False
        queued, result = e.rep[side][1], e.rep[side][2]
        if is_error(queued):
            answer = queued  # rejected when queued (arity, syntax): EXEC says only EXECABORT
        elif is_error(result):
            answer = result
        else:
            inner = result[result.index(b"\r\n") + 2:]
            if result[:2] != b"*1" or inner in NULL_REPLIES:  # nothing to pop yet (or EXEC aborted by a WATCH)
                seq = self.shim.seq
                e.rep[side] = None
                e.exp[side] = 1
                e.payload[side] = encode(e.args)
                e.bkeys = self._lock_keys(e.c.keys(e.args))
                seq.blocking_started(e.bkeys)
                if e.name in _MOVES and len(e.args) > 2:
                    e.bmove = tuple(self._lock_keys(e.args[1:3]))
                    seq.move_started(*e.bmove)
                req, e.req = e.req, None
                self.up[side].out.appendleft(e)
                seq.release(req)
                return False
            answer = inner
        e.rep[side] = answer
        if self.ungranted and self.ungranted[0] is e:
            self.ungranted.popleft()
            self._request_next()
        return True

    def _blocking_returned(self, e: Entry, other: int, cmds: list[list[bytes]]) -> None:
        """A blocking command answered: its effect takes its keys ahead of everything waiting."""
        seq = self.shim.seq
        seq.blocking_ended(e.bkeys)
        e.bkeys = None
        if cmds and not e.done[other]:
            classify = self.shim.table.classify
            keys = list(dict.fromkeys(k for cmd in cmds for k in self._lock_keys(classify(cmd).keys(cmd))))
            if keys:
                if seq.call_later is not None and seq.fed_by_move(keys, e.bmove):
                    # A move into its key was probably woken by the same write, and the server
                    # ran it first (chained BLMOVEs): its effect must reach the shadow first.
                    e.saved = list(e.payload)
                    e.payload[other] = DEFERRED
                    self._await_feeder(e, other, keys, time.monotonic() + self.shim.shadow_timeout)
                    return  # stays at the head of ``ungranted``
                if not self._effect_first(e, keys):
                    e.saved = list(e.payload)
                    e.payload[other] = DEFERRED
                    return  # stays at the head of ``ungranted`` until granted
        if self.ungranted and self.ungranted[0] is e:
            self.ungranted.popleft()
            self._request_next()

    def _effect_first(self, e: Entry, keys: list) -> bool:
        """Request a blocking command's effect's keys ahead of every waiting request; True if granted now."""
        req = Request(self, [(k, True) for k in keys], self._granted)
        req.data = e
        e.req = req
        return self.shim.seq.acquire_first(req)

    def _await_feeder(self, e: Entry, other: int, keys: list, deadline: float) -> None:
        """Hold ``e``'s effect while a blocked move into its keys may not be mirrored yet.

        Looked at again every 2 ms, at most until ``deadline`` (``shadow_timeout``): then it goes
        anyway, and if the shadow pops something else than the answering side did, the effect
        check records a divergence and marks the keys dirty.
        """
        seq = self.shim.seq

        def again() -> None:
            if self.closed:
                return
            if e.pending == 0 or e.done[other]:  # settled meanwhile (its shadow failed): let the rest go
                if self.ungranted and self.ungranted[0] is e:
                    self.ungranted.popleft()
                    self._request_next()
                    self._after_io()
                return
            if seq.fed_by_move(keys, e.bmove) and time.monotonic() < deadline:
                seq.call_later(0.002, again)
                return
            if not self._effect_first(e, keys):
                return  # granted later: see _granted
            e.payload, e.saved = e.saved, None
            if self.ungranted and self.ungranted[0] is e:
                self.ungranted.popleft()
                self._request_next()
            self._after_io()

        seq.call_later(0.002, again)
