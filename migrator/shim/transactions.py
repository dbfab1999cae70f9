"""MULTI/EXEC/DISCARD/WATCH: a transaction runs on the write side; the shadow gets what EXEC did.

The transaction's sides are fixed at MULTI; the shadow side gets one MULTI/EXEC made of the
commands' effects once EXEC has answered (``_shadow_transaction``); a WATCH across the write
switch aborts EXEC as a changed key would.
"""

from __future__ import annotations

import time

from migrator.shim import effects
from migrator.shim.commands import SOURCE, Classified, Cls
from migrator.shim.connstate import tx_state_changes
from migrator.shim.entry import CONNECTING, NOTHING, UP, Entry, internal_entry
from migrator.shim.resp import encode, error_reply, parse
from migrator.shim.routing import Plan


class Transactions:
    """The session's MULTI/EXEC/DISCARD/WATCH handling."""

    def _refuse_in_tx(self, args: list[bytes], c: Classified | None, name: bytes) -> None:
        self.tx_abort = True
        self.shim.stats.refused[f"in-multi:{name.decode(errors='replace')}"] += 1
        self._local(args, c, error_reply(
            f"ERR migrator shim: {name.decode(errors='replace').upper()} inside MULTI is not supported through the shim"))

    def _handle_tx(self, args: list[bytes], name: bytes, c: Classified) -> None:
        if name == b"multi" and self.tx is None:
            self.tx = []
            self.tx_abort = False
            # The transaction's sides are fixed when it starts, even if the phase changes
            # before EXEC: its queued commands are on the write side already.
            self.tx_plan = self.shim.routes[Cls.TX]
            self.tx_gen = self.shim.generation
            self._dispatch(args, name, c, Plan(self.tx_plan.answer), gen=self.tx_gen)
            return
        if name == b"exec" and self.tx is not None:
            tx, plan, gen = self.tx, self.tx_plan, self.tx_gen
            self.tx = self.tx_plan = None
            watched, self.watched = self.watched, set()
            if self.tx_abort or (watched and watched != {plan.answer}):
                # The shim refused a command inside MULTI: like Redis after a queueing error,
                # nothing runs. Or keys were WATCHed on the side that took writes then, and the
                # write switch has moved writes since: the transaction would run where nothing
                # watches them, so it is aborted as if a watched key had changed (which the
                # shim cannot rule out). Either way the server discards what it queued.
                self._internal(plan.answer, [b"DISCARD"], gen)
                self._unwatch(watched - {plan.answer}, gen)
                if self.tx_abort:
                    self.tx_abort = False
                    self._local(args, c, b"-EXECABORT Transaction discarded because of previous errors.\r\n")
                else:
                    self.shim.stats.refused["exec-watch-across-write-switch"] += 1
                    self._local(args, c, b"_\r\n" if self.proto == 3 else b"*-1\r\n")
                return
            self._unwatch(watched - {plan.answer}, gen)
            now_shadow = self.shim.routes[Cls.TX].shadow
            if plan.shadow is None and now_shadow is not None:
                # Begun before mirroring, executed after: it runs on one side only, so what it
                # writes must be repaired on the other.
                e = Entry(tx, name, c, gen)
                e.tx = tx
                self._mark_dirty(self._entry_keys(e), self._db(now_shadow), "transaction-across-phase-change", name)
            e = self._dispatch(args, name, c, plan, gen=gen, tx=tx)
            changes = tx_state_changes(tx)
            if changes:
                self._state_change(e, changes)
            return
        if name == b"discard" and self.tx is not None:
            plan, gen = self.tx_plan, self.tx_gen
            self.tx = self.tx_plan = None
            self.tx_abort = False
            watched, self.watched = self.watched, set()
            self._unwatch(watched - {plan.answer}, gen)
            self._dispatch(args, name, c, Plan(plan.answer), gen=gen)
            return
        # WATCH/UNWATCH (and misplaced MULTI/EXEC/DISCARD, which the server rejects): the write
        # side only. The shadow replays what EXEC did, so it needs no WATCH of its own.
        answer = self.tx_plan.answer if self.tx_plan is not None else self.shim.routes[Cls.TX].answer
        if self.tx is None:
            if name == b"watch":
                self.watched.add(answer)
            elif name == b"unwatch":
                watched, self.watched = self.watched, set()
                self._unwatch(watched - {answer}, None)
        self._dispatch(args, name, c, Plan(answer), gen=self.tx_gen if self.tx is not None else None)

    def _internal(self, side: int, args: list[bytes], gen: int | None) -> None:
        """A command of the shim's own on ``side``, in stream order; its reply goes to nobody."""
        self._enqueue(side, internal_entry(side, args, self.shim.generation if gen is None else gen))

    def _unwatch(self, sides, gen: int | None) -> None:
        for side in sides:
            if self.up[side].state is UP or self.up[side].state is CONNECTING:
                self._internal(side, [b"UNWATCH"], gen)

    def _shadow_transaction(self, e: Entry, raw: bytes) -> tuple[bytes, int]:
        result = parse(raw)
        if not isinstance(result, list):
            return NOTHING, 1  # aborted (WATCH) or refused (EXECABORT): nothing happened
        now_ms = int(time.time() * 1000)
        shadow_cmds: list[list[bytes]] = []
        pairs: list[tuple[int, int]] = []
        names: list[bytes] = []
        for i, (args, r) in enumerate(zip(e.tx, result)):
            replaced = effects.needs_reply(args)
            for cmd in effects.shadow_commands(args, r, now_ms):
                if not replaced:
                    names.append(args[0].lower())
                    pairs.append((i, len(shadow_cmds)) if e.answer == SOURCE else (len(shadow_cmds), i))
                shadow_cmds.append(cmd)
        e.txcmp = (names, pairs)  # for comparing the two EXEC replies
        if not shadow_cmds:
            return NOTHING, 1
        payload = encode([b"MULTI"]) + b"".join(encode(c) for c in shadow_cmds) + encode([b"EXEC"])
        return payload, len(shadow_cmds) + 2
