"""``migrator sync`` on real servers: types, TTLs, big keys, methods, resume, concurrent writes, dirty keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from migrator import reports
from migrator.data import check, checkpoint, copy, dirty, sync, values
from migrator.data.keyspace import TMP_PREFIX
from migrator.data.verify import Verifier
from migrator.gates import make_context
from migrator.phases import Phase
from migrator.state import State, StateStore, iso, now
from tests.test_data_helpers import FAST, MirroringWriter, bulk, load, populate, wait_for


def _full_check(pb, **kw):
    return check.run(pb, full=True, interval=0.05, **kw)


def test_every_type_with_ttls_is_copied_and_checks_clean(pair, make_playbook):
    """Every data type (streams with groups and PELs, HyperLogLogs, empty strings) arrives equal, with absolute expiries."""
    src, dst = pair
    types = populate(src.client())
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb)
    assert res.complete and res.keys == len(types)
    assert src.client().config_get("notify-keyspace-events")["notify-keyspace-events"] == ""  # turned back off
    t = dst.client()
    for key, type_ in types.items():
        assert t.type(key).decode() == type_, key
    assert 590_000 < t.pttl("counter") <= 600_000
    assert t.ttl("str") == -1
    g1 = {g["name"]: g for g in t.xinfo_groups("stream")}[b"g1"]
    assert g1["pending"] == 2 and g1["last-delivered-id"] == b"2-1"
    assert t.xpending("stream", "g1")["consumers"] == [{"name": b"consumer-a", "pending": 2}]
    assert t.pfcount("hll") == 3
    res = _full_check(pb)
    assert res.clean and res.checked == len(types) and res.verdict == "pass", [(m.key, m.detail) for m in res.mismatches]


@pytest.mark.parametrize("source,target", [("valkey-9.1", "redis-6.2"), ("valkey-8.1", "redis-7.0")])
def test_copy_back_to_older_redis_is_type_aware(server_factory, make_playbook, source, target):
    """A target that rejects the source's DUMP format gets a type-aware copy that checks clean."""
    src, dst = server_factory(source), server_factory(target)
    types = populate(src.client())
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb)
    assert res.method == copy.STRUCT and "rejects" in res.method_reason
    assert res.complete, res
    assert dst.client().xinfo_groups("stream")[0]["pending"] == 2
    assert _full_check(pb).clean
    assert len(types) == dst.client().dbsize()


def test_compat_report_copy_method_is_used(server_factory, make_playbook):
    """The newest compatibility report's copy_method decides the method without probing."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    populate(src.client())
    pb = load(make_playbook(src, dst, **FAST))
    data = reports.common("compat", pb.name, "pass", "compatible", copy_method="struct")
    reports.write(pb.state_path, data, "# compat\n", "<p>compat</p>")
    res = sync.run(pb)
    assert res.method == "struct" and "compatibility report" in res.method_reason
    assert _full_check(pb).clean


def test_big_keys_are_copied_in_chunks_through_a_temporary_key(server_factory, make_playbook):
    """Keys larger than the chunk size (set, hash, zset, list, stream, string) are chunk-copied, renamed, and equal."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-8.1")
    s = src.client()
    s.sadd("bigset", *range(50_000))
    s.hset("bighash", mapping={f"f{i}": i for i in range(3000)})
    s.zadd("bigzset", {f"m{i}": i / 3 for i in range(3000)})
    s.rpush("biglist", *range(3000))
    for i in range(700):
        s.xadd("bigstream", {"i": i})
    s.set("bigstring", b"x" * (3 << 20))
    s.expire("bigset", 5000)
    dst.client().sadd("bigset", "stale-member")  # an old value must be replaced, not merged
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb, chunk=500)
    assert res.complete and res.big == 6
    t = dst.client()
    assert t.scard("bigset") == 50_000 and not t.sismember("bigset", "stale-member")
    assert 4990 < t.ttl("bigset") <= 5000
    assert not [k for k in t.keys() if k.startswith(TMP_PREFIX)]
    assert _full_check(pb, chunk=500).clean


@pytest.mark.parametrize("source,target,events", [("redis-7.0", "valkey-9.1", True), ("redis-7.0", "valkey-9.1", False),
                                                   ("valkey-9.1", "redis-7.0", True)])
