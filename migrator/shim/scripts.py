"""Scripts: a script body seen on one side is loaded on the other before an EVALSHA needs it.

The shim remembers script bodies clients send (``Shim.note_script``); an EVALSHA mirrored to a
side that has not loaded that script gets a ``SCRIPT LOAD`` first (``_heal_script``). A NOSCRIPT
that could not be healed is counted and its keys marked dirty (see ``replies``).
"""

from __future__ import annotations

import hashlib

from migrator.shim.entry import internal_entry


def script_killed(raw: bytes) -> bool:
    """A script's error reply says SCRIPT KILL or FUNCTION KILL stopped it."""
    return b"killed by user" in raw[:300].lower()


def is_script_flush(args: list[bytes]) -> bool:
    return len(args) > 1 and args[0].lower() == b"script" and args[1].lower() == b"flush"


def sha1_hex(body: bytes) -> bytes:
    return hashlib.sha1(body).hexdigest().encode()


class Scripts:
    """The session's script healing on the shadow side."""

    def _heal_script(self, side: int, sha: bytes) -> None:
        """Load a script on ``side`` before an EVALSHA if the shim saw its body but not it loaded there."""
        shim = self.shim
        if sha in shim.scripts_loaded[side]:
            return
        body = shim.script_bodies.get(sha)
        if body is None:
            return  # a NOSCRIPT may follow; it is counted and the keys marked dirty then
        e = internal_entry(side, [b"SCRIPT", b"LOAD", body], shim.generation)
        e.heal_sha = sha
        shim.stats.script_heals += 1
        self._enqueue(side, e)
