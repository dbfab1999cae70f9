"""RESP on the wire: framing replies into raw byte slices, parsing with hiredis, encoding commands.

The shim forwards the authoritative side's reply bytes to the client unchanged, so it must know
where each reply ends without re-encoding it: ``frame_end`` walks the RESP2/RESP3 headers (it
never builds values). Values are only built (by hiredis, in C) when a reply is compared or
drives an effect. Requests are parsed by hiredis too; a client that sends anything that is not
RESP (apart from inline commands at a command boundary, which redis-cli and telnet users send)
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
    """The value of one complete raw reply (errors come back as ``hiredis.ReplyError``)."""
    _parser.feed(raw)
    value = _parser.gets()
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


def encoded_length(cmd: list[bytes]) -> int:
    """Bytes of ``cmd`` as a canonical RESP array of bulk strings."""
    total = 3 + len(str(len(cmd)))
    for a in cmd:
        n = len(a)
        total += n + 5 + (1 if n < 10 else 2 if n < 100 else 3 if n < 1000 else len(str(n)))
    return total


def error_reply(message: str) -> bytes:
    """A RESP error line; newlines are removed because they would end the reply early."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + CRLF


class RequestParser:
    """Splits a client's byte stream into commands (lists of bytes), bounded in size.

    Like Redis, a connection may start with inline commands (``PING\\r\\n``: redis-cli, telnet);
    once it sends a RESP array it is parsed as RESP from then on (hiredis cannot say where a
    partial command ends, so inline detection mid-stream is not possible; no client mixes).

    The size limit is checked against what a command *declares* (its ``*N`` count and each
    ``$len`` header) as soon as the header arrives, like Redis does, so an oversized request is
    refused before any of its payload is buffered. hiredis accepts canonical lengths only, so
    the bytes of the complete commands are exactly their encoded lengths: what follows them in
    the stream is the partial command, whose headers are scanned (resumably, across chunks).
    """

    __slots__ = ("_inline_buf", "_partial", "_reader", "_resp", "_scan", "max_request_bytes")

    def __init__(self, max_request_bytes: int) -> None:
        self._reader = hiredis.Reader()
        self._resp = False
        self._inline_buf = b""
        self.max_request_bytes = max_request_bytes
        self._partial = 0  # bytes of the partial command received so far
        # The partial command's header scan: [elements still to come (-1: its "*N" header not
        # seen yet), payload bytes to skip, declared bytes so far, a header line cut by the chunk];
        # None: no partial command; False: not scanned (see feed).
        self._scan: list | bool | None = None

    def feed(self, data: bytes) -> list[list[bytes]]:
        """Every complete command in ``data`` (plus what was buffered); raises ProtocolError."""
        commands: list[list[bytes]] = []
        reader = self._reader
        if not self._resp:
            if self._inline_buf:
                data, self._inline_buf = self._inline_buf + data, b""
            data = self._inline(data, commands)
            if not data:
                return commands
            self._resp = True
        reader.feed(data)
        consumed = 0
        try:
            while True:
                cmd = reader.gets()
                if cmd is False:
                    break
                if type(cmd) is not list:
                    raise ProtocolError("expected an array of bulk strings")
                if cmd:  # "*0\r\n": Redis ignores an empty command, and so do we
                    for a in cmd:
                        if type(a) is not bytes:
                            raise ProtocolError("expected an array of bulk strings")
                    commands.append(cmd)
                consumed += encoded_length(cmd)
        except hiredis.ProtocolError as e:
            raise ProtocolError(str(e)) from None
        partial = self._partial + len(data) - consumed
        if partial <= 0:
            self._partial, self._scan = 0, None
            return commands
        if consumed and partial > len(data):
            # Bytes this count does not cover (it must add every byte it parses): the partial
            # command's start is unknown, so its headers are not scanned; the bound below holds.
            self._scan = False
        elif consumed or self._scan is None:
            self._scan = [-1, 0, 0, b""]  # a new partial command, starting in this chunk
            self._check(data, len(data) - partial)
        elif self._scan:
            self._check(data, 0)  # more of the partial command that started earlier
        self._partial = partial
        # What hiredis holds: the partial command plus at most 1 KiB already consumed.
        if reader.len() > self.max_request_bytes:
            raise ProtocolError(f"request larger than shim.max_request_bytes ({self.max_request_bytes} bytes)")
        return commands

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

    def _inline(self, data: bytes, out: list[list[bytes]]) -> bytes:
        """Parse inline commands until a RESP array starts; returns the rest (from the ``*``)."""
        while data and data[:1] != b"*":
            eol = data.find(b"\n")
            if eol < 0:
                if len(data) > min(64 * 1024, self.max_request_bytes):
                    raise ProtocolError("too big inline request")
                self._inline_buf = data
                return b""
            line = data[:eol].rstrip(b"\r")
            data = data[eol + 1 :]
            args = line.split()
            if args:
                out.append(args)
        return data
