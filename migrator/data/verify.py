"""Copy-then-verify: every copied batch is checked once the mirror has settled.

While the shim mirrors writes (source first, then target), a copy of key K read from the source
at r and written to the target at w races a mirrored write W to K that reaches the source at s
and the target at t < s + lag: if r < s and t < w the older copy overwrites W; if s < r and
t > w, W is applied twice (an INCR, an LPUSH). Both are visible once every write that could
race has landed: ``settle`` (the shim's ``shadow_timeout``, its bound on a mirrored write's lag)
after the batch's write. Then the batch's *suspects* are compared exactly, and those that
differ are copied again (and verified again), up to ``max_attempts`` times; keys that never
settle (written faster than the loop converges) are reported as unsettled, never accepted.

Suspects are the keys the source's keyspace events show written in (read − settle, now)
(``watch.WriteWatch``), or, without events, every key whose DUMP CRC64 or expiry changed on
either side since its copy (``Signature``), or, without either, every key.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis

from migrator.data import compare, fastcall, values
from migrator.data.copy import Copier, CopyResult, Signature
from migrator.data.watch import WriteWatch

POLL_EVERY_S = 0.05

# Which keys changed since their copy: ARGV holds, per key, the CRC64 its DUMP ended with and its
# absolute expiry then, plus the tolerance last. Returns the 1-based positions of changed keys,
# so an unchanged batch costs one short reply.
_CHANGED_LUA = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tol = tonumber(ARGV[#ARGV])
local out = {}
for i, k in ipairs(KEYS) do
  local d = redis.call('DUMP', k)
  local crc = d and string.sub(d, -8) or ''
  local ttl = redis.call('PTTL', k)
  local exp = ttl > 0 and now + ttl or 0
  if crc ~= ARGV[2 * i - 1] or math.abs(exp - tonumber(ARGV[2 * i])) > tol then out[#out + 1] = i end
end
return out
"""


@dataclass
class Pending:
    seq: int  # position of the original batch in scan order
    keys: list[bytes]
    written_at: float  # monotonic time the batch's write finished
    attempt: int = 1
    signatures: dict[bytes, Signature] = field(default_factory=dict)
    marked_at: float = 0.0  # monotonic time before the batch was read (for the WriteWatch)


@dataclass
class VerifyStats:
    verified: int = 0
    recopied: int = 0
    unsettled: dict[bytes, str] = field(default_factory=dict)


