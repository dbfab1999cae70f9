"""The shim's side of a Sentinel-managed endpoint: follow its primary through a failover.

- Every new upstream connection to a Sentinel endpoint asks the sentinels first
  (``resolve_for_connection``, off the loop): it goes to the primary of the moment, never to a
  server whose ``ROLE`` is not master (``migrator.sentinel.resolve``).
- ``SentinelWatch`` keeps one subscription to ``+switch-master`` per Sentinel-managed side, on
  one sentinel at a time: when that sentinel dies or stops answering (a ``PING`` every
  ``PING_INTERVAL``, answered within ``DEAD_AFTER``), it subscribes on the next one, and
  re-resolves the primary at once in case a switch happened while it was not listening.
- On a switch (or a re-resolution naming another primary), every upstream connection of that
  side that is not to the new primary is closed — the sessions' own connections, the shared
  ones and the pooled ones. A session that loses its connection this way does what it does for
  any lost connection (see docs/shim.md "Faults"): its client's connection is closed, as it would
  be by the sentinels' ``CLIENT KILL`` on a demoted primary, and writes it had in flight on that
  side are marked dirty; the next connection goes to the new primary.

Writes the old primary acknowledged but had not replicated before the promotion are lost by the
servers themselves (asynchronous replication); the new primary's different ``run_id`` marks the
side's databases dirty in a two-sided phase (``Shim.side_restarted``), so the next cutover waits
for a full sync (or ``check --full --repair`` once the target is authoritative).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from migrator import sentinel
from migrator.errors import UnreachableError
from migrator.shim.commands import SIDE_NAMES

PING_INTERVAL = 1.0  # seconds between PINGs on the subscription
DEAD_AFTER = 3.0  # a sentinel that has not answered for this long is left for the next one
RETRY_PAUSE = 0.2  # seconds between subscription attempts (1 s after trying every sentinel)


async def resolve_for_connection(loop: asyncio.AbstractEventLoop, ep: Any) -> str | None:
    """Resolve a Sentinel endpoint's primary before a new upstream connection; None, or why not."""
    if getattr(ep, "sentinel", None) is None:
        return None
    try:
        await loop.run_in_executor(None, sentinel.resolve, ep)
    except UnreachableError as e:
        return str(e)
    return None


