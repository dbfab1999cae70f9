"""SUBSCRIBE and its kin: a subscribed connection streams from the side it subscribed on.

Confirmations are counted (``_sub_confirmed``); commands after a (un)subscribe wait until its
confirmations are in (``sub_held``), which decide whether the connection streams (``pipe``).
"""

from __future__ import annotations

from migrator.shim.commands import Classified, Cls
from migrator.shim.entry import WRITE_LIKE, Entry
from migrator.shim.resp import encode, parse


class Subscriptions:
    """The session's (un)subscribe confirmations and its stream once subscribed."""

    def _sub_expected(self, args: list[bytes], name: bytes) -> int:
        """How many confirmations a (un)subscribe gets (0: none to wait for, e.g. an arity error)."""
        if len(args) > 1:
            return len(args) - 1
        if name.endswith(b"unsubscribe"):
            return max(1, len(self.subs[name[: -len(b"unsubscribe")]]))  # one per subscription, or one
        return 0

    def _sub_confirmed(self, raw: bytes) -> bool:
        """Track a (un)subscribe confirmation; False if ``raw`` is not one."""
        if raw[:1] not in (b"*", b">") or b"subscribe\r\n" not in raw[:32]:
            return False
        try:
            msg = parse(raw)
        except Exception:  # noqa: BLE001 - not a frame of ours to judge
            return False
        if not isinstance(msg, list) or len(msg) != 3 or not isinstance(msg[0], bytes):
            return False
        kind = msg[0].lower()
        if kind.endswith(b"unsubscribe"):
            subs = self.subs.get(kind[: -len(b"unsubscribe")])
            if subs is None:
                return False
            subs.discard(msg[1])
        elif kind.endswith(b"subscribe"):
            subs = self.subs.get(kind[: -len(b"subscribe")])
            if subs is None:
                return False
            subs.add(msg[1])
        else:
            return False
        return True

    def _sub_settled(self, side: int) -> None:
        """The awaited confirmations are in: stream from ``side`` while subscribed, then go on."""
        self.sub_expect = None
        self.pipe = side if any(self.subs.values()) else None
        held, self.sub_held = self.sub_held, []
        for args in held:
            self.handle(args)
            if self.closed:
                return

    def _pipe_command(self, args: list[bytes], name: bytes, c: Classified) -> None:
        """A command on a subscribed connection: a stream to the side it subscribed on."""
        side = self.pipe
        if c.cls in WRITE_LIKE and self.shim.routes[Cls.WRITE].shadow is not None:
            # RESP3 lets a subscribed connection write; that write reaches one side only.
            self._mark_dirty(c.keys(args), self._db(1 - side), "write-on-subscribed-connection", name)
        e = Entry(args, name, c, self.shim.generation)
        e.stream = True
        e.answer = side
        e.payload[side] = encode(args)
        self._enqueue(side, e)
        if c.cls is Cls.SUBSCRIBE:
            n = self._sub_expected(args, name)
            if n:
                self.sub_expect = [side, n]  # counted as the confirmations stream by

    def _streamed(self, side: int, raw: bytes) -> None:
        """A frame of the stream this subscribed connection reads from ``side``: to the client, in order."""
        if self.inflight:
            self.backlog.append(raw)
        else:
            self.out.append(raw)
        if self._sub_confirmed(raw) and self.sub_expect is not None:
            self.sub_expect[1] -= 1
            if not self.sub_expect[1]:
                self._sub_settled(side)
        elif self.sub_expect is not None and raw[:1] == b"-":
            self._sub_settled(side)  # the (un)subscribe was refused (NOPERM...)
