"""RESP on the wire: framing replies into raw byte slices, parsing with hiredis, encoding commands.

The shim forwards the authoritative side's reply bytes to the client unchanged, so it must know
where each reply ends without re-encoding it: ``frame_end`` walks the RESP2/RESP3 headers (it
never builds values). Values are only built (by hiredis, in C) when a reply is compared or
drives an effect. Requests are parsed by hiredis too; a client that sends anything that is not
RESP (apart from inline commands at any command boundary, which redis-cli and telnet users send)
gets a protocol error, like Redis gives.
"""

from __future__ import annotations

from typing import Any

import hiredis

CRLF = b"\r\n"
_BULK = frozenset(b"$=!")  # length-prefixed: bulk string, verbatim string, bulk error
_AGG = frozenset(b"*~>")  # n elements: array, set, push
_MAP = frozenset(b"%|")  # n key/value pairs: map, attribute
PUSH = ord(">")
ERROR_TYPES = frozenset(b"-!")


class ProtocolError(Exception):
    """Bytes that are not RESP: the peer that sent them cannot be trusted to stay in step."""


def frame_end(buf: bytes, pos: int = 0) -> int:
    """Index just past the one complete reply starting at ``pos``, or -1 if more bytes are needed."""
    n = len(buf)
    pending = 1
    while pending:
        if pos >= n:
            return -1
        t = buf[pos]
        eol = buf.find(CRLF, pos)
        if eol < 0:
            return -1
        if t in _BULK:
            try:
                length = int(buf[pos + 1 : eol])
            except ValueError:
                raise ProtocolError(f"bad bulk length {bytes(buf[pos:eol])[:32]!r}") from None
            pos = eol + 2 + (length + 2 if length >= 0 else 0)
            if pos > n:
                return -1
        elif t in _AGG or t in _MAP:
            try:
                count = int(buf[pos + 1 : eol])
            except ValueError:
                raise ProtocolError(f"bad aggregate length {bytes(buf[pos:eol])[:32]!r}") from None
            if count > 0:
                # An attribute precedes the reply it annotates, so it adds that reply too.
                pending += count * 2 if t in _MAP else count
                if t == 0x7C:  # '|'
                    pending += 1
            pos = eol + 2
        elif t in b"+-:,#_(":
            pos = eol + 2
        else:
            raise ProtocolError(f"unknown RESP type byte {chr(t)!r}")
        pending -= 1
    return pos


OK = b"+OK\r\n"


class Framer:
    """Accumulates a byte stream and splits it into complete raw replies."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf + data if self.buf else data
        if buf[:5] == OK:
            # Pipelined writes' replies: often nothing but +OK (a tiling of it, if its count
            # covers every byte).
            n = len(buf) // 5
            if buf.count(OK) == n and n * 5 == len(buf):
                self.buf = b""
                return [OK] * n
        frames: list[bytes] = []
        append = frames.append
        find = buf.find
        pos = 0
        n = len(buf)
        while pos < n:
            # The common replies (+OK, :1, $3 bulk) inline; the rest through frame_end.
            t = buf[pos]
            if t == 36:  # '$'
                eol = find(CRLF, pos)
                if eol < 0:
                    break
                try:
                    length = int(buf[pos + 1 : eol])
                except ValueError:
                    raise ProtocolError(f"bad bulk length {bytes(buf[pos:eol])[:32]!r}") from None
                end = eol + 4 + length if length >= 0 else eol + 2
                if end > n:
                    break
            elif t == 43 or t == 58:  # '+' ':'
                eol = find(CRLF, pos)
                if eol < 0:
                    break
                end = eol + 2
            else:
                end = frame_end(buf, pos)
                if end < 0:
                    break
            append(buf[pos:end])
            pos = end
        self.buf = buf[pos:] if pos < n else b""
        return frames

    def pending_bytes(self) -> int:
        return len(self.buf)


_parser = hiredis.Reader()


def parse(raw: bytes) -> Any:
    """The value of one complete raw reply (errors come back as ``hiredis.ReplyError``).

    Raises ProtocolError for a reply hiredis cannot build (nested deeper than it allows, about
    1,000 levels): the caller decides what that one reply means.
    """
    global _parser
    _parser.feed(raw)
    try:
        value = _parser.gets()
    except hiredis.ProtocolError as e:
        _parser = hiredis.Reader()  # a reader that raised stays failed: every later parse would too
        raise ProtocolError(f"reply not parsed: {e}") from None
    if value is False:  # cannot happen for a frame from ``Framer``; guard against a torn frame
        raise ProtocolError("incomplete reply")
    return value


def is_error(raw: bytes) -> bool:
    return bool(raw) and raw[0] in ERROR_TYPES


def is_push(raw: bytes) -> bool:
    return bool(raw) and raw[0] == PUSH


def encode(args: list[bytes]) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if not isinstance(a, (bytes, bytearray)):
            a = str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


def run_id_of(info: bytes) -> bytes | None:
    """The ``run_id`` in an ``INFO server`` reply (raw RESP bytes or the text), or None."""
    i = info.find(b"run_id:")
    if i < 0:
        return None
    end = info.find(b"\r\n", i)
    return info[i + 7 : end if end >= 0 else len(info)].strip() or None


def error_reply(message: str) -> bytes:
    """A RESP error line; newlines are removed because they would end the reply early."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + CRLF