def test_write_to_a_big_key_during_its_chunked_copy_is_repaired(server_factory, make_playbook, monkeypatch, source, target,
                                                                events):
    """A mirrored SREM of a member already copied into the temporary key is caught after the RENAME and re-copied."""
    src, dst = server_factory(source), server_factory(target)
    s, t = src.client(), dst.client()
    s.sadd("bigset", *range(20_000))
    pb = load(make_playbook(src, dst, **FAST))
    real_parts = copy._parts
    removed = []

    def racing_parts(src_client, snap, chunk, chunk_bytes, *field_ttls):
        for i, (command, args) in enumerate(real_parts(src_client, snap, chunk, chunk_bytes, *field_ttls)):
            yield command, args
            if i == 0 and not removed:
                removed.append(args[0])
                s.srem("bigset", args[0])  # the shim's order: source, then target
                t.srem("bigset", args[0])

    monkeypatch.setattr(copy, "_parts", racing_parts)
    res = sync.run(pb, chunk=500, keyspace_events=events)
    assert removed and res.complete and res.recopied == 1, res
    assert t.scard("bigset") == 19_999 and not t.sismember("bigset", removed[0])
    assert _full_check(pb, chunk=500).clean


def test_include_exclude_and_databases_limit_the_copy(server_factory, make_playbook):
    """Only keys matching include and not exclude, in the listed databases, are copied."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    for db in (0, 1, 2):
        c = src.client(db=db)
        c.set("user:1", db)
        c.set("user:tmp:1", db)
        c.set("order:1", db)
    pb = load(make_playbook(src, dst, sync={"include": ["user:*"], "exclude": ["user:tmp:*"], "databases": [0, 2]}, **FAST))
    assert sync.run(pb).complete
    assert dst.client(db=0).keys() == [b"user:1"]
    assert dst.client(db=1).dbsize() == 0
    assert dst.client(db=2).get("user:1") == b"2"


@pytest.mark.parametrize("source", ["redis-6.2", "redis-7.0", "valkey-9.1"])
def test_scan_steps_read_their_keys_in_the_same_call(server_factory, make_playbook, monkeypatch, source):
    """With no selection or one include pattern, each SCAN step reads its keys in the same script
    call (temporary keys left out); an exclude pattern takes plain SCAN steps. Both copy the same."""
    src, dst = server_factory(source), server_factory("valkey-9.1")
    s = src.client()
    bulk(s, 1200, prefix="user")
    bulk(s, 300, prefix="order")
    s.set(TMP_PREFIX + b"left-by-a-killed-run", "x")
    calls = []
    real = copy.Copier.scan_read
    monkeypatch.setattr(copy.Copier, "scan_read", lambda self, *a: calls.append(a) or real(self, *a))
    for selection, expected, scan_read in [({}, 1500, True), ({"include": ["user:*"]}, 1200, True),
                                           ({"include": ["user:*"], "exclude": ["user:1*"]}, 1200 - 311, False)]:
        dst.client().flushall()
        calls.clear()
        pb = load(make_playbook(src, dst, sync=selection, **FAST))
        res = sync.run(pb, batch=100, restart=True)
        assert res.complete and res.keys == expected and dst.client().dbsize() == expected, selection
        assert bool(calls) == scan_read and all(match == selection.get("include", [None])[0] for _c, _n, match in calls)
        assert not dst.client().exists(TMP_PREFIX + b"left-by-a-killed-run")
        assert _full_check(pb).clean


def test_a_source_without_scripting_is_copied_with_plain_commands(server_factory, make_playbook):
    """EVAL, EVALSHA and SCRIPT renamed away on the source: SCAN steps and pipelined reads copy it all."""
    src = server_factory("redis-7.0", conf_lines=['rename-command EVAL ""', 'rename-command EVALSHA ""',
                                                  'rename-command SCRIPT ""'])
    dst = server_factory("valkey-9.1")
    bulk(src.client(), 700)
    src.client().sadd("big", *range(2500))
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb, batch=100)
    assert res.complete and res.keys == 701 and res.big == 1
    assert dst.client().dbsize() == 701 and dst.client().scard("big") == 2500


def test_functions_are_copied_both_ways(server_factory, make_playbook):
    """Function libraries reach the target by FUNCTION RESTORE, or by LOAD when the dump format is rejected."""
    lib = "#!lua name=mylib\nredis.register_function('hello', function() return 'hi' end)"
    for source, target in (("redis-7.0", "valkey-9.1"), ("valkey-9.1", "redis-7.0")):
        src, dst = server_factory(source), server_factory(target)
        src.client().function_load(lib)
        src.client().set("k", "v")
        pb = load(make_playbook(src, dst, **FAST))
        res = sync.run(pb)
        assert "1 function library copied" in res.functions
        assert dst.client().fcall("hello", 0) == b"hi"


def test_second_run_is_idempotent(server_factory, make_playbook):
    """Running sync again after it completed copies the same data and still checks clean."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    bulk(src.client(), 500)
    pb = load(make_playbook(src, dst, **FAST))
    first = sync.run(pb)
    second = sync.run(pb)
    assert first.complete and second.complete and not second.resumed
    assert second.keys == first.keys == 500
    assert dst.client().dbsize() == 500
    assert _full_check(pb).clean


