"""Hash field TTLs (Redis 7.4+, Valkey 9.0+): sync carries them, check compares them, a target
without them refuses those hashes. Valkey 9.1 stands in for a Redis 7.4/8.x source."""

from __future__ import annotations

import time

import pytest

from migrator import reports
from migrator.data import check, checkpoint, compare, copy, sync
from migrator.data.keyspace import TMP_PREFIX
from tests.test_data_helpers import FAST, load

BIG = 2500  # fields of the big hash (copied in chunks of 500 below)


def _field_data(c) -> dict[str, list[str]]:
    """Hashes with and without field TTLs on ``c``; returns key → fields (in a fixed order)."""
    c.hset("h:ttl", mapping={"a": "1", "b": "2", "c": "3"})
    c.execute_command("HPEXPIRE", "h:ttl", 600_000, "FIELDS", 1, "a")
    c.execute_command("HPEXPIRE", "h:ttl", 300_000, "FIELDS", 1, "c")
    c.pexpire("h:ttl", 900_000)  # a key TTL as well
    c.hset("h:plain", mapping={"x": "1"})
    c.execute_command("HSETEX", "h:setex", "PX", 400_000, "FIELDS", 2, "p", "1", "q", "2")
    fields = [f"f{i}" for i in range(BIG)]
    c.hset("h:big", mapping={f: "v" for f in fields})
    c.execute_command("HPEXPIRE", "h:big", 700_000, "FIELDS", 100, *fields[:100])
    c.execute_command("HPEXPIRE", "h:big", 800_000, "FIELDS", 1, fields[-1])
    c.set("s", "v")
    return {"h:ttl": ["a", "b", "c"], "h:plain": ["x"], "h:setex": ["p", "q"], "h:big": fields}


def _times(c, key: str, fields: list[str]) -> list[int]:
    """HPEXPIRETIME of ``fields`` (a plain or a cluster client)."""
    return [int(t) for t in c.execute_command("HPEXPIRETIME", key, "FIELDS", len(fields), *fields)]


@pytest.mark.parametrize("method", [copy.DUMP, copy.STRUCT])
def test_field_ttls_arrive_as_the_same_absolute_times(server_factory, make_playbook, method):
    """Each field's expiry reaches the target as the source's absolute time, by DUMP/RESTORE and type-aware, big hashes too."""
    src, dst = server_factory("valkey-9.1"), server_factory("valkey-9.1")
    s = src.client()
    keys = _field_data(s)
    pb = load(make_playbook(src, dst, **FAST))
    if method == copy.STRUCT:
        reports.write(pb.state_path, reports.common("compat", pb.name, "pass", "compatible", copy_method="struct"),
                      "# compat\n", "<p>compat</p>")
    res = sync.run(pb, chunk=500)
    assert res.complete and not res.errors and res.method == method, res
    t = dst.client()
    for key, fields in keys.items():
        assert _times(t, key, fields) == _times(s, key, fields), key  # exact: absolute, never stretched
    assert sum(x > 0 for x in _times(t, "h:big", keys["h:big"])) == 101
    assert t.hlen("h:big") == BIG and abs(t.pttl("h:ttl") - s.pttl("h:ttl")) < 2000
    res = check.run(pb, full=True, interval=0.05)
    assert res.clean and res.verdict == "pass", [(m.key, m.detail) for m in res.mismatches]


@pytest.mark.parametrize("relaxed", [False, True])
def test_a_target_without_field_ttls_refuses_those_hashes_by_name(server_factory, make_playbook, relaxed):
    """Valkey 8.1 cannot hold field TTLs: those hashes are refused per key (strict or relaxed RDB check), the rest is copied."""
    src = server_factory("valkey-9.1")
    dst = server_factory("valkey-8.1", config={"rdb-version-check": "relaxed"} if relaxed else {})
    _field_data(src.client())
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb, chunk=500)
    assert not res.complete
    refused = {checkpoint.decode_key(key): err for _db, key, err in res.errors}
    assert set(refused) == {b"h:ttl", b"h:setex", b"h:big"}, refused
    assert "2 field(s) with a TTL" in refused[b"h:ttl"] and "HPEXPIREAT" in refused[b"h:ttl"]
    t = dst.client()
    assert not t.exists("h:ttl", "h:setex", "h:big")  # never written without their TTLs
    assert t.hgetall("h:plain") == {b"x": b"1"} and t.get("s") == b"v"
    assert not t.keys(TMP_PREFIX.decode() + "*")  # the big hash's partial copy is gone


