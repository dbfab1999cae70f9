"""The replication strategy's IO: offsets polled, and differing reads confirmed against them.

One ``ReplicaWatch`` per shim process, on its event loop, with connections of its own to each
side (never the clients'):

- **Offsets.** ``INFO replication`` of the primary, then of the replica, into the shim's
  ``lag.OffsetTracker``: every ``FAST_POLL`` while something waits on an offset (a connection's
  read-your-writes, see ``Dispatch._ryw_redirect``), otherwise every ``SLOW_POLL`` (for
  ``/status`` and the metrics, and to notice a replica that is loading or whose link is down).
- **Confirmations.** A compared read that differed (``lag.Mismatch``) is read again on both
  sides, each in a transaction with its offset (``SELECT`` / ``MULTI`` / the read / ``INFO
  replication`` / ``EXEC``): primary first, then the replica until its offset has reached the
  primary's. Agreeing values were lag (``lag_resolved``); values differing with the replica at
  exactly the primary's offset are a divergence, recorded as the dual-write comparison records
  one; anything still undecided after ``shim.replica_lag_timeout`` is ``lag_unconfirmed``.
  At most ``shim.mirror_queue_size`` wait (more are counted unconfirmed, reason
  ``queue-full``), confirmed one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from typing import Any

from migrator.replication import parse as parse_replication
from migrator.shim import compare as cmp
from migrator.shim import lag
from migrator.shim.commands import SIDE_NAMES, SOURCE, TARGET
from migrator.shim.resp import Framer, ProtocolError, encode, parse

FAST_POLL = 0.002
SLOW_POLL = 0.5
TICK = 0.01  # how often an idle watch looks whether something started waiting on an offset
RETRY_PAUSE = 0.002  # between two reads of a replica that has not reached the primary's offset


def info_dict(text: bytes) -> dict[str, str]:
    """``INFO`` text as a flat dict (``slaveN`` lines kept as strings: not needed here)."""
    out: dict[str, str] = {}
    for line in text.decode(errors="replace").splitlines():
        if line and not line.startswith("#") and ":" in line:
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


class Link:
    """One plain connection to a side, for the watch's own commands (AUTH/TLS from the playbook)."""

    def __init__(self, ep: Any, ctx: ssl.SSLContext | None) -> None:
        self.ep, self.ctx = ep, ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.framer = Framer()
        self.frames: deque[bytes] = deque()

    async def call(self, *commands: list[bytes], timeout: float) -> list[bytes]:
        """Send ``commands`` pipelined; their raw replies. Any failure closes the link (reopened next time)."""
        try:
            return await asyncio.wait_for(self._call(commands), timeout)
        except BaseException:
            self.close()
            raise

    async def _call(self, commands) -> list[bytes]:
        if self.writer is None:
            ep = self.ep
            self.reader, self.writer = await asyncio.open_connection(
                ep.host, ep.port, ssl=self.ctx,
                server_hostname=(ep.tls.server_name if ep.tls and ep.tls.server_name else ep.host) if self.ctx else None)
            self.framer, self.frames = Framer(), deque()
            if ep.password:
                auth = [b"AUTH", *([ep.user.encode()] if ep.user else []), ep.password.encode()]
                (reply,) = await self._call([auth])
                if reply[:1] == b"-":
                    raise ConnectionError(f"{ep.display} refused AUTH: {reply[1:].strip().decode(errors='replace')}")
        self.writer.write(b"".join(encode(c) for c in commands))
        while len(self.frames) < len(commands):
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError(f"{self.ep.display} closed the connection")
            self.frames.extend(self.framer.feed(data))
        return [self.frames.popleft() for _ in commands]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _split_exec(raw: bytes) -> list[bytes] | None:
    """The frames inside an EXEC reply (None: the transaction did not run)."""
    if raw[:1] != b"*" or raw[:3] == b"*-1":
        return None
    return Framer().feed(raw[raw.index(b"\r\n") + 2 :])