def test_killed_sync_resumes_from_its_checkpoint(server_factory, make_playbook):
    """A sync killed with SIGKILL mid-way continues from the checkpoint on the next run and ends clean."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    bulk(src.client(), 4000)
    path = make_playbook(src, dst, **FAST)
    pb = load(path)
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(path), "sync", "--rate", "2000", "--batch", "50"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        assert wait_for(lambda: (cp := checkpoint.load(pb.state_path)) is not None and cp.db(0).cursor != 0, timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    copied_before = dst.client().dbsize()
    assert 0 < copied_before < 4000
    res = sync.run(pb)
    assert res.resumed and res.complete
    assert res.run_keys < 4000  # it continued rather than started over
    assert res.keys == 4000 and res.runs == 2  # the result (and report) describe the whole pass
    assert dst.client().dbsize() == 4000
    assert _full_check(pb).clean
    restarted = sync.run(pb, restart=True)
    assert not restarted.resumed and restarted.keys == 4000


@pytest.mark.parametrize("events", [True, False], ids=["keyspace-events", "signatures"])
def test_concurrent_mirrored_partial_updates_end_clean(pair, make_playbook, events):
    """Partial updates mirrored (source, then target) during the copy leave no key different."""
    src, dst = pair
    n = 3000
    bulk(src.client(), n)
    pb = load(make_playbook(src, dst, **FAST))
    writer = MirroringWriter(src.client(), dst.client(), n // 10)  # hot keys, so writes hit batches in flight
    writer.start()
    try:
        # A throttled copy (~1 s) gives the writer time to race it even on a loaded machine.
        res = sync.run(pb, batch=50, rate=3000, keyspace_events=events)
    finally:
        ops = writer.stop()
    assert ops - writer.late_ops > 200, "the writer must have raced the copy (within the shim's lag bound)"
    assert res.complete, res
    result = _full_check(pb)
    # A key whose mirrored write lagged past shadow_timeout is one the shim would have marked
    # dirty (repaired by `sync --dirty`); every other key must be equal.
    unexplained = [(m.key, m.detail) for m in result.mismatches if m.key not in writer.late]
    assert not unexplained and result.in_flux == 0, (unexplained, len(writer.late))


class RacingCopier(copy.Copier):
    """A copier that lets a mirrored write land between its read and its write, once per key, in every batch."""

    raced: set = set()

    def read_flat(self, keys, dump):
        flat = super().read_flat(keys, dump)
        self._race(keys)
        return flat

    def scan_read(self, cursor, count, match):  # the SCAN step that reads its keys at once
        cursor_after, keys, flat = super().scan_read(cursor, count, match)
        self._race(keys)
        return cursor_after, keys, flat

    def _race(self, keys):
        for key in [k for k in keys if k not in self.raced][:3]:
            self.raced.add(key)
            # Removals are no-ops on a target that lacks the key yet: only the source sees them.
            cmd = {b"hash": ["HDEL", key, "g"], b"string": ["APPEND", key, "+"], b"list": ["LPUSH", key, "+"],
                   b"set": ["SREM", key, "s"], b"zset": ["ZINCRBY", key, 1, "m"]}[self.src.type(key)]
            for server in (self.src, self.dst):  # the shim's order: source first, then target
                server.execute_command(*cmd)


@pytest.mark.parametrize("events", [True, False], ids=["keyspace-events", "signatures"])
@pytest.mark.parametrize("source,target", [("redis-7.0", "valkey-9.1"), ("redis-6.2", "valkey-8.1")])
def test_writes_landing_between_read_and_write_are_repaired(server_factory, make_playbook, monkeypatch, source, target,
                                                            events):
    """When a mirrored update lands between a batch's read and its write, verify re-copies the key and the end is clean."""
    src, dst = server_factory(source), server_factory(target)
    bulk(src.client(), 500)
    pb = load(make_playbook(src, dst, **FAST))
    monkeypatch.setattr(sync, "Copier", RacingCopier)
    RacingCopier.raced = set()
    res = sync.run(pb, batch=50, keyspace_events=events)
    assert res.complete and res.recopied > 0, res
    result = _full_check(pb)
    assert result.clean, [(m.key, m.detail) for m in result.mismatches]


