"""Redis 7.4/8.x sources in compat: the RDB decision table over the pairs, Redis 8 commands and vector
sets named with counts (recorded replies where no server here has them), and the report on real pairs."""

from __future__ import annotations

import pytest

from migrator.compat import rdb
from migrator.compat.commands import missing_commands_check, parse_spec
from migrator.compat.identify import identify
from migrator.compat.model import FAIL, WARN
from migrator.compat.modules import odd_types
from migrator.compat.rpc import Unavailable


def _redis(v: str):
    return identify({"redis_version": v, "redis_mode": "standalone"})


def _valkey(v: str):
    return identify({"server_name": "valkey", "valkey_version": v, "redis_version": "7.2.4"})


FTTL, VSET = rdb.FIELD_TTL_HASHES, rdb.VECTOR_SETS
DUMP, TYPED, NONE = rdb.DUMP_RESTORE, rdb.TYPE_AWARE, rdb.NO_COPY


@pytest.mark.parametrize("src,dst,relaxed,in_use,method,replicates,advice", [
    # RDB 12 (Redis 7.4/8.0-8.4) and 13 (8.6) into Valkey: refused unless relaxed, which helps for known types.
    (_redis("7.4.2"), _valkey("8.1.1"), False, set(), TYPED, False, "would help"),
    (_redis("7.4.2"), _valkey("8.1.1"), True, set(), DUMP, True, "is set"),
    (_redis("8.6.0"), _valkey("9.1.0"), False, set(), TYPED, False, "would help"),
    (_redis("8.2.1"), _valkey("9.1.0"), True, set(), DUMP, True, "is set"),
    # ... and not for types the target's loader lacks: field-TTL hashes (Redis types 24/25), vector sets.
    (_redis("8.0.0"), _valkey("9.1.0"), True, {FTTL}, TYPED, False, "would not help"),
    (_redis("7.4.2"), _valkey("8.1.1"), True, {FTTL}, NONE, False, "would not help"),
    (_redis("8.0.0"), _valkey("9.1.0"), True, {VSET}, NONE, False, "would not help"),
    # Valkey 8.0 has no rdb-version-check: nothing to advise, a setting it lacks changes nothing.
    (_redis("7.4.2"), _valkey("8.0.2"), True, set(), TYPED, False, ""),
    # Valkey 9 (RDB 80) into Valkey 8.1: relaxed helps, except for Valkey 9's field-TTL hashes (type 22).
    (_valkey("9.1.0"), _valkey("8.1.1"), False, set(), TYPED, False, "would help"),
    (_valkey("9.1.0"), _valkey("8.1.1"), True, set(), DUMP, True, "is set"),
    (_valkey("9.1.0"), _valkey("8.1.1"), True, {FTTL}, NONE, False, "would not help"),
    (_valkey("9.0.0"), _valkey("9.1.0"), False, {FTTL}, DUMP, True, ""),
    # Older into newer needs nothing; anything into an older Redis is type-aware, no relaxed mode there.
    (_redis("7.0.15"), _valkey("8.1.1"), False, set(), DUMP, True, ""),
    (_valkey("9.1.0"), _redis("7.0.15"), True, set(), TYPED, False, ""),
    (_valkey("9.1.0"), _redis("7.4.2"), False, {FTTL}, TYPED, False, ""),  # Redis 7.4 has HPEXPIREAT
    (_redis("8.0.0"), _redis("8.6.0"), False, {FTTL, VSET}, DUMP, True, ""),
])
def test_the_pair_decides_copy_method_replication_and_relaxed_advice(src, dst, relaxed, in_use, method, replicates, advice):
    """Each pair's copy method, replication and rdb-version-check advice follow the RDB matrix and the data in use."""
    plan = rdb.plan_pair(src, dst, relaxed, in_use)
    assert plan.copy_method == method, plan
    assert plan.replication.startswith("works") is replicates, plan
    assert plan.relaxed.startswith(advice) if advice else plan.relaxed == "", plan
    if method == NONE:
        assert plan.blocked, plan


# A recorded ``INFO commandstats`` of a Redis 8.2 application (as ``command_calls`` parses it) and the
# commands a Valkey 8.1 knows among them; ``COMMAND DOCS`` from that Redis for the since-versions.
REDIS82_EXECUTED = {"get": 1200, "set": 800, "hgetex": 12, "hsetex": 30, "vadd": 40, "vsim": 7, "delex": 3,
                    "digest": 2, "hello": 5}