class RequestParser:
    """Splits a client's byte stream into commands (lists of bytes), bounded in size.

    Like Redis, at every command boundary a command is either RESP (an array of bulk strings,
    starting with ``*``) or an inline command (one line split on whitespace: redis-cli, telnet),
    and a connection may mix the two, pipelined in one chunk too. Runs of RESP are parsed by
    hiredis; where it stops at a byte that starts no RESP command, the boundary is found from
    the encoded lengths of the commands it returned (``_carry``: bytes of a partial RESP
    command fed in earlier chunks) and the rest is taken one command at a time (``_mixed``).

    The size limit is checked against what a command *declares* (its ``*N`` count and each
    ``$len`` header) as soon as the header arrives, like Redis does, so an oversized request is
    refused before any of its payload is buffered: the partial RESP command's headers are
    scanned (``_check``, resumably across chunks) from where it starts.
    """

    __slots__ = ("_carry", "_inline_buf", "_reader", "_scan", "encoded", "error", "inline", "max_request_bytes")

    def __init__(self, max_request_bytes: int) -> None:
        self._reader = hiredis.Reader()
        self._carry = 0  # bytes of the partial RESP command hiredis holds; -1: not known
        self._inline_buf = b""
        self.max_request_bytes = max_request_bytes
        self.inline = False  # the connection has sent an inline command (its bytes are not RESP)
        self.encoded = -1  # canonical RESP bytes of the commands the last ``feed`` returned (-1: not counted)
        # Bytes that are not a command, after commands of the same chunk: those run first (as in
        # Redis, which runs each command as it is parsed), then the connection gets this error.
        self.error: ProtocolError | None = None
        # The partial command's header scan: [elements still to come (-1: its "*N" header not
        # seen yet), payload bytes to skip, declared bytes so far, a header line cut by the chunk];
        # None: no partial command; False: its start is not known, so it is not scanned (the
        # buffer bound in ``feed`` still holds).
        self._scan: list | bool | None = None

    def _partial_starts(self, data: bytes, pos: int) -> None:
        """A partial RESP command starts at ``data[pos]``: scan its headers from there."""
        self._scan = [-1, 0, 0, b""]
        self._check(data, pos)

    def feed(self, data: bytes) -> list[list[bytes]]:
        """Every complete command in ``data`` (plus what was buffered); raises ProtocolError."""
        if self.error is not None:
            raise self.error
        commands: list[list[bytes]] = []
        self.encoded = -1
        try:
            if self._inline_buf:
                data, self._inline_buf = self._inline_buf + data, b""
                self._mixed(data, 0, commands)
            elif self._carry == 0 and data[:1] != b"*":
                self._mixed(data, 0, commands)
            else:
                self._resp_run(data, commands)
        except ProtocolError as e:
            if not commands:
                raise
            self.error = e
            self.encoded = -1
            return commands
        # What hiredis holds: the partial command plus at most 1 KiB already consumed.
        if self._reader.len() > self.max_request_bytes:
            raise ProtocolError(f"request larger than shim.max_request_bytes ({self.max_request_bytes} bytes)")
        return commands

    def _resp_run(self, data: bytes, commands: list[list[bytes]]) -> None:
        """Feed hiredis a chunk that continues RESP; fall back to ``_mixed`` where it is not RESP."""
        reader = self._reader
        reader.feed(data)
        carry = self._carry
        returned: list[list[bytes]] = []  # every command hiredis returned here, empty ones too
        try:
            while True:
                cmd = reader.gets()
                if cmd is False:
                    break
                if not _is_command(cmd):
                    raise hiredis.ProtocolError("expected an array of bulk strings")
                returned.append(cmd)
                if cmd:  # "*0\r\n": Redis ignores an empty command, and so do we
                    commands.append(cmd)
        except hiredis.ProtocolError as e:
            # An inline command (or garbage) at a boundary: where, from what was returned.
            pos = sum(map(encoded_length, returned)) - carry if carry >= 0 else -1
            if pos < 0 or pos >= len(data) or (pos >= 2 and data[pos - 2 : pos] != CRLF):
                raise ProtocolError(str(e)) from None
            self._reader = hiredis.Reader()
            self._carry = 0
            self._mixed(data, pos, commands)
            return
        # hiredis does not say whether it holds part of a command (it may have consumed a
        # header), so the bytes are counted: the commands' canonical lengths against the bytes
        # fed. A client with non-canonical lengths (none is known) is never taken inline again.
        total = self.encoded = sum(map(encoded_length, returned)) if returned else 0
        if carry < 0:
            self._scan = False
            return
        rest = carry + len(data) - total
        if 0 < rest <= len(data) and data[-rest] != 0x2A:
            # The start of an inline command, which hiredis may have taken for a reply type
            # ('+', ':', '#'...): it is kept until its line is complete.
            self._reader = hiredis.Reader()
            self._carry = 0
            self._mixed(data, len(data) - rest, commands)
        elif rest > 0:
            self._carry = rest
            if rest <= len(data) and (total or not self._scan):
                self._partial_starts(data, len(data) - rest)  # a new partial command, in this chunk
            elif total == 0 and self._scan:
                self._check(data, 0)  # more of the partial command that started earlier
            elif total:
                self._scan = False  # the count does not cover these bytes: the start is not known
        else:
            self._carry = 0 if rest == 0 and not reader.has_data() else -1
            self._scan = None if self._carry == 0 else False

    def _check(self, data: bytes, pos: int) -> None:
        """Scan the partial command's headers in ``data[pos:]``: refuse a declared size over the limit."""
        st = self._scan
        left, skip, declared, cut = st
        limit = self.max_request_bytes
        n = len(data)
        if cut:  # a header line the previous chunk cut (rare: a copy is fine)
            data, pos, cut = cut + data[pos:], 0, b""
            n = len(data)
        while pos < n:
            if skip:
                take = min(skip, n - pos)
                pos += take
                skip -= take
                continue
            eol = data.find(CRLF, pos)
            if eol < 0:
                cut = data[pos:]
                if len(cut) > 32:
                    raise ProtocolError("invalid bulk length" if left >= 0 else "invalid multibulk length")
                break
            try:
                value = int(data[pos + 1 : eol])
            except ValueError:
                return  # hiredis refuses it when it gets there
            declared += eol + 2 - pos
            if left < 0:
                # Each element takes at least 6 bytes ("$0\r\n\r\n").
                if value * 6 + declared > limit:
                    raise ProtocolError(
                        f"invalid multibulk length ({value} elements declared; shim.max_request_bytes is {limit} bytes)")
                left = value
            else:
                declared += value + 2
                if value > limit or declared > limit:
                    raise ProtocolError(
                        f"invalid bulk length ({value} bytes declared; shim.max_request_bytes is {limit} bytes)")
                left -= 1
                skip = value + 2 if value >= 0 else 0
            pos = eol + 2
        st[0], st[1], st[2], st[3] = left, skip, declared, cut

    def _mixed(self, data: bytes, pos: int, commands: list[list[bytes]]) -> None:
        """Parse ``data`` from the command boundary ``pos``, one command at a time."""
        n = len(data)
        reader = self._reader
        while pos < n:
            if data[pos] == 0x2A:  # '*': a RESP command
                end = frame_end(data, pos)
                if end < 0:
                    reader.feed(data[pos:] if pos else data)
                    self._carry = n - pos
                    self._partial_starts(data, pos)
                    return
                reader.feed(data[pos:end])
                try:
                    cmd = reader.gets()
                except hiredis.ProtocolError as e:
                    raise ProtocolError(str(e)) from None
                if not _is_command(cmd):
                    raise ProtocolError("expected an array of bulk strings")
                if cmd:
                    commands.append(cmd)
                pos = end
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                if n - pos > min(64 * 1024, self.max_request_bytes):
                    raise ProtocolError("too big inline request")
                self._inline_buf = data[pos:]
                return
            self.inline = True
            line = data[pos:eol]
            args = split_inline(line[:-1] if line[-1:] == b"\r" else line)
            if args:
                commands.append(args)
            pos = eol + 1
        self._carry = 0
        self._scan = None


