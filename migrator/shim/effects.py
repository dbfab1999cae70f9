"""Non-deterministic writes, rewritten into what they did, the way Redis replicates them.

Sending ``SPOP s`` to both sides would pop different members; sending ``EXPIRE k 10`` a few
milliseconds apart leaves different deadlines. So the shadow side gets the *effect* instead:

- computed before sending, from the command alone (``rewrite_now``): relative expiries become
  absolute ones (``PEXPIREAT``, ``SET ... PXAT``, ``RESTORE ... ABSTTL``; for hash fields
  ``HPEXPIREAT`` and ``HSETEX``/``HGETEX ... PXAT``), taken at the moment the shim forwards the
  command;
- computed from the authoritative side's reply (``effect``): pops become removals of exactly
  what was popped, blocking commands become their non-blocking form, ``INCRBYFLOAT`` becomes a
  ``SET`` of the result (``KEEPTTL``), ``XADD *`` gets the ID the authoritative side chose.

Pure functions over argument lists and hiredis-parsed replies.
"""

from __future__ import annotations

from typing import Any

import hiredis

Command = list[bytes]

# Commands whose shadow version depends on the authoritative reply.
NEEDS_REPLY = frozenset({
    b"spop", b"blpop", b"brpop", b"brpoplpush", b"blmove", b"blmpop", b"bzpopmin", b"bzpopmax", b"bzmpop",
    b"incrbyfloat", b"hincrbyfloat", b"xreadgroup",
})


def needs_reply(args: Command) -> bool:
    name = args[0].lower()
    if name in NEEDS_REPLY:
        return name != b"xreadgroup" or any(a.lower() == b"block" for a in args)
    if name == b"xadd":
        return _xadd_id_index(args) is not None
    return False


def _int(x: bytes) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


# A key's or a hash's fields' relative expiry, and its absolute form: (command, milliseconds per unit).
_RELATIVE_EXPIRES = {
    b"expire": (b"PEXPIREAT", 1000), b"pexpire": (b"PEXPIREAT", 1),
    b"hexpire": (b"HPEXPIREAT", 1000), b"hpexpire": (b"HPEXPIREAT", 1),
}


def rewrite_now(args: Command, now_ms: int) -> Command | None:
    """The shadow's version of a command with a relative expiry, or None to send it unchanged."""
    name = args[0].lower()
    n = len(args)
    if name in _RELATIVE_EXPIRES and n >= 3:
        absolute, unit_ms = _RELATIVE_EXPIRES[name]
        v = _int(args[2])
        if v is None or abs(v) > 10**13:
            return None  # let both sides reject it the same way
        return [absolute, args[1], b"%d" % (now_ms + v * unit_ms), *args[3:]]
    if name in (b"setex", b"psetex") and n == 4:
        v = _int(args[2])
        if v is None or v <= 0 or v > 10**13:
            return None
        ms = v * 1000 if name == b"setex" else v
        return [b"SET", args[1], args[3], b"PXAT", b"%d" % (now_ms + ms)]
    if name in (b"set", b"getex"):
        first_opt = 3 if name == b"set" else 2
        for i in range(first_opt, n - 1):
            opt = args[i].lower()
            if opt in (b"ex", b"px"):
                v = _int(args[i + 1])
                if v is None or v <= 0 or v > 10**13:
                    return None
                ms = v * 1000 if opt == b"ex" else v
                return [*args[:i], b"PXAT", b"%d" % (now_ms + ms), *args[i + 2 :]]
        return None
    if name in (b"hsetex", b"hgetex"):
        return _field_expiry_option(args, now_ms)
    if name == b"restore" and n >= 4:
        ttl = _int(args[2])
        if ttl is None or ttl <= 0 or any(a.lower() == b"absttl" for a in args[4:]):
            return None
        return [args[0], args[1], b"%d" % (now_ms + ttl), *args[3:], b"ABSTTL"]
    return None


def _field_expiry_option(args: Command, now_ms: int) -> Command | None:
    """``HSETEX``/``HGETEX key ... EX s|PX ms ... FIELDS n ...`` with the expiry as ``PXAT``.

    Options come before ``FIELDS``; what follows it are field names (and values), never options.
    """
    for i in range(2, len(args) - 1):
        opt = args[i].lower()
        if opt == b"fields":
            return None
        if opt in (b"ex", b"px"):
            v = _int(args[i + 1])
            if v is None or v <= 0 or v > 10**13:
                return None  # let both sides reject it the same way
            ms = v * 1000 if opt == b"ex" else v
            return [*args[:i], b"PXAT", b"%d" % (now_ms + ms), *args[i + 2:]]
    return None


def _members(reply: Any) -> list[bytes]:
    if reply is None:
        return []
    if isinstance(reply, list):
        return [m for m in reply if isinstance(m, bytes)]
    return [reply] if isinstance(reply, bytes) else []


