"""``migrator sync``: copy every key of every selected database, resumably, verifying each batch.

Per database: SCAN from the checkpoint's cursor, a thread ahead; each SCAN step reads its keys
in the same Lua call on the source (OBJECT ENCODING, PTTL, DUMP; ``Copier.scan_read``), or,
where that cannot be used, each batch is read when it is copied; batches are written to the
target (pipelined RESTOREs, or type-aware) several at once; each copied batch is verified once
the mirror has settled (``verify``); the checkpoint is saved about once a second. Then keys left unsettled
(by this or an earlier run) are tried again, and a report of kind ``sync`` is written.

Correctness relies on the shim mirroring writes from before the sync starts: a key created
after SCAN passed its slot is on the target through the mirror alone.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import redis
from filelock import FileLock, Timeout

from migrator import reports, sides
from migrator.connect import connect
from migrator.data import checkpoint as cpmod
from migrator.data import dirty as dirtymod
from migrator.data import progress as progress_mod
from migrator.data import watch as watchmod
from migrator.data.copy import DUMP, Copier, CopyResult, detect_method
from migrator.data.failures import server_errors
from migrator.data.functions import copy_functions
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
from migrator.data.verify import Verifier
from migrator.data.watch import WriteWatch
from migrator.errors import LockedError, RefusedError, UnreachableError
from migrator.logs import get_logger
from migrator.phases import Phase
from migrator.playbook import Playbook
from migrator.state import StateStore, iso, now, parse_iso

CHECKPOINT_EVERY_S = 1.0
COPY_WORKERS = 3
DEFAULT_CHUNK = 1000
DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass
class SyncProgress:
    db: int
    keys: int
    bytes: int
    total_keys: int
    elapsed_s: float

    @property
    def keys_per_s(self) -> float:
        return self.keys / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.keys_per_s
        return max(0.0, (self.total_keys - self.keys) / rate) if rate > 0 and self.total_keys >= self.keys else None


@dataclass
class SyncResult:
    complete: bool
    mode: str  # "full" or "dirty"
    method: str
    method_reason: str
    pass_started_at: str
    finished_at: str
    resumed: bool
    keys: int = 0
    bytes: int = 0
    deleted: int = 0
    big: int = 0
    verified: int = 0
    recopied: int = 0
    equal: int = 0  # dirty keys found already equal on both sides, so not copied (``--dirty`` only)
    duration_s: float = 0.0
    # A full pass may take several runs (Ctrl-C, then resume): ``keys``/``bytes`` count the whole
    # pass, these this run alone (the rate is this run's).
    runs: int = 1
    run_keys: int = 0
    run_bytes: int = 0
    source_keys: int = 0  # keys the selected databases of the source held when this run began
    functions: str = ""
    dbs: dict[int, dict] = field(default_factory=dict)
    unsettled: list[tuple[int, str]] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    report_id: str = ""
    sides: dict = field(default_factory=dict)  # both servers as the pass began (``migrator.sides``)
    restarted: str = ""  # why an interrupted pass was started over instead of resumed
    shards: list[dict] = field(default_factory=list)  # a cluster source: per shard (``cluster_sync``)
    replanned: list[str] = field(default_factory=list)  # a cluster source: why rounds were re-planned

    @property
    def keys_per_s(self) -> float:
        return self.run_keys / self.duration_s if self.duration_s > 0 else 0.0


ProgressFn = Callable[[SyncProgress], None]


class _Run:
    """One invocation: connections, checkpoint, counters."""

    def __init__(self, pb: Playbook, rate: float | None, batch: int | None, progress: ProgressFn | None,
                 chunk: int, settle: float | None) -> None:
        self.pb = pb
        self.selection = Selection.from_config(pb.sync)
        self.batch = batch or pb.sync.batch
        self.limiter = RateLimiter(rate if rate is not None else pb.sync.rate)
        self.progress = progress
        self.chunk = chunk
        self.settle = pb.shim.shadow_timeout.total_seconds() if settle is None else settle
        self.ttl_tolerance_ms = int(pb.check.ttl_tolerance.total_seconds() * 1000)
        self.t0 = time.monotonic()
        self.total = CopyResult()
        self.verified = self.recopied = self.equal = 0
        self.total_keys = 0
        self.done_before = 0  # keys an earlier run of this pass copied (a resumed sync)
        self.unsettled: list[tuple[int, str]] = []
        self.keyspace_events = True  # may turn on the source's keyspace events to watch writes
        self.errors: list[tuple[int, str, str]] = []
        self.clustered = (False, False)  # (source, target) run with cluster mode on

    def result(self, *args) -> SyncResult:
        """``_result`` for this run (for ``cluster_sync``, which does not import this module)."""
        return _result(self, *args)

    def clients(self, db: int) -> tuple[redis.Redis, redis.Redis]:
        return connect(self.pb.source, "source", db=db), connect(self.pb.target, "target", db=db)

    def tick(self, db: int) -> None:
        if self.progress:
            self.progress(SyncProgress(db, self.done_before + self.total.copied + self.total.deleted, self.total.bytes,
                                       self.total_keys, time.monotonic() - self.t0))

    def absorb(self, db: int, verifier: Verifier, copy_errors: dict[bytes, str]) -> None:
        self.verified += verifier.stats.verified
        self.recopied += verifier.stats.recopied
        self.unsettled += [(db, cpmod.encode_key(k)) for k in verifier.stats.unsettled]
        self.errors += [(db, cpmod.encode_key(k), e) for k, e in copy_errors.items()]

    def copier(self, src, dst, method: str, sign: bool = True, undeclared: tuple[bool, bool] = (False, False)) -> Copier:
        return Copier(src, dst, method, chunk=self.chunk, chunk_bytes=DEFAULT_CHUNK_BYTES, sign=sign,
                      undeclared=undeclared)

    def verifier(self, src, dst, copier: Copier, watch: WriteWatch | None = None) -> Verifier:
        return Verifier(src, dst, copier, settle=self.settle, ttl_tolerance_ms=self.ttl_tolerance_ms, watch=watch)

    def open_pass(self, saved: cpmod.Checkpoint | None, resumable: bool,
                  fresh: cpmod.Checkpoint) -> tuple[cpmod.Checkpoint, bool, str]:
        """The checkpoint this run goes on with: ``saved`` when ``resumable`` and no side restarted
        since it began, else ``fresh``; with whether it resumed and why it started over.

        Keys the interrupted pass copied are gone if the target restarted since: resuming would
        skip them and call the sync complete. The pass starts over instead.
        """
        resumed, start_over = resumable, ""
        seen = sides.snapshot_json(self.pb)
        if resumed and saved is not None and saved.sides:
            why = sides.restarted_since(sides.recorded({"sides": seen}), saved.started_at,
                                        sides.recorded({"sides": saved.sides}))
            if why:
                resumed, start_over = False, f"the interrupted pass was started over: {'; '.join(why)}"
        cp = saved if resumed and saved is not None else fresh
        if not cp.sides:
            cp.sides = seen
        cp.runs += 1
        return cp, resumed, start_over

    def copy_batch(self, copier: Copier, verifier: Verifier, seq: int, part: list[bytes], compare_first: bool,
                   errors: dict[bytes, str], check: Callable[[dict[bytes, str]], None] | None = None) -> bool:
        """Copy one batch (only the keys that differ now with ``compare_first``) and hand it to the
        verifier as batch ``seq``; ``check`` sees the copy's per-key errors first (and may raise).
        False when nothing needed copying."""
        self.limiter.wait(len(part))
        if compare_first:
            differ = verifier.differing(part)
            self.equal += len(part) - len(differ)
            part = [k for k in part if k in differ]
            if not part:
                return False
        marked_at = time.monotonic()
        res = copier.copy(part)
        if check is not None:
            check(res.errors)
        errors.update(res.errors)
        self.total.add(res)
        verifier.add(seq, part, time.monotonic(), res, marked_at)
        return True

    def watch(self, src: redis.Redis, db: int, cp: cpmod.Checkpoint) -> WriteWatch | None:
        """A WriteWatch on the source when keyspace events may be (and can be) turned on there."""
        if not self.keyspace_events:
            return None
        if cp.notify_before is None:
            cp.notify_before = watchmod.enable(src)
            if cp.notify_before is None:
                return None
            cpmod.save(self.pb.state_path, cp)  # so a killed run's successor can restore the setting
        else:
            watchmod.enable(src)
        try:
            return WriteWatch(src, db)
        except redis.exceptions.RedisError:
            return None


def replicated(playbook: Playbook) -> bool:
    """Whether the target replicates the source now (the replication strategy, mirroring or reads-on-target)."""
    from migrator import replication

    state = StateStore(playbook.state_path, playbook.name).load()
    return (replication.strategy_of(state) == "replication"
            and state.phase in (Phase.MIRRORING, Phase.READS_ON_TARGET))


def run(playbook: Playbook, *, restart: bool = False, dirty: bool = False, rate: float | None = None,
        batch: int | None = None, progress: ProgressFn | None = None, chunk: int = DEFAULT_CHUNK,
        settle: float | None = None, keyspace_events: bool = True) -> SyncResult:
    """Copy the selected keyspace (or, with ``dirty``, the shim's dirty keys) and write a report.

    Refused once the target is authoritative (writes-on-target, completed): a copy source →
    target would overwrite writes only the target has.
    """
    state_dir = playbook.state_path
    phase = StateStore(state_dir, playbook.name).load().phase
    if replicated(playbook):
        raise RefusedError("the target replicates the source (mirror strategy replication): its copy is the server's "
                           f"own full sync, nothing to copy; `migrator sync -p {playbook.path}` reports it "
                           "(migrator.data.replica.watch)")
    if phase in (Phase.WRITES_ON_TARGET, Phase.COMPLETED):
        raise RefusedError(
            f"the migration is {phase}: the target is authoritative and a sync (source → target) would overwrite "
            "its writes with the source's older values. Dirty keys now mean the source missed writes: repair them "
            f"with `migrator check --full --repair -p {playbook.path}` (it copies from the target)")
    lock = FileLock(str(Path(state_dir) / cpmod.SYNC_DIR / "lock"), timeout=0)
    (Path(state_dir) / cpmod.SYNC_DIR).mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(f"another migrator sync is running on {state_dir}; wait for it to finish") from None
    # For `migrator status --watch`: keys done of the expected total, rate and ETA (``progress``).
    pub = progress_mod.Publisher(state_dir, cpmod.SYNC_DIR, "dirty" if dirty else "full")
    outcome = "failed"

    def publish(p: SyncProgress) -> None:
        pub.update(p.keys, p.total_keys)
        if progress:
            progress(p)

    try:
        pub.update(0, force=True)
        r = _Run(playbook, rate, batch, publish, chunk, settle)
        r.keyspace_events = keyspace_events
        from migrator.compat import ownstats
        from migrator.data import cluster_sync

        with server_errors("sync"), ownstats.recording(state_dir, connect(playbook.source, "source")):
            r.clustered = (cluster_sync.is_cluster_endpoint(playbook.source, "source"),
                           cluster_sync.is_cluster_endpoint(playbook.target, "target"))
            if dirty:
                result = _run_dirty(r)
            elif r.clustered[0]:
                result = cluster_sync.run_full(r, restart, pub.set_shards)
            elif r.clustered[1]:
                result = cluster_sync.run_full_to_cluster(r, restart)
            else:
                result = _run_full(r, restart)
        result.report_id = _write_report(playbook, result)
        pub.update(result.keys, max(pub.total, result.keys), force=True)
        outcome = "complete" if result.complete else "incomplete"
        return result
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    finally:
        pub.finish(outcome)
        lock.release()


def _method(r: _Run, cp: cpmod.Checkpoint, dbs: list[int]) -> tuple[str, str]:
    if cp.method:
        return cp.method, cp.method_reason
    sizes = keyspace_sizes(connect(r.pb.source, "source"))
    db = next((d for d in dbs if sizes.get(d)), dbs[0] if dbs else 0)
    src, dst = r.clients(db)
    return detect_method(src, dst, reports.latest(r.pb.state_path, "compat"))


def _run_full(r: _Run, restart: bool) -> SyncResult:
    state_dir = r.pb.state_path
    src0, dst0 = r.clients(0)
    saved = cpmod.load(state_dir)
    # A killed run may have left the source's keyspace events on: keep what to restore.
    cp, resumed, start_over = r.open_pass(saved, not restart and saved is not None and not saved.finished,
                                          cpmod.Checkpoint(notify_before=saved.notify_before if saved else None))
    dbs = databases(r.selection, src0)
    cp.method, cp.method_reason = _method(r, cp, dbs)
    sizes = keyspace_sizes(src0)
    r.total_keys = sum(sizes.get(d, 0) for d in dbs)
    r.done_before = sum(cp.db(d).keys for d in dbs)
    functions = _copy_functions(src0, dst0)
    cpmod.save(state_dir, cp)
    try:
        for db in dbs:
            if not cp.db(db).done:
                _sync_db_on_one_source(r, cp, db, src0)
        _retry_unsettled(r, cp)
        _repair_marked(r, cp, dbs)
    finally:
        if cp.notify_before is not None:
            watchmod.restore(src0, cp.notify_before)
            cp.notify_before = None
            cpmod.save(state_dir, cp)
    complete = all(cp.db(d).done for d in dbs) and not r.unsettled and not r.errors
    # A key that failed to copy is retried like an unsettled one when the pass resumes: otherwise
    # a second run would skip it and call the pass complete.
    cp.unsettled = list(dict.fromkeys(list(r.unsettled) + [(db, k) for db, k, _e in r.errors if k]))
    cp.completed_at = iso(now()) if complete else None
    cpmod.save(state_dir, cp)
    if complete:
        dirtymod.clear_walked(r.pb.state_path, parse_iso(cp.started_at).timestamp(), dbs, r.selection)
    res = _result(r, "full", cp.method, cp.method_reason, cp.started_at, resumed, complete, functions,
                  {d: {"keys": cp.db(d).keys, "bytes": cp.db(d).bytes, "done": cp.db(d).done} for d in dbs})
    res.sides, res.restarted = cp.sides, start_over
    # The whole pass, earlier runs included: what the report and the sync_complete gate describe.
    res.keys, res.bytes, res.runs = sum(cp.db(d).keys for d in dbs), sum(cp.db(d).bytes for d in dbs), cp.runs
    return res


def _copy_functions(src: redis.Redis, dst: redis.Redis) -> str:
    try:
        n, how = copy_functions(src, dst)
    except redis.exceptions.ResponseError as e:
        return f"function libraries NOT copied: {e}"
    return f"{n} function librar{'y' if n == 1 else 'ies'} copied ({how})" if n else how


def _repair_marked(r: _Run, cp: cpmod.Checkpoint, dbs: list[int]) -> None:
    """Compare and copy the keys marked dirty, as ``sync --dirty`` does, before the pass clears their marks.

    A walk of the source never meets a key the source does not have: a write only the target
    applied (the source refused it, e.g. ``NOREPLICAS`` while a Sentinel failover left its
    primary without a replica) would keep its key on the target once the complete pass cleared
    the mark. Copying from the source deletes it there.
    """
    dirty = dirtymod.list_dirty(r.pb.state_path)
    for db, keys in sorted(dirty.keys.items()):
        wanted = sorted(k for k in keys if r.selection.wants(k))
        if db in dbs and wanted:
            _copy_and_verify(r, db, wanted, cp.method, compare_first=True)


def _sync_db_on_one_source(r: _Run, cp: cpmod.Checkpoint, db: int, src0: redis.Redis) -> None:
    """``_sync_db``, scanning the database again from the start if the source changed meanwhile.

    A SCAN cursor means something on one server only: when the source's primary changed during
    the scan (a Sentinel failover, followed by the source's client; or a restart), keys may have
    been skipped, so the database is scanned again (with a fresh keyspace watch on the server
    that is the primary now).
    """
    for _ in range(MAX_SOURCE_CHANGES + 1):
        before = server_run_id(src0)
        _sync_db(r, cp, db)
        after = server_run_id(src0)
        if before is None or before == after:
            return
        prog = cp.db(db)
        prog.cursor, prog.done, prog.keys, prog.bytes = 0, False, 0, 0
        cpmod.save(r.pb.state_path, cp)
        get_logger("migrator.sync").warning("sync.source_changed", db=db, old_run_id=before[:8],
                                            new_run_id=(after or "?")[:8],
                                            action="scanning the database again from the start")
    raise UnreachableError(f"the source {r.pb.source.display} changed primary {MAX_SOURCE_CHANGES + 1} times during "
                           f"the scan of db {db}; run migrator sync again once it is stable (it resumes)")


def _sync_db(r: _Run, cp: cpmod.Checkpoint, db: int) -> None:
    src, dst = r.clients(db)
    watch = r.watch(src, db, cp)
    copier = r.copier(src, dst, cp.method, sign=watch is None)
    verifier = r.verifier(src, dst, copier, watch)
    prog = cp.db(db)
    cursors = {-1: prog.cursor}  # seq → cursor to resume from once that batch is verified
    # seq → keys and bytes this run copied up to that batch: the checkpoint's counts go with its
    # cursor, so a resumed run, which re-copies from the cursor, does not count a batch twice.
    base_keys, base_bytes = prog.keys, prog.bytes
    copied = {-1: (0, 0)}
    run_keys = run_bytes = 0
    last_save = time.monotonic()
    errors: dict[bytes, str] = {}
    inflight: deque = deque()  # (seq, keys, marked_at, future) of batches being copied, in scan order

    def finish() -> None:
        nonlocal run_keys, run_bytes
        seq, keys, marked_at, future = inflight.popleft()
        res = future.result()
        errors.update(res.errors)
        r.total.add(res)
        run_keys += res.copied + res.deleted
        run_bytes += res.bytes
        copied[seq] = (run_keys, run_bytes)
        verifier.add(seq, keys, time.monotonic(), res, marked_at)

    read_marks: deque = deque()  # marked_at of batches read ahead (scan_read) and not yet taken

    # Several batches are copied at once: each waits on the network and on one server most of
    # the time, so overlapping them keeps both servers busy.
    with ThreadPoolExecutor(max_workers=COPY_WORKERS) as pool:
        batches = prefetch(_batches(r, src, copier, prog.cursor, read_marks))
        for seq, (cursor_after, keys, marked_at, flat) in enumerate(batches):
            cursors[seq] = cursor_after
            if flat is None:
                r.limiter.wait(len(keys))
                marked_at = time.monotonic()  # before the read: a write racing it must count
                future = pool.submit(copier.copy, keys)
            else:  # read already, as the SCAN step
                read_marks.popleft()
                future = pool.submit(copier.write_flat, keys, flat)
            inflight.append((seq, keys, marked_at, future))
            while inflight and (len(inflight) > COPY_WORKERS or inflight[0][3].done()):
                finish()
            # The oldest batch read but not verified yet: its window needs the watch's events.
            verifier.poll(inflight[0][2] if inflight else (read_marks[0] if read_marks else None))
            r.tick(db)
            if time.monotonic() - last_save >= CHECKPOINT_EVERY_S:
                done_upto = inflight[0][0] - 1 if inflight else seq
                upto = min(verifier.safe_seq, done_upto)
                prog.cursor = cursors[upto]
                prog.keys, prog.bytes = base_keys + copied[upto][0], base_bytes + copied[upto][1]
                cp.method = copier.method
                cpmod.save(r.pb.state_path, cp)
                last_save = time.monotonic()
        while inflight:
            finish()
    verifier.drain()
    verifier.close()
    if watch:
        watch.stop()
    prog.cursor, prog.done = 0, True
    prog.keys, prog.bytes = base_keys + run_keys, base_bytes + run_bytes
    cp.method = copier.method
    r.absorb(db, verifier, errors)
    cpmod.save(r.pb.state_path, cp)


def _batches(r: _Run, src: redis.Redis, copier: Copier, cursor: int, read_marks: deque):
    """``(cursor_after, keys, marked_at, flat)`` per SCAN step from ``cursor``, run a thread ahead.

    While the copy is by DUMP with scripting allowed and the selection is at most one MATCH
    pattern, each step is ``scan_read`` (SCAN and the read in one call on the source), with the
    time taken before it (``marked_at``, also appended to ``read_marks`` until the batch is
    taken). Otherwise plain SCAN steps, ``marked_at`` and ``flat`` None: the batch is read when
    it is copied.
    """
    sel = r.selection
    simple = (sel.include == ["*"] or sel.scan_match is not None) and not sel.exclude
    started = False
    while simple and (not started or cursor != 0) and copier.method == DUMP and copier.lua:
        marked_at = time.monotonic()  # before the read: a write racing it must count
        read_marks.append(marked_at)
        try:
            cursor_after, keys, flat = copier.scan_read(cursor, r.batch, sel.scan_match)
        except redis.exceptions.ResponseError:
            read_marks.pop()
            if started:
                raise
            break  # no scripting, or no SCAN in scripts: SCAN steps, each batch read when copied
        started = True
        cursor = cursor_after
        r.limiter.wait(len(keys))  # the next step waits for this one's keys
        yield cursor_after, keys, marked_at, flat
    if started and cursor == 0:
        return
    for cursor_after, keys in scan_batches(src, sel, cursor, r.batch):
        yield cursor_after, keys, None, None


def _copy_and_verify(r: _Run, db: int, keys: list[bytes], method: str, compare_first: bool = False) -> Verifier:
    """Copy ``keys``, then verify and re-copy them until they settle.

    ``compare_first``: copy only the keys that differ now. A repair rewrites a key on the target
    while writes continue, and until its verification re-copies the key the copy may have
    raced one (every write to it diverges meanwhile); a key already equal needs neither the
    write nor that window. Equal at one moment is enough: a write in flight then reaches both
    sides through the shim, or is marked dirty again if it does not.
    """
    src, dst = r.clients(db)
    copier = r.copier(src, dst, method)
    verifier = r.verifier(src, dst, copier)
    errors: dict[bytes, str] = {}
    for i in range(0, len(keys), r.batch):
        if not r.copy_batch(copier, verifier, i, keys[i:i + r.batch], compare_first, errors):
            continue
        verifier.poll()
        r.tick(db)
    verifier.drain()
    verifier.close()
    r.absorb(db, verifier, errors)
    return verifier


def _retry_unsettled(r: _Run, cp: cpmod.Checkpoint) -> None:
    """Keys left unsettled (by this or an earlier run) get one more copy-and-verify."""
    pending = list(dict.fromkeys(cp.unsettled + r.unsettled))
    r.unsettled = []
    by_db: dict[int, list[bytes]] = {}
    for db, key in pending:
        by_db.setdefault(db, []).append(cpmod.decode_key(key))
    for db, keys in by_db.items():
        _copy_and_verify(r, db, keys, cp.method)


def _run_dirty(r: _Run) -> SyncResult:
    started = iso(now())
    seen = sides.snapshot_json(r.pb)
    dirty = dirtymod.list_dirty(r.pb.state_path)
    cp = cpmod.load(r.pb.state_path)
    method = cp.method if cp and cp.method else ""
    reason = cp.method_reason if cp and cp.method else ""
    r.total_keys = dirty.count
    if any(r.clustered):  # keys routed by slot on each side (a cluster has database 0 only)
        from migrator.data import cluster_sync

        keys = sorted(k for ks in dirty.keys.values() for k in ks)
        if keys:
            method, reason = cluster_sync.copy_and_verify_routed(r, keys, method, compare_first=True)
        dirty_keys: dict[int, set] = {}
    else:
        dirty_keys = dirty.keys
    for db, keys in sorted(dirty_keys.items()):
        if not method:
            src, dst = r.clients(db)
            method, reason = detect_method(src, dst, reports.latest(r.pb.state_path, "compat"))
        _copy_and_verify(r, db, sorted(keys), method, compare_first=True)
    still = {(db, cpmod.decode_key(k)) for db, k in r.unsettled} | {(db, cpmod.decode_key(k)) for db, k, _e in r.errors}
    dirtymod.clear_repaired(r.pb.state_path, dirty, still)
    for db in sorted(dirty.whole_dbs):  # a lost FLUSHDB or the like: only a full sync repairs it
        r.errors.append((db, "", "a write without keys was not mirrored here: the whole database needs a full sync"))
    complete = not r.unsettled and not r.errors
    res = _result(r, "dirty", method, reason, started, False, complete, "not copied (dirty keys only)",
                  {db: {"keys": len(keys)} for db, keys in dirty.keys.items()})
    res.sides = seen
    return res


def _result(r: _Run, mode: str, method: str, reason: str, started: str, resumed: bool, complete: bool,
            functions: str, dbs: dict) -> SyncResult:
    return SyncResult(
        complete=complete, mode=mode, method=method, method_reason=reason, pass_started_at=started,
        finished_at=iso(now()), resumed=resumed, keys=r.total.copied + r.total.deleted, bytes=r.total.bytes,
        deleted=r.total.deleted, big=r.total.big, verified=r.verified, recopied=r.recopied, equal=r.equal,
        duration_s=time.monotonic() - r.t0, functions=functions, dbs=dbs, unsettled=r.unsettled, errors=r.errors,
        run_keys=r.total.copied + r.total.deleted, run_bytes=r.total.bytes, source_keys=r.total_keys)


def _write_report(pb: Playbook, res: SyncResult) -> str:
    from migrator.data import render

    phase = StateStore(pb.state_path, pb.name).load().phase
    data = render.sync_report_data(pb, res, str(phase))
    data["sides"] = res.sides
    if res.restarted:
        data["restarted"] = res.restarted
    ref = reports.write(pb.state_path, data, render.sync_markdown(data), render.sync_html(data))
    return ref.id