class ReplicaWatch:
    """Offsets and confirmations for one shim (see the module's docstring)."""

    def __init__(self, shim: Any) -> None:
        self.shim = shim
        eps, ctxs = shim.endpoints, shim.ssl_contexts
        self.poll_links = (Link(eps[SOURCE], ctxs[SOURCE]), Link(eps[TARGET], ctxs[TARGET]))
        self.confirm_links = (Link(eps[SOURCE], ctxs[SOURCE]), Link(eps[TARGET], ctxs[TARGET]))
        self.queue: deque[lag.Mismatch] = deque()
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.last_error: str | None = None
        # Checked by the loops too: a cancellation that lands as asyncio.wait_for's inner call
        # completes can be swallowed (Python < 3.12), and a loop must end anyway.
        self.stopped = False
        self._was_ready: bool | None = None  # for logging the replica's readiness when it changes

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._poll_loop()), asyncio.create_task(self._confirm_loop())]

    async def stop(self) -> None:
        self.stopped = True
        self.wake.set()
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for link in (*self.poll_links, *self.confirm_links):
            link.close()
        stats = self.shim.stats
        for _ in self.queue:
            stats.lag_unconfirmed["shim-stopped"] += 1
        self.queue.clear()
        stats.lag_pending = 0

    # --- offsets ---------------------------------------------------------------------------
    def _timeout(self) -> float:
        return max(1.0, self.shim.shadow_timeout)

    async def _poll_loop(self) -> None:
        tracker = self.shim.tracker
        last = 0.0
        while not self.stopped:
            fast = time.monotonic() < tracker.demand_until
            await asyncio.sleep(FAST_POLL if fast else TICK)
            t = time.monotonic()
            if tracker.replica is None or not (fast or t < tracker.demand_until or t - last >= SLOW_POLL):
                continue
            last = t
            try:
                await self.poll_once()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a side down: readings stop, the tracker says not ready
                self.last_error = f"{type(e).__name__}: {e}"
                tracker.set_replica(None, "", False, False, False, time.monotonic())
                tracker.why_unready = f"offsets not readable ({self.last_error})"
                self._note_readiness()
                await asyncio.sleep(SLOW_POLL)
                continue
            self._note_readiness()

    def _note_readiness(self) -> None:
        """Log the replica becoming ready or not (a replica that is not one means writes reach one side only)."""
        tracker = self.shim.tracker
        ready = tracker.ready
        if ready == self._was_ready or tracker.replica is None:
            return
        self._was_ready = ready
        if ready:
            self.shim.log.info("shim.replica_ready", replica=SIDE_NAMES[tracker.replica], offset=tracker.replica_offset,
                               lag_bytes=tracker.lag_bytes)
        else:
            self.shim.log.warning("shim.replica_not_ready", replica=SIDE_NAMES[tracker.replica], why=tracker.why_unready,
                                  hint="reads are not compared against it until it is; the replication control "
                                       "(migrator status) says whether it is attached")

    async def poll_once(self) -> None:
        """One reading of both offsets: the primary's first (a replica reading after it is comparable)."""
        tracker = self.shim.tracker
        p, r = tracker.primary, tracker.replica
        if p is None or r is None:
            return
        at = time.monotonic()
        (raw,) = await self.poll_links[p].call([b"INFO", b"replication"], timeout=self._timeout())
        st = parse_replication(info_dict(parse(raw)))
        if (p, r) != (tracker.primary, tracker.replica):
            return  # roles changed meanwhile
        tracker.set_primary(st.master_repl_offset, st.master_replid, at)
        at = time.monotonic()
        (raw,) = await self.poll_links[r].call([b"INFO", b"replication"], timeout=self._timeout())
        st = parse_replication(info_dict(parse(raw)))
        if (p, r) != (tracker.primary, tracker.replica):
            return
        tracker.set_replica(st.replica_offset, st.master_replid, bool(st.link_up), bool(st.sync_in_progress),
                            st.is_replica, at)

    # --- confirmations -----------------------------------------------------------------------
    def submit(self, m: lag.Mismatch) -> None:
        stats = self.shim.stats
        if len(self.queue) >= self.shim.cfg.mirror_queue_size:
            stats.lag_unconfirmed["queue-full"] += 1
            return
        m.queued_at = time.monotonic()
        self.queue.append(m)
        stats.lag_pending = len(self.queue)
        self.wake.set()

    async def _confirm_loop(self) -> None:
        stats = self.shim.stats
        while not self.stopped:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            m = self.queue[0]
            try:
                outcome = await self.confirm(m)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a side down or a reply not understood: undecided
                self.last_error = f"{type(e).__name__}: {e}"
                outcome = ("unconfirmed", "error", None, None)
            self.queue.popleft()
            stats.lag_pending = len(self.queue)
            self._settle(m, *outcome)

    async def _read(self, side: int, db: int, args: list[bytes]) -> tuple[bytes, Any, Any]:
        """(raw value, parsed value, replication status) of one side, read in one transaction."""
        replies = await self.confirm_links[side].call(
            [b"SELECT", str(db).encode()], [b"MULTI"], args, [b"INFO", b"replication"], [b"EXEC"],
            timeout=self._timeout())
        frames = _split_exec(replies[-1])
        if frames is None or len(frames) != 2:
            raise ProtocolError(f"transaction not run: {replies[-1][:80]!r}")
        value_raw, info_raw = frames
        info = parse(info_raw)
        if not isinstance(info, bytes):
            raise ProtocolError("INFO inside the transaction was refused")
        return value_raw, parse(value_raw), parse_replication(info_dict(info))

    async def confirm(self, m: lag.Mismatch) -> tuple[str, str, bytes | None, bytes | None]:
        """(outcome, kind or reason, source raw, target raw); outcome "lag", "divergent", "unconfirmed", "skipped"."""
        tracker = self.shim.tracker
        p, r = tracker.primary, tracker.replica
        if p is None or r is None:
            return "unconfirmed", "roles-changed", None, None
        deadline = m.queued_at + self.shim.cfg.replica_lag_timeout.total_seconds()
        while True:
            m.tries += 1
            p_raw, p_val, p_st = await self._read(p, m.dbs[p], m.args)
            while True:
                r_raw, r_val, r_st = await self._read(r, m.dbs[r], m.args)
                if not r_st.is_replica or r_st.master_replid != p_st.master_replid:
                    return "unconfirmed", "not-replicating", None, None
                if r_st.sync_in_progress or not r_st.link_up:
                    return "skipped", "replica-not-ready", None, None
                if (r_st.replica_offset or 0) >= p_st.master_repl_offset or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(RETRY_PAUSE)
            kind = cmp.compare(m.name, p_val, r_val, self.shim.ttl_tolerance_ms) if p_raw != r_raw else None
            verdict = lag.judge(kind is None, p_st.master_repl_offset, r_st.replica_offset or 0)
            src, tgt = (p_raw, r_raw) if p == SOURCE else (r_raw, p_raw)
            if verdict == lag.LAG:
                return "lag", "", src, tgt
            if verdict == lag.DIVERGENT:
                return "divergent", kind, src, tgt
            if time.monotonic() >= deadline:
                return "unconfirmed", "timeout", src, tgt

    def _settle(self, m: lag.Mismatch, outcome: str, what: str, src: bytes | None, tgt: bytes | None) -> None:
        shim = self.shim
        stats = shim.stats
        if outcome == "lag":
            stats.lag_resolved += 1
        elif outcome == "skipped":
            stats.lag_skipped += 1
        elif outcome == "divergent":
            stats.divergences[what] += 1
            shim.divergence.record(kind=what, command=m.name, keys=m.keys, db=m.dbs[TARGET], source_raw=src,
                                   target_raw=tgt)
        else:
            stats.lag_unconfirmed[what] += 1
            shim.log.warning("shim.mismatch_unconfirmed", command=m.name.decode(errors="replace").upper(),
                             reason=what, keys=[k.decode(errors="replace") for k in m.keys[:4]],
                             error=self.last_error if what == "error" else None)
