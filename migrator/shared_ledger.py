"""A ledger for a fleet: writers on several addresses (shims, or the source itself) that SHARE keys.

``migrator.workload`` gives each client its own keys, so that the expected value of every key is
known from one client's acknowledgements. A fleet writes the same keys from many places at once,
and then "the final value" depends on an order nobody fixed. What stays well defined is this:
every acknowledged write adds something unique — a set member, a hash field, a list element, a
sorted-set member, named ``<writer>-<n>`` — so the audit can say of each acknowledged write whether
it is on the server (lost if not), and of each element on the server whether some writer sent it
(a phantom if not). Shared counters (``INCR``) must equal the sum of acknowledged increments.

What each writer checks while it runs:

- read-your-writes: after an acknowledged ``SADD``, the same connection's ``SISMEMBER`` must say 1
  (a shim serving reads from a lagging replica must not hide a client's own write);
- list order: a writer waits for each acknowledgement, so its elements must appear in a shared
  list in the order it sent them;
- ``MULTI``/``EXEC`` of an ``SADD`` and an ``INCR`` on shared keys: both or neither.

A command that failed has an unknown outcome (its element may or may not be there; a counter may
be up to that many higher), except a refusal the server certainly did not apply: ``READONLY`` (a
writer straight to a server that has become a replica) and ``EXECABORT``. Those are counted by
message as ``refused``; the ledger tests expect them from a writer that bypasses the shims after
the write cutover, and nothing else. A command the client library sent again after a closed
connection is audited leniently, as in ``migrator.workload``.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import ExponentialBackoff

from migrator.workload import _NotingRetry

KINDS = ("set", "hash", "list", "zset")
# The operations a writer picks from (uniformly): INCR, MULTI(SADD, INCR), then one add per kind.
# Only the order-independent ones (set, hash, zset) suit shims that dual-write shared keys: the
# others' results depend on the order of writes, which two dual-writing shims do not agree on.
OPS = ("counter", "multi", *KINDS)
# Replies that mean the server did not apply the command (not an unknown outcome).
CERTAIN_REFUSALS = ("READONLY", "EXECABORT", "NOREPLICAS")


@dataclass
class WriterLedger:
    name: str
    url: str
    acked: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # key -> uids, in ack order
    uncertain: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # key -> uids
    counters: Counter = field(default_factory=Counter)
    uncertain_counters: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)  # first word of the error -> count
    errors: list[str] = field(default_factory=list)  # unknown outcomes (and anything unexpected)
    ryw_violations: list[str] = field(default_factory=list)
    ops: int = 0
    retried: bool = False


@dataclass
class SharedAudit:
    ok: bool
    acked: int  # acknowledged unique elements audited
    lost: list[str]
    phantoms: list[str]
    problems: list[str]  # counters, order, duplicates
    errors: list[str]
    refused: dict[str, int]
    ryw_violations: list[str]
    ops: int

    def summary(self) -> str:
        return (f"{self.ops} acknowledged operations, {self.acked} acknowledged elements audited: "
                f"{len(self.lost)} lost, {len(self.phantoms)} phantom, "
                f"{len(self.problems)} other problem(s); {len(self.errors)} client error(s), refused "
                f"{dict(self.refused) or 'none'}, {len(self.ryw_violations)} read-your-writes violation(s)")


class SharedWorkload:
    """Writer threads on ``urls`` (name -> URL, ``per_url`` threads each) writing one shared key set."""

    def __init__(self, urls: dict[str, str], per_url: int = 1, keys: int = 4, prefix: str = "fleet:",
                 rate: float | None = 100.0, seed: int = 0, check_reads: bool = True,
                 ops: tuple[str, ...] = OPS) -> None:
        unknown = set(ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown operation(s) {sorted(unknown)}; choose from {OPS}")
        self.prefix, self.keys, self.rate, self.check_reads, self.mix = prefix, keys, rate, check_reads, ops
        self.ledgers = [WriterLedger(f"{name}.{j}", url) for name, url in urls.items() for j in range(per_url)]
        self._stop = threading.Event()
        self._stopped = {led.name: threading.Event() for led in self.ledgers}
        self._threads = [threading.Thread(target=self._run, args=(led, seed + i), daemon=True, name=f"fleet-{led.name}")
                         for i, led in enumerate(self.ledgers)]

    def start(self) -> SharedWorkload:
        for t in self._threads:
            t.start()
        return self

    def stop(self, *names: str) -> None:
        """Stop every writer, or only those on the addresses named ``names`` (e.g. ``"direct"``)."""
        if not names:
            self._stop.set()
        for led, t in zip(self.ledgers, self._threads):
            if not names or led.name.split(".")[0] in names:
                self._stopped[led.name].set()
                t.join(timeout=30)

    @property
    def ops(self) -> int:
        return sum(led.ops for led in self.ledgers)

    def key(self, kind: str, k: int) -> str:
        return f"{self.prefix}{kind}:{k}"

    def _run(self, led: WriterLedger, seed: int) -> None:
        rng = random.Random(seed)
        done = self._stopped[led.name]
        c = redis.Redis.from_url(led.url, socket_timeout=30, decode_responses=True,
                                 retry=_NotingRetry(led, ExponentialBackoff(cap=0.25, base=0.01), 40),
                                 retry_on_error=[redis.exceptions.ConnectionError])
        interval = 1.0 / self.rate if self.rate else 0.0
        n = 0
        try:
            while not self._stop.is_set() and not done.is_set():
                n += 1
                led.retried = False
                self._one(c, led, rng, n)
                if interval:
                    time.sleep(interval)
        finally:
            c.close()

    def _one(self, c: redis.Redis, led: WriterLedger, rng: random.Random, n: int) -> None:
        uid = f"{led.name}-{n}"
        op = rng.choice(self.mix)
        if op == "counter":
            keys = [self.key("counter", rng.randrange(self.keys))]
            send = lambda: c.incr(keys[0])
        elif op == "multi":
            keys = [self.key("set", rng.randrange(self.keys)), self.key("counter", rng.randrange(self.keys))]

            def send():
                pipe = c.pipeline(transaction=True)
                pipe.sadd(keys[0], uid)
                pipe.incr(keys[1])
                return pipe.execute()
        else:
            keys = [self.key(op, rng.randrange(self.keys))]
            send = {"set": lambda: c.sadd(keys[0], uid), "hash": lambda: c.hset(keys[0], uid, n),
                    "list": lambda: c.rpush(keys[0], uid), "zset": lambda: c.zadd(keys[0], {uid: n})}[op]
        try:
            send()
        except redis.exceptions.RedisError as e:
            msg = str(e)
            refusal = _refusal(e)
            if refusal:
                led.refused[refusal] += 1
                return
            led.errors.append(f"{led.name} {uid} on {keys}: {type(e).__name__}: {msg}")
            self._note(led, keys, uid, acked=False)
            return
        led.ops += 1
        self._note(led, keys, uid, acked=True)
        if self.check_reads and keys[0].startswith(self.key("set", 0)[:-1]):
            try:
                if not c.sismember(keys[0], uid):
                    led.ryw_violations.append(f"{led.name}: SISMEMBER {keys[0]} {uid} = 0 right after its SADD")
            except redis.exceptions.RedisError as e:
                led.errors.append(f"{led.name} SISMEMBER {keys[0]}: {type(e).__name__}: {e}")

    def _note(self, led: WriterLedger, keys: list[str], uid: str, acked: bool) -> None:
        """Record one operation: acknowledged (present at least once; applied twice possibly, if the
        library sent it again) or failed (unknown outcome)."""
        doubt = not acked or led.retried
        for key in keys:
            if key.startswith(self.prefix + "counter:"):
                led.counters[key] += acked
                led.uncertain_counters[key] += doubt
            else:
                if acked:
                    led.acked[key].append(uid)
                if doubt:
                    led.uncertain[key].add(uid)

    # --- auditing ------------------------------------------------------------------------------
    def read(self, client: redis.Redis) -> dict[str, Any]:
        """Every shared key's content on ``client``'s server."""
        out: dict[str, Any] = {}
        for k in range(self.keys):
            out[self.key("set", k)] = [_s(m) for m in client.smembers(self.key("set", k))]
            out[self.key("hash", k)] = [_s(f) for f in client.hkeys(self.key("hash", k))]
            out[self.key("list", k)] = [_s(e) for e in client.lrange(self.key("list", k), 0, -1)]
            out[self.key("zset", k)] = [_s(m) for m in client.zrange(self.key("zset", k), 0, -1)]
            out[self.key("counter", k)] = int(client.get(self.key("counter", k)) or 0)
        return out

    def audit(self, client: redis.Redis) -> SharedAudit:
        """Compare the ledgers with what ``client``'s server holds now."""
        have = self.read(client)
        lost: list[str] = []
        phantoms: list[str] = []
        problems: list[str] = []
        acked_total = 0
        for key, content in have.items():
            if key.startswith(self.prefix + "counter:"):
                want = sum(led.counters[key] for led in self.ledgers)
                slack = sum(led.uncertain_counters[key] for led in self.ledgers)
                if not (want <= content <= want + slack):
                    problems.append(f"{key}: counter is {content}, acknowledged increments sum to {want}"
                                    + (f" (+{slack} unknown outcome)" if slack else ""))
                continue
            present = Counter(content)
            sent: set[str] = set()
            for led in self.ledgers:
                acked = led.acked.get(key, [])
                acked_total += len(acked)
                lost += [f"{key}: {uid} (acknowledged to {led.name})" for uid in acked if uid not in present]
                sent.update(acked)
                sent.update(led.uncertain.get(key, ()))
                if key.startswith(self.prefix + "list:"):
                    mine = [e for e in content if e.startswith(led.name + "-") and e not in led.uncertain.get(key, ())]
                    if mine != [u for u in acked if u not in led.uncertain.get(key, ())]:
                        problems.append(f"{key}: {led.name}'s elements are not in the order it was acknowledged "
                                        f"({len(mine)} present, {len(acked)} acknowledged)")
            phantoms += [f"{key}: {e} (never sent)" for e in present if e not in sent]
            uncertain = set().union(*(led.uncertain.get(key, set()) for led in self.ledgers))
            problems += [f"{key}: {e} present {n} times" for e, n in present.items() if n > 1 and e not in uncertain]
        refused: Counter = Counter()
        for led in self.ledgers:
            refused.update(led.refused)
        errors = [e for led in self.ledgers for e in led.errors]
        ryw = [v for led in self.ledgers for v in led.ryw_violations]
        return SharedAudit(not (lost or phantoms or problems), acked_total, lost, phantoms, problems, errors,
                           dict(refused), ryw, self.ops)


def _refusal(e: Exception) -> str | None:
    """The refusal ``e`` is, when the server certainly did not apply the command (else None).

    redis-py turns ``-READONLY`` into ``ReadOnlyError`` without the word; a transaction with a
    refused command fails as a whole (``EXECABORT``), naming the refusal in its message."""
    if isinstance(e, redis.exceptions.ReadOnlyError) or "read only replica" in str(e):
        return "READONLY"
    if isinstance(e, redis.exceptions.ExecAbortError):
        return "EXECABORT"
    if not isinstance(e, redis.exceptions.ResponseError):
        return None
    upper = str(e).upper()
    return next((w for w in CERTAIN_REFUSALS if w in upper), None)


def _s(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v
