"""``migrator check`` on real servers: mismatch kinds, rechecks, in-flux keys, repair, bound, gate, reports."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from migrator import reports
from migrator.data import check, render, stats, sync
from migrator.data import gates as data_gates
from migrator.gates import make_context
from migrator.phases import Phase
from migrator.state import State, StateStore, iso, now
from tests.test_data_helpers import FAST, bulk, load, populate


def _synced(src, dst, make_playbook, n: int = 200, **sections):
    bulk(src.client(), n)
    populate(src.client(), prefix="t:")
    pb = load(make_playbook(src, dst, **{**FAST, **sections}))
    assert sync.run(pb).complete
    return pb


def _cli(path, *args):
    return subprocess.run([sys.executable, "-m", "migrator", "-p", str(path), *args], capture_output=True, text=True,
                          timeout=60)


def _break_one_of_each_kind(src, dst):
    t = dst.client()
    t.delete("k:0")  # missing on target
    t.set("only-on-target", "x")  # extra on target
    t.delete("k:1")
    t.set("k:1", "now a string")  # type
    t.hset("t:hash", "a", "changed")  # value
    t.sadd("k:3", "extra-member")  # value (size)
    t.pexpire("k:5", 100_000)  # TTL only on target
    src.client().expire("k:10", 3600)
    t.expire("k:10", 1800)  # TTL delta beyond tolerance


def test_each_mismatch_kind_is_detected(pair, make_playbook):
    """Missing, extra, type, value and TTL differences are each found by a full check and reported by kind."""
    src, dst = pair
    pb = _synced(src, dst, make_playbook)
    _break_one_of_each_kind(src, dst)
    res = check.run(pb, full=True, interval=0.05)
    kinds = {m.key: m.kind for m in res.mismatches}
    assert kinds == {b"k:0": "missing", b"only-on-target": "extra", b"k:1": "type", b"t:hash": "value",
                     b"k:3": "value", b"k:5": "ttl", b"k:10": "ttl"}
    assert res.verdict == "fail" and not res.clean
    data = reports.load(pb.state_path, res.report_id)
    assert data["by_kind"] == {"missing": 1, "extra": 1, "type": 1, "value": 2, "ttl": 2, "field-ttl": 0}
    assert data["by_db"]["0"]["value"] == 2


def test_sample_finds_keys_only_on_the_target(server_factory, make_playbook):
    """A sample draws from the target too, so keys that exist only there are found."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = _synced(src, dst, make_playbook, n=3000)
    p = dst.client().pipeline(transaction=False)
    for i in range(600):
        p.set(f"stray:{i}", i)
    p.execute()
    res = check.run(pb, sample=400, interval=0.05)
    assert not res.exhaustive and 300 < res.checked <= 400
    extra = [m for m in res.mismatches if m.kind == "extra"]
    assert extra and all(m.key.startswith(b"stray:") for m in extra)
    assert res.counts[0]["target"] == res.counts[0]["source"] + 600


def test_sample_of_a_clean_keyspace_states_its_bound(server_factory, make_playbook):
    """A clean sample reports n, 0 mismatches and the Clopper-Pearson bound; warn when n is too small for the limit."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = _synced(src, dst, make_playbook, n=3000)
    res = check.run(pb, sample=500)
    assert res.clean and not res.exhaustive
    assert res.bound == pytest.approx(stats.upper_bound(0, res.checked))
    assert res.verdict == "warn"  # 0 in ~500 only bounds the rate below ~0.6%, above the 0.1% limit
    assert "95% bound" in res.summary


def test_transient_difference_is_filtered_by_the_recheck(server_factory, make_playbook):
    """A difference that disappears before the next round (a write in flight) is not a mismatch."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = _synced(src, dst, make_playbook)
    t = dst.client()
    t.rpush("k:2", "stale")  # as if a mirrored RPOP had not landed yet
    fix = threading.Timer(0.3, lambda: dst.client().rpop("k:2"))
    fix.start()
    res = check.run(pb, full=True, rounds=3, interval=0.6)
    fix.join()
    assert res.clean and res.transient == 1 and res.in_flux == 0


