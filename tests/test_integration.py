"""Where the parts meet: the compatibility report steering sync and repair."""

from migrator import playbook, reports
from migrator.compat import run as compat_run
from migrator.data import sync
from migrator.data.copy import DUMP, STRUCT, detect_method


def test_sync_and_repair_follow_the_compatibility_reports_methods(server_factory, make_playbook):
    """Valkey 9.1 → Redis 7.0: the report says type-aware forward and DUMP/RESTORE back, and the copy obeys both."""
    src, dst = server_factory("valkey-9.1"), server_factory("redis-7.0")
    c = src.client()
    c.set("s", "1")
    c.hset("h", mapping={"a": "1", "b": "2"})
    c.zadd("z", {"m": 1.5})
    pb = playbook.load(make_playbook(src, dst))
    compat_run(pb)
    rep = reports.latest(pb.state_path, "compat")
    assert (rep["copy_method"], rep["rollback_copy_method"]) == ("type-aware", "dump-restore")
    method, why = detect_method(src.client(), dst.client(), rep)
    assert method == STRUCT and "compatibility report" in why
    back, why_back = detect_method(dst.client(), src.client(), rep, rollback=True)
    assert back == DUMP and "rollback_copy_method" in why_back
    res = sync.run(pb)
    assert res.complete and res.method == STRUCT
    assert dst.client().hgetall("h") == {b"a": b"1", b"b": b"2"}
    assert dst.client().zscore("z", "m") == 1.5