def _xadd_id_index(args: Command) -> int | None:
    """Where the ID is in an XADD with ``*`` (None for an explicit ID or a malformed command)."""
    i, n = 2, len(args)
    while i < n:
        opt = args[i].lower()
        if opt == b"nomkstream":
            i += 1
        elif opt in (b"maxlen", b"minid"):
            i += 2
            if i - 1 < n and args[i - 1] in (b"=", b"~"):
                i += 1
            if i < n and args[i].lower() == b"limit":
                i += 2
        else:
            return i if args[i] == b"*" else None
    return None


def effect(args: Command, reply: Any) -> list[Command]:
    """What the shadow must run so it ends in the state the authoritative side reached.

    ``reply`` is the authoritative side's parsed reply to ``args``. An error reply means the
    command changed nothing, so nothing is sent. Commands that are not in ``NEEDS_REPLY`` (or an
    XADD with an explicit ID) are returned as they are.
    """
    if isinstance(reply, hiredis.ReplyError):
        return []
    name = args[0].lower()
    if name == b"spop":
        members = _members(reply)
        return [[b"SREM", args[1], *members]] if members else []
    if name in (b"blpop", b"brpop"):
        if not isinstance(reply, list) or len(reply) < 2:
            return []
        return [[b"LPOP" if name == b"blpop" else b"RPOP", reply[0]]]
    if name == b"brpoplpush":
        return [[b"RPOPLPUSH", args[1], args[2]]] if reply is not None else []
    if name == b"blmove":
        return [[b"LMOVE", *args[1:5]]] if reply is not None else []
    if name == b"blmpop":
        if not isinstance(reply, list) or len(reply) < 2:
            return []
        key, values = reply[0], reply[1]
        # BLMPOP timeout numkeys key [key ...] LEFT|RIGHT [COUNT n]: the direction follows the
        # keys (a key may itself be called "left" or "right").
        numkeys = _int(args[2]) if len(args) > 2 else None
        where = b"LEFT"
        if numkeys is not None and 3 + numkeys < len(args):
            where = args[3 + numkeys].upper()
        return [[b"LPOP" if where == b"LEFT" else b"RPOP", key, b"%d" % len(values)]]
    if name in (b"bzpopmin", b"bzpopmax"):
        if not isinstance(reply, list) or len(reply) < 2:
            return []
        return [[b"ZREM", reply[0], reply[1]]]
    if name == b"bzmpop":
        if not isinstance(reply, list) or len(reply) < 2:
            return []
        key, pairs = reply[0], reply[1]
        members = [p[0] for p in pairs if isinstance(p, list) and p]
        if isinstance(pairs, dict):  # RESP3 may render member→score as a map
            members = list(pairs)
        return [[b"ZREM", key, *members]] if members else []
    if name == b"incrbyfloat":
        return [[b"SET", args[1], _float_text(reply), b"KEEPTTL"]]
    if name == b"hincrbyfloat":
        return [[b"HSET", args[1], args[2], _float_text(reply)]]
    if name == b"xadd":
        idx = _xadd_id_index(args)
        if idx is None:
            return [list(args)]
        if not isinstance(reply, bytes):  # NOMKSTREAM on a missing stream: nothing added
            return []
        return [[*args[:idx], reply, *args[idx + 1 :]]]
    if name == b"xreadgroup":
        if reply is None:
            return []  # timed out: nothing was delivered
        out, skip = [], False
        for a in args:
            if skip:
                skip = False
                continue
            if a.lower() == b"block":
                skip = True
                continue
            out.append(a)
        return [out]
    return [list(args)]


def confirms(args: Command, reply: Any, shadow: Any) -> bool:
    """Does the shadow's reply to ``effect(args, reply)`` show it did what the answering side did?

    ``reply``: the answering side's parsed reply to ``args``; ``shadow``: the shadow's parsed
    reply to the (one) effect command. A pop must find there the element(s) popped here: if a
    chain of blocked commands woken by one write (``BLMOVE l1 l2`` feeding ``BLMOVE l2 l3``) was
    mirrored in another order than the server ran it, the shadow pops nothing or something else.
    Effects whose reply says nothing about the data (``SET``, ``HSET``) always confirm.
    """
    name = args[0].lower()
    if name in (b"blpop", b"brpop"):
        return isinstance(reply, list) and len(reply) >= 2 and shadow == reply[1]
    if name in (b"brpoplpush", b"blmove"):
        return shadow == reply
    if name == b"blmpop":
        return isinstance(reply, list) and len(reply) >= 2 and shadow == reply[1]
    if name in (b"bzpopmin", b"bzpopmax"):
        return shadow == 1
    if name in (b"bzmpop", b"spop"):
        cmds = effect(args, reply)
        return not cmds or shadow == len(cmds[0]) - 2  # ZREM/SREM k m1 m2...: every member removed
    if name == b"xadd":
        return shadow == reply
    return True


def _float_text(reply: Any) -> bytes:
    if isinstance(reply, bytes):
        return reply
    if isinstance(reply, float):
        return repr(reply).encode()
    return str(reply).encode()


def shadow_commands(args: Command, reply: Any, now_ms: int) -> list[Command]:
    """The shadow's commands for one command of a transaction, given its result in EXEC."""
    if needs_reply(args):
        return effect(args, reply)
    rewritten = rewrite_now(args, now_ms)
    return [rewritten if rewritten is not None else list(args)]