class Verifier:
    def __init__(self, src: redis.Redis, dst: redis.Redis, copier: Copier, *, settle: float, ttl_tolerance_ms: int,
                 max_attempts: int = 5, watch: WriteWatch | None = None) -> None:
        self.src, self.dst, self.copier = src, dst, copier
        self.watch = watch
        self.settle = settle
        self.ttl_tolerance_ms = ttl_tolerance_ms
        self.max_attempts = max_attempts
        undeclared = getattr(copier, "undeclared", (False, False))  # cluster nodes: batches of several slots
        self.src_probe = values.Prober(src, copier.chunk, copier.chunk_bytes, undeclared=undeclared[0])
        self.dst_probe = values.Prober(dst, copier.chunk, copier.chunk_bytes, undeclared=undeclared[1])
        self.queue: deque[Pending] = deque()
        self.stats = VerifyStats()
        self.last_seq = -1
        self._src_changed = fastcall.register(src, _CHANGED_LUA, undeclared[0])
        self._dst_changed = fastcall.register(dst, _CHANGED_LUA, undeclared[1])
        self.pool = ThreadPoolExecutor(max_workers=1)  # the target's half of each comparison
        self._last_poll = 0.0

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    def add(self, seq: int, keys: list[bytes], written_at: float, result: CopyResult, marked_at: float = 0.0) -> None:
        """Queue a copied batch: ``result`` of its copy, ``marked_at`` taken before it was read."""
        self.last_seq = max(self.last_seq, seq)
        if result.errors:  # reported as copy errors already: a re-copy would only fail again
            keys = [k for k in keys if k not in result.errors]
        if keys:
            self.queue.append(Pending(seq, keys, written_at, signatures=result.signatures, marked_at=marked_at))

    @property
    def safe_seq(self) -> int:
        """Every batch up to this one (in scan order) is verified."""
        return min((p.seq for p in self.queue), default=self.last_seq + 1) - 1

    def _due(self) -> list[Pending]:
        now = time.monotonic()
        due = []
        while self.queue and self.queue[0].written_at + self.settle <= now:
            due.append(self.queue.popleft())
        return due

    def poll(self, oldest_in_flight: float | None = None) -> None:
        """Verify the batches whose settle time has passed (at most every POLL_EVERY_S: one fence
        and one round of comparisons then covers every batch that came due meanwhile).

        ``oldest_in_flight``: when the oldest batch still being copied (not yet added) was
        marked; the watch must keep the events its window will need.
        """
        now = time.monotonic()
        if now - self._last_poll >= POLL_EVERY_S:
            self._last_poll = now
            self._verify_all(self._due(), oldest_in_flight)

    def drain(self) -> None:
        """Wait for and verify everything still queued (re-copies included)."""
        while self.queue:
            wait = self.queue[0].written_at + self.settle - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._verify_all(self._due())

    def _verify_all(self, due: list[Pending], oldest_in_flight: float | None = None) -> None:
        if not due:
            return
        if self.watch and not self.watch.broken:
            self.watch.fence()  # every event up to now is in: the batches' windows are complete
        for p in due:
            self._verify(p)
        if self.watch:
            marks = [p.marked_at for p in self.queue] + ([oldest_in_flight] if oldest_in_flight is not None else [])
            self.watch.forget_before(min(marks, default=time.monotonic()) - self.settle)

    def _suspects(self, p: Pending) -> list[bytes]:
        """The keys of ``p`` that may differ: written during their window, or unknown."""
        if self.watch and not self.watch.broken:
            # A write the source saw up to one mirror lag before the read may still reach the
            # target after the copy: the window starts ``settle`` before the read.
            written = self.watch.written_since(p.keys, p.marked_at - self.settle)
            return [k for k in p.keys if k in written] if written else []
        same = self.unchanged(p)
        return [k for k in p.keys if k not in same]

    def unchanged(self, p: Pending) -> set[bytes]:
        """Keys that neither side has written since their copy (so they are equal): the fast path."""
        keys = [k for k in p.keys if k in p.signatures]
        if not keys or not self.copier.lua:
            return set()
        src_args: list = []
        dst_args: list = []
        for k in keys:
            sig = p.signatures[k]
            src_args += [sig.source, sig.expire_at]
            dst_args += [sig.target, sig.expire_at]
        src_args.append(self.ttl_tolerance_ms)
        dst_args.append(self.ttl_tolerance_ms)
        future = self.pool.submit(fastcall.evalsha, self.dst, self._dst_changed, keys, dst_args)
        try:
            changed = set(fastcall.evalsha(self.src, self._src_changed, keys, src_args)) | set(future.result())
        except redis.exceptions.ResponseError:
            return set()  # no scripting or DUMP here: the type-aware comparison decides
        return {k for i, k in enumerate(keys, 1) if i not in changed}

    def differing(self, keys: list[bytes]) -> dict[bytes, compare.Difference]:
        if not keys:
            return {}
        future = self.pool.submit(self.dst_probe.probe, keys)
        s_states = self.src_probe.probe(keys)
        d_states = future.result()
        out = {}
        for k, s, d in zip(keys, s_states, d_states):
            diff = compare.difference(self.src, self.dst, k, s, d, self.ttl_tolerance_ms, self.copier.chunk,
                                     self.copier.chunk_bytes)
            if diff:
                out[k] = diff
        return out

    def _verify(self, p: Pending) -> None:
        diffs = self.differing(self._suspects(p))
        self.stats.verified += len(p.keys) - len(diffs)
        if not diffs:
            return
        if p.attempt >= self.max_attempts:
            for k, d in diffs.items():
                self.stats.unsettled[k] = f"{d.kind}: {d.detail}"
            return
        keys = list(diffs)
        marked_at = time.monotonic()
        res = self.copier.copy(keys)
        self.stats.recopied += len(keys)
        self.queue.append(Pending(p.seq, keys, time.monotonic(), p.attempt + 1, res.signatures, marked_at))
