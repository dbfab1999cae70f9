"""Managed services: compat, sync, check, gates and the shim against servers restricted like each provider.

Each profile (``tests/providers.py``) emulates one provider's documented restrictions with
``rename-command`` lines or ACL rules. One pair of servers serves all the steps of a case.
"""

from __future__ import annotations

import pytest

from migrator import compat, gates, reports
from migrator.compat import capabilities
from migrator.data import check, sync
from migrator.phases import Phase
from migrator.shim.commands import SOURCE, TARGET
from migrator.state import StateStore
from tests.providers import PROFILES
from tests.test_data_helpers import FAST, bulk, load, populate

# Every profile as the source (Redis 7.0); as the target (Valkey 9.1), the two that restrict
# differently: by renaming (Memorystore: COMMAND, OBJECT, CLIENT, CONFIG gone) and by ACL (MemoryDB).
CASES = [(name, "source") for name in PROFILES] + [("memorystore", "target"), ("memorydb", "target")]


@pytest.mark.parametrize("name,role", CASES, ids=[f"{n}-as-{r}" for n, r in CASES])
def test_provider_profile_compat_sync_check_gates_and_shim(name, role, server_factory, make_playbook, make_env):
    """Against a server restricted like the provider, compat names what is refused and the provider, never claims
    replication works when SYNC/PSYNC are refused, and sync, check, the gates and the mirroring shim all work."""
    profile = PROFILES[name]
    src = server_factory("redis-7.0", conf_lines=profile["conf"] if role == "source" else None)
    dst = server_factory("valkey-9.1", conf_lines=profile["conf"] if role == "target" else None)
    populate(src.client())
    bulk(src.client(), 200)
    src.client().sadd("bigset", *range(2500))  # copied in chunks (the read script's OBJECT path on a plain source)
    path = make_playbook(src, dst, **FAST)
    pb = load(path)

    # compat: the profile, the provider guessed, the replication claim.
    result = compat.run(pb)
    prov = result.check("provider")
    assert prov.status == compat.WARN, prov.evidence
    caps = {c["name"]: c["state"] for c in result.data["capabilities"][role]["capabilities"]}
    expected = capabilities.DENIED if name == "memorydb" else capabilities.RENAMED
    assert {n: caps[n] for n in profile["refused"]} == {n: expected for n in profile["refused"]}, caps
    assert profile["provider"] in result.data["capabilities"][role]["providers"], prov.evidence
    other = "target" if role == "source" else "source"
    assert result.data["capabilities"][other]["providers"] == []  # a plain server matches no provider
    forward = result.data["replication"]["target_replicates_source"]
    if role == "source" and profile["refused"] & {"SYNC", "PSYNC"}:
        assert not forward.startswith("works") and ("SYNC" in forward), forward
    elif role == "source":
        assert forward.startswith("works"), forward  # Azure documents no SYNC/PSYNC block: not refused
    elif "REPLICAOF" in profile["refused"]:
        assert forward.startswith("does not work: REPLICAOF is") and "on the target" in forward, forward
    if role == "source" and "REPLICAOF" in profile["refused"]:  # no rollback by replication either
        back = result.data["replication"]["source_replicates_target"]
        assert back.startswith("does not work: REPLICAOF is") and "on the source" in back, back
    page = (reports.reports_dir(pb.state_path) / f"{result.report_id}.md").read_text()
    assert "## Provider profile" in page and profile["provider"] in page

    # sync and a full check.
    res = sync.run(pb, batch=100)
    keys = src.client().dbsize()
    assert keys > 200 and res.complete and res.keys == keys and dst.client().dbsize() == keys
    assert check.run(pb, full=True, interval=0.05).clean

    # The shim in mirroring: the restricted side's command table is loaded (shipped where COMMAND is refused).
    env = make_env(src, dst, **FAST)
    side = SOURCE if role == "source" else TARGET
    assert env.thread.call(lambda: env.thread.shim.table.loaded(side))
    env.walk_to(Phase.MIRRORING)
    c = env.client()
    c.set("via-shim", "1")
    c.hset("bigset-h", mapping={"a": "1"})
    c.sadd("bigset", "new-member")
    c.expire("via-shim", 100)
    env.flush()
    for server in (src, dst):
        r = server.client()
        assert r.get("via-shim") == b"1" and r.hget("bigset-h", "a") == b"1" and r.sismember("bigset", "new-member")
        assert 0 < r.ttl("via-shim") <= 100

    # The gates the phase walk asks for read INFO only: none needs CONFIG, OBJECT or CLIENT.
    store = StateStore(pb.state_path, pb.name)
    ctx = gates.make_context(pb, store, store.load())
    results = gates.evaluate(("source_reachable", "sides_live", "key_counts"), ctx)
    assert len(results) == 3 and all(r.passed for r in results), [(r.name, r.evidence) for r in results]


