"""Copy-then-verify: every copied batch is compared on both servers once the mirror has settled.

Why: while the shim mirrors writes (source first, then target), a copy of key K read from the
source at time r and written to the target at time w races every mirrored write to K whose
source and target halves straddle r or w. A write applied to the source after r but to the
target before w is overwritten by the older copy; a write applied to the source before r but
to the target after w (an INCR, an LPUSH) is applied twice. Both leave K different on the two
servers, and both are visible once the mirror has applied every write that was in flight at
r: that is ``settle`` (the shim's ``shadow_timeout``, its bound on a mirrored write's lag)
after r. So each batch is compared ``settle`` after it was read; differing keys are copied
again (and verified again), up to ``max_attempts`` times. Keys that never settle (written
faster than the loop converges) are reported as unsettled, not silently accepted.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import redis

from migrator.data import values
from migrator.data.copy import Copier


@dataclass
class Pending:
    seq: int  # position of the original batch in scan order
    keys: list[bytes]
    read_at: float  # monotonic time the batch was read from the source
    attempt: int = 1


@dataclass
class VerifyStats:
    verified: int = 0
    recopied: int = 0
    unsettled: dict[bytes, str] = field(default_factory=dict)


class Verifier:
    def __init__(self, src: redis.Redis, dst: redis.Redis, copier: Copier, *, settle: float, ttl_tolerance_ms: int,
                 max_attempts: int = 5) -> None:
        self.src, self.dst, self.copier = src, dst, copier
        self.settle = settle
        self.ttl_tolerance_ms = ttl_tolerance_ms
        self.max_attempts = max_attempts
        self.src_probe = values.Prober(src, copier.chunk, copier.chunk_bytes)
        self.dst_probe = values.Prober(dst, copier.chunk, copier.chunk_bytes)
        self.queue: deque[Pending] = deque()
        self.stats = VerifyStats()
        self.last_seq = -1

    def add(self, seq: int, keys: list[bytes], read_at: float) -> None:
        self.last_seq = max(self.last_seq, seq)
        if keys:
            self.queue.append(Pending(seq, keys, read_at))

    @property
    def safe_seq(self) -> int:
        """Every batch up to this one (in scan order) is verified."""
        return min((p.seq for p in self.queue), default=self.last_seq + 1) - 1

    def poll(self) -> None:
        """Verify the batches whose settle time has passed."""
        now = time.monotonic()
        while self.queue and self.queue[0].read_at + self.settle <= now:
            self._verify(self.queue.popleft())

    def drain(self) -> None:
        """Wait for and verify everything still queued (re-copies included)."""
        while self.queue:
            wait = self.queue[0].read_at + self.settle - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._verify(self.queue.popleft())

    def differing(self, keys: list[bytes]) -> dict[bytes, values.Difference]:
        s_states = self.src_probe.probe(keys)
        d_states = self.dst_probe.probe(keys)
        out = {}
        for k, s, d in zip(keys, s_states, d_states):
            diff = values.difference(self.src, self.dst, k, s, d, self.ttl_tolerance_ms, self.copier.chunk,
                                     self.copier.chunk_bytes)
            if diff:
                out[k] = diff
        return out

    def _verify(self, p: Pending) -> None:
        diffs = self.differing(p.keys)
        self.stats.verified += len(p.keys) - len(diffs)
        if not diffs:
            return
        if p.attempt >= self.max_attempts:
            for k, d in diffs.items():
                self.stats.unsettled[k] = f"{d.kind}: {d.detail}"
            return
        keys = list(diffs)
        read_at = time.monotonic()
        self.copier.copy(keys)
        self.stats.recopied += len(keys)
        self.queue.append(Pending(p.seq, keys, read_at, p.attempt + 1))
