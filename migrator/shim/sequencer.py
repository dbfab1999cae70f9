"""Per-key ordering of writes across client connections, for one shim process.

Each client connection has its own upstream connection per side, and a server serves its
connections in whatever order their bytes arrive. Two clients writing one key (``SET k a``,
``SET k b``) could therefore be applied a,b on one side and b,a on the other. So a write that
goes to both sides first *acquires* its keys here, is sent only once granted, and releases them
when both sides have replied (or the shadow timed out or failed, which marks the keys dirty): a
key is only ever written by one entry at a time, and every side sees that key's writes in the
grant order.

Rules (pure: no sockets, no clock except through the ``call_later`` it is given):

- A request names all its keys at once, exclusive (writes) or shared (compared reads), and is
  granted all or nothing. Each key keeps a FIFO of the requests waiting for it; a request is
  granted when it heads the queue of every one of its keys and no holder conflicts. Requests
  enter all their queues at the same moment, so the queues agree on their relative order, and
  a waiting request only ever waits for holders or for requests that arrived before it: the
  wait-for graph has no cycle. A holder is an entry already sent upstream, whose completion
  depends on the servers alone (and the shadow timeout): so there is no deadlock.
- A connection's own earlier holds do not block it (its upstream connection keeps its order),
  unless another connection already waits for the key: then it queues like everybody else, so
  a pipelining client cannot starve others.
- A write without keys (FLUSHDB, SWAPDB, a script without declared keys) is a *barrier*: it is
  granted when nothing is held or waiting before it, and everything requested after it waits
  until it is released. A barrier with ``lift_after`` (a keyless script) stops holding the others
  back once it has been held that long: a long script keeps its server busy, and the others'
  commands must reach the servers to get the server's own ``-BUSY`` instead of waiting here.
- Blocking commands (BLPOP...) are not sequenced while they block. Their effect, mirrored after
  they return, takes its keys with priority (ahead of every waiting request: none of those has
  reached the answering side, so the pop happened before all of them). The write that woke a
  blocked command finished on the answering side just before the pop; so that nothing else is
  granted between it and the effect, a write releasing a key some blocked command waits on
  hands it over to the first such effect that arrives, or frees it after ``wake_grace``.
- One write can wake a chain: ``RPUSH l1`` wakes ``BLMOVE l1 l2``, whose push wakes ``BLMOVE l2
  l3``. Redis may send the second reply first, and its effect (``LMOVE l2 l3``) would then reach
  the shadow before the ``LMOVE l1 l2`` that feeds it. So blocked moves are registered (``moves``)
  until their effect is done, and an effect on a key some blocked move pushes into waits while
  that move's source is being written (or was just: a pending wake): ``fed_by_move``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

WAITING, GRANTED, RELEASED = 1, 2, 3
_MIXED = object()  # shared holders from more than one connection
WAKE_GRACE = 0.05  # seconds a woken blocked command's reply may lag the reply of the write that woke it


class Request:
    """What one entry needs, each key once; no keys: a barrier.

    ``keys`` as (key, exclusive) pairs, or — the common case of a pipelined chunk of only writes
    or only reads, kept cheap — a plain list of keys and one ``excl`` for all of them.
    """

    __slots__ = ("_keys", "data", "empty", "excl", "first", "granted_cb", "lift_after", "lifted", "owner", "plain",
                 "state")

    def __init__(self, owner: Any, keys: list, granted_cb: Callable[[Request], None], excl: bool | None = None) -> None:
        self.owner = owner
        if excl is None:
            self._keys: list[tuple[Hashable, bool]] | None = keys
            self.plain: list[Hashable] | None = None
        else:
            self._keys = None
            self.plain = keys
        self.excl = excl
        self.empty = not keys
        self.granted_cb = granted_cb
        self.state = 0
        self.first = False  # a blocked command's effect: ahead of every waiting request
        self.data: Any = None  # the owner's own reference (the session's entry)
        self.lift_after: float | None = None  # a barrier: seconds after which it no longer fences
        self.lifted = False

    @property
    def keys(self) -> list[tuple[Hashable, bool]]:
        """(key, exclusive) pairs (made from the plain form when first needed: off the fast path)."""
        if self._keys is None:
            excl = self.excl
            self._keys = [(k, excl) for k in self.plain]
        return self._keys


class _Lock:
    __slots__ = ("q", "shared", "sowner", "wake", "xcount", "xowner")

    def __init__(self) -> None:
        self.xcount = 0  # exclusive holds (several only for one owner: its pipelined writes)
        self.xowner: Any = None
        self.shared = 0
        self.sowner: Any = None  # the one connection holding it shared, or _MIXED
        self.q: deque[Request] | None = None
        self.wake = False  # released by a write while a blocked command waits on it: see handover

    def free(self) -> bool:
        return not self.xcount and not self.shared and not self.q and not self.wake


class Sequencer:
    def __init__(self, call_later: Callable[[float, Callable[[], None]], Any] | None = None,
                 wake_grace: float = WAKE_GRACE) -> None:
        # The common states cost no lock object per command: a key held exclusively by one
        # request with nobody waiting maps to that Request; a key only read (shared) with nobody
        # waiting maps to the number of readers. Anything else (several holds of one connection,
        # mixed modes, waiters, a pending wake) maps to a _Lock.
        self.locks: dict[Hashable, _Lock | Request | int] = {}
        self.held = 0  # granted requests, barriers included
        self.waiting = 0  # keyed requests in key queues
        self.fence: deque[Request] = deque()  # a barrier (waiting or held) and what came after it
        self.barrier_held = False
        self.lifted = 0  # granted barriers that no longer fence (see lift)
        self.blocked: dict[Hashable, int] = {}  # key -> blocking commands waiting on it upstream
        # destination -> {source: n}: blocked moves (BLMOVE, BRPOPLPUSH), until their effect is done
        self.moves: dict[Hashable, dict[Hashable, int]] = {}
        self.wakes = 0
        self.call_later = call_later
        self.wake_grace = wake_grace
        self._after_barrier: list[Request] = []  # effects requested while a barrier is held
        self._granted: list[Request] = []
        self._work: list[Hashable] = []
        self._busy = False
        # Counters for /status and the tests.
        self.waited = 0
        self.barriers = 0

    # --- requests ------------------------------------------------------------------------
    def acquire(self, req: Request) -> bool:
        """True: granted now (no callback). False: ``req.granted_cb(req)`` is called when it is."""
        if req.empty:
            self.barriers += 1
        if self.fence:
            req.state = WAITING
            self.fence.append(req)
            self.waited += 1
            return False
        if req.empty:
            return self._acquire_barrier(req)
        return self._acquire_keyed(req)

    def acquire_first(self, req: Request) -> bool:
        """Like ``acquire``, ahead of every waiting request (a blocked command's effect)."""
        req.first = True
        if self.barrier_held:
            req.state = WAITING
            self._after_barrier.append(req)
            return False
        locks = self.locks
        for key, excl in req.keys:
            lk = locks.get(key)
            if lk is not None and not _compatible(lk, req.owner, excl, True):
                self._enqueue(req, front=True)
                return False
        self._grant(req)
        return True

    def release(self, req: Request) -> None:
        """A granted request is done, or a waiting one is no longer wanted."""
        state = req.state
        req.state = RELEASED
        if state == WAITING:
            self._cancel(req)
            return
        if state != GRANTED:
            return
        self.held -= 1
        if req.empty and req.lifted:
            self.lifted -= 1  # it stopped fencing already
            self._run(())
            return
        if req.empty:
            self._barrier_done(req)
            return
        locks = self.locks
        blocked = self.blocked
        touched = []
        plain = req.plain
        if plain is not None:
            excl = req.excl
            for key in plain:
                lk = locks[key]
                if lk is req and not blocked:
                    del locks[key]
                elif lk.__class__ is int:
                    if lk > 1:
                        locks[key] = lk - 1
                    else:
                        del locks[key]
                elif self._release_key(req, key, excl, lk):
                    touched.append(key)
        else:
            for key, excl in req._keys:
                lk = locks[key]
                if lk is req and not blocked:
                    del locks[key]
                elif lk.__class__ is int:
                    if lk > 1:
                        locks[key] = lk - 1
                    else:
                        del locks[key]
                elif self._release_key(req, key, excl, lk):
                    touched.append(key)
        if touched or self.fence:
            self._run(touched)

    def _release_key(self, req: Request, key: Hashable, excl: bool, lk: _Lock | Request) -> bool:
        """One key of a released request, beyond the short forms; True if requests wait for it."""
        locks = self.locks
        blocked = self.blocked
        if lk is req:
            if not blocked.get(key):
                del locks[key]
                return False
            lk = self._upgrade(key)
        if excl:
            lk.xcount -= 1
            if not lk.xcount:
                lk.xowner = None
                if blocked and not req.first and blocked.get(key) and self.call_later is not None:
                    # This write may have woken a blocked command on the answering side: keep
                    # the key for that command's effect (or until the grace ends). An effect
                    # ran on the shadow only: it wakes nothing upstream.
                    if not lk.wake:
                        lk.wake = True
                        self.wakes += 1
                    self.call_later(self.wake_grace, lambda lk=lk, key=key: self._wake_expired(key, lk))
        else:
            lk.shared -= 1
            if not lk.shared:
                lk.sowner = None
        if lk.q:
            return True
        if not (lk.xcount or lk.shared or lk.wake):
            del locks[key]
        return False

    # --- blocking commands ---------------------------------------------------------------
    def blocking_started(self, keys: Iterable[Hashable]) -> None:
        blocked = self.blocked
        for k in keys:
            blocked[k] = blocked.get(k, 0) + 1

    def blocking_ended(self, keys: Iterable[Hashable]) -> None:
        blocked = self.blocked
        for k in keys:
            n = blocked.get(k, 0) - 1
            if n > 0:
                blocked[k] = n
            else:
                blocked.pop(k, None)

    def move_started(self, src: Hashable, dst: Hashable) -> None:
        srcs = self.moves.setdefault(dst, {})
        srcs[src] = srcs.get(src, 0) + 1

    def move_ended(self, src: Hashable, dst: Hashable) -> None:
        srcs = self.moves.get(dst)
        if srcs is None or src not in srcs:
            return
        if srcs[src] > 1:
            srcs[src] -= 1
        else:
            del srcs[src]
            if not srcs:
                del self.moves[dst]

    def fed_by_move(self, keys: Iterable[Hashable], own: tuple[Hashable, Hashable] | None = None) -> bool:
        """May a blocked move into one of ``keys`` have been woken, and its effect not be done yet?

        True while such a move's source is held by a write (or by that move's own effect) or has
        a pending wake: the move then ran on the server before a pop of what it pushed.
        ``own``: the asking command's own move, left out.
        """
        moves, locks = self.moves, self.locks
        for k in keys:
            srcs = moves.get(k)
            if not srcs:
                continue
            for src, n in srcs.items():
                if own is not None and own == (src, k) and n == 1:
                    continue
                lk = locks.get(src)
                if lk is None or lk.__class__ is int:
                    continue  # free, or only read
                if lk.__class__ is Request or lk.xcount or lk.wake:
                    return True
        return False

    def _wake_expired(self, key: Hashable, lk: _Lock) -> None:
        if lk.wake and self.locks.get(key) is lk:
            lk.wake = False
            self.wakes -= 1
            self._run([key])

    # --- internals -----------------------------------------------------------------------
    def _acquire_barrier(self, req: Request) -> bool:
        self.fence.append(req)  # waiting, or held at the head of the fence
        if self.held - self.lifted or self.waiting or self.wakes:
            req.state = WAITING
            self.waited += 1
            return False
        self.barrier_held = True
        self._grant(req)
        self._lift_later(req)
        return True

    def _lift_later(self, req: Request) -> None:
        if req.lift_after is not None and self.call_later is not None:
            self.call_later(req.lift_after, lambda: self.lift(req))

    def lift(self, req: Request) -> None:
        """A held barrier stops fencing: what waits behind it is granted as if it were released.

        It still counts as held until released, but only as a holder of nothing; a later barrier
        does not wait for it either (on the server, that one would meet the same ``-BUSY``).
        """
        if req.state != GRANTED or not req.empty or req.lifted:
            return
        req.lifted = True
        self.lifted += 1
        self._barrier_done(req)

    def _barrier_done(self, req: Request) -> None:
        """The keyless command ``req`` no longer fences: grant what waited behind it."""
        self.barrier_held = False
        if self.fence and self.fence[0] is req:
            self.fence.popleft()
        pending, self._after_barrier = self._after_barrier, []
        for r in pending:
            if r.state == WAITING:
                r.state = 0
                if self.acquire_first(r):
                    self._granted.append(r)
        self._run(())

    def _acquire_keyed(self, req: Request) -> bool:
        locks = self.locks
        # Fast path, one dict lookup per key: every key free (or only read, for a read).
        plain = req.plain
        taken = 0
        if plain is not None:
            if req.excl:
                for key in plain:
                    if key in locks:
                        break
                    locks[key] = req
                    taken += 1
            else:
                for key in plain:
                    v = locks.get(key)
                    if v is None:
                        locks[key] = 1
                    elif v.__class__ is int:
                        locks[key] = v + 1
                    else:
                        break
                    taken += 1
            done = taken == len(plain)
            undo = plain[:taken]
        else:
            for key, excl in req._keys:
                v = locks.get(key)
                if v is None:
                    locks[key] = req if excl else 1
                elif not excl and v.__class__ is int:
                    locks[key] = v + 1
                else:
                    break
                taken += 1
            done = taken == len(req._keys)
            undo = [k for k, _ in req._keys[:taken]]
        if done:
            req.state = GRANTED
            self.held += 1
            return True
        for key in undo:  # then the general path
            v = locks[key]
            if v is req or v == 1:
                del locks[key]
            else:
                locks[key] = v - 1
        owner = req.owner
        for key, excl in req.keys:
            lk = locks.get(key)
            if lk is not None and not _compatible(lk, owner, excl, False):
                self._enqueue(req, front=False)
                return False
        self._grant(req)
        return True

    def _grant(self, req: Request) -> None:
        req.state = GRANTED
        self.held += 1
        locks = self.locks
        owner = req.owner
        for key, excl in req.keys:
            lk = locks.get(key)
            if lk is None:
                locks[key] = req if excl else 1
                continue
            if lk.__class__ is int and not excl:
                locks[key] = lk + 1
                continue
            if lk.__class__ is not _Lock:
                lk = self._upgrade(key)
            elif lk.wake and req.first:
                lk.wake = False  # the handover: the woken command's effect comes next
                self.wakes -= 1
            if excl:
                lk.xcount += 1
                lk.xowner = owner
            else:
                lk.sowner = owner if not lk.shared or lk.sowner is owner else _MIXED
                lk.shared += 1

    def _upgrade(self, key: Hashable) -> _Lock:
        """The key's full lock record (made from a single exclusive holder, or new)."""
        v = self.locks.get(key)
        if v is not None and v.__class__ is _Lock:
            return v
        lk = self.locks[key] = _Lock()
        if v.__class__ is int:
            lk.shared = v
            lk.sowner = _MIXED  # readers' connections are not recorded in the short form
        elif v is not None:
            lk.xcount = 1
            lk.xowner = v.owner
        return lk

    def _enqueue(self, req: Request, front: bool) -> None:
        req.state = WAITING
        self.waiting += 1
        self.waited += 1
        for key, _excl in req.keys:
            lk = self._upgrade(key)
            if lk.q is None:
                lk.q = deque()
            if front:
                lk.q.appendleft(req)
            else:
                lk.q.append(req)

    def _cancel(self, req: Request) -> None:
        if req.empty or req in self._after_barrier or req in self.fence:
            self._run(())  # dropped from the fence when it reaches the head
            return
        self.waiting -= 1
        self._run([key for key, _ in req.keys])

    def _run(self, keys: Iterable[Hashable]) -> None:
        """Grant what became grantable, then tell the owners (outside the bookkeeping)."""
        self._work.extend(keys)
        if self._busy:
            return
        self._busy = True
        try:
            work = self._work
            while True:
                while work:
                    self._check(work.pop())
                self._drain_fence()
                if not work:
                    break
            granted, self._granted = self._granted, []
        finally:
            self._busy = False
        for r in granted:
            if r.state == GRANTED:
                r.granted_cb(r)

    def _check(self, key: Hashable) -> None:
        locks = self.locks
        lk = locks.get(key)
        if lk is None or lk.__class__ is not _Lock:
            return  # the short forms: nobody waiting
        q = lk.q
        while q:
            head = q[0]
            if head.state != WAITING:
                q.popleft()  # cancelled while waiting
                continue
            if self.barrier_held or not self._grantable(head):
                break
            for k, _excl in head.keys:
                locks[k].q.popleft()  # a waiter's keys are all full _Lock records
            self.waiting -= 1
            self._grant(head)
            self._granted.append(head)
            self._work.extend(k for k, _ in head.keys if k != key)
        if lk.free():
            del locks[key]

    def _grantable(self, req: Request) -> bool:
        locks = self.locks
        owner = req.owner
        first = req.first
        for key, excl in req.keys:
            lk = locks[key]
            if lk.q[0] is not req or not _compatible(lk, owner, excl, first, queued_ok=True):
                return False
        return True

    def _drain_fence(self) -> None:
        fence = self.fence
        while fence:
            head = fence[0]
            if head.state == RELEASED:
                fence.popleft()
                continue
            if head.state == GRANTED:
                return  # a held barrier: everything behind it waits
            if head.empty:
                if self.held - self.lifted or self.waiting or self.wakes:
                    return
                self.barrier_held = True
                self._grant(head)
                self._granted.append(head)
                self._lift_later(head)
                return
            fence.popleft()
            self.waited -= 1  # counted once, when it first waited
            if self._acquire_keyed(head):
                self._granted.append(head)

    def stats(self) -> dict[str, int]:
        return {"held": self.held, "waiting": self.waiting + len(self.fence), "keys": len(self.locks),
                "waited_total": self.waited, "barriers_total": self.barriers}


def _compatible(lk: _Lock | Request, owner: Any, excl: bool, first: bool, queued_ok: bool = False) -> bool:
    """Can ``owner`` take ``lk`` now? ``first``: a blocked command's effect (ahead of the queue
    and of a pending wake); ``queued_ok``: the request heads the queue itself."""
    if lk.__class__ is Request:
        return lk.owner is owner  # held exclusively by one request: only its own connection may
    if lk.__class__ is int:
        return not excl  # only read, by connections not recorded: readers join, a writer waits
    if lk.q and not (first or queued_ok):
        return False
    if lk.wake and not first:
        return False
    if excl:
        return (not lk.xcount or lk.xowner is owner) and (not lk.shared or lk.sowner is owner)
    return not lk.xcount or lk.xowner is owner