def _peer(transport: Any) -> tuple[str, int] | None:
    get = getattr(transport, "get_extra_info", None)
    if get is None:
        return None
    peer = get("peername")
    return (peer[0], int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None


def close_upstreams(shim: Any, side: int, keep: tuple[str, int]) -> int:
    """Close every upstream connection of ``side`` that is not to ``keep``; how many were closed."""
    closed = 0
    for s in list(shim.sessions):
        up = getattr(s, "up", None)
        t = up[side].transport if up is not None else None
        peer = _peer(t)
        if peer is not None and peer != keep and not t.is_closing():
            t.abort()
            closed += 1
    for (link_side, _proto), links in shim.mux.links.items():
        if link_side != side:
            continue
        for link in links:
            peer = _peer(link.transport)
            if peer is not None and peer != keep and not link.transport.is_closing():
                link.transport.abort()
                closed += 1
    for p in [*shim.pool.idle[side], *shim.pool.resetting[side]]:
        peer = _peer(p.transport)
        if peer is not None and peer != keep:
            shim.pool.drop(p)
            closed += 1
    return closed


class SentinelWatch:
    """``+switch-master`` subscriptions for the shim's Sentinel-managed sides."""

    def __init__(self, shim: Any) -> None:
        self.shim = shim
        self.tasks: list[asyncio.Task] = []
        self.subscribed: list[str | None] = [None, None]  # the sentinel listened to, per side
        self.primary: list[tuple[str, int] | None] = [None, None]  # as last resolved here
        self.switches: list[list[dict]] = [[], []]

    def sides(self) -> list[int]:
        return [i for i, ep in enumerate(self.shim.endpoints) if getattr(ep, "sentinel", None) is not None]

    def start(self) -> None:
        for side in self.sides():
            ep = self.shim.endpoints[side]
            if ep._resolved is not None:
                self.primary[side] = ep._resolved
            self.tasks.append(asyncio.ensure_future(self._watch(side, ep)))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.tasks.clear()

    def status(self) -> dict[str, Any]:
        return {SIDE_NAMES[side]: {"master_name": self.shim.endpoints[side].sentinel.master_name,
                                   "primary": sentinel.address_text(self.primary[side]) if self.primary[side] else None,
                                   "subscribed_to": self.subscribed[side], "switches": self.switches[side][-10:]}
                for side in self.sides()}

    async def _watch(self, side: int, ep: Any) -> None:
        addresses = list(ep.sentinel.addresses)
        i = 0
        log = self.shim.log
        while True:
            address = addresses[i % len(addresses)]
            i += 1
            host, port = sentinel._split(address)
            kw = {k: v for k, v in sentinel.sentinel_kwargs(ep).items() if k not in ("retry", "health_check_interval")}
            # No retry of its own: a sentinel that fails is left for the next one at once.
            client = redis.asyncio.Redis(host=host, port=port, retry=AsyncRetry(NoBackoff(), 0), **kw)
            ps = client.pubsub()
            try:
                await ps.subscribe("+switch-master")
                self.subscribed[side] = address
                log.info("shim.sentinel_subscribed", side=SIDE_NAMES[side], sentinel=address)
                await self.recheck(side, ep, f"subscribed to {address}")
                await self._listen(side, ep, ps, address)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure: the next sentinel
                if self.subscribed[side] == address:
                    log.warning("shim.sentinel_lost", side=SIDE_NAMES[side], sentinel=address,
                                error=f"{type(e).__name__}: {e}")
                self.subscribed[side] = None
            finally:
                with contextlib.suppress(Exception):
                    await ps.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(RETRY_PAUSE if i % len(addresses) else 1.0)

    async def _listen(self, side: int, ep: Any, ps, address: str) -> None:
        last_heard = time.monotonic()
        last_ping = 0.0
        name = ep.sentinel.master_name
        while True:
            now = time.monotonic()
            if now - last_ping >= PING_INTERVAL:
                await ps.ping()
                last_ping = now
            if now - last_heard > DEAD_AFTER:
                raise TimeoutError(f"sentinel {address} has not answered for {DEAD_AFTER:g} s")
            msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.25)
            if msg is None:
                continue
            last_heard = time.monotonic()
            if msg.get("type") != "message":
                continue  # a pong
            data = msg.get("data")
            fields = (data.decode() if isinstance(data, bytes) else str(data)).split()
            # +switch-master <master name> <old ip> <old port> <new ip> <new port>
            if len(fields) == 5 and fields[0] == name:
                await self.recheck(side, ep, f"+switch-master from {address}: {fields[1]}:{fields[2]} -> "
                                             f"{fields[3]}:{fields[4]}")

    async def recheck(self, side: int, ep: Any, why: str) -> None:
        """Resolve ``side``'s primary now; if it moved, close the connections to the old one."""
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, sentinel.resolve, ep)
        except UnreachableError as e:
            self.shim.log.warning("shim.sentinel_no_primary", side=SIDE_NAMES[side], why=why, error=str(e))
            return
        old = self.primary[side]
        self.primary[side] = new
        if old is None or old == new:
            # The first answer, or no change; still close anything not to the primary (a
            # connection opened just before a switch we learned of late).
            closed = close_upstreams(self.shim, side, new) if old is not None else 0
            if closed:
                self.shim.log.warning("shim.sentinel_stale_connections", side=SIDE_NAMES[side], closed=closed)
            return
        closed = close_upstreams(self.shim, side, new)
        event = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "old": sentinel.address_text(old),
                 "new": sentinel.address_text(new), "why": why, "closed": closed}
        self.switches[side].append(event)
        del self.switches[side][:-50]
        self.shim.log.warning("shim.primary_switched", side=SIDE_NAMES[side], **event)
        self.shim.check_run_ids_soon()