def test_check_names_a_missing_or_different_field_ttl(server_factory, make_playbook):
    """A field TTL missing, added or moved beyond the tolerance on the target is a field-ttl mismatch naming the field, and repair fixes it."""
    src, dst = server_factory("valkey-9.1"), server_factory("valkey-9.1")
    keys = _field_data(src.client())
    pb = load(make_playbook(src, dst, check={"interval": "50ms", "rounds": 2, "ttl_tolerance": "2s"},
                            shim={"shadow_timeout": "50ms"}))
    assert sync.run(pb, chunk=500).complete
    t = dst.client()
    t.execute_command("HPERSIST", "h:ttl", "FIELDS", 1, "a")  # missing on the target
    t.execute_command("HPEXPIRE", "h:setex", 600_000, "FIELDS", 1, "q")  # different (+200 s)
    t.execute_command("HPEXPIRE", "h:plain", 600_000, "FIELDS", 1, "x")  # only on the target
    t.execute_command("HPERSIST", "h:big", "FIELDS", 1, keys["h:big"][-1])  # big hash: compared in chunks
    at = _times(src.client(), "h:big", ["f0"])[0]
    t.execute_command("HPEXPIREAT", "h:big", at + 500, "FIELDS", 1, "f0")  # within 2 s: equal
    res = check.run(pb, full=True, interval=0.05)
    got = {m.key: (m.kind, m.detail) for m in res.mismatches}
    assert {k: kind for k, (kind, _) in got.items()} == {
        b"h:ttl": compare.FIELD_TTL, b"h:setex": compare.FIELD_TTL, b"h:plain": compare.FIELD_TTL,
        b"h:big": compare.FIELD_TTL}, got
    assert got[b"h:ttl"][1] == "field 'a': expires only on the source"
    assert got[b"h:setex"][1].startswith("field 'q': expiry differs by +")
    assert got[b"h:plain"][1] == "field 'x': expires only on the target"
    assert got[b"h:big"][1] == f"field '{keys['h:big'][-1]}': expires only on the source"
    assert res.verdict == "fail"
    res = check.run(pb, full=True, repair=True, interval=0.05)  # re-copied from the source, field TTLs included
    assert {m.key for m in res.repaired} == set(got) and not res.mismatches
    assert check.run(pb, full=True, interval=0.05).clean


def test_check_against_a_target_without_field_ttls_finds_them_missing(server_factory, make_playbook):
    """Values copied by hand to Valkey 8.1 are equal, but each field TTL the source has is reported missing there."""
    src, dst = server_factory("valkey-9.1"), server_factory("valkey-8.1")
    s, t = src.client(), dst.client()
    s.hset("h", mapping={"a": "1", "b": "2"})
    s.execute_command("HPEXPIRE", "h", 600_000, "FIELDS", 1, "b")
    t.hset("h", mapping={"a": "1", "b": "2"})
    pb = load(make_playbook(src, dst, **FAST))
    res = check.run(pb, full=True, interval=0.05)
    assert [(m.key, m.kind, m.detail) for m in res.mismatches] == [
        (b"h", compare.FIELD_TTL, "field 'b': expires only on the source")]


def test_slow_second_copy_keeps_the_first_absolute_time(server_factory, make_playbook):
    """A type-aware copy made seconds after the field TTL was set lands on the same absolute expiry."""
    src, dst = server_factory("valkey-9.1"), server_factory("valkey-9.1")
    s = src.client()
    s.hset("h", mapping={"a": "1"})
    s.execute_command("HPEXPIRE", "h", 60_000, "FIELDS", 1, "a")
    before = _times(s, "h", ["a"])[0]
    time.sleep(1.2)  # a relative copy (HPEXPIRE with the remaining TTL read earlier) would drift
    c = copy.Copier(s, dst.client(), copy.STRUCT)
    assert c.copy([b"h"]).copied == 1
    assert _times(dst.client(), "h", ["a"]) == [before]