def test_verifier_recopies_a_key_overwritten_by_a_stale_copy(server_factory, make_playbook):
    """A key left different by a racing copy is detected after the settle time and copied again."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    s, t = src.client(), dst.client()
    s.hset("h", mapping={"a": 1, "b": 2})
    copier = copy.Copier(s, t, copy.DUMP)
    copier.copy([b"h"])
    t.hdel("h", "b")  # what a stale RESTORE after a mirrored HSET leaves behind
    verifier = Verifier(s, t, copier, settle=0.05, ttl_tolerance_ms=2000)
    verifier.add(0, [b"h"], time.monotonic(), copy.CopyResult())
    verifier.drain()
    assert verifier.stats.recopied == 1 and not verifier.stats.unsettled
    assert t.hgetall("h") == {b"a": b"1", b"b": b"2"}


@pytest.mark.parametrize("source", ["redis-6.2", "redis-7.0", "valkey-9.1"])
def test_read_script_sizes_every_encoding_before_its_dump(server_factory, source):
    """Compact encodings are DUMPed at once; others are sized first (a wrong guess of the type
    from the encoding is settled by TYPE), so a big key is never DUMPed; a missing key reads as none."""
    src, dst = server_factory(source), server_factory("valkey-9.1")
    s = src.client()
    s.hset("hash-hashtable", mapping={f"f{i}": i for i in range(300)})  # > 128 fields: a hashtable, not a set
    s.hset("hash-big", mapping={f"f{i}": i for i in range(1500)})
    s.sadd("set-hashtable", *[f"m{i}" for i in range(300)])
    s.sadd("set-big", *range(1500))
    s.rpush("list", *range(300))
    s.zadd("zset", {f"m{i}": i for i in range(300)})
    s.set("string-raw", b"r" * 100)
    s.set("string-big", b"b" * 5000)
    s.set("int", 12345)
    s.hset("hash-small", mapping={"a": 1})
    s.expire("hash-hashtable", 3600)
    keys = [b"hash-hashtable", b"hash-big", b"set-hashtable", b"set-big", b"list", b"zset", b"string-raw",
            b"string-big", b"int", b"hash-small", b"missing"]
    copier = copy.Copier(s, dst.client(), copy.DUMP, chunk=1000, chunk_bytes=1000)
    snaps = {sn.key: sn for sn in copier.read(keys)}
    big = {k for k, sn in snaps.items() if sn.big}
    assert big == {b"hash-big", b"set-big", b"string-big"}
    assert all(snaps[k].payload is None for k in big) and snaps[b"missing"].type == "none"
    assert {k: snaps[k].type for k in keys} == {
        b"hash-hashtable": "hash", b"hash-big": "hash", b"set-hashtable": "set", b"set-big": "set", b"list": "list",
        b"zset": "zset", b"string-raw": "string", b"string-big": "string", b"int": "string", b"hash-small": "hash",
        b"missing": "none"}
    assert snaps[b"hash-hashtable"].expire_at > 0 and snaps[b"list"].expire_at == 0
    dst.client().set("missing", "stale")  # a key gone from the source is deleted on the target
    res = copier.copy(keys)
    assert (res.copied, res.deleted, res.big, res.errors) == (10, 1, 3, {})
    t = dst.client()
    assert t.hlen("hash-big") == 1500 and t.scard("set-hashtable") == 300 and t.get("string-big") == b"b" * 5000
    assert t.exists("missing") == 0 and 3590 < t.ttl("hash-hashtable") <= 3600


def test_rejected_payloads_switch_the_copy_to_type_aware(server_factory):
    """A DUMP copy whose RESTOREs the target rejects (an older RDB format) switches to the type-aware
    copy for good and copies the same batch that way."""
    src, dst = server_factory("valkey-9.1"), server_factory("redis-7.0")
    s = src.client()
    bulk(s, 50)
    keys = sorted(s.keys())
    copier = copy.Copier(s, dst.client(), copy.DUMP)  # as a stale compatibility report would say
    res = copier.copy(keys)
    assert copier.method == copy.STRUCT and res.copied == 50 and not res.errors
    t = dst.client()
    assert t.dbsize() == 50 and t.hgetall("k:1") == {b"f": b"1", b"g": b"x"} and t.lrange("k:2", 0, -1) == [b"2", b"3"]


def test_pipelined_writes_raise_an_error_reply_and_leave_the_client_usable(server_factory):
    """``fastcall.Pipelined`` (the chunked copy's writes) raises the first error reply, and a
    connection left with unread replies is not reused."""
    import hiredis
    import redis as redis_py

    from migrator.data import fastcall

    server = server_factory("valkey-9.1")
    c = server.client()
    c.set("s", "x")
    with pytest.raises(redis_py.exceptions.ResponseError, match="WRONGTYPE"):
        with fastcall.Pipelined(c, depth=2) as out:
            for cmd in [("RPUSH", "l", "a"), ("RPUSH", "s", "b"), ("RPUSH", "l", "c"), ("RPUSH", "l", "d")]:
                out.send(hiredis.pack_command(cmd))
    assert c.ping() and c.get("s") == b"x"
    with fastcall.Pipelined(c, depth=2) as out:
        for i in range(10):
            out.send(hiredis.pack_command(("RPUSH", "m", i)))
    assert c.lrange("m", 0, -1) == [str(i).encode() for i in range(10)]
    replies = fastcall.pipeline(c, hiredis.pack_command(("GET", "s")) + hiredis.pack_command(("LPOP", "s")), 2)
    assert replies[0] == b"x" and isinstance(replies[1], redis_py.exceptions.ResponseError)  # returned, not raised


def _mark_dirty(pb, keys, shim_id="shim-test"):
    """Record dirty keys the way a running shim does (its own recorder writes the files)."""
    from migrator.shim.dirty import DirtyRecorder

    recorder = DirtyRecorder(pb.state_path, shim_id)
    for db, key in keys:
        recorder.add(db, [key] if key is not None else [], "shadow timeout", b"SET")
    recorder.flush()


def test_dirty_keys_recorded_by_the_shim_are_recopied(server_factory, make_playbook):
    """``sync --dirty`` re-copies the keys the shim marked dirty and clears those marks."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    s = src.client()
    bulk(s, 100)
    pb = load(make_playbook(src, dst, **FAST))
    assert sync.run(pb).complete
    s.set("k:0", "changed while the shim could not mirror")
    src.client(db=3).set("other-db", "x")
    _mark_dirty(pb, [(0, b"k:0"), (3, b"other-db")])
    assert dirty.list_dirty(pb.state_path).count == 2
    res = sync.run(pb, dirty=True)
    assert res.complete and res.mode == "dirty" and res.keys == 2
    assert dst.client().get("k:0") == b"changed while the shim could not mirror"
    assert dst.client(db=3).get("other-db") == b"x"
    assert dirty.list_dirty(pb.state_path).count == 0


def test_dirty_keys_already_equal_are_not_rewritten(server_factory, make_playbook, monkeypatch):
    """``sync --dirty`` compares first: a marked key the sides already agree on is cleared without a copy (no write
    to the target that could race a live one), a marked key that differs (or is gone from the source) is copied."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-8.1")
    s = src.client()
    bulk(s, 50)
    pb = load(make_playbook(src, dst, **FAST))
    assert sync.run(pb).complete
    s.hset("h:differs", "f", "source only")
    s.delete("k:1")
    _mark_dirty(pb, [(0, b"k:0"), (0, b"k:1"), (0, b"h:differs"), (0, b"never-existed")])
    copied: list[bytes] = []
    real_copy = copy.Copier.copy

    def spy(self, keys):
        copied.extend(keys)
        return real_copy(self, keys)

    monkeypatch.setattr(copy.Copier, "copy", spy)
    res = sync.run(pb, dirty=True)
    assert res.complete and res.equal == 2 and res.keys == 2, res
    assert sorted(copied) == [b"h:differs", b"k:1"]
    assert dst.client().hgetall("h:differs") == {b"f": b"source only"} and not dst.client().exists("k:1")
    assert dirty.list_dirty(pb.state_path).count == 0
    report = reports.load(pb.state_path, res.report_id)
    assert report["equal"] == 2 and report["summary"].startswith("2 found already equal, 2 dirty keys re-copied")


def test_whole_database_marks_need_a_full_sync(server_factory, make_playbook):
    """A lost keyless write (FLUSHDB) is not repaired by ``--dirty``, and a later complete full sync clears it."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    src.client().set("a", 1)
    pb = load(make_playbook(src, dst, **FAST))
    _mark_dirty(pb, [(0, None)])
    time.sleep(0.01)
    res = sync.run(pb, dirty=True)
    assert not res.complete and "full sync" in res.errors[0][2]
    assert dirty.list_dirty(pb.state_path).whole_dbs == {0}
    assert sync.run(pb).complete
    assert dirty.list_dirty(pb.state_path).count == 0


def test_sync_complete_gate(server_factory, make_playbook):
    """The gate passes only after a complete sync that started in the current phase, with no dirty keys waiting."""
    from migrator.data import gates as data_gates

    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    src.client().set("a", 1)
    pb = load(make_playbook(src, dst, **FAST))
    store = StateStore(pb.state_path, pb.name)
    store.save(State(migration=pb.name, phase=Phase.MIRRORING, phase_since=iso(now())))
    ctx = lambda: make_context(pb, store, store.load())  # noqa: E731
    assert not data_gates.sync_complete(ctx()).passed
    assert sync.run(pb).complete
    ok = data_gates.sync_complete(ctx())
    assert ok.passed and "1 keys copied" in ok.evidence, ok.evidence
    _mark_dirty(pb, [(0, b"a")])
    waiting = data_gates.sync_complete(ctx())
    assert not waiting.passed and "1 dirty key" in waiting.evidence
    assert sync.run(pb, dirty=True).complete
    assert data_gates.sync_complete(ctx()).passed
    time.sleep(0.01)
    store.save(State(migration=pb.name, phase=Phase.MIRRORING, phase_since=iso(now())))
    late = data_gates.sync_complete(ctx())
    assert not late.passed and "before" in late.evidence


def test_cli_sync_prints_summary_and_report(server_factory, make_playbook):
    """The CLI sync exits 0 when complete, prints the verdict line and writes a report of kind sync."""
    src, dst = server_factory("redis-6.2"), server_factory("valkey-8.1")
    populate(src.client())
    path = make_playbook(src, dst, **FAST)
    out = subprocess.run([sys.executable, "-m", "migrator", "-p", str(path), "sync", "--output", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["kind"] == "sync" and data["complete"] and data["verdict"] == "pass"
    assert '"sync progress"' in out.stderr or "sync progress" in out.stderr
    assert values.KeyState  # the module imports cleanly from the CLI process too


def test_password_protected_servers_and_no_secret_in_reports(server_factory, make_playbook):
    """Sync and check work with passwords in the URLs, and no report or checkpoint contains them."""
    src = server_factory("redis-7.0", password="s3cret-source-pw")
    dst = server_factory("valkey-9.1", password="s3cret-target-pw")
    populate(src.client())
    pb = load(make_playbook(src, dst, **FAST))
    assert sync.run(pb).complete
    assert _full_check(pb).clean
    for f in pb.state_path.rglob("*"):
        if f.is_file():
            text = f.read_text(errors="replace")
            assert "s3cret-source-pw" not in text and "s3cret-target-pw" not in text, f
