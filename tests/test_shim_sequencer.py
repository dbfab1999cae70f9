"""The per-key sequencer on its own: who is granted what, in which order, and that nothing deadlocks."""

from __future__ import annotations

import random

from migrator.shim.sequencer import GRANTED, WAITING, Request, Sequencer


class Owner:
    """A connection: records the order its requests were granted in."""

    def __init__(self, name: str, log: list) -> None:
        self.name = name
        self.log = log

    def req(self, *keys, shared: bool = False) -> Request:
        r = Request(self, [(k, not shared) for k in keys], lambda r: self.log.append(r.data))
        r.data = f"{self.name}:{','.join(keys) or '*'}"
        return r


def owners(n: int):
    log: list = []
    return log, [Owner(chr(ord("a") + i), log) for i in range(n)]


def test_writes_to_one_key_are_granted_one_at_a_time_in_arrival_order():
    """A second and third writer of a key wait, and are granted in the order they asked."""
    seq = Sequencer()
    log, (a, b, c) = owners(3)
    ra, rb, rc = a.req("k"), b.req("k"), c.req("k")
    assert seq.acquire(ra) and not seq.acquire(rb) and not seq.acquire(rc)
    seq.release(ra)
    assert log == ["b:k"] and rc.state == WAITING
    seq.release(rb)
    assert log == ["b:k", "c:k"]
    seq.release(rc)
    assert seq.stats()["keys"] == 0 and seq.held == 0


def test_writes_to_different_keys_do_not_wait_for_each_other():
    """Disjoint keys are granted at once, whoever holds what."""
    seq = Sequencer()
    _log, (a, b) = owners(2)
    assert seq.acquire(a.req("x", "y")) and seq.acquire(b.req("z"))


def test_a_connection_reuses_its_own_key_unless_another_waits_for_it():
    """A pipelining connection's later write to its held key goes at once, but queues once someone else waits."""
    seq = Sequencer()
    log, (a, b) = owners(2)
    a1, a2 = a.req("k"), a.req("k")
    assert seq.acquire(a1) and seq.acquire(a2)
    rb, a3 = b.req("k"), a.req("k")
    assert not seq.acquire(rb) and not seq.acquire(a3)
    seq.release(a1)
    seq.release(a2)
    assert log == ["b:k"]
    seq.release(rb)
    assert log == ["b:k", "a:k"]


def test_multi_key_requests_are_all_or_nothing():
    """A request for two keys holds neither until both are free."""
    seq = Sequencer()
    log, (a, b, c) = owners(3)
    ra, rc = a.req("x"), c.req("y")
    assert seq.acquire(ra) and seq.acquire(rc)
    rb = b.req("x", "y")
    assert not seq.acquire(rb)
    seq.release(ra)
    assert log == [] and rb.state == WAITING
    seq.release(rc)
    assert log == ["b:x,y"]


def test_shared_readers_share_and_a_waiting_writer_stops_new_readers():
    """Compared reads hold a key together; a writer waits for them, and readers after it wait for the writer."""
    seq = Sequencer()
    log, (a, b, c, d) = owners(4)
    r1, r2 = a.req("k", shared=True), b.req("k", shared=True)
    assert seq.acquire(r1) and seq.acquire(r2)
    w, r3 = c.req("k"), d.req("k", shared=True)
    assert not seq.acquire(w) and not seq.acquire(r3)
    seq.release(r1)
    assert log == []
    seq.release(r2)
    assert log == ["c:k"]
    seq.release(w)
    assert log == ["c:k", "d:k"]


def test_a_keyless_write_waits_for_everything_before_it_and_holds_back_everything_after():
    """A barrier (FLUSHDB) is granted only when nothing is held, and later requests on any key wait for it."""
    seq = Sequencer()
    log, (a, b, c) = owners(3)
    ra = a.req("x")
    assert seq.acquire(ra)
    barrier, rc = b.req(), c.req("unrelated")
    assert not seq.acquire(barrier) and not seq.acquire(rc)
    seq.release(ra)
    assert log == ["b:*"] and rc.state == WAITING
    seq.release(barrier)
    assert log == ["b:*", "c:unrelated"]
    assert seq.barriers == 1