@pytest.mark.parametrize("args, expected", [
    ([b"HEXPIRE", b"h", b"10", b"FIELDS", b"1", b"a"], [b"HPEXPIREAT", b"h", b"1010000", b"FIELDS", b"1", b"a"]),
    ([b"hpexpire", b"h", b"5", b"NX", b"FIELDS", b"2", b"a", b"b"],
     [b"HPEXPIREAT", b"h", b"1000005", b"NX", b"FIELDS", b"2", b"a", b"b"]),
    ([b"HSETEX", b"h", b"FNX", b"EX", b"3", b"FIELDS", b"1", b"f", b"v"],
     [b"HSETEX", b"h", b"FNX", b"PXAT", b"1003000", b"FIELDS", b"1", b"f", b"v"]),
    ([b"HGETEX", b"h", b"PX", b"7", b"FIELDS", b"1", b"f"], [b"HGETEX", b"h", b"PXAT", b"1000007", b"FIELDS", b"1", b"f"]),
    # After FIELDS come names and values, never options: a field called "EX" stays as it is.
    ([b"HSETEX", b"h", b"KEEPTTL", b"FIELDS", b"1", b"EX", b"5"], None),
    ([b"HGETEX", b"h", b"PERSIST", b"FIELDS", b"1", b"px"], None),
    ([b"HEXPIREAT", b"h", b"2000", b"FIELDS", b"1", b"a"], None),  # already absolute
    ([b"HPERSIST", b"h", b"FIELDS", b"1", b"a"], None),
    ([b"HGETDEL", b"h", b"FIELDS", b"1", b"a"], None),
    ([b"HEXPIRE", b"h", b"soon", b"FIELDS", b"1", b"a"], None),  # both sides reject it alike
    ([b"HSETEX", b"h", b"EX", b"0", b"FIELDS", b"1", b"f", b"v"], None),
])
def test_relative_field_expiries_become_absolute(args, expected):
    """The shim sends HEXPIRE/HPEXPIRE as HPEXPIREAT and HSETEX/HGETEX EX|PX as PXAT, from its own clock."""
    from migrator.shim import effects

    assert effects.rewrite_now(args, 1_000_000) == expected


def test_field_ttl_replies_are_compared_with_the_ttl_tolerance():
    """HTTL/HPTTL/HEXPIRETIME/HPEXPIRETIME replies agree within the tolerance, field by field; -1/-2 exactly."""
    from migrator.shim import compare as cmp

    assert cmp.compare(b"hpttl", [5000, -1], [4200, -1], 2000) is None
    assert cmp.compare(b"hpttl", [5000, -1], [1000, -1], 2000) == cmp.DIFFERENT_VALUE
    assert cmp.compare(b"httl", [-1], [10], 2000) == cmp.DIFFERENT_VALUE
    assert cmp.compare(b"hexpiretime", [100, -2], [101, -2], 2000) is None


@pytest.fixture
def delayed():
    """Delaying forwarders (tests.helpers) in front of servers; closed after the shims that use them."""
    from tests.helpers import DelayingForwarder

    made: list = []

    def make(server, delay: float):
        made.append(DelayingForwarder(server.port, delay))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_a_slow_second_side_does_not_stretch_field_ttls(server_factory, delayed, make_env):
    """Mirrored through a target 200 ms away, HPEXPIRE, HEXPIRE, HSETEX EX and HGETEX PX land on the same absolute
    field expiry; HGETDEL and HPERSIST leave the same hash."""
    from migrator.phases import Phase

    src, tgt = server_factory("valkey-9.1"), server_factory("valkey-9.1")
    env = make_env(src, delayed(tgt, 0.2))
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    c.hset("h", mapping={"a": "1", "b": "2", "c": "3"})
    c.execute_command("HPEXPIRE", "h", 60_000, "FIELDS", 1, "a")
    c.execute_command("HEXPIRE", "h", 60, "FIELDS", 1, "b")
    c.execute_command("HSETEX", "h2", "EX", 60, "FIELDS", 1, "x", "1")
    c.execute_command("HGETEX", "h", "PX", 60_000, "FIELDS", 1, "c")
    c.execute_command("HSETEX", "h3", "PX", 60_000, "FIELDS", 2, "p", "1", "q", "2")
    assert c.execute_command("HGETDEL", "h3", "FIELDS", 1, "p") == [b"1"]
    c.execute_command("HPERSIST", "h3", "FIELDS", 1, "q")
    env.flush()
    s, t = src.client(), tgt.client()
    assert t.hgetall("h3") == s.hgetall("h3") == {b"q": b"2"} and _times(t, "h3", ["q"]) == [-1]
    for key, fields in (("h", ["a", "b", "c"]), ("h2", ["x"])):
        a, b = _times(s, key, fields), _times(t, key, fields)
        assert all(x > 0 for x in a + b), (a, b)
        # Relative expiries would land 200 ms or more later on the target.
        assert max(abs(x - y) for x, y in zip(a, b)) < 120, (key, a, b)


