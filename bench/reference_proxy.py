"""The ceiling for any Python proxy on this machine: a proxy that does no work at all.

    python bench/reference_proxy.py LISTEN_PORT ANSWER_PORT [SHADOW_PORT]

Each client connection gets one connection to the answering server (and one to the shadow
server, if given); every byte the client sends is written to both, the answering server's
bytes go back to the client and the shadow's are thrown away. No parsing, no ordering, no
comparison, no state: the least a forwarding (or mirroring) proxy must do per chunk, on uvloop,
as the shim uses. ``bench/shim.py`` runs it beside the shim so the shim's ratios can be read
against what the machine allows. Not a tool: it is wrong as a proxy (it forgets connection
state on reconnect, drops the shadow's errors, has no bounds).
"""

from __future__ import annotations

import asyncio
import sys

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the shim
    uvloop = None


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport | None) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)


class _Client(asyncio.Protocol):
    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.ups: list[asyncio.Transport] = []
        self.early: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        ups = []
        for i, port in enumerate(self.ports):
            tr, _ = await loop.create_connection(lambda i=i: _Upstream(self.transport if i == 0 else None),
                                                 "127.0.0.1", port)
            ups.append(tr)
        self.ups = ups
        for data in self.early:
            for tr in ups:
                tr.write(data)
        self.early = []

    def data_received(self, data: bytes) -> None:
        if not self.ups:
            self.early.append(data)
            return
        for tr in self.ups:
            tr.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for tr in self.ups:
            tr.close()


async def _serve(listen: int, ports: list[int]) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Client(ports), "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    listen, *ports = (int(a) for a in argv)
    coro = _serve(listen, ports)
    if uvloop is not None:
        uvloop.run(coro)
    else:  # pragma: no cover
        asyncio.run(coro)


if __name__ == "__main__":
    main(sys.argv[1:])
