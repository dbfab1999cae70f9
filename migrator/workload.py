"""A ledger workload: concurrent clients whose every acknowledged write is recorded, then audited.

Used by ``migrator demo`` and by the end-to-end ledger tests, Jepsen-style: run it through the
shim while the migration walks its steps (with rollbacks and restarts), then check that the
final server holds every acknowledged write.

Each client owns its keys (``<prefix>c<i>:…``) except the shared counters, so the expected
final value of every key is known exactly from what that client was told succeeded:

- ``INCR`` on shared counters: the final value equals the sum of acknowledged increments;
- ``RPUSH`` of unique ids: the list holds every acknowledged id, in order;
- ``HSET``: each field holds its last acknowledged value;
- ``SET … EX`` then ``EXPIRE``: the key holds its value with a TTL; ``DEL``: the key is gone;
- ``SADD`` then ``SPOP``: the set holds exactly what was added and not popped;
- ``MULTI``/``EXEC`` of an ``INCR`` and an ``RPUSH``: both or neither.

A command that failed has an unknown outcome: its key is listed as uncertain and audited
leniently (a counter may be up to that many higher), and the error is reported, since the
ledger tests require that clients see no error the source itself would not have returned.
So has a command the client library sent again after its connection closed (it reconnects and
retries, as applications do): the first attempt may have been applied too, so its key is
audited leniently although the retry was acknowledged.
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
from redis.retry import Retry

COUNTERS = 8


@dataclass
class ClientLedger:
    counters: Counter = field(default_factory=Counter)
    uncertain_counters: Counter = field(default_factory=Counter)
    lists: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    hashes: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    strings: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    sets: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    uncertain: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    ops: int = 0
    retried: bool = False  # the current operation was sent again after a closed connection


class _NotingRetry(Retry):
    """The client library's retry, which also tells the ledger that an operation was sent again."""

    def __init__(self, led: ClientLedger, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._led = led

    def call_with_retry(self, do, fail, *args, **kw):
        def noted(error, *rest):
            self._led.retried = True
            return fail(error, *rest)

        return super().call_with_retry(do, noted, *args, **kw)

    def __deepcopy__(self, memo):
        # Each connection gets its own copy of the retry; the ledger it notes to stays shared.
        import copy

        twin = copy.copy(self)
        twin._backoff = copy.deepcopy(self._backoff, memo)
        return twin


@dataclass
class AuditResult:
    ok: bool
    checked: int
    problems: list[str]
    uncertain_keys: int
    errors: list[str]
    ops: int

    def summary(self) -> str:
        verdict = "every acknowledged write is present" if self.ok else f"{len(self.problems)} problem(s)"
        return (f"{self.ops} acknowledged operations, {self.checked} keys audited: {verdict}; "
                f"{len(self.errors)} client error(s), {self.uncertain_keys} key(s) with an unknown outcome")


class Workload:
    """Run ``clients`` threads against ``url`` until ``stop()``; then ``audit`` a server."""

    def __init__(self, url: str, clients: int = 4, prefix: str = "ledger:", rate: float | None = 200.0,
                 seed: int = 0, protocol: int = 2, password: str | None = None) -> None:
        self.url, self.prefix, self.rate, self.protocol = url, prefix, rate, protocol
        self.password = password  # overrides the URL's, so that it need not sit in a command line
        self.ledgers = [ClientLedger() for _ in range(clients)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i, seed + i), daemon=True, name=f"ledger-{i}")
                         for i in range(clients)]

    # --- running ---------------------------------------------------------------------------
    def start(self) -> "Workload":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def __enter__(self) -> "Workload":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def ops(self) -> int:
        return sum(led.ops for led in self.ledgers)

    @property
    def errors(self) -> list[str]:
        return [e for led in self.ledgers for e in led.errors]

    def _run(self, i: int, seed: int) -> None:
        rng = random.Random(seed)
        led = self.ledgers[i]
        # Like a well-configured application: reconnect (with backoff) when a connection is
        # refused or closed — e.g. while a shim restarts — but never re-send a command whose
        # reply timed out, since it may have been applied.
        c = redis.Redis.from_url(self.url, socket_timeout=30, protocol=self.protocol, decode_responses=True,
                                 **({"password": self.password} if self.password else {}),
                                 retry=_NotingRetry(led, ExponentialBackoff(cap=0.25, base=0.01), 40),
                                 retry_on_error=[redis.exceptions.ConnectionError])
        n = 0
        interval = 1.0 / self.rate if self.rate else 0.0
        try:
            while not self._stop.is_set():
                n += 1
                op = rng.choice(_OPS)
                led.retried = False
                try:
                    op(self, c, led, i, n, rng)
                    led.ops += 1
                except redis.exceptions.RedisError as e:
                    led.errors.append(f"client {i} op {op.__name__}: {type(e).__name__}: {e}")
                if interval:
                    time.sleep(interval)
        finally:
            c.close()

    def k(self, i: int, *parts: Any) -> str:
        return self.prefix + f"c{i}:" + ":".join(str(p) for p in parts)

    # --- operations (each records only what the server acknowledged) ---------------------------
    def _incr(self, c, led, i, n, rng):
        key = f"{self.prefix}counter:{rng.randrange(COUNTERS)}"
        try:
            c.incr(key)
        except redis.exceptions.RedisError:
            led.uncertain_counters[key] += 1
            raise
        led.counters[key] += 1
        if led.retried:
            led.uncertain_counters[key] += 1

    def _rpush(self, c, led, i, n, rng):
        key = self.k(i, "list")
        uid = f"{i}-{n}"
        try:
            c.rpush(key, uid)
        except redis.exceptions.RedisError:
            led.uncertain.add(key)
            raise
        led.lists[key].append(uid)
        if led.retried:
            led.uncertain.add(key)

    def _hset(self, c, led, i, n, rng):
        key, fld = self.k(i, "hash"), f"f{rng.randrange(20)}"
        try:
            c.hset(key, fld, str(n))
        except redis.exceptions.RedisError:
            led.uncertain.add(key)
            raise
        led.hashes[key][fld] = str(n)
        if led.retried:
            led.uncertain.add(key)

    def _set_ex_then_expire_or_del(self, c, led, i, n, rng):
        key = self.k(i, "str", n)
        try:
            c.set(key, f"v{n}", ex=3600)
            if rng.random() < 0.3:
                c.delete(key)
                led.deleted.add(key)
                return
            c.expire(key, 7200)
        except redis.exceptions.RedisError:
            led.uncertain.add(key)
            raise
        led.strings[key] = f"v{n}"
        if led.retried:
            led.uncertain.add(key)

    def _sadd_spop(self, c, led, i, n, rng):
        key = self.k(i, "set")
        try:
            c.sadd(key, f"m{n}", f"m{n}b")
            led.sets[key].update((f"m{n}", f"m{n}b"))
            popped = c.spop(key)
        except redis.exceptions.RedisError:
            led.uncertain.add(key)
            raise
        if popped is not None:
            led.sets[key].discard(popped)
        if led.retried:
            led.uncertain.add(key)

    def _multi(self, c, led, i, n, rng):
        ctr, lst = self.k(i, "txcounter"), self.k(i, "txlist")
        pipe = c.pipeline(transaction=True)
        pipe.incr(ctr)
        pipe.rpush(lst, f"tx{n}")
        try:
            pipe.execute()
        except redis.exceptions.RedisError:
            led.uncertain.update((ctr, lst))
            raise
        led.counters[ctr] += 1
        led.lists[lst].append(f"tx{n}")
        if led.retried:
            led.uncertain.update((ctr, lst))

    # --- auditing --------------------------------------------------------------------------------
    def audit(self, client: redis.Redis) -> AuditResult:
        """Compare the ledger with what ``client``'s server holds now."""
        problems: list[str] = []
        checked = 0
        expected_counters: Counter = Counter()
        slack: Counter = Counter()
        uncertain: set[str] = set()
        for led in self.ledgers:
            expected_counters.update(led.counters)
            slack.update(led.uncertain_counters)
            uncertain |= led.uncertain
        for key, want in expected_counters.items():
            checked += 1
            got = int(client.get(key) or 0)
            if not (want <= got <= want + slack[key]):
                problems.append(f"{key}: counter is {got}, acknowledged increments sum to {want}"
                                + (f" (+{slack[key]} uncertain)" if slack[key] else ""))
        for led in self.ledgers:
            for key, ids in led.lists.items():
                checked += 1
                got = [_s(x) for x in client.lrange(key, 0, -1)]
                if key in uncertain:
                    missing = [x for x in ids if x not in set(got)]
                    if missing:
                        problems.append(f"{key}: {len(missing)} acknowledged id(s) missing, e.g. {missing[:3]}")
                elif got != ids:
                    problems.append(f"{key}: list differs from the acknowledged pushes ({len(got)} vs {len(ids)} items)")
            for key, fields in led.hashes.items():
                if key in uncertain:
                    continue
                checked += 1
                got = {_s(k): _s(v) for k, v in client.hgetall(key).items()}
                if got != fields:
                    problems.append(f"{key}: hash differs in {sum(got.get(f) != v for f, v in fields.items())} field(s)")
            for key, value in led.strings.items():
                if key in uncertain:
                    continue
                checked += 1
                got, ttl = client.get(key), client.ttl(key)
                if _s(got) != value:
                    problems.append(f"{key}: string is {_s(got)!r}, acknowledged {value!r}")
                elif not (0 < ttl <= 7200):
                    problems.append(f"{key}: TTL is {ttl}, expected an expiry within 7200s")
            for key in led.deleted - uncertain:
                checked += 1
                if client.exists(key):
                    problems.append(f"{key}: deleted (acknowledged) but present")
            for key, members in led.sets.items():
                if key in uncertain:
                    continue
                checked += 1
                got = {_s(m) for m in client.smembers(key)}
                if got != members:
                    problems.append(f"{key}: set has {len(got)} members, ledger expects {len(members)}")
        errors = self.errors
        return AuditResult(not problems, checked, problems, len(uncertain), errors, self.ops)