def _compat(make_playbook, source, target):
    from migrator import compat, playbook

    return compat.run(playbook.load(make_playbook(source, target)), write_report=False)


def test_compat_fails_a_target_without_field_ttls_with_hash_and_field_counts(server_factory, make_playbook):
    """Valkey 9.1 → 8.1: data.types fails, saying exactly how many hashes and fields would lose their expiry."""
    from migrator.compat.model import FAIL

    src, dst = server_factory("valkey-9.1"), server_factory("valkey-8.1")
    c = src.client()
    for i in range(3):
        c.hset(f"h{i}", mapping={"a": "1", "b": "2", "c": "3"})
        c.execute_command("HPEXPIRE", f"h{i}", 600_000, "FIELDS", i + 1, *["a", "b", "c"][:i + 1])
    c.hset("plain", mapping={"a": "1"})
    types = _compat(make_playbook, src, dst).check("data.types")
    assert types.status == FAIL, types.evidence
    assert "3 hash(es) (INFO keyspace) with 6 field TTL(s) in all would lose their expiry" in types.evidence
    assert "valkey 8.1" in types.evidence.lower() and "HPERSIST" in types.remediation
    assert types.data["field_ttls"] == {"hashes": 3, "hashes_how": "INFO keyspace", "fields": 6,
                                        "sampled_hashes": 4, "exact": True}


def test_compat_says_at_least_when_it_read_only_part_of_the_field_ttls(server_factory, make_playbook, monkeypatch):
    """A hash larger than the per-hash bound is counted in part, and the count says "at least" over the sample."""
    from migrator.compat import modules

    monkeypatch.setattr(modules, "FIELDS_PER_HASH", 1000)
    src, dst = server_factory("valkey-9.1"), server_factory("valkey-8.1")
    c = src.client()
    fields = [f"f{i}" for i in range(BIG)]
    c.hset("big", mapping={f: "v" for f in fields})
    c.execute_command("HPEXPIRE", "big", 600_000, "FIELDS", BIG, *fields)
    types = _compat(make_playbook, src, dst).check("data.types")
    got = types.data["field_ttls"]
    assert not got["exact"] and 1000 <= got["fields"] < BIG and got["hashes"] == 1, got
    assert f"at least {got['fields']:,} field TTL(s) in a sample of 1 hash(es)" in types.evidence


def test_restore_effect_carries_field_ttls():
    """A RESTORE mirrored by effect rebuilds a hash with each field's absolute expiry (HPEXPIREAT), then the key's."""
    from migrator.shim import restore

    read = [b"hash", 1000, 500, [b"a", b"1", b"b", b"2", b"c", b"3"], [7000, -1, 7000]]
    assert restore.effect(b"k", read) == [
        [b"DEL", b"k"], [b"HSET", b"k", b"a", b"1", b"b", b"2", b"c", b"3"],
        [b"HPEXPIREAT", b"k", b"7000", b"FIELDS", b"2", b"a", b"c"], [b"PEXPIREAT", b"k", b"1500"]]