_SPACE = frozenset(b" \n\r\t\x0b\x0c")  # C isspace(): between arguments, after a closing quote
_SEPARATORS = frozenset(b" \n\r\t")  # what ends an unquoted argument
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX = frozenset(b"0123456789abcdefABCDEF")


def split_inline(line: bytes) -> list[bytes]:
    """An inline command's arguments, split as Redis splits them (``sdssplitargs``).

    Whitespace separates arguments; ``"..."`` may hold spaces and the escapes ``\\n \\r \\t
    \\b \\a \\xHH`` (any other escaped byte stands for itself); ``'...'`` only ``\\'``. A
    closing quote must end its argument. Unbalanced quotes raise ProtocolError, like Redis.
    """
    if b'"' not in line and b"'" not in line and b"\x0b" not in line and b"\x0c" not in line:
        return line.split()  # the common case: no quoting
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    raise ProtocolError("unbalanced quotes in request")
                break
            c = line[i]
            if quote == 0x22:  # inside "..."
                if c == 0x5C and i + 3 < n and line[i + 1] == 0x78 and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < n:
                    i += 1
                    cur.append(_ESCAPES.get(line[i], line[i]))
                elif c == 0x22:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise ProtocolError("unbalanced quotes in request")  # a closing quote must end the argument
                    i += 1
                    break
                else:
                    cur.append(c)
            elif quote == 0x27:  # inside '...'
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    i += 1
                    cur.append(0x27)
                elif c == 0x27:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise ProtocolError("unbalanced quotes in request")
                    i += 1
                    break
                else:
                    cur.append(c)
            elif c in _SEPARATORS:
                break
            elif c == 0x22 or c == 0x27:
                quote = c
            else:
                cur.append(c)
            i += 1
        args.append(bytes(cur))


def _is_command(value: Any) -> bool:
    """An array of bulk strings (hiredis gives None for a null array, which Redis ignores too)."""
    if value is None:
        return True
    if type(value) is not list:
        return False
    for a in value:
        if type(a) is not bytes:
            return False
    return True


def encoded_length(cmd: list[bytes] | None) -> int:
    """Bytes of ``cmd`` as a canonical RESP array of bulk strings."""
    if cmd is None:
        return 5  # "*-1\r\n"
    total = 3 + len(str(len(cmd)))
    for a in cmd:
        n = len(a)
        total += n + 5 + (1 if n < 10 else 2 if n < 100 else 3 if n < 1000 else len(str(n)))
    return total