def _s(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


_OPS = [Workload._incr, Workload._incr, Workload._rpush, Workload._hset, Workload._set_ex_then_expire_or_del,
        Workload._sadd_spop, Workload._multi]


# --- ``python -m migrator.workload``: the ledger workload as a long-running application --------------
# The lab (docker-compose.yml, docs/lab.md) runs it as its sample application through the shim.


def _wait_reachable(client: redis.Redis, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.exceptions.AuthenticationError:
            raise
        except redis.exceptions.ConnectionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    """Run the ledger workload until SIGTERM or Ctrl-C, then audit every acknowledged write."""
    import os
    import secrets
    import signal
    import sys

    import click

    from migrator.redact import redact
    from migrator.errors import EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE

    @click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.option("--url", required=True, metavar="URL",
                  help="redis:// URL the clients write and read through (e.g. the shim's), without a password.")
    @click.option("--password-env", metavar="VAR", default=None,
                  help="Environment variable holding the password (kept out of the URL and the process list).")
    @click.option("--clients", type=click.IntRange(1, 256), default=4, show_default=True, help="Concurrent clients.")
    @click.option("--rate", type=click.FloatRange(0, min_open=True), default=50.0, show_default=True,
                  help="Operations per second, per client.")
    @click.option("--prefix", default=None, metavar="PREFIX",
                  help="Key prefix (default ledger:<random>: so that a restarted run never audits an older run's keys).")
    @click.option("--report-every", type=click.FloatRange(0.1), default=10.0, show_default=True,
                  help="Seconds between progress lines.")
    @click.option("--wait", type=click.FloatRange(0), default=60.0, show_default=True,
                  help="Seconds to wait for the server to answer before giving up (exit 3).")
    @click.option("--audit/--no-audit", default=True, show_default=True,
                  help="When stopped, check through --url that every acknowledged write is there (exit 1 if not).")
    def command(url: str, password_env: str | None, clients: int, rate: float, prefix: str | None,
                report_every: float, wait: float, audit: bool) -> None:
        """The ledger workload: concurrent clients whose every acknowledged write is recorded, then audited."""
        password = None
        if password_env:
            password = os.environ.get(password_env)
            if password is None:
                click.echo(f"--password-env: environment variable {password_env} is not set", err=True)
                sys.exit(EXIT_USAGE)
        probe = redis.Redis.from_url(url, socket_timeout=10, **({"password": password} if password else {}))
        try:
            _wait_reachable(probe, wait)
        except redis.exceptions.RedisError as e:
            click.echo(f"{redact(url)}: not reachable after {wait:g}s: {type(e).__name__}: {redact(str(e))}", err=True)
            sys.exit(EXIT_UNREACHABLE)
        prefix = prefix if prefix is not None else f"ledger:{secrets.token_hex(4)}:"
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        work = Workload(url, clients=clients, prefix=prefix, rate=rate, password=password)
        click.echo(f"workload: {clients} client(s) at {rate:g} op/s each on {redact(url)}, keys {prefix}*; "
                   "SIGTERM or Ctrl-C stops and audits", err=False)
        work.start()
        last_ops, last_t = 0, time.monotonic()
        while not stop.wait(report_every):
            ops, t = work.ops, time.monotonic()
            errors = work.errors
            line = f"workload: {ops} acknowledged operations ({(ops - last_ops) / (t - last_t):.0f}/s), {len(errors)} client error(s)"
            if errors:
                line += f"; last: {redact(errors[-1])}"
            click.echo(line)
            last_ops, last_t = ops, t
        work.stop()
        if not audit:
            click.echo(f"workload: stopped after {work.ops} acknowledged operations, {len(work.errors)} client error(s)")
            return
        result = work.audit(probe)
        click.echo(f"workload: audit through {redact(url)}: {result.summary()}")
        for line in result.problems[:20]:
            click.echo(f"  problem: {line}")
        for line in result.errors[:5]:
            click.echo(f"  client error: {redact(line)}")
        if not result.ok:
            sys.exit(EXIT_REFUSED)

    command.main(args=argv, prog_name="python -m migrator.workload")


if __name__ == "__main__":
    main()
