"""A side that fails or stops answering: what was waiting on it is settled, never left hanging.

``fail`` settles a connection's pending entries (a read falls back to the other side where it
can, a shadow write's keys are marked dirty, a lost answer closes the client);
``check_timeouts`` (the IO layer's timer) applies ``shim.shadow_timeout``.
"""

from __future__ import annotations

from migrator.shim.commands import SIDE_NAMES, Cls
from migrator.shim.entry import CONNECTING, DOWN, NOTHING, UP, Upstream, complete

CLIENT_GONE_GRACE = 5.0  # seconds a disconnected client's in-flight commands may still finish


def _reason_label(reason: str) -> str:
    """A short, bounded label for metrics from a free-text failure reason."""
    if "timeout" in reason:
        return "timeout"
    if reason.startswith("protocol error"):
        return "protocol-error"
    if "refused" in reason and "while connecting" in reason:
        return "handshake-refused"
    return "connection-lost"


class Failures:
    """The session's handling of a failed, lost or slow side."""

    def fail(self, side: int, reason: str, side_fault: bool = True) -> None:
        """``side``'s connection is unusable: settle everything that was waiting on it.

        ``side_fault``: the side itself failed (connect refused, connection lost, its own
        timeout), which every connection backs off from. A command refused on this connection
        only (a handshake command it replays, an answer that differs) resets this connection,
        never the side for the others.
        """
        u = self.up[side]
        if u.state is DOWN and not u.wait and not u.out:
            return
        shim = self.shim
        was_up = u.state is UP
        if u.transport is not None:
            u.transport.abort()
        u.transport = None
        u.state = DOWN
        if side_fault:
            shim.side_failed(side, reason)
        pending = list(u.wait) + list(u.out)
        u.wait.clear()
        u.out.clear()
        lost_answer = self._drop_raw(u)
        for e in pending:
            if e.internal or e.stream:
                if e.stream:
                    lost_answer = True
                continue
            if side == e.answer:
                other = e.shadow
                if (e.fallback and other is not None and not e.done[side]
                        and (not e.done[other] or complete(e, other))):
                    # A read the other side also got (and can still answer, or has): its reply
                    # answers instead.
                    e.answer, e.shadow = other, None
                    e.done[side] = True
                    e.pending -= 1
                    if not e.done[other]:
                        shim.mirror_depth -= e.n  # counted as the shadow's; it answers now
                        self.shadow_n -= e.n
                    e.wait_shadow = False
                    if e.pending == 0:
                        self._entry_done(e)
                    continue
                lost_answer = True
                self._answer_lost(e)
                if e.write and e.shadow is not None:
                    # Whether the answering side applied it is unknown (its connection was lost,
                    # or closed: a primary a failover demoted); the shadow may have.
                    self._mark_dirty(self._entry_keys(e), self._db(side), "answer-lost", e.name)
                self._finish_side(e, side)
            else:
                shim.stats.shadow_failures[(SIDE_NAMES[side], _reason_label(reason))] += 1
                if e.write and e.payload[side] is not NOTHING:  # NOTHING: there was nothing to apply
                    self._mark_dirty(self._entry_keys(e), self._db(side), _reason_label(reason), e.name)
                self._finish_side(e, side)
        if lost_answer or self.pipe == side or (
                self.pipe is not None and was_up and side == shim.routes[Cls.WRITE].answer):
            # (A subscribed connection also ends when its open connection to the write side is
            # lost: a CLIENT KILL aimed at it goes there, where CLIENT ID/LIST name it.)
            shim.log.warning("shim.authoritative_lost", side=SIDE_NAMES[side], reason=reason, peer=self.client.peer)
            self._flush_client()
            self.close(f"{SIDE_NAMES[side]} connection lost: {reason}")
            return
        self._flush_client()

    @staticmethod
    def _answers_on(u: Upstream) -> bool:
        """Some client command is waiting for this side's answer (so it is not just a shadow)."""
        side = u.side
        return any(not x.internal and x.answer == side for x in u.wait) or any(
            not x.internal and x.answer == side for x in u.out)

    def check_timeouts(self, now: float) -> None:
        """Called periodically: a shadow that stopped answering must not hold anything up."""
        if self.closed:
            return
        up = self.up
        if not self.client_gone and not (up[0].wait or up[0].out or up[1].wait or up[1].out):
            return  # idle: the common case, kept cheap for many connections
        limit = self.shim.shadow_timeout
        stalled = now < self.shim.stalled_until  # the shim's own delay, not the sides' (see _sweep_loop)
        for u in up:
            side = u.side
            if stalled:
                break
            if u.state is UP and u.wait:
                e = u.wait[0]
                # A shadow reply, or a handshake/heal on a connection nobody waits on for an answer.
                if now - e.ts[side] > limit:
                    if side != e.answer or (e.internal and not self._answers_on(u)):
                        self.fail(side, "shadow-timeout")
                    elif self._can_fall_back(u):
                        # Reads the other side also got (after the read cutover): it answers them.
                        self.fail(side, "read-timeout")
                    else:
                        self._expire_behind(u, now - limit)
            elif (u.state is CONNECTING and u.out and now - u.connect_started > limit
                  and any(e.answer != side and not e.internal for e in u.out)
                  and not any(e.answer == side and not e.internal for e in u.out)):
                # Only shadow work waits on this connection: give up on it like on a slow reply.
                self.fail(side, "shadow-connect-timeout")
        if self.client_gone and not self.closed and not self.held and now - self.client_gone > CLIENT_GONE_GRACE:
            self.close("client closed; in-flight commands did not finish in time")
        if not self.closed:
            self._after_io()

    @staticmethod
    def _can_fall_back(u: Upstream) -> bool:
        """Every client command this side owes an answer has a copy on the other side to answer instead."""
        side = u.side
        for q in (u.wait, u.out):
            for x in q:
                if x.answer == side and not x.internal and (x.stream or not x.fallback or x.shadow is None):
                    return False
        return True

    def _expire_behind(self, u: Upstream, sent_before: float) -> None:
        """Shadow work waiting behind an answer on a slow side: stop letting it hold anything up.

        The side answers a command (a read after the read cutover), so the connection is not
        given up; but a shadow write queued behind that answer must not keep its keys from other
        connections, nor its own client waiting, past ``shadow_timeout``. Its keys are marked
        dirty and released; its reply, if it comes, is still taken and compared.
        """
        side = u.side
        for e in u.wait:
            if e.ts[side] > sent_before:
                break
            if side == e.answer or e.internal or e.stream or e.expired:
                continue
            e.expired = True
            self.shim.stats.shadow_failures[(SIDE_NAMES[side], "timeout")] += 1
            if e.write:
                self._mark_dirty(self._entry_keys(e), self._db(side), "timeout", e.name)
            e.wait_shadow = False
            req = e.req
            if req is not None:
                e.req = None
                req.data = None
                self.shim.seq.release(req)
                if self.ungranted and self.ungranted[0] is e:
                    self.ungranted.popleft()
                    self._request_next()
