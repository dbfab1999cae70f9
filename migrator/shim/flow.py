"""Back-pressure for one client connection, shared by sessions and multiplexed clients.

A client with too much in the shim is no longer read; it is read again once half of it is gone
(the bounds are halved while paused, so it does not flap at the bound). What "too much" is, each
kind of connection says; when to pause and resume is here.
"""

from __future__ import annotations

from typing import Any


def bounds(cfg: Any, client_window: int, paused: bool) -> tuple[int, int]:
    """(bytes, commands) a client may have in the shim: ``max_client_buffer_bytes`` and the client
    window, or half of each while it is paused."""
    limit = cfg.max_client_buffer_bytes
    if paused:
        return limit // 2, client_window // 2
    return limit, client_window


def pause_or_resume(conn: Any, over: bool, stats: Any) -> None:
    """Stop reading ``conn``'s client when ``over`` (counted in ``stats.backpressure``), resume when not."""
    if over and not conn.paused:
        conn.paused = True
        stats.backpressure += 1
        conn.client.pause_reading()
    elif conn.paused and not over:
        conn.paused = False
        conn.client.resume_reading()
