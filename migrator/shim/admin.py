"""The admin HTTP endpoint: ``GET /metrics`` (Prometheus text) and ``GET /status`` (JSON).

A few lines of HTTP/1.0 over asyncio rather than another dependency: two read-only routes,
one request per connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

Route = Callable[[], tuple[str, bytes]]  # -> (content type, body)
MAX_REQUEST = 8192


async def start(host: str, port: int, routes: dict[str, Route], reuse_port: bool = False) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path = path.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
            elif path in routes:
                ctype, body = routes[path]()
                status = "200 OK"
            else:
                status, ctype, body = "404 Not Found", "text/plain", ("try " + ", ".join(sorted(routes)) + "\n").encode()
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST, reuse_port=reuse_port or None)


def json_route(fn: Callable[[], Any]) -> Route:
    return lambda: ("application/json", (json.dumps(fn(), indent=2, default=str) + "\n").encode())
