"""Commands about the servers rather than the data: the reply a client gets when both sides answer.

Pure functions over raw RESP replies (hiredis parses them). Which commands go to both sides is
decided in ``commands.SERVER_COMMANDS``; this module only says what the client is told:

- PUBLISH/SPUBLISH and PUBSUB NUMSUB/NUMPAT/SHARDNUMSUB: the receivers of both sides added up
  (a subscriber through the shim sits on exactly one side, and PUBLISH reaches both);
  PUBSUB CHANNELS/SHARDCHANNELS: the channels of both sides, each once.
- SCRIPT KILL / FUNCTION KILL: ``+OK`` if a script was killed on either side.
- anything else (CONFIG SET...): the answering side's reply.
"""

from __future__ import annotations

import hiredis

from migrator.shim.resp import ProtocolError, error_reply, parse

_SUM = frozenset({b"publish", b"spublish", b"numpat"})
_SUM_PER_CHANNEL = frozenset({b"numsub", b"shardnumsub"})
_UNION = frozenset({b"channels", b"shardchannels"})
_KILL = frozenset({b"script", b"function"})

# CLIENT KILL filters that name one connection; every other filter (TYPE, USER, LADDR, MAXAGE,
# SKIPME alone) also matches the shim's own connections to the servers, which carry every
# other client's commands.
_KILL_BY_ONE = frozenset({b"id", b"addr"})


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def combine(args: list[bytes], answer: bytes, other: bytes) -> bytes:
    """The reply to ``args`` made from the answering side's and the other side's raw replies."""
    name = args[0].lower()
    sub = args[1].lower() if len(args) > 1 else b""
    if name in _KILL and sub == b"kill":
        if answer[:1] == b"-" and other.startswith(b"+OK"):
            return other
        return answer
    if name == b"pubsub":
        name = sub
    try:
        a, o = parse(answer), parse(other)
    except (ProtocolError, hiredis.ProtocolError):
        return answer
    if isinstance(a, hiredis.ReplyError) or isinstance(o, hiredis.ReplyError):
        return answer
    if name in _SUM and isinstance(a, int) and isinstance(o, int):
        return b":%d\r\n" % (a + o)
    if name in _SUM_PER_CHANNEL:
        if isinstance(a, dict) and isinstance(o, dict):  # RESP3: a map
            return b"%%%d\r\n" % len(a) + b"".join(_bulk(k) + b":%d\r\n" % (v + o.get(k, 0)) for k, v in a.items())
        if isinstance(a, list) and isinstance(o, list):
            theirs = dict(zip(o[0::2], o[1::2]))
            pairs = list(zip(a[0::2], a[1::2]))
            return b"*%d\r\n" % (2 * len(pairs)) + b"".join(
                _bulk(k) + b":%d\r\n" % (v + theirs.get(k, 0)) for k, v in pairs)
        return answer
    if name in _UNION and isinstance(a, list) and isinstance(o, list):
        both = list(dict.fromkeys([*a, *o]))
        return b"*%d\r\n" % len(both) + b"".join(_bulk(c) for c in both)
    return answer


def client_kill_refusal(args: list[bytes]) -> bytes | None:
    """An error reply if this CLIENT KILL could hit the shim's own upstream connections, else None.

    ``CLIENT KILL ip:port`` and the ``ID``/``ADDR`` filters name one connection and are sent on;
    ``TYPE``, ``USER``, ``LADDR``, ``MAXAGE`` (alone or with those) would also match the
    connections the shim holds for every other client, so they are refused.
    """
    if len(args) == 3:
        return None  # CLIENT KILL ip:port (the old form)
    filters = args[2::2]
    bad = [f.decode(errors="replace").upper() for f in filters if f.lower() not in _KILL_BY_ONE | {b"skipme"}]
    if not bad and any(f.lower() in _KILL_BY_ONE for f in filters):
        return None
    what = ", ".join(bad) if bad else "SKIPME alone"
    return error_reply(
        f"ERR migrator shim: CLIENT KILL {what} would also kill the shim's own connections to the servers, "
        "which carry every other client's commands; kill one connection by ID or ADDR, or connect to the server directly")
