"""Replies in: matched to their entry, combined, compared, and the entry settled.

Per side, per entry: latency and one-sided errors (``_paired_in``), the shadow's payload
computed from the answer (``_resolve_deferred``), a reply made from both sides'
(``_combine``), a refusal by the shadow alone (``_shadow_refusal``), the comparison
(``_compare``, ``_diverged``), and the entry's end (``_finish_side``, ``_entry_done``).
"""

from __future__ import annotations

import time

from migrator.shim import compare as cmp
from migrator.shim import effects, lag, server_cmds
from migrator.shim.commands import SIDE_NAMES, SOURCE, TARGET, Cls
from migrator.shim.connstate import LOGIN_NAMES, PER_SIDE_STATE
from migrator.shim.entry import (
    DEFERRED,
    EVALSHA_NAMES,
    EXEC_BYTES,
    MULTI_BYTES,
    NOTHING,
    Entry,
    complete,
    has_error,
)
from migrator.shim.resp import ProtocolError, encode, error_reply, is_error, parse
from migrator.shim.scripts import script_killed

_COMBINED = frozenset({Cls.PUBLISH, Cls.PUBSUB_COUNT, Cls.SERVER_BOTH})  # the reply is made from both sides'


class Replies:
    """The session's reply intake: match, combine, compare, settle."""

    def _side_done(self, e: Entry, side: int, now: float) -> None:
        """``side``'s reply to ``e`` is in; whatever goes wrong handling it ends that one entry cleanly."""
        try:
            self._reply_in(e, side, now)
        except Exception as err:  # noqa: BLE001 - one reply must never wedge its keys (or every client)
            self._reply_failed(e, side, err)

    def _reply_failed(self, e: Entry, side: int, err: Exception) -> None:
        """Handling ``side``'s reply to ``e`` raised (a reply nested too deep to parse or compare).

        The entry ends as if compared: the client gets the answering side's reply, its keys are
        released, and, where both sides got it, marked dirty on the other side (what each side
        holds is not known; the repair compares the data itself). A keyless command (a script
        without declared keys) marks its whole database.
        """
        shim = self.shim
        expected = isinstance(err, (ProtocolError, cmp.Uncomparable))
        (shim.log.warning if expected else shim.log.error)(
            "shim.reply_not_compared", command=e.name.decode(errors="replace").upper() or "(pipelined chunk)",
            side=SIDE_NAMES[side], error=str(err) or type(err).__name__, peer=self.client.peer,
            **({} if expected else {"exc_info": err}))
        if e.internal or e.stream:
            return
        e.compare = False
        if e.bprobe:  # (its reply is made from EXEC's, which could not be read)
            e.bprobe = False
            e.rep[side] = error_reply(f"ERR migrator shim: reply not understood: {err}")
        other = e.shadow if side == e.answer else e.answer
        if other is not None and other >= 0:
            if e.payload[other] is DEFERRED and e.saved is None:
                e.payload[other] = NOTHING  # what it should run depended on this reply
            if e.write:
                keys = self._entry_keys(e)
            else:  # a compared read: its keys (a keyless read names no data to repair)
                classify = shim.table.classify
                keys = [k for args in (e.args if e.batch else e.tx or [e.args]) for k in classify(args).keys(args)]
            if e.write or (keys and not shim.lag_aware):  # (a replica's data is the server's to keep in step)
                self._mark_dirty(keys, self._db(e.shadow if e.shadow is not None else other),
                                 "reply-not-compared" if expected else "shim-error", e.name)
        self._finish_side(e, side)

    def _reply_in(self, e: Entry, side: int, now: float) -> None:
        shim = self.shim
        took = now - e.ts[side]
        shim.stats.latency[side].observe(took, e.n)
        if e.shadow is not None and not e.internal:
            self._paired_in(e, side, took)
        if e.batch:
            if side == e.answer and e.shadow is not None and e.payload[e.shadow] is DEFERRED:
                self._resolve_batch(e, e.shadow, e.rep[side])
            if e.compare and complete(e, 1 - side):
                self._compare_batch(e)
            self._finish_side(e, side)
            return
        if e.bprobe and side == e.answer and not self._blocking_probe(e, side):
            return
        if e.restore is True and side == e.answer:
            self._restore_answered(e, side)
        if e.internal:
            raw = e.rep[side]
            if e.heal_sha is not None:
                if not is_error(raw):
                    shim.scripts_loaded[side].add(e.heal_sha)
            elif is_error(raw) and e.name == b"auth" and shim.passthrough and self.login is not None:
                self._login_lost(side, raw)  # the client's own login, replayed (shim.auth: passthrough)
            elif is_error(raw):
                # This connection's state (a command it replays) was refused: the side is fine.
                self.fail(side, f"{SIDE_NAMES[side]} refused {e.name.decode().upper()} while connecting: "
                                f"{raw[1:].strip().decode(errors='replace')}", side_fault=False)
            return
        if side == e.answer:
            raw = e.rep[side]
            other = e.shadow
            if other is not None and e.payload[other] is DEFERRED:
                self._resolve_deferred(e, other, raw)
            if e.cstate is not None:
                self._state_settled(e, raw)
            if e.cls is Cls.SUBSCRIBE and self.sub_expect is not None and self.pipe is None:
                for f in raw if type(raw) is list else (raw,):
                    self._sub_confirmed(f)
                self._sub_settled(side)
            self._readonly_settled(e, side, raw)
            if e.cls is Cls.SCRIPT or e.cls is Cls.SCRIPT_ADMIN:
                shim.script_result(side, e.args, e.name, raw)
        else:
            raw = e.rep[side]
            if e.name in EVALSHA_NAMES and raw.startswith(b"-NOSCRIPT"):
                shim.scripts_loaded[side].discard(e.args[1].lower())
            elif e.cls is Cls.SCRIPT or e.cls is Cls.SCRIPT_ADMIN:
                shim.script_result(side, e.args, e.name, raw if e.exp[side] == 1 else raw[-1])
            self._readonly_settled(e, side, raw)
        if e.cls in _COMBINED and e.shadow is not None and complete(e, 1 - side):
            self._combine(e)
        if e.shadow is not None and not e.batch and complete(e, e.shadow) and complete(e, e.answer):
            self._shadow_refusal(e)
        if e.compare and complete(e, 1 - side):
            self._compare(e)
        if e.name in LOGIN_NAMES and shim.passthrough and self._login_reply(e, side):
            self._finish_side(e, side)
            return
        self._finish_side(e, side)
        if (e.cls is Cls.CONNECTION and e.shadow is not None and e.rep[SOURCE] is not None
                and e.rep[TARGET] is not None and is_error(e.rep[SOURCE]) != is_error(e.rep[TARGET])
                and e.name not in PER_SIDE_STATE):
            # One side took SELECT / CLIENT SETNAME / HELLO, the other refused it: the shadow
            # connection is not in the client's state. Reset it (this connection only: the side
            # itself is fine); a new one replays the state.
            self.fail(e.shadow, f"{SIDE_NAMES[e.shadow]} and {SIDE_NAMES[e.answer]} answered "
                                f"{e.name.decode(errors='replace').upper()} differently", side_fault=False)

    def _paired_in(self, e: Entry, side: int, took: float) -> None:
        """A command sent to both sides: once both replied, each side's latency and one-sided errors (for the gates).

        The first reply's latency waits in ``e.ts`` (its side no longer waits on ``e``), so both
        sides are measured over the same commands (``latency`` and ``error_rate`` gates).
        """
        other = 1 - side
        if not complete(e, other):
            e.ts[side] = took
            return
        # A blocking command waits for data on the answering side (the other gets its effect): no latency of the server.
        lat = None if e.cls is Cls.BLOCKING else (took, e.ts[other]) if side == SOURCE else (e.ts[other], took)
        src, tgt = e.rep[SOURCE], e.rep[TARGET]
        if not e.batch:
            t_err, s_err = has_error(tgt), has_error(src)
            if t_err != s_err:
                self.shim.divergence.paired(lat, 1, [e.name] if t_err else [], int(s_err))
            else:
                self.shim.divergence.paired(lat, 1, [], 0)
            return
        if e.sent_idx is None:
            pairs = zip(range(e.n), src, tgt)
        else:  # the shadow got only the commands the answering side applied
            a, b = e.rep[e.answer], e.rep[e.shadow]
            pairs = ((i, *((a[i], b[j]) if e.answer == SOURCE else (b[j], a[i]))) for j, i in enumerate(e.sent_idx))
        n = s_err = 0
        t_err: list[bytes] = []
        for i, fs, ft in pairs:
            n += 1
            es, et = fs[:1] == b"-", ft[:1] == b"-"
            if es != et:
                if et:
                    t_err.append(e.args[i][0])
                else:
                    s_err += 1
        self.shim.divergence.paired(lat, n, t_err, s_err)

    def _combine(self, e: Entry) -> None:
        """Both sides answered a command whose reply is made from both (see server_cmds)."""
        answer, other = e.rep[e.answer], e.rep[e.shadow]
        if (e.cls is Cls.SERVER_BOTH and is_error(other) and not is_error(answer)
                and not (len(e.args) > 1 and e.args[1].lower() == b"kill")):  # (NOTBUSY: nothing ran there)
            # CONFIG SET of a parameter one side lacks...: the client hears the write side; the
            # refusal is counted and logged, never silent.
            self.shim.stats.shadow_failures[(SIDE_NAMES[e.shadow], "refused")] += 1
            self.shim.log.warning("shim.server_command_refused", side=SIDE_NAMES[e.shadow],
                                  command=b" ".join(e.args[:2]).decode(errors="replace").upper(),
                                  error=other[1:].strip().decode(errors="replace")[:200])
        if e.cls is not Cls.SERVER_BOTH and is_error(answer) and not is_error(other):
            # SPUBLISH / PUBSUB SHARDNUMSUB on a side without sharded pub/sub (Redis 6.2): any
            # subscriber is on the other side, which answers.
            e.rep[e.answer] = other
            return
        e.rep[e.answer] = server_cmds.combine(e.args, answer, other)

    def _shadow_refusal(self, e: Entry) -> None:
        """Both replies are in: a refusal by the shadow side alone is never silent.

        A write both sides refused (FUNCTION LOAD of a library that exists, FUNCTION FLUSH BOGUS,
        an EVALSHA both lack) changed neither: nothing to repair. An uncompared write, or an
        EVALSHA, that only the shadow refused marks its keys dirty.
        """
        shim = self.shim
        side = e.shadow
        raw = e.rep[side]
        if not has_error(raw):
            if e.effect and e.tx is None and e.exp[side] == 1:
                self._effect_check(e)
            return
        if is_error(e.rep[e.answer]) and all(is_error(f) for f in (raw if type(raw) is list else (raw,))):
            return  # refused by both: applied by neither (compared ones are also compared below)
        if e.name in EVALSHA_NAMES and raw.startswith(b"-NOSCRIPT"):
            shim.stats.shadow_failures[(SIDE_NAMES[side], "noscript")] += 1
            shim.warn_noscript(side, e.args[1])
            if e.write:
                self._mark_dirty(self._entry_keys(e), self._db(side), "noscript", e.name)
            else:
                e.compare = False  # a read that could not run there: nothing to compare
        elif e.write and not e.compare:
            # An effect the other side refused (not compared, so caught here): never silent.
            shim.stats.shadow_failures[(SIDE_NAMES[side], "error")] += 1
            self._mark_dirty(self._entry_keys(e), self._db(side), "shadow-error", e.name)

    def _effect_check(self, e: Entry) -> None:
        """An effect (a pop's removal of what it popped) that did something else on the shadow side is
        a divergence, and its keys dirty: never a silent difference (see ``effects.confirms``)."""
        answer = parse(e.rep[e.answer])
        shadow = parse(e.rep[e.shadow])
        if effects.confirms(e.args, answer, shadow):
            return
        if shadow is None or shadow == 0 or shadow == []:
            kind = cmp.MISSING_ON_TARGET if e.shadow == TARGET else cmp.MISSING_ON_SOURCE
        else:
            kind = cmp.DIFFERENT_VALUE
        src, tgt = (e.rep[SOURCE], e.rep[TARGET])
        self._diverged(e, kind, e.name, self._entry_keys(e), src, tgt, True)

    def _answer_lost(self, e: Entry) -> None:
        """The answering side's reply will never come: a shadow refusal already in stays on record."""
        other = e.shadow
        if other is not None and e.write and complete(e, other) and has_error(e.rep[other]):
            self.shim.stats.shadow_failures[(SIDE_NAMES[other], "error")] += 1
            self._mark_dirty(self._entry_keys(e), self._db(other), "shadow-error", e.name)

    def _resolve_deferred(self, e: Entry, other: int, raw: bytes) -> None:
        """The answer is in: compute what the shadow side runs (possibly nothing)."""
        if e.tx is not None:
            e.payload[other], e.exp[other] = self._shadow_transaction(e, raw)
        elif e.restore is not False:
            cmds = e.restore or []
            e.payload[other] = MULTI_BYTES + b"".join(encode(c) for c in cmds) + EXEC_BYTES if cmds else NOTHING
            e.exp[other] = len(cmds) + 2 if cmds else 1
        elif e.effect:
            cmds = effects.effect(e.args, parse(raw))
            e.payload[other] = b"".join(encode(c) for c in cmds) if cmds else NOTHING
            e.exp[other] = max(len(cmds), 1)
            if e.bkeys is not None:
                self._blocking_returned(e, other, cmds)
        elif is_error(raw) and (e.cls is not Cls.SCRIPT or raw.startswith(b"-NOSCRIPT") or script_killed(raw)):
            # Sequential: the shadow applies it only if the answering side did. (A script that
            # failed may have written before the error, and Lua does not roll back: it runs on
            # the shadow too, which fails the same way; the two replies are compared. A script
            # stopped by SCRIPT/FUNCTION KILL wrote nothing, or it could not have been killed:
            # run on the shadow it would only keep that side busy until killed again.)
            e.payload[other] = NOTHING
        else:
            e.payload[other] = e.shadow_raw

    def _compare(self, e: Entry) -> None:
        shim = self.shim
        src, tgt = e.rep[SOURCE], e.rep[TARGET]
        if e.tx is not None:
            src_last = src[-1] if isinstance(src, list) else src
            tgt_last = tgt[-1] if isinstance(tgt, list) else tgt
            names, pairs = e.txcmp or ([], [])
            kind = cmp.compare_exec(names, parse(src_last), parse(tgt_last), pairs, shim.ttl_tolerance_ms)
            src, tgt = src_last, tgt_last
        else:
            if src == tgt:
                shim.divergence.compared()
                shim.stats.compared += 1
                return
            if shim.lag_aware and lag.unready_reply(e.rep[shim.tracker.replica]):
                shim.stats.lag_skipped += 1  # the replica cannot answer from data yet: not compared
                return
            kind = cmp.compare(e.name, parse(src), parse(tgt), shim.ttl_tolerance_ms)
        shim.divergence.compared()
        shim.stats.compared += 1
        if kind is None:
            return
        if shim.lag_aware and not e.write and e.tx is None:
            self._lag_mismatch(e.args, e.name, kind)
            return
        self._diverged(e, kind, e.name, self._entry_keys(e), src, tgt, e.write)

    def _lag_mismatch(self, args: list[bytes], name: bytes, kind: str) -> None:
        """A read differing from the replica's: maybe only lag. Confirmed against offsets by the shim
        (``shim.lag``, ``shim.replwatch``): a divergence only if it holds with the replica at the primary's offset."""
        c = self.shim.table.classify(args)
        self.shim.confirm_mismatch(lag.Mismatch(args, name, c.keys(args), (self._db(SOURCE), self._db(TARGET)), kind))

    def _diverged(self, e: Entry, kind: str, name: bytes, keys: list[bytes], src: bytes | None, tgt: bytes | None,
                  write: bool) -> None:
        """The two sides answered a command of ``e`` differently: count, log, and mark a write's keys dirty."""
        shim = self.shim
        shim.stats.divergences[kind] += 1
        db = self._db(e.shadow if e.shadow is not None else TARGET)
        shim.divergence.record(kind=kind, command=name, keys=keys, db=e.db, source_raw=src, target_raw=tgt,
                               awaiting_repair=self._awaiting_repair(db, keys))
        if write:
            # The two sides answered a write differently, so their data may now differ too.
            self._mark_dirty(keys, db, f"divergent-{kind}", name)

    def _finish_side(self, e: Entry, side: int) -> None:
        if e.done[side]:
            return
        e.done[side] = True
        if e.internal or e.stream:
            return
        if side == e.shadow:
            self.shim.mirror_depth -= e.n
            self.shadow_n -= e.n
        e.pending -= 1
        if e.pending == 0:
            self._entry_done(e)

    def _entry_done(self, e: Entry) -> None:
        if e.bmove is not None:
            self.shim.seq.move_ended(*e.bmove)
            e.bmove = None
        if e.req is not None or e.bkeys is not None:
            seq = self.shim.seq
            if e.bkeys is not None:
                seq.blocking_ended(e.bkeys)
                e.bkeys = None
            if e.req is not None:
                seq.release(e.req)
                # Released: the request no longer names its entry. (The two naming each other
                # are a cycle, which only the garbage collector frees: with a chunk's argument
                # lists behind every entry, collections took about a sixth of a busy shim's time.)
                e.req.data = None
            if self.ungranted and self.ungranted[0] is e:
                self.ungranted.popleft()  # settled without being granted (its shadow failed)
                self._request_next()
        if e.ryw:
            self.ryw_pending -= 1
            if not self.ryw_pending:
                self.ryw_acked, self.ryw_offset = time.monotonic(), None
        self.pending_count -= 1
        if e.cls is Cls.BLOCKING or e.cls is Cls.BLOCKING_READ:
            self.blocking_pending -= 1
        else:
            self.shim.entry_finished(e.gen)