def test_sync_without_object_or_a_compat_report_sizes_keys_with_type_and_size_commands(server_factory, make_playbook):
    """Without OBJECT and without a compat report, sync picks its copy method and copies every key (big in chunks)."""
    src = server_factory("redis-7.0", conf_lines=PROFILES["memorystore"]["conf"])
    dst = server_factory("valkey-9.1")
    bulk(src.client(), 300)
    src.client().sadd("bigset", *range(2500))
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb, batch=100)
    assert res.complete and res.method == "dump" and "accepts the source's DUMP payload" in res.method_reason
    assert res.keys == dst.client().dbsize() == 301 and res.big == 1 and dst.client().scard("bigset") == 2500
    assert check.run(pb, full=True, interval=0.05).clean


# What a locked-down service may refuse beyond the documented profiles: scripting, FUNCTION, MEMORY, DEBUG, OBJECT.
NO_SCRIPTING = [f'rename-command {c} ""' for c in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "SCRIPT", "FUNCTION",
                                                     "FCALL", "FCALL_RO", "MEMORY", "DEBUG", "OBJECT")]


def test_sync_and_check_without_scripting_object_memory_or_function_on_both_sides(server_factory, make_playbook):
    """With no scripting, FUNCTION, MEMORY, DEBUG or OBJECT on either server, sync copies every key, says the
    function libraries were not copied (not "no functions"), and check still finds the differences planted after it."""
    src = server_factory("redis-7.0", conf_lines=NO_SCRIPTING)
    dst = server_factory("valkey-9.1", conf_lines=NO_SCRIPTING)
    populate(src.client())
    bulk(src.client(), 300)
    src.client().sadd("bigset", *range(2500))
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb, batch=100)
    keys = src.client().dbsize()
    assert res.complete and res.keys == keys == dst.client().dbsize() and res.big == 1
    assert res.functions.startswith("function libraries NOT copied: FUNCTION LIST is refused on the source")
    assert check.run(pb, full=True, interval=0.05).clean
    dst.client().set("k:5", "changed")
    dst.client().delete("k:6")
    dst.client().srem("bigset", 7)
    found = check.run(pb, full=True, interval=0.05)
    assert sorted(m.key for m in found.mismatches) == [b"bigset", b"k:5", b"k:6"], found.summary


def test_shipped_command_table_family_is_the_newest_not_newer_than_the_server():
    """A server without COMMAND gets the shipped table of its kind not newer than it (else the oldest of its kind)."""
    from migrator.shim import command_tables
    from migrator.shim.commands import parse_command_reply

    assert command_tables.family_for("redis", "7.4.2") == "redis-7.0"
    assert command_tables.family_for("redis", "8.2.1") == "redis-7.0"
    assert command_tables.family_for("redis", "6.2.14") == "redis-6.2"
    assert command_tables.family_for("redis", "6.0.9") == "redis-6.2"
    assert command_tables.family_for("valkey", "9.0.0") == "valkey-8.1"
    assert command_tables.family_for("valkey", "9.1.2") == "valkey-9.1"
    for family in command_tables.FAMILIES:
        table = parse_command_reply(command_tables.load_reply(family))
        assert len(table) > 200 and table[b"set"].first == 1 and b"mset" in table
    assert b"hexpire" in parse_command_reply(command_tables.load_reply("valkey-9.1"))


def test_provider_match_needs_every_documented_refusal_and_no_documented_command_refused():
    """A profile names a provider only when all its documented blocks are refused and none of what it allows is."""
    def prof(*refused: str) -> capabilities.Profile:
        p = capabilities.Profile("source")
        p.capabilities = [capabilities.Capability(n, f, capabilities.RENAMED if f in refused else capabilities.AVAILABLE,
                                                  "test") for n, f, *_ in capabilities._PROBES]
        return p

    assert capabilities.match_providers(prof()) == []
    assert capabilities.match_providers(prof("CONFIG")) == []
    assert capabilities.match_providers(prof("CONFIG", "DEBUG", "REPLICAOF", "SYNC")) == ["AWS ElastiCache"]
    assert capabilities.match_providers(prof("CONFIG", "DEBUG", "REPLICAOF", "SYNC", "PSYNC")) == [
        "AWS ElastiCache", "AWS MemoryDB"]
    assert capabilities.match_providers(prof("CONFIG", "DEBUG", "REPLICAOF")) == ["Azure Cache for Redis"]


def test_a_cluster_side_is_probed_on_every_primary(cluster_factory, server_factory, make_playbook):
    """On a cluster source, each primary is probed: PSYNC denied by ACL on one primary only is reported denied,
    naming that node, and replication is not claimed."""
    source = cluster_factory("redis-7.0", primaries=3, replicas=0)
    target = server_factory("valkey-9.1")
    third = source.primaries()[2]
    source.node_client(third).execute_command("ACL", "SETUSER", "default", "-psync", "-sync")
    result = compat.run(load(make_playbook(source, target)), write_report=False)
    prof = result.data["capabilities"]["source"]
    caps = {c["name"]: c for c in prof["capabilities"]}
    assert caps["PSYNC"]["state"] == caps["SYNC"]["state"] == capabilities.DENIED
    assert f"on {third.host}:{third.port} of 3 primaries" in caps["PSYNC"]["how"]
    assert caps["CONFIG GET"]["state"] == capabilities.AVAILABLE and len(prof["nodes"]) == 3
    assert not result.data["replication"]["target_replicates_source"].startswith("works")
    assert result.check("provider").status == compat.WARN
