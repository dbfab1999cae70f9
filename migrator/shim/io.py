"""The shim's IO layer: client and upstream sockets, the event loop, TLS for clients.

The core (``session`` and the modules it is made of) is handed bytes and events by the two
protocol classes here, and writes through them (``ClientProtocol`` is its ``host.ClientLink``;
an upstream transport its ``host.UpstreamLink``). A client connection's life:

``ClientProtocol.connection_made`` creates its ``Session``; ``data_received`` feeds
``Session.on_client_data``; the session asks its host to open a side
(``Shim.open_upstream`` -> ``connect_upstream`` here) and is told ``on_upstream_connected`` /
``on_upstream_failed``; ``UpstreamProtocol`` feeds ``on_upstream_data`` / ``on_upstream_lost``;
flow control (``pause_writing``/``resume_writing``) calls ``Session.on_buffers_changed``.

The controller (``server.Shim``: phase polling, registry, metrics, timers) and the process
runner (``server.run``, ``server.ShimThread``) build on this module; nothing here imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from typing import Any

from migrator.errors import UsageError
from migrator.shim.mux import SharedLink
from migrator.shim.sentinelwatch import resolve_for_connection
from migrator.shim.session import Session


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ClientProtocol(asyncio.Protocol):
    """One client connection; hands its bytes to a Session."""

    def __init__(self, shim: Any) -> None:  # server.Shim
        self.shim = shim
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = ""

    def connection_made(self, transport) -> None:
        self.transport = transport
        # pause_writing/resume_writing around the client's unread replies (see Session._flow).
        limit = self.shim.cfg.max_client_buffer_bytes
        # Paused at half the bound means it crossed ``high``, so ``resume_writing`` will follow.
        transport.set_write_buffer_limits(high=max(1, limit // 2), low=limit // 4)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self.shim.stopping:
            transport.close()
            return
        mux = self.shim.mux
        if mux.applies():
            # A one-sided phase: on the shared connections until it needs state (see shim.mux).
            self.session = mux.client(self)
            self.shim.session_opened(self.session)
            return
        self.session = Session(self.shim, self)
        self.shim.session_opened(self.session)
        self.session.connect_sides()

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.on_client_data(data)

    def connection_lost(self, exc) -> None:
        if self.session is not None:
            self.session.on_client_lost()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.on_buffers_changed()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.on_buffers_changed()

    # The Session's view of its client.
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered first

    def buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.shim.stopping:
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, session: Session, side: int) -> None:
        self.session = session
        self.side = side
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.session.on_upstream_data(self.side, data)

    def connection_lost(self, exc) -> None:
        reason = f"connection lost ({exc})" if exc else "connection closed by server"
        self.session.on_upstream_lost(self.side, self.transport, reason)

    def resume_writing(self) -> None:
        self.session.on_buffers_changed()


async def _open(loop: asyncio.AbstractEventLoop, factory, ep: Any, ctx: ssl.SSLContext | None):
    """A connection to endpoint ``ep`` (TLS with ``ctx``), within its connect timeout: (transport, None),
    or (None, why not)."""
    why = await resolve_for_connection(loop, ep)  # a Sentinel endpoint: its primary of the moment
    if why is not None:
        return None, why
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(factory, ep.host, ep.port, ssl=ctx,
                                   server_hostname=(ep.tls.server_name if ep.tls and ep.tls.server_name else ep.host) if ctx else None),
            timeout=ep.connect_timeout.total_seconds())
    except (TimeoutError, OSError, ssl.SSLError) as e:
        return None, f"cannot connect to {ep.display}: {e or type(e).__name__}"
    return transport, None


async def connect_upstream(loop: asyncio.AbstractEventLoop, session: Session, side: int, attempt: int, ep: Any,
                           ctx: ssl.SSLContext | None) -> None:
    """Open ``session``'s connection to ``side`` (endpoint ``ep``) and tell the session how it went."""
    transport, why = await _open(loop, lambda: UpstreamProtocol(session, side), ep, ctx)
    if transport is None:
        session.on_upstream_failed(side, why, attempt)
    elif not session.on_upstream_connected(side, transport, attempt):
        transport.close()


class SharedProtocol(asyncio.Protocol):
    """The socket of one shared upstream connection (see shim.mux)."""

    def __init__(self, link: SharedLink) -> None:
        self.link = link
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.link.data(data)

    def connection_lost(self, exc) -> None:
        self.link.lost(self.transport, f"connection lost ({exc})" if exc else "connection closed by server")


async def connect_shared(loop: asyncio.AbstractEventLoop, link: SharedLink, attempt: int, ep: Any,
                         ctx: ssl.SSLContext | None) -> None:
    """Open a shared upstream connection (endpoint ``ep``) and tell its link how it went."""
    transport, why = await _open(loop, lambda: SharedProtocol(link), ep, ctx)
    if transport is None:
        link.failed(why, attempt)
    elif not link.connected(transport, attempt):
        transport.close()


def tls_server_context(cfg) -> ssl.SSLContext | None:
    tls = cfg.tls
    if tls is None:
        return None
    if not tls.cert_file or not tls.key_file:
        raise UsageError("shim.tls needs cert_file and key_file to serve TLS to clients")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file:  # client certificates, when a CA to check them is given
        ctx.load_verify_locations(str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.verify else ssl.CERT_OPTIONAL
    return ctx


@contextlib.contextmanager
def bind_errors(addr: str, flag: str, field: str, alternative: str = ""):
    """An address that cannot be listened on (in use, not local, not permitted) is the operator's
    to fix: one line naming it and where it was set, exit code 2, instead of a traceback."""
    try:
        yield
    except OSError as e:
        # asyncio's message repeats the address; the errno's text alone says why.
        reason = (os.strerror(e.errno) if e.errno else str(e)).lower()
        raise UsageError(f"cannot listen on {addr} ({field} or {flag}): {reason}; stop what holds it or choose another "
                         f"address with {flag}{', ' + alternative if alternative else ''}") from None
