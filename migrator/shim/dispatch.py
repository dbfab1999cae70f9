"""A command routed: an ``Entry`` made from its ``routing.Plan``, with each side's payload, queued per side.

``_dispatch`` is the per-command path's heart: which side answers and which shadows it (sampled
reads, dirty keys read from the side that has them, a side down), the shadow's payload (as
sent, rewritten to an absolute time, or computed once the answer is in), script healing, the
sequencer's keys, and the entry's place in the client's and each side's queue.
"""

from __future__ import annotations

import time

from migrator.shim import compare as cmp
from migrator.shim import effects
from migrator.shim.commands import SIDE_NAMES, TARGET, Classified, Cls
from migrator.shim.entry import (
    DEFERRED,
    DOWN,
    EVALSHA_NAMES,
    EXEC_BYTES,
    IDLE,
    MULTI_BYTES,
    Entry,
)
from migrator.shim.resp import encode
from migrator.shim.routing import Plan
from migrator.shim.scripts import is_script_flush
from migrator.shim.sequencer import GRANTED

# What counts as a write for read-your-writes, besides the write classes (Entry.write).
_RYW_WRITES = frozenset({Cls.TX, Cls.SCRIPT, Cls.BLOCKING})


class Dispatch:
    """The session's routing of one command into an entry."""

    def _ryw_redirect(self) -> bool:
        """Read-your-writes while a replica answers reads: must the primary answer this read?

        Yes while one of this connection's writes is unacknowledged, and after that until the
        replica's offset reaches the primary's offset read after the last write was
        acknowledged (``shim.lag.OffsetTracker``, polled quickly while a connection waits on it).
        Other connections' reads, and this one's once the replica has caught up, go to the replica.
        """
        if self.ryw_pending:
            return True
        if self.ryw_acked is None:
            return False
        tracker = self.shim.tracker
        if self.ryw_offset is None:
            self.ryw_offset = tracker.primary_offset_since(self.ryw_acked)
        if self.ryw_offset is not None and tracker.caught_up(self.ryw_offset):
            self.ryw_acked = self.ryw_offset = None
            return False
        tracker.demand(time.monotonic())
        return True

    def _db(self, side: int) -> int:
        return self.db if self.db is not None else self.shim.endpoint_dbs[side]

    def _dispatch(self, args: list[bytes], name: bytes, c: Classified, plan: Plan, gen: int | None = None,
                  tx: list[list[bytes]] | None = None) -> Entry:
        shim = self.shim
        stats = shim.stats
        e = Entry(args, name, c, shim.generation if gen is None else gen)
        e.tx = tx
        answer, shadow = plan.answer, plan.shadow
        cls = e.cls
        if shim.ryw and cls is Cls.READ and tx is None and self.tx is None and self._ryw_redirect():
            # This connection wrote something the replica may not have yet: the primary answers.
            answer, shadow = shim.tracker.primary, None
            stats.ryw_redirects += 1
        if shadow is not None and plan.sampled and not shim.sample():
            shadow = None
        replica = shim.tracker.replica
        if (cls is Cls.SCRIPT_ADMIN and name == b"script" and shadow is None and tx is None and self.tx is None
                and replica is not None and answer != replica):
            # SCRIPT LOAD / FLUSH are not replicated, and a replica accepts them: the replica gets
            # them too, so an EVALSHA finds its script there once it answers (FUNCTION ... is
            # replicated, and refused by a replica: the primary only).
            shadow = replica
        if shadow is not None and shim.lag_aware and plan.compare and cls is Cls.READ and not shim.tracker.ready:
            # The replica is loading its initial sync, or its link is down: nothing to compare.
            shadow = None
            stats.lag_skipped += 1
        if plan.fallback and shim.dirty.keys and shim.dirty.is_dirty(self._db(answer), c.keys(args)):
            # A key whose last write did not reach the read side is read from the side that has it.
            answer, shadow = plan.shadow, None
        elif plan.fallback and not shim.may_retry(answer):
            # The read side failed (down or timed out) moments ago: the write side answers, at once.
            answer, shadow = plan.shadow, None
        known = c.known
        if not known[answer]:
            stats.unknown[(SIDE_NAMES[answer], name.decode(errors="replace"))] += 1
            shim.warn_unknown(answer, name)
        if shadow is not None:
            reason = None
            if not known[shadow]:
                stats.unknown[(SIDE_NAMES[shadow], name.decode(errors="replace"))] += 1
                shim.warn_unknown(shadow, name)
                reason = f"unknown-on-{SIDE_NAMES[shadow]}"
                if shadow == TARGET:
                    shim.divergence.target_lacks(name)
            elif self.up[shadow].state in (DOWN, IDLE) and not shim.may_retry(shadow):
                reason = f"{SIDE_NAMES[shadow]}-down"
            # (A full mirror queue drops nothing: connections adding to it stop being read, see _flow.)
            if reason is not None:
                stats.shadow_failures[(SIDE_NAMES[shadow], reason)] += 1
                if cls is Cls.SERVER_BOTH:
                    shim.log.warning("shim.server_command_one_side", side=SIDE_NAMES[shadow], reason=reason,
                                     command=b" ".join(args[:2]).decode(errors="replace").upper())
                if e.write:
                    self._mark_dirty(self._entry_keys(e), self._db(shadow), reason, name)
                shadow = None
        e.answer, e.shadow = answer, shadow
        e.db = self._db(answer)
        raw = encode(args)
        e.payload[answer] = raw
        e.pending = 1
        stats.commands[(cls.value, SIDE_NAMES[answer])] += 1
        if shadow is not None:
            e.pending = 2
            e.wait_shadow = plan.wait_shadow or plan.combine
            e.fallback = plan.fallback
            shim.mirror_depth += 1
            self.shadow_n += 1
            stats.commands[(cls.value, SIDE_NAMES[shadow])] += 1
            needs_reply = tx is not None or plan.effect or (e.write and effects.needs_reply(args))
            if needs_reply:
                e.payload[shadow] = DEFERRED
                e.effect = True
                e.compare = tx is not None and plan.compare
            else:
                rewritten = effects.rewrite_now(args, int(time.time() * 1000)) if e.write else None
                shadow_raw = encode(rewritten) if rewritten is not None else raw
                if plan.sequential:
                    e.payload[shadow] = DEFERRED
                    e.shadow_raw = shadow_raw
                else:
                    e.payload[shadow] = shadow_raw
                e.compare = plan.compare and cmp.comparable(name)
            if tx is not None:
                # A transaction's EVALSHA reaches the shadow inside its copy of the transaction.
                for targs in tx:
                    if targs[0].lower() in EVALSHA_NAMES and len(targs) > 1:
                        self._heal_script(shadow, targs[1].lower())
        if name in EVALSHA_NAMES and len(args) > 1:
            # (EVALSHA_RO too: a read, answered by the target after the read cutover.)
            sha = args[1].lower()
            # Never on the answering side: the client sees what that server says (NOSCRIPT after a
            # SCRIPT FLUSH, which a reload would undo); the shadow is healed to stay in step.
            if shadow is not None:
                self._heal_script(shadow, sha)
        if cls is Cls.SCRIPT or cls is Cls.SCRIPT_ADMIN:
            shim.note_script(args, name)
        if name == b"restore" and shadow is not None and tx is None:
            self._restore_by_effect(e)
        if shim.ryw and answer == shim.tracker.primary and (e.write or cls in _RYW_WRITES):
            e.ryw = True
            self.ryw_pending += 1
        # SCRIPT FLUSH is ordered like a keyless write (a barrier): a script other connections
        # still have in flight to the shadow must not run there after the flush, nor before it.
        if (shadow is not None and (e.write or e.compare) and shim.sequence_keys
                and (cls is not Cls.SCRIPT_ADMIN or is_script_flush(args))):
            if cls is Cls.BLOCKING:
                # First tried without blocking (inside MULTI/EXEC), holding its keys like a write,
                # so a pop of data already there is ordered like any write. Only if there is
                # nothing yet is it sent as itself, to block without holding anything (see
                # _blocking_probe); the connection's later entries wait until it has returned.
                e.bprobe = True
                e.payload[answer] = MULTI_BYTES + raw + EXEC_BYTES
                e.exp[answer] = 3
                self._sequence(e, [(k, True) for k in dict.fromkeys(self._lock_keys(c.keys(args)))])
                if e.req.state == GRANTED:
                    self.ungranted.append(e)  # granted at once: still holds back what follows
            else:
                self._sequence(e, self._entry_spec(e))
        self.pending_count += 1
        if cls is Cls.BLOCKING or cls is Cls.BLOCKING_READ:
            self.blocking_pending += 1  # may wait forever by design: a drain does not wait for it
        else:
            shim.outstanding[e.gen] = shim.outstanding.get(e.gen, 0) + 1
        self.inflight.append(e)
        e.size = len(raw)
        self.inflight_n += 1
        self.inflight_bytes += e.size
        self._enqueue(answer, e)
        if shadow is not None:
            self._enqueue(shadow, e)
        return e

    def _enqueue(self, side: int, e: Entry) -> None:
        u = self.up[side]
        if u.state is IDLE or u.state is DOWN:
            self._connect(side)
        u.out.append(e)