def test_a_blocked_commands_effect_goes_ahead_of_waiting_writes_and_takes_the_key_from_its_waker():
    """The write that may have woken a blocked pop keeps its key for the pop's effect, which precedes later writers."""
    timers: list = []
    seq = Sequencer(call_later=lambda delay, fn: timers.append(fn))
    log, (waker, later, popper) = owners(3)
    seq.blocking_started(["q"])
    w = waker.req("q")
    assert seq.acquire(w)
    w2 = later.req("q")
    assert not seq.acquire(w2)
    seq.release(w)  # the push finished on both sides; the pop's reply is not in yet
    assert log == [] and w2.state == WAITING
    seq.blocking_ended(["q"])
    effect = popper.req("q")
    assert seq.acquire_first(effect)
    seq.release(effect)
    assert log == ["b:q"]


def test_the_handover_ends_after_the_grace_when_no_blocked_command_was_woken():
    """If no effect arrives, the key is released when the grace timer fires."""
    timers: list = []
    seq = Sequencer(call_later=lambda delay, fn: timers.append(fn))
    log, (a, b) = owners(2)
    seq.blocking_started(["q"])
    w, w2 = a.req("q"), b.req("q")
    assert seq.acquire(w) and not seq.acquire(w2)
    seq.release(w)
    assert log == [] and len(timers) == 1
    timers[0]()
    assert log == ["b:q"]


def test_a_cancelled_waiting_request_does_not_block_the_ones_behind_it():
    """A request dropped while waiting (its connection closed) is skipped."""
    seq = Sequencer()
    log, (a, b, c) = owners(3)
    ra, rb, rc = a.req("k"), b.req("k"), c.req("k")
    assert seq.acquire(ra) and not seq.acquire(rb) and not seq.acquire(rc)
    seq.release(rb)
    seq.release(ra)
    assert log == ["c:k"]


def test_random_request_mixes_never_deadlock_and_never_grant_conflicting_holds():
    """Thousands of random requests (multi-key, shared, barriers, re-entrant) all get granted, never in conflict."""
    rng = random.Random(7)
    seq = Sequencer()
    _log, conns = owners(6)
    keys = ["k1", "k2", "k3", "k4"]
    granted: list[Request] = []
    waiting: dict[int, list[Request]] = {i: [] for i in range(len(conns))}
    total = 0

    def check_no_conflict() -> None:
        holds: dict[str, list[Request]] = {}
        barrier_held = any(not r.keys for r in granted)
        assert not barrier_held or len(granted) == 1
        for r in granted:
            for k, excl in r.keys:
                for other in holds.get(k, []):
                    if other.owner is not r.owner:
                        assert not excl and not dict(other.keys)[k]
                holds.setdefault(k, []).append(r)

    for step in range(4000):
        i = rng.randrange(len(conns))
        if rng.random() < 0.55 and not waiting[i]:
            # A connection asks for its next entry only once its earlier ones are granted.
            roll = rng.random()
            ks = [] if roll < 0.03 else rng.sample(keys, rng.randint(1, 3))
            r = conns[i].req(*ks, shared=roll > 0.8)
            if rng.random() < 0.5:  # the plain form a uniform pipelined chunk uses
                r = Request(r.owner, [k for k, _ in r.keys], r.granted_cb, excl=roll <= 0.8)
                r.data = "plain"
            total += 1
            if seq.acquire(r):
                granted.append(r)
            else:
                waiting[i].append(r)
        elif granted:
            r = granted.pop(rng.randrange(len(granted)))
            seq.release(r)
        for rs in waiting.values():
            for r in list(rs):
                if r.state == GRANTED:
                    rs.remove(r)
                    granted.append(r)
        check_no_conflict()
    while granted:
        seq.release(granted.pop())
        for rs in waiting.values():
            for r in list(rs):
                if r.state == GRANTED:
                    rs.remove(r)
                    granted.append(r)
        check_no_conflict()
    assert not any(waiting.values())
    assert seq.held == 0 and seq.stats()["waiting"] == 0 and seq.stats()["keys"] == 0
    assert total > 1500
