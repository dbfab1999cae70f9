"""``migrator check``: is the target's data the source's data?

1. Keys: ``--sample N`` draws about N/2 keys with RANDOMKEY from the source and N/2 from the
   target (so keys only on the target are found), per database in proportion to its size; a
   database no larger than its share is walked whole. ``--full`` SCANs the source, and the
   target for keys the source lacks.
2. Each batch is probed on both servers (type, PTTL, size, digest), and differing digests are
   confirmed by the exact type-aware comparison (``compare.difference``).
3. Rounds: differing keys are compared again after ``check.interval``, up to ``rounds`` times.
   A key equal in a later round was a transient difference (a mirrored write in flight); a key
   whose value changed on either side, or that expired, between rounds is "in flux". Only
   keys that differed, unchanged, in every round are mismatches.
4. ``repair`` re-copies mismatches from the authoritative side of the current phase and
   compares them again.
5. The verdict states its strength: k mismatches in n keys → the 95% upper bound of the
   mismatch rate (exact for a full walk, Clopper-Pearson for a sample).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis

from migrator import reports, sides
from migrator.connect import connect
from migrator.data import compare, render, stats, values
from migrator.data import dirty as dirtymod
from migrator.data import progress as progress_mod
from migrator.data.copy import Copier, detect_method
from migrator.data.failures import server_errors
from migrator.data.keyspace import (
    MAX_SOURCE_CHANGES,
    Selection,
    databases,
    keyspace_sizes,
    prefetch,
    scan_batches,
    server_run_id,
)
from migrator.data.throttle import RateLimiter
from migrator.errors import RefusedError, UnreachableError, UsageError
from migrator.logs import get_logger
from migrator.phases import Phase
from migrator.playbook import Playbook
from migrator.state import StateStore, iso, now, parse_iso

DEFAULT_CHUNK = 1000
CHUNK_BYTES = 1 << 20
BATCH = 1000
IN_FLIGHT = 2  # batches probed at once
RECHECK_AT = 50_000  # differing keys held before their rechecks run
SOURCE_IS_AUTHORITATIVE = (Phase.PLANNED, Phase.COMPATIBLE, Phase.MIRRORING, Phase.READS_ON_TARGET)
_EXISTS_LUA = "local o = {} for i, k in ipairs(KEYS) do o[i] = redis.call('EXISTS', k) end return o"


@dataclass
class Mismatch:
    db: int
    key: bytes
    kind: str
    detail: str
    source: values.KeyState
    target: values.KeyState
    source_value: str | None = None
    target_value: str | None = None
    repaired: bool = False
    slot: int | None = None  # a cluster side: the key's hash slot


@dataclass
class CheckResult:
    verdict: str
    summary: str
    mode: str
    exhaustive: bool
    checked: int
    mismatches: list[Mismatch]
    repaired: list[Mismatch]
    in_flux: int
    transient: int
    bound: float
    max_rate: float
    rounds: int
    counts: dict[int, dict[str, int]]
    ttl_deltas_ms: list[int]
    duration_s: float
    phase: str
    authoritative: str
    started_at: str
    report_id: str = ""
    shards: list[dict] = field(default_factory=list)  # a cluster side: per shard (``cluster_check``)
    recovered: str = ""  # slot ranges compared again because they moved during the check
    still_moving: str = ""  # slot ranges still moving when the check ended (not re-covered)

    @property
    def clean(self) -> bool:
        return not self.mismatches

    @property
    def keys_per_s(self) -> float:
        return self.checked / self.duration_s if self.duration_s > 0 else 0.0


@dataclass
class _Db:
    """Clients and probers of one database on both servers."""

    db: int
    src: redis.Redis
    dst: redis.Redis
    src_probe: values.Prober
    dst_probe: values.Prober


@dataclass
class _Run:
    pb: Playbook
    rounds: int
    interval: float
    ttl_tolerance_ms: int
    chunk: int
    limiter: RateLimiter
    pool: ThreadPoolExecutor
    checked: int = 0
    ttl_deltas: list[int] = field(default_factory=list)
    transient: int = 0
    in_flux: int = 0
    progress: progress_mod.Publisher | None = None  # for `migrator status --watch`
    # When one side replicates the other: wait until the replica has applied what its primary
    # had before a recheck, so replication lag never counts as a mismatch (``_lag_waiter``).
    catch_up: object = None
    lag_waits: int = 0
    lag_unmet: int = 0

    def open(self, db: int) -> _Db:
        src, dst = connect(self.pb.source, "source", db=db), connect(self.pb.target, "target", db=db)
        return _Db(db, src, dst, values.Prober(src, self.chunk, CHUNK_BYTES), values.Prober(dst, self.chunk, CHUNK_BYTES))


def _check_db_on_one_source(r: _Run, selection: Selection, plan, db: int, src0: redis.Redis) -> list[Mismatch]:
    """``_check_db``, walked again from the start if the source's primary changed meanwhile.

    A SCAN cursor means something on one server only: after a Sentinel failover (followed by the
    source's client) or a restart mid-walk, keys may have been skipped; a check must never
    under-check silently, so that database is walked again on the primary of now.
    """
    for _ in range(MAX_SOURCE_CHANGES + 1):
        before, checked, ttl_deltas = server_run_id(src0), r.checked, len(r.ttl_deltas)
        found = _check_db(r, r.open(db), _keys(r.open(db), selection, plan))
        after = server_run_id(src0)
        if before is None or before == after:
            return found
        r.checked = checked
        del r.ttl_deltas[ttl_deltas:]
        get_logger("migrator.check").warning("check.source_changed", db=db, old_run_id=before[:8],
                                             new_run_id=(after or "?")[:8], action="walking the database again")
    raise UnreachableError(f"the source {r.pb.source.display} changed primary {MAX_SOURCE_CHANGES + 1} times during "
                           f"the walk of db {db}; run migrator check again once it is stable")


def _both(r: _Run, d: _Db, keys: list[bytes]) -> tuple[list[values.KeyState], list[values.KeyState]]:
    """Probe both servers at once: each probe runs on its own connection, in parallel."""
    fs = r.pool.submit(d.src_probe.probe, keys)
    fd = r.pool.submit(d.dst_probe.probe, keys)
    return fs.result(), fd.result()


def run(playbook: Playbook, *, sample: int | None = None, full: bool = False, rounds: int | None = None,
        repair: bool = False, show_values: bool = False, rate: float | None = None, interval: float | None = None,
        chunk: int = DEFAULT_CHUNK) -> CheckResult:
    """Compare source and target (a sample or everything), recheck, optionally repair; write a report."""
    cfg = playbook.check
    started, t0 = iso(now()), time.monotonic()
    seen = sides.snapshot_json(playbook)  # which servers this check judges: a later restart voids it
    store = StateStore(playbook.state_path, playbook.name)
    state = store.load()
    phase = state.phase
    if repair:
        _refuse_repair_from_a_loss(playbook, store, state)
        _refuse_repair_of_a_replica(playbook, state)
    from migrator.compat import ownstats

    pub = progress_mod.Publisher(playbook.state_path, "check", "full" if full else "sample")
    pub.update(0, force=True)
    with _finished(pub), ThreadPoolExecutor(max_workers=2 * IN_FLIGHT) as pool, server_errors("check"), \
            ownstats.recording(playbook.state_path, connect(playbook.source, "source")):
        r = _Run(playbook, rounds or cfg.rounds, cfg.interval.total_seconds() if interval is None else interval,
                 int(cfg.ttl_tolerance.total_seconds() * 1000), chunk, RateLimiter(rate), pool, progress=pub)
        selection = Selection.from_config(playbook.sync)
        src0, dst0 = connect(playbook.source, "source"), connect(playbook.target, "target")
        clustered = _clustered(playbook)
        if any(clustered):
            return _run_cluster(r, playbook, selection, clustered, sample, full, repair, show_values, started, t0,
                                seen, phase)
        dbs = databases(selection, src0, dst0)
        r.catch_up = _lag_waiter(src0, dst0, max(5.0, r.interval * 10))
        src_sizes, dst_sizes = keyspace_sizes(src0), keyspace_sizes(dst0)
        counts = {db: {"source": src_sizes.get(db, 0), "target": dst_sizes.get(db, 0)} for db in dbs}
        n = sample or cfg.sample
        plan = _plan(dbs, src_sizes, dst_sizes, None if full else n)
        pub.update(0, sum(max(src_sizes.get(db, 0), dst_sizes.get(db, 0)) if plan[db] is None else sum(plan[db])
                          for db in dbs), force=True)
        mismatches: list[Mismatch] = []
        for db in dbs:
            mismatches += _check_db_on_one_source(r, selection, plan[db], db, src0)
        repaired = _repair(r, mismatches, phase) if repair and mismatches else []
        remaining = [m for m in mismatches if not m.repaired]
        if show_values:
            _attach_values(r, remaining + repaired)
    exhaustive = all(p is None for p in plan.values())
    if exhaustive:
        # The exact rate; a walk of an empty keyspace (both sides empty) found 0 of 0 differing:
        # consistent. (A target empty while the source is not is a walk of the source's keys,
        # each one missing on the target.)
        bound = len(remaining) / r.checked if r.checked else 0.0
    else:
        bound = stats.upper_bound(len(remaining), r.checked)
    result = CheckResult(
        verdict="", summary="", mode="full" if full else "sample", exhaustive=exhaustive, checked=r.checked,
        mismatches=remaining, repaired=repaired, in_flux=r.in_flux, transient=r.transient, bound=bound,
        max_rate=cfg.max_mismatch_rate, rounds=r.rounds, counts=counts, ttl_deltas_ms=r.ttl_deltas,
        duration_s=time.monotonic() - t0, phase=str(phase), authoritative=_authoritative(phase), started_at=started)
    result.verdict, result.summary = verdict(result)
    if exhaustive and not remaining and not r.in_flux:
        # Every key was seen equal on both sides (after any repair): the shim's dirty marks made
        # before this check began, on keys it walked, need no other repair. This is how the
        # source is repaired in writes-on-target, where `sync` (source -> target) is refused.
        dirtymod.clear_walked(playbook.state_path, parse_iso(started).timestamp(), _walked(selection, dbs, playbook),
                              selection)
    data = render.check_report_data(playbook, result)
    data["sides"] = seen
    ref = reports.write(playbook.state_path, data, render.check_markdown(data), render.check_html(data, playbook.state_path))
    result.report_id = ref.id
    return result


def _clustered(pb: Playbook) -> tuple[bool, bool]:
    from migrator.data import cluster_sync

    return (cluster_sync.is_cluster_endpoint(pb.source, "source"), cluster_sync.is_cluster_endpoint(pb.target, "target"))


def _run_cluster(r: _Run, pb: Playbook, selection: Selection, clustered: tuple[bool, bool], sample: int | None,
                 full: bool, repair: bool, show_values: bool, started: str, t0: float, seen, phase: Phase) -> CheckResult:
    """``run`` when either side is a cluster: per shard and slot range, both ways (``cluster_check``)."""
    from migrator.data import cluster_check
    from migrator.data.cluster_sync import Side

    if selection.databases not in (None, [0]):
        raise UsageError(f"a cluster has only database 0, but sync.databases is {selection.databases}")
    cfg = pb.check
    src, dst = Side(pb.source, "source", clustered[0]), Side(pb.target, "target", clustered[1])
    for side in (src, dst):
        other = [db for db in keyspace_sizes(side.single) if db != 0] if side.single is not None else []
        if other and selection.databases is None:
            src.close()
            dst.close()
            raise UsageError(f"the {'target' if side is src else 'source'} is a cluster (database 0 only) but the "
                               f"{side.role} has keys in databases {other}: set sync.databases: [0] to check database 0")
    try:
        src.refresh()
        dst.refresh()
        n = sample or cfg.sample
        total = max(cluster_check.side_keys(src), cluster_check.side_keys(dst))
        draw = None if full or total <= n else n
        if r.progress:
            r.progress.update(0, total if draw is None else draw, force=True)
        cc = cluster_check.run(sys.modules[__name__], r, selection, draw, src, dst)
        mismatches = cc.mismatches
        repaired = cluster_check.repair(sys.modules[__name__], r, mismatches, phase, src, dst) if repair and mismatches else []
        remaining = [m for m in mismatches if not m.repaired]
        if show_values:
            cluster_check.attach_values(remaining + repaired, src, dst)
    finally:
        src.close()
        dst.close()
    exhaustive = draw is None
    bound = (len(remaining) / r.checked if r.checked else 0.0) if exhaustive else stats.upper_bound(len(remaining), r.checked)
    result = CheckResult(
        verdict="", summary="", mode="full" if full else "sample", exhaustive=exhaustive, checked=r.checked,
        mismatches=remaining, repaired=repaired, in_flux=r.in_flux, transient=r.transient, bound=bound,
        max_rate=cfg.max_mismatch_rate, rounds=r.rounds, counts={0: {"source": cc.source_keys, "target": cc.target_keys}},
        ttl_deltas_ms=r.ttl_deltas, duration_s=time.monotonic() - t0, phase=str(phase),
        authoritative=_authoritative(phase), started_at=started,
        shards=[vars(row) for row in cc.shards], recovered=cc.recovered, still_moving=cc.still_moving)
    result.verdict, result.summary = verdict(result)
    if cc.recovered:
        result.summary += f"; slots {cc.recovered} moved during the check and were compared again"
    if cc.still_moving:
        result.summary += f"; slots {cc.still_moving} were still moving at the end (run the check again)"
        if result.verdict == "pass":
            result.verdict = "warn"
    if exhaustive and not remaining and not r.in_flux and not cc.still_moving:
        dirtymod.clear_walked(pb.state_path, parse_iso(started).timestamp(), [0], selection)
    data = render.check_report_data(pb, result)
    data["sides"] = seen
    ref = reports.write(pb.state_path, data, render.check_markdown(data), render.check_html(data, pb.state_path))
    result.report_id = ref.id
    return result


@contextlib.contextmanager
def _finished(pub: progress_mod.Publisher):
    """The progress file says how the check ended: compared every key, or failed/interrupted."""
    try:
        yield
    except BaseException as e:
        pub.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
    pub.update(pub.done, max(pub.total, pub.done), force=True)
    pub.finish("finished")


def _walked(selection: Selection, dbs: list[int], playbook: Playbook) -> list[int]:
    """The databases a complete walk covered. Without a playbook list it walked every database
    with keys on either side; any other was empty on both (so equal), and marks made there earlier
    (a key since deleted on both sides) are covered too."""
    if selection.databases is not None:
        return dbs
    marked = dirtymod.list_dirty(playbook.state_path)
    return sorted(set(dbs) | set(marked.keys) | marked.whole_dbs)


def verdict(res: CheckResult) -> tuple[str, str]:
    """pass: no mismatch and the bound is below the limit; warn: no mismatch, too few keys; fail."""
    k, n = len(res.mismatches), res.checked
    strength = (f"exact rate {stats.format_rate(res.bound)}" if res.exhaustive
                else f"95% bound {stats.format_rate(res.bound)}")
    rel = "<" if res.bound < res.max_rate else "≥"
    text = f"{k} mismatch{'es' if k != 1 else ''} in {n:,} keys ({strength} {rel} {stats.format_rate(res.max_rate)})"
    if res.in_flux:
        text += f"; {res.in_flux} in flux"
    if res.repaired:
        text += f"; {len(res.repaired)} repaired"
    if k:
        return "fail", text
    count_drift = [db for db, c in res.counts.items() if c["source"] != c["target"]]
    if res.bound >= res.max_rate or count_drift:
        if count_drift:
            text += f"; key counts differ in db {', '.join(map(str, count_drift))}"
        return "warn", text
    return "pass", text


def _authoritative(phase: Phase) -> str:
    return "source" if phase in SOURCE_IS_AUTHORITATIVE else "target"


# --- which keys ---------------------------------------------------------------------------------


def _plan(dbs: list[int], src_sizes: dict[int, int], dst_sizes: dict[int, int], n: int | None) -> dict[int, tuple | None]:
    """Per database: None to walk it whole, else (keys to draw from source, from target)."""
    if n is None:
        return {db: None for db in dbs}
    total_src = sum(src_sizes.get(db, 0) for db in dbs) or 1
    total_dst = sum(dst_sizes.get(db, 0) for db in dbs) or 1
    plan: dict[int, tuple | None] = {}
    for db in dbs:
        from_src = math.ceil(n / 2 * src_sizes.get(db, 0) / total_src)
        from_dst = math.ceil(n / 2 * dst_sizes.get(db, 0) / total_dst)
        small = max(src_sizes.get(db, 0), dst_sizes.get(db, 0)) <= from_src + from_dst
        plan[db] = None if small else (from_src, from_dst)
    return plan


def _keys(d: _Db, selection: Selection, plan: tuple | None) -> Iterator[list[bytes]]:
    if plan is None:
        yield from _walk(d, selection)
    else:
        yield from _draw(d, selection, *plan)


def _walk(d: _Db, selection: Selection) -> Iterator[list[bytes]]:
    """Every source key, then the target's keys that the source lacks."""
    for _cursor, keys in scan_batches(d.src, selection, 0, BATCH):
        if keys:
            yield keys
    exists = d.src.register_script(_EXISTS_LUA)
    for _cursor, keys in scan_batches(d.dst, selection, 0, BATCH):
        if keys:
            yield [k for k, e in zip(keys, _exists(d.src, exists, keys)) if not e]


def _exists(client: redis.Redis, script, keys: list[bytes]) -> list[int]:
    try:
        return [int(x) for x in script(keys=keys)]
    except redis.exceptions.ResponseError:
        p = client.pipeline(transaction=False)
        for k in keys:
            p.exists(k)
        return p.execute()


def _draw(d: _Db, selection: Selection, from_src: int, from_dst: int) -> Iterator[list[bytes]]:
    """Uniform draws (RANDOMKEY) from each side, deduplicated, in batches."""
    seen: set[bytes] = set()
    for client, want in ((d.src, from_src), (d.dst, from_dst)):
        for start in range(0, want, BATCH):
            p = client.pipeline(transaction=False)
            for _ in range(min(BATCH, want - start)):
                p.randomkey()
            keys = [k for k in p.execute() if k is not None and k not in seen and selection.wants(k)]
            seen.update(keys)
            if keys:
                yield keys


# --- comparing, rechecking ----------------------------------------------------------------------


def _check_db(r: _Run, d: _Db, batches) -> list[Mismatch]:
    """Compare every batch; probes of the next batches run while this one is classified, and
    differing keys wait for their rechecks together (one pause per round, not per batch)."""
    mismatches: list[Mismatch] = []
    differing: dict[bytes, tuple] = {}
    inflight: deque = deque()
    for keys in prefetch(batches):
        r.limiter.wait(len(keys))
        keys = list(dict.fromkeys(keys))
        inflight.append((keys, r.pool.submit(d.src_probe.probe, keys), r.pool.submit(d.dst_probe.probe, keys)))
        if len(inflight) >= IN_FLIGHT:
            _classify(r, d, *inflight.popleft(), differing)
        if len(differing) >= RECHECK_AT:
            mismatches += _recheck(r, d, differing)
            differing = {}
    while inflight:
        _classify(r, d, *inflight.popleft(), differing)
    return mismatches + _recheck(r, d, differing)


def _classify(r: _Run, d: _Db, keys: list[bytes], fs, fd, differing: dict[bytes, tuple]) -> None:
    s_states, d_states = fs.result(), fd.result()
    r.checked += len(keys)
    if r.progress:
        r.progress.update(r.checked)
    tol, deltas = r.ttl_tolerance_ms, r.ttl_deltas
    for k, s, t in zip(keys, s_states, d_states):
        expiring = s.pttl >= 0 and t.pttl >= 0
        if expiring and len(deltas) < 100_000:
            deltas.append(t.pttl - s.pttl)
        # The common case, decided here: same type and digest, same expiry (within tolerance).
        if s.digest and s.digest == t.digest and s.type == t.type and s.field_ttls == t.field_ttls is not None and (
                (s.pttl < 0 and t.pttl < 0) or (expiring and abs(t.pttl - s.pttl) <= tol)):
            continue
        diff = compare.difference(d.src, d.dst, k, s, t, tol, r.chunk, CHUNK_BYTES)
        if diff:
            differing[k] = (diff, s, t)


def _lag_waiter(src: redis.Redis, dst: redis.Redis, timeout: float):
    """A function waiting until the replica side has applied its primary's offset as read when it is
    called, if one side replicates the other (same replication history); None otherwise."""
    from migrator import replication

    try:
        s, t = replication.read(src), replication.read(dst)
    except redis.exceptions.ResponseError:  # INFO refused (a managed service): no replication to wait for
        return None
    if t.is_replica and t.master_replid == s.master_replid:
        return lambda: replication.wait_caught_up(src, dst, timeout)
    if s.is_replica and s.master_replid == t.master_replid:
        return lambda: replication.wait_caught_up(dst, src, timeout)
    return None


def _recheck(r: _Run, d: _Db, found: dict[bytes, tuple]) -> list[Mismatch]:
    # With replication, a differing key is compared again at least once, after the replica
    # caught up with the offset its primary had when the first comparison was over.
    for _round in range(1, max(r.rounds, 2 if r.catch_up and found else 1)):
        if not found:
            break
        time.sleep(r.interval)
        if r.catch_up:
            r.lag_waits += 1
            if not r.catch_up():
                r.lag_unmet += 1
        keys = list(found)
        s_states, d_states = _both(r, d, keys)
        still: dict[bytes, tuple] = {}
        for k, s, t in zip(keys, s_states, d_states):
            _old, s0, t0 = found[k]
            diff = compare.difference(d.src, d.dst, k, s, t, r.ttl_tolerance_ms, r.chunk, CHUNK_BYTES)
            if diff is None:
                r.transient += 1  # converged: the difference was a write in flight
            elif s.fingerprint != s0.fingerprint or t.fingerprint != t0.fingerprint:
                r.in_flux += 1  # still being written: no verdict on this key now
            else:
                still[k] = (diff, s, t)
        found = still
    return [Mismatch(d.db, k, diff.kind, diff.detail, s, t) for k, (diff, s, t) in found.items()]


def _refuse_repair_of_a_replica(pb: Playbook, state) -> None:
    """In the replication strategy the target is a read-only replica of the source: nothing may copy onto it."""
    from migrator import replication

    if replication.strategy_of(state) == "replication" and state.phase in (Phase.MIRRORING, Phase.READS_ON_TARGET):
        raise RefusedError(
            "the target replicates the source (mirror strategy replication): it cannot be written, and a key that "
            "still differs once replication lag is waited out means the replica diverged; run the check without "
            f"--repair, then re-copy everything by rolling back to compatible and advancing again (`migrator rollback "
            f"-p {pb.path}` until compatible, then `migrator advance`, with mirror.replication.replace_target_data)")


def _refuse_repair_from_a_loss(pb: Playbook, store: StateStore, state) -> None:
    """A repair copies from the authoritative side: never from one that lost data (restarted empty)."""
    from migrator import gates

    ctx = gates.make_context(pb, store, state, read_only=True)
    lost = gates.authority_lost(ctx)
    if lost:
        auth = _authoritative(state.phase)
        raise RefusedError(
            f"check --repair refused: the {auth}, which a repair copies from, may have lost data ({lost}); repairing "
            f"would copy that loss onto the other side. {gates.repair_advice(ctx)}")


def _repair(r: _Run, mismatches: list[Mismatch], phase: Phase) -> list[Mismatch]:
    """Copy each mismatch from the authoritative side, then compare it again; returns those fixed."""
    forward = _authoritative(phase) == "source"
    fixed: list[Mismatch] = []
    by_db: dict[int, list[Mismatch]] = {}
    for m in mismatches:
        by_db.setdefault(m.db, []).append(m)
    for db, ms in by_db.items():
        d = r.open(db)
        auth, other = (d.src, d.dst) if forward else (d.dst, d.src)
        method, _why = detect_method(auth, other, reports.latest(r.pb.state_path, "compat"), rollback=not forward)
        keys = [m.key for m in ms]
        Copier(auth, other, method, chunk=r.chunk, chunk_bytes=CHUNK_BYTES).copy(keys)
        s_states, d_states = _both(r, d, keys)
        for m, s, t in zip(ms, s_states, d_states):
            if compare.difference(d.src, d.dst, m.key, s, t, r.ttl_tolerance_ms, r.chunk, CHUNK_BYTES) is None:
                m.repaired = True
                fixed.append(m)
    return fixed


def _attach_values(r: _Run, ms: list[Mismatch]) -> None:
    opened: dict[int, _Db] = {}
    for m in ms:
        d = opened.get(m.db) or opened.setdefault(m.db, r.open(m.db))
        m.source_value = values.value_preview(d.src, m.key, m.source.type)
        m.target_value = values.value_preview(d.dst, m.key, m.target.type)
