"""An entry: one client command (or one of the shim's own) on its way to both sides and back.

``Entry`` holds a command's route (answering side, shadow side), each side's payload and
reply, and its place in the sequencer; ``Upstream`` a session's connection to one side (its
queues: routed and not sent yet, sent and awaiting replies). The markers (``DEFERRED``,
``NOTHING``) and the small predicates every part of the session uses are here too.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import hiredis

from migrator.shim.commands import Classified, Cls
from migrator.shim.resp import Framer, encode, is_error
from migrator.shim.routing import SHIM
from migrator.shim.sequencer import Request

DEFERRED = object()  # the shadow's payload is computed when the answer arrives
MULTI_BYTES = encode([b"MULTI"])
EXEC_BYTES = encode([b"EXEC"])
NULL_REPLIES = frozenset({b"*-1\r\n", b"$-1\r\n", b"_\r\n"})
EVALSHA_NAMES = frozenset({b"evalsha", b"evalsha_ro"})
NOTHING = b""  # the effect was "nothing to do" (e.g. a pop that found nothing)
IDLE, CONNECTING, UP, DOWN = "idle", "connecting", "up", "down"
WRITE_LIKE = frozenset({Cls.WRITE, Cls.SCRIPT, Cls.SCRIPT_ADMIN, Cls.BLOCKING, Cls.TX})


class Entry:
    """One command (or one internal command of the shim) on its way through the shim."""

    __slots__ = (
        "answer",
        "args",
        "batch",
        "bkeys",
        "bmove",
        "bprobe",
        "c",
        "close_after",
        "cls",
        "compare",
        "cstate",
        "db",
        "done",
        "effect",
        "exp",
        "expired",
        "fallback",
        "gen",
        "heal_sha",
        "internal",
        "local",
        "n",
        "name",
        "payload",
        "pending",
        "rep",
        "req",
        "restore",
        "ryw",
        "saved",
        "sent_idx",
        "shadow",
        "shadow_raw",
        "size",
        "stream",
        "ts",
        "tx",
        "txcmp",
        "wait_shadow",
        "write",
    )

    def __init__(self, args: list[bytes], name: bytes, c: Classified | None, gen: int) -> None:
        self.args = args
        self.name = name
        self.c = c
        self.cls = c.cls if c is not None else Cls.LOCAL
        self.gen = gen
        self.answer = SHIM
        self.shadow: int | None = None
        self.payload: list[Any] = [None, None]
        self.exp = [1, 1]
        self.rep: list[Any] = [None, None]
        self.pending = 0
        self.done = [False, False]
        self.wait_shadow = False
        self.compare = False
        self.db = 0
        self.ts = [0.0, 0.0]
        self.internal = False
        self.local: bytes | None = None
        self.close_after = False
        self.effect = False
        self.tx: list[list[bytes]] | None = None
        self.shadow_raw: bytes | None = None
        self.fallback = False
        self.stream = False
        self.write = self.cls in WRITE_LIKE
        self.heal_sha: bytes | None = None
        self.txcmp: tuple[list[bytes], list[tuple[int, int]]] | None = None
        self.n = 1  # commands this entry stands for (a batch: a whole pipelined chunk)
        self.batch = False
        self.sent_idx: list[int] | None = None  # a batch's commands the shadow got (None: all)
        self.req: Request | None = None  # its keys in the shim's sequencer
        self.saved: list[Any] | None = None  # the payloads, while held back for the sequencer
        self.bkeys: list | None = None  # a blocking command's keys, while it may block upstream
        self.bprobe = False  # a blocking command tried inside MULTI/EXEC first (see _blocking_probe)
        self.bmove: tuple | None = None  # a blocked move's (source, destination), until it is done
        # Connection state it changes, {field: (before, after)}, until its answer says whether it did.
        self.cstate: dict[str, tuple[Any, Any]] | None = None
        self.expired = False  # its shadow reply is late behind an answer on that side (see check_timeouts)
        self.size = 0  # request bytes it holds while in the client's queue (see Session._flow)
        # A RESTORE the other side cannot read (see _restore_by_effect): True until answered,
        # then the other side's commands (None: a type not copied, its key is marked dirty).
        self.restore: bool | list | None = False
        self.ryw = False  # a write of a connection whose next reads must see it (see Dispatch._ryw_redirect)


class Upstream:
    """A session's connection to one side."""

    __slots__ = ("attempt", "connect_started", "counter", "framer", "out", "raw_pending", "raw_sent", "side", "state",
                 "transport", "virtual", "wait")

    def __init__(self, side: int) -> None:
        self.side = side
        self.state = IDLE
        self.transport = None
        self.out: deque[Entry] = deque()  # routed, not sent yet (connecting, or behind a deferred one)
        self.wait: deque[Entry] = deque()  # sent, awaiting replies
        self.framer = Framer()
        self.connect_started = 0.0
        self.attempt = 0
        # Passthrough ("raw") mode: replies owed for commands forwarded without entries, counted
        # by hiredis and forwarded to the client as they arrive (see Session._raw_passthrough).
        self.raw_pending = 0
        self.raw_sent: deque[list] = deque()  # [sent at, replies still owed, generation]
        self.counter = hiredis.Reader()
        # A share of a shared upstream connection (``shim.mux.VirtualConn``) while the session
        # has no connection state, instead of a connection of its own (see Session._connect).
        self.virtual = False


def internal_entry(side: int, args: list[bytes], gen: int) -> Entry:
    """A command of the shim's own (handshake, SCRIPT LOAD, DISCARD...) for ``side``; no client waits for it."""
    e = Entry(args, args[0].lower(), None, gen)
    e.internal = True
    e.answer = side
    e.payload[side] = encode(args)
    return e


def has_error(raw: bytes | list[bytes]) -> bool:
    return any(is_error(f) for f in raw) if type(raw) is list else is_error(raw)


def complete(e: Entry, side: int) -> bool:
    """``side`` has sent every reply ``e`` expects of it (a list fills up frame by frame)."""
    r = e.rep[side]
    return r is not None and (type(r) is not list or len(r) >= e.exp[side])
