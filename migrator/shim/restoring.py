"""RESTORE of a DUMP payload one side cannot read: run where it can be, the key copied to the other.

The session's part of ``shim.restore`` (the pure functions): rerouting the entry and turning
the answering side's MULTI/EXEC reply into RESTORE's own reply and the other side's copy.
"""

from __future__ import annotations

from migrator.shim import restore
from migrator.shim.commands import Cls
from migrator.shim.entry import DEFERRED, EXEC_BYTES, MULTI_BYTES, NULL_REPLIES, Entry
from migrator.shim.resp import encode, error_reply, is_error, parse


class Restoring:
    """The session's rerouting of a RESTORE one side cannot read."""

    def _restore_by_effect(self, e: Entry) -> None:
        """A RESTORE whose payload one side cannot read: run where it can be, copy the key to the other.

        The write side answers if it reads the payload; else the read side does if it can (after
        the read cutover a DUMP is answered by the target, so its payload must RESTORE through the
        shim). That side runs RESTORE and a read of the key it made, in one MULTI/EXEC; the other
        side then gets the key's type-aware copy (see shim.restore), and the client's reply waits
        for both. A payload both sides read goes as sent; one only the other side reads gets
        the write side's refusal, as without the shim.
        """
        version = restore.payload_version(e.args)
        if version is None:
            return
        versions = self.shim.rdb_versions
        answer, other = e.answer, e.shadow
        if restore.can_read(versions[answer], version):
            if restore.can_read(versions[other], version):
                return  # both read it: mirrored as sent
        elif restore.can_read(versions[other], version) and other == self.shim.routes[Cls.READ].answer:
            # Reads-on-target: the payload came from a DUMP the target answered; the target applies it.
            answer, other = other, answer
        else:
            # The answering side will refuse it as it would without the shim: the other side gets
            # it only if it was accepted after all.
            if e.payload[other] is not DEFERRED:
                e.shadow_raw, e.payload[other] = e.payload[other], DEFERRED
            return
        e.answer, e.shadow = answer, other
        e.db = self._db(answer)
        e.payload[answer] = MULTI_BYTES + encode(e.args) + encode(restore.reader(e.args[1])) + EXEC_BYTES
        e.exp[answer] = 4
        e.payload[other] = DEFERRED
        e.exp[other] = 1
        e.shadow_raw = None
        e.effect = e.compare = False
        e.wait_shadow = True
        e.restore = True

    def _restore_answered(self, e: Entry, side: int) -> None:
        """The RESTORE's MULTI/EXEC answered: the client gets RESTORE's own reply; the copy is made."""
        frames = e.rep[side]
        queued, result = frames[1], frames[3]
        cmds: list | None = []
        if is_error(queued):
            reply = queued  # rejected when queued (arity): EXEC only says EXECABORT
        elif is_error(result):
            reply = result
        elif result in NULL_REPLIES:
            reply = error_reply("ERR migrator shim: RESTORE was not run: this connection's WATCH aborted the "
                                "transaction the shim runs it in; retry it")
        else:
            start = result.index(b"\r\n") + 2
            end = result.index(b"\r\n", start) + 2
            reply = result[start:end]  # RESTORE answers one line: +OK or an error
            if not is_error(reply):
                parsed = parse(result)
                cmds = restore.effect(e.args[1], parsed[1] if isinstance(parsed, list) and len(parsed) == 2 else None)
                if cmds is None:
                    self._mark_dirty([e.args[1]], self._db(e.shadow), "restore-not-copied", b"restore")
        e.rep[side] = reply
        e.restore = cmds
