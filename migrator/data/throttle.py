"""A keys-per-second limit (``--rate``): a token bucket that sleeps the caller when it runs ahead."""

from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, rate: float | None, burst_seconds: float = 0.2) -> None:
        self.rate = rate
        self.capacity = (rate or 0) * burst_seconds
        self.tokens = self.capacity
        self.last = time.monotonic()
        self._lock = threading.Lock()  # one limit shared by a cluster sync's shard threads

    def wait(self, n: int) -> None:
        """Block until ``n`` more keys may be processed."""
        if not self.rate:
            return
        with self._lock:
            t = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (t - self.last) * self.rate)
            self.last = t
            self.tokens -= n
            behind = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if behind:
            time.sleep(behind)