def test_persistent_difference_survives_every_round(server_factory, make_playbook):
    """A difference still there, unchanged, after every round is a mismatch."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = _synced(src, dst, make_playbook)
    dst.client().set("k:0", "stale")
    res = check.run(pb, full=True, rounds=3, interval=0.05)
    assert [m.key for m in res.mismatches] == [b"k:0"] and res.transient == 0


def test_key_changing_between_rounds_is_in_flux(server_factory, make_playbook):
    """A differing key whose value changes between rounds is counted in flux, not as a mismatch."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = _synced(src, dst, make_playbook)
    src.client().set("k:0", "changed once")
    bump = threading.Timer(0.2, lambda: src.client().set("k:0", "changed twice"))
    bump.start()
    res = check.run(pb, full=True, rounds=3, interval=0.5)
    bump.join()
    assert res.clean and res.in_flux == 1


def test_repair_copies_from_the_source_before_write_cutover(server_factory, make_playbook):
    """--repair in mirroring re-copies mismatches source → target, and a new check is clean."""
    src, dst = server_factory("redis-6.2"), server_factory("valkey-8.1")
    pb = _synced(src, dst, make_playbook)
    StateStore(pb.state_path, pb.name).save(State(migration=pb.name, phase=Phase.MIRRORING))
    _break_one_of_each_kind(src, dst)
    res = check.run(pb, full=True, repair=True, interval=0.05)
    assert res.clean and len(res.repaired) == 7 and res.authoritative == "source"
    assert dst.client().hget("t:hash", "a") == b"1" and not dst.client().exists("only-on-target")
    assert check.run(pb, full=True, interval=0.05).clean


def test_repair_copies_from_the_target_after_write_cutover(server_factory, make_playbook):
    """--repair in writes-on-target treats the target as authoritative and copies it back to the (older) source."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = _synced(src, dst, make_playbook)
    StateStore(pb.state_path, pb.name).save(State(migration=pb.name, phase=Phase.WRITES_ON_TARGET))
    dst.client().hset("t:hash", "a", "written on the target")
    dst.client().zadd("k:4", {"new": 5})
    res = check.run(pb, full=True, repair=True, interval=0.05)
    assert res.clean and res.authoritative == "target" and len(res.repaired) == 2
    assert src.client().hget("t:hash", "a") == b"written on the target"
    assert src.client().zscore("k:4", "new") == 5


def test_big_keys_are_compared_in_chunks(server_factory, make_playbook):
    """Keys larger than the chunk size are compared chunk by chunk, and one differing member is found."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    s = src.client()
    s.sadd("bigset", *range(20_000))
    s.zadd("bigzset", {f"m{i}": i for i in range(5000)})
    pb = load(make_playbook(src, dst, **FAST))
    assert sync.run(pb, chunk=500).complete
    assert check.run(pb, full=True, chunk=500).clean
    dst.client().zadd("bigzset", {"m4321": 0.5})
    dst.client().srem("bigset", 777)
    dst.client().sadd("bigset", "intruder")
    res = check.run(pb, full=True, chunk=500, interval=0.05)
    details = {m.key: m.detail for m in res.mismatches}
    assert set(details) == {b"bigset", b"bigzset"}
    assert "score" in details[b"bigzset"] and "missing" in details[b"bigset"]


def test_consistency_gate_requires_a_clean_check_in_this_phase(server_factory, make_playbook):
    """The gate passes on a clean check newer than the phase start, with the bound in its evidence."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = _synced(src, dst, make_playbook)
    store = StateStore(pb.state_path, pb.name)
    store.save(State(migration=pb.name, phase=Phase.READS_ON_TARGET, phase_since=iso(now())))
    ctx = lambda: make_context(pb, store, store.load())  # noqa: E731
    assert not data_gates.consistency(ctx()).passed
    check.run(pb, full=True)
    ok = data_gates.consistency(ctx())
    assert ok.passed, ok.evidence
    assert "0 mismatches in 211 keys (exact rate 0% < 0.1%)" in ok.evidence
    dst.client().set("k:0", "broken")
    check.run(pb, full=True, interval=0.05)
    failed = data_gates.consistency(ctx())
    assert not failed.passed and "1 mismatch in" in failed.evidence


def test_reports_render_and_hide_values_unless_asked(server_factory, make_playbook, tmp_path):
    """Check reports exist as JSON, Markdown and HTML with SVG charts; values appear only with --show-values."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = _synced(src, dst, make_playbook)
    dst.client().set("k:0", "SECRET-LOOKING-VALUE")
    res = check.run(pb, full=True, interval=0.05)
    ref = reports.reports_dir(pb.state_path)
    html = (ref / f"{res.report_id}.html").read_text()
    md = (ref / f"{res.report_id}.md").read_text()
    assert html.index("verdict fail") < html.index("Mismatches by kind") and html.count("<svg") == 2
    assert "k:0" in md and "missing on target" in md
    for text in (html, md, (ref / f"{res.report_id}.json").read_text()):
        assert "SECRET-LOOKING-VALUE" not in text
    shown = check.run(pb, full=True, interval=0.05, show_values=True)
    assert "SECRET-LOOKING-VALUE" in (ref / f"{shown.report_id}.md").read_text()