def test_sync_cli_exits_1_naming_the_refused_hash(server_factory, make_playbook):
    """`migrator sync` to Valkey 8.1 exits 1, and its summary line names the refused hash and why."""
    from tests.helpers import run_cli

    src, dst = server_factory("valkey-9.1"), server_factory("valkey-8.1")
    c = src.client()
    c.hset("sessions", mapping={"a": "1", "b": "2"})
    c.execute_command("HPEXPIRE", "sessions", 600_000, "FIELDS", 1, "b")
    c.set("s", "v")
    r = run_cli("sync", playbook=make_playbook(src, dst))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "first error: db0 key sessions: hash has 1 field(s) with a TTL and the target has no hash field expiry" in r.stdout
    assert dst.client().get("s") == b"v" and not dst.client().exists("sessions")


@pytest.mark.parametrize("method", [copy.DUMP, copy.STRUCT])
def test_field_ttls_are_copied_and_checked_per_node_on_clusters(cluster_factory, make_playbook, method):
    """Valkey 9.1 cluster → cluster: hashes of many slots keep each field's absolute expiry; a lost one is a field-ttl mismatch."""
    src = cluster_factory("valkey-9.1", primaries=2, replicas=0)
    dst = cluster_factory("valkey-9.1", primaries=2, replicas=0)
    rc = src.cluster_client()
    try:
        for i in range(40):
            rc.hset(f"h:{i}", mapping={"a": "1", "b": "2"})
            rc.execute_command("HPEXPIRE", f"h:{i}", 600_000 + i, "FIELDS", 1, "b")
        rc.hset("{big}:h", mapping={f"f{i}": "v" for i in range(BIG)})
        rc.execute_command("HPEXPIRE", "{big}:h", 700_000, "FIELDS", 3, "f0", "f1", "f2499")
        expected = {f"h:{i}": _times(rc, f"h:{i}", ["a", "b"]) for i in range(40)}
        expected["{big}:h"] = _times(rc, "{big}:h", ["f0", "f1", "f2", "f2499"])
    finally:
        rc.close()
    pb = load(make_playbook(src, dst, **FAST))
    if method == copy.STRUCT:
        reports.write(pb.state_path, reports.common("compat", pb.name, "pass", "compatible", copy_method="struct"),
                      "# compat\n", "<p>compat</p>")
    res = sync.run(pb, chunk=500)
    assert res.complete and not res.errors, res
    tc = dst.cluster_client()
    try:
        got = {k: _times(tc, k, ["a", "b"] if k != "{big}:h" else ["f0", "f1", "f2", "f2499"]) for k in expected}
        assert got == expected
        assert check.run(pb, full=True, interval=0.05).clean
        tc.execute_command("HPERSIST", "h:7", "FIELDS", 1, "b")
    finally:
        tc.close()
    res = check.run(pb, full=True, interval=0.05)
    assert [(m.key, m.kind, m.detail) for m in res.mismatches] == [
        (b"h:7", compare.FIELD_TTL, "field 'b': expires only on the source")]


def test_big_hashes_check_clean_when_only_one_side_has_field_expiry(server_factory, make_playbook):
    """Redis 7.0 → Valkey 9.1: a big hash (field TTLs unread by the probe on 9.1) is compared without asking 7.0 for them."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    src.client().hset("big", mapping={f"f{i}": "v" for i in range(BIG)})
    pb = load(make_playbook(src, dst, **FAST))
    assert sync.run(pb, chunk=500).complete
    assert check.run(pb, full=True, interval=0.05, chunk=500).clean


def test_a_source_without_scripting_still_copies_field_ttls(server_factory, make_playbook):
    """EVAL/EVALSHA/SCRIPT renamed away on a Valkey 9.1 source: the type-aware copy reads field TTLs with plain commands."""
    src = server_factory("valkey-9.1", conf_lines=['rename-command EVAL ""', 'rename-command EVALSHA ""',
                                                   'rename-command SCRIPT ""'])
    dst = server_factory("valkey-9.1")
    keys = _field_data(src.client())
    pb = load(make_playbook(src, dst, **FAST))
    reports.write(pb.state_path, reports.common("compat", pb.name, "pass", "compatible", copy_method="struct"),
                  "# compat\n", "<p>compat</p>")
    res = sync.run(pb, chunk=500)
    assert res.complete and not res.errors, res
    for key, fields in keys.items():
        assert _times(dst.client(), key, fields) == _times(src.client(), key, fields), key