VALKEY81_KNOWS = ["get", "set", "hello"]
REDIS82_DOCS = [b"delex", [b"summary", b"...", b"since", b"8.4.0"], b"digest", [b"since", b"8.4.0"],
                b"hgetex", [b"since", b"8.0.0"], b"hsetex", [b"since", b"8.0.0"], b"vadd", [b"since", b"8.0.0"],
                b"vsim", [b"since", b"8.0.0"]]


class _Side:
    def __init__(self, docs=None):
        self.docs = docs

    def call(self, *args, raw=False):
        if args[:2] == ("COMMAND", "DOCS") and self.docs is not None:
            return self.docs
        raise Unavailable("not recorded")


class _RecordedProbe:
    """Just what the commands check reads from a probe, from recorded replies."""

    def __init__(self, executed, target_knows, docs):
        self.commandstats = executed
        self.own_calls = {}
        self.source = _Side(docs)
        self.target = _Side()
        self.target_id = _valkey("8.1.1")
        self._table = {n: parse_spec([n.encode(), -1, [], 0, 0, 0, [b"@read"]]) for n in target_knows}

    def memo(self, key, fn):
        assert key == "commands:target"
        return self._table


def test_redis8_commands_the_target_lacks_are_named_with_call_counts():
    """HGETEX/HSETEX, V* and DELEX/DIGEST executed on a Redis 8 source fail against Valkey 8.1, each with its calls and since."""
    check = missing_commands_check(_RecordedProbe(REDIS82_EXECUTED, VALKEY81_KNOWS, REDIS82_DOCS))
    assert check.status == FAIL
    assert check.data["missing"] == ["delex", "digest", "hgetex", "hsetex", "vadd", "vsim"]
    for text in ("delex (3 calls, since 8.4.0)", "digest (2 calls, since 8.4.0)", "hgetex (12 calls, since 8.0.0)",
                 "hsetex (30 calls, since 8.0.0)", "vadd (40 calls, since 8.0.0)", "vsim (7 calls, since 8.0.0)"):
        assert text in check.evidence, check.evidence
    assert "6 of 9 commands" in check.evidence


def test_vector_sets_are_named_with_their_sampled_count():
    """Sampled keys whose TYPE is vectorset (Redis 8) fail with their count: no Valkey holds them."""
    findings = odd_types({"hash": 10, "vectorset": 3}, set())
    assert [(f.what, f.status) for f in findings] == [("type vectorset (3 sampled keys)", FAIL)]
    assert "vector sets the target cannot hold" in findings[0].note and "no Valkey module holds them" in findings[0].note
    assert "Valkey has no vector sets" in findings[0].fix


def _compat(make_playbook, source, target):
    from migrator import compat, playbook

    return compat.run(playbook.load(make_playbook(source, target)), write_report=False)


def test_report_advises_relaxed_where_it_helps(server_factory, make_playbook):
    """Valkey 9.1 → strict 8.1 with core types only: type-aware now, and relaxed named as the way to DUMP/RESTORE."""
    src, dst = server_factory("valkey-9.1"), server_factory("valkey-8.1")
    src.client().hset("h", mapping={"a": "1"})
    fmt = _compat(make_playbook, src, dst).check("data.format")
    assert fmt.status == WARN and fmt.data["copy_method"] == "type-aware"
    assert "rdb-version-check relaxed on the target would help" in fmt.evidence
    assert "CONFIG SET rdb-version-check relaxed" in fmt.remediation
    assert fmt.data["pair_plan"]["forward"]["copy_method"] == "type-aware"


def test_report_says_relaxed_does_not_carry_field_ttl_hashes(server_factory, make_playbook):
    """Valkey 9.1 → relaxed 8.1: core-type canaries pass, but with field TTLs in use replication is not claimed to work."""
    src = server_factory("valkey-9.1")
    dst = server_factory("valkey-8.1", config={"rdb-version-check": "relaxed"})
    c = src.client()
    c.hset("h", mapping={"a": "1"})
    c.execute_command("HPEXPIRE", "h", 600_000, "FIELDS", 1, "a")
    result = _compat(make_playbook, src, dst)
    fmt = result.check("data.format")
    assert fmt.data["copy_method"] == "dump-restore"  # what the canaries saw (core types)
    forward = fmt.data["replication"]["target_replicates_source"]
    assert forward.startswith("does not work: hashes with field TTLs"), forward
    assert "would not help" in fmt.evidence and "no copy method carries them to this target" in fmt.evidence
    assert fmt.status == WARN
    assert fmt.data["pair_plan"]["forward"]["blocked"] == [rdb.FIELD_TTL_HASHES]
    assert result.check("data.types").status == FAIL and result.verdict == "fail"