def test_cli_check_exit_codes_and_report_commands(server_factory, make_playbook, tmp_path):
    """CLI check exits 0 when clean and 1 on a mismatch; report lists, prints, writes and compares reports."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    pb = _synced(src, dst, make_playbook)
    path = pb.path
    clean = _cli(path, "check", "--full", "--output", "json")
    assert clean.returncode == 0, clean.stderr
    first = json.loads(clean.stdout)["id"]
    dst.client().delete("k:7")
    broken = _cli(path, "check", "--full")
    assert broken.returncode == 1 and broken.stdout.startswith("FAIL: 1 mismatch in") and "missing: 1" in broken.stdout
    second = broken.stdout.strip().splitlines()[-1].split()[1]
    listing = _cli(path, "report")
    assert listing.returncode == 0 and first in listing.stdout and second in listing.stdout and " sync " in listing.stdout
    out = tmp_path / "r.html"
    assert _cli(path, "report", second, "--format", "html", "--out", str(out)).returncode == 0
    assert out.read_text().startswith("<!doctype html>")
    cmp = _cli(path, "report", "--compare", first, second)
    assert cmp.returncode == 0 and "## New mismatches (1)" in cmp.stdout and "k:7" in cmp.stdout
    assert _cli(path, "check", "--full", "--sample", "3").returncode == 2
    assert _cli(path, "report", "no-such-report").returncode == 2


def test_unreachable_target_exits_3(server_factory, make_playbook):
    """A target that cannot be reached fails with one line and exit code 3."""
    src = server_factory("redis-7.0")
    path = make_playbook(src, "redis://127.0.0.1:1/0", **FAST)
    out = _cli(path, "check")
    assert out.returncode == 3 and out.stderr.startswith("FAILED: target redis://127.0.0.1:1/0: cannot connect")
    assert len(out.stderr.strip().splitlines()) == 1


def test_clopper_pearson_bound():
    """The bound matches the exact binomial values: 0 in 10,000 → 0.03%, and grows with k."""
    assert stats.format_rate(stats.upper_bound(0, 10_000)) == "0.03%"
    assert stats.upper_bound(0, 10_000) == pytest.approx(2.9953e-4, rel=1e-4)
    assert stats.upper_bound(5, 100) == pytest.approx(0.10225, rel=1e-4)  # scipy beta.ppf(0.95, 6, 95)
    assert stats.upper_bound(1000, 1_000_000) == pytest.approx(0.0010536, rel=1e-4)
    assert stats.upper_bound(3, 3) == 1.0 and stats.upper_bound(0, 0) == 1.0


def test_compare_two_checks():
    """Comparing two check reports lists new, resolved and persisting mismatches."""
    def rep(i, keys):
        ms = [{"db": 0, "key": k, "key_b64": k, "kind": "value", "detail": "d"} for k in keys]
        return {"id": f"check-{i}", "kind": "check", "verdict": "fail", "checked": 10, "mismatch_count": len(ms),
                "bound_text": "1%", "by_kind": {"value": len(ms)}, "mismatches": ms}

    c = render.compare_checks(rep(1, ["a", "b"]), rep(2, ["b", "c"]))
    assert [m["key"] for m in c["new"]] == ["c"] and [m["key"] for m in c["resolved"]] == ["a"]
    assert [m["key"] for m in c["persisting"]] == ["b"] and c["by_kind"]["value"] == [2, 2]
