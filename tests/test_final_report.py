"""The final migration report: a change-approval board signs off from it alone.

A real walk (Redis 7.0 → Valkey 9.1, a shim process, concurrent clients) with a refused step,
a gate override, a rollback of the write cutover and a ``--dirty`` pass after the full sync;
the report written at completion must carry each of those with the values the run produced.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from migrator import command, demo, playbook, reports
from migrator.data import check as check_mod
from migrator.data import sync as sync_mod
from migrator.shim import divergence
from migrator.state import operator
from migrator.workload import Workload

REASON = "change board CAB-1234 accepted a shortened observation"


def _walk(server_factory, tmp_path):
    """Run the whole migration; return the playbook, the ids the run produced and the final step's result."""
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    demo.seed(src.client(), 300)
    path = demo.write_playbook(tmp_path, src, tgt)
    doc = json.loads(path.read_text())
    doc["steps"]["mirror"]["min_duration"] = "1h"  # refused, then overridden
    doc["steps"]["read_cutover"]["min_duration"] = "1s"
    doc["steps"]["write_cutover"]["rollback_window"] = "1s"
    path.write_text(json.dumps(doc))
    pb = playbook.load(path)
    shim = demo.ShimProcess(path, tmp_path / "shim.log")
    workload = None
    ids: dict = {}
    try:
        shim.wait_registered(pb.state_path)
        workload = Workload(f"redis://{pb.shim.listen}/0", clients=3, rate=150.0, seed=5).start()
        command.advance(pb)  # → compatible
        command.advance(pb)  # → mirroring
        ids["full_sync"] = sync_mod.run(pb).report_id
        ids["dirty_sync"] = sync_mod.run(pb, dirty=True).report_id
        check_mod.run(pb, full=True)
        time.sleep(1.5)  # replies compared after the sync finished (the divergence gate's minimum)
        with pytest.raises(command.GatesFailed):
            command.advance(pb)  # mirror_duration: 1h not elapsed
        command.advance(pb, overrides={"mirror_duration": REASON})  # → reads-on-target
        time.sleep(1.1)
        check_mod.run(pb, full=True)
        command.advance(pb)  # → writes-on-target (a write pause)
        command.rollback(pb)  # → reads-on-target (another write pause)
        check_mod.run(pb, full=True)
        time.sleep(1.1)
        command.advance(pb)  # → writes-on-target again
        time.sleep(1.1)
        workload.stop()
        ids["last_check"] = check_mod.run(pb, full=True).report_id
        done = command.advance(pb)  # → completed: writes the report
    finally:
        if workload is not None:
            workload.stop()
        shim.stop()
    return pb, ids, done


@pytest.mark.slow
def test_final_report_carries_every_piece_of_sign_off_evidence(server_factory, tmp_path):
    """The report written at completion holds each step's gate evidence, the override with its reason and operator, the refusal, the rollback, every write pause, the shims' divergence totals, the full sync (not the later --dirty pass) and the last check, in JSON, Markdown and HTML."""
    pb, ids, done = _walk(server_factory, tmp_path)
    action = next(a for a in done.actions if a.name == "final_report")
    data = reports.load(pb.state_path, action.data["report"])
    md = reports.path_of(pb.state_path, data["id"], "md").read_text()
    page = reports.path_of(pb.state_path, data["id"], "html").read_text()

    # Every step, with the evidence each gate measured.
    assert [(s["from"], s["to"]) for s in data["steps"]] == [
        ("planned", "compatible"), ("compatible", "mirroring"), ("mirroring", "reads-on-target"),
        ("reads-on-target", "writes-on-target"), ("writes-on-target", "reads-on-target"),
        ("reads-on-target", "writes-on-target"), ("writes-on-target", "completed")]
    assert all(g["evidence"] for s in data["steps"] for g in s["gates"])
    read_cut = data["steps"][2]
    assert {g["gate"] for g in read_cut["gates"]} >= {"mirror_duration", "sync_complete", "divergence", "consistency"}
    for s in data["steps"]:
        for g in s["gates"]:
            assert g["evidence"] in md and g["evidence"].replace("'", "&#x27;").replace("<", "&lt;").replace(">", "&gt;") in page

    # The override: gate, reason, operator and what was overridden.
    assert len(data["overrides"]) == 1
    o = data["overrides"][0]
    assert (o["gate"], o["reason"], o["operator"]) == ("mirror_duration", REASON, operator())
    assert "of 1h" in o["evidence"]
    assert REASON in md and REASON in page
    assert data["verdict"] == "warn" and "1 gate override(s)" in data["summary"]

    # The refusal, with the failing gate's evidence.
    assert len(data["refusals"]) == 1
    assert [g["gate"] for g in data["refusals"][0]["failing"]] == ["mirror_duration"]
    assert data["refusals"][0]["failing"][0]["evidence"] in md

    # The rollback of the write cutover.
    assert [(r["kind"], r["from"], r["to"], r["outcome"]) for r in data["rollbacks"]] == [
        ("rollback", "writes-on-target", "reads-on-target", "completed")]

    # Each switch of write authority, with the pause the shim measured.
    pauses = data["write_pauses"]
    assert [(p["from"], p["to"]) for p in pauses] == [
        ("reads-on-target", "writes-on-target"), ("writes-on-target", "reads-on-target"),
        ("reads-on-target", "writes-on-target")]
    assert all(0 <= p["max_pause_ms"] < 5000 for p in pauses)
    for p in pauses:
        assert f"{p['max_pause_ms']:.1f} ms" in md and f"{p['max_pause_ms']:.1f} ms" in page

    # The divergence totals are the shims' own counters, summed.
    files = list(divergence.counters_dir(pb.state_path).glob("g*.json"))
    compared = sum(json.loads(f.read_text())["compared"] for f in files)
    divergent = sum(json.loads(f.read_text())["divergent"] for f in files)
    total = data["divergences"]["total"]
    assert compared > 100 and (total["compared"], total["divergent"]) == (compared, divergent)
    assert f"{compared:,}" in md and f"{compared:,}" in page

    # The full sync, not the later --dirty pass; then the last check.
    assert data["full_sync"]["id"] == ids["full_sync"] and data["full_sync"]["mode"] == "full"
    assert data["full_sync"]["keys"] >= 300
    assert data["dirty_syncs_after"]["count"] == 1 and data["dirty_syncs_after"]["last"]["id"] == ids["dirty_sync"]
    assert data["last_check"]["id"] == ids["last_check"] and data["last_check"]["verdict"] == "pass"
    for text in (md, page):
        assert ids["full_sync"] in text and ids["last_check"] in text
        for section in ("Sign-off summary", "Gate overrides", "Steps and their gate evidence", "Refusals",
                        "Rollbacks", "Write pauses", "Divergences", "Full sync", "Last consistency check"):
            assert section in text

    # HTML for people: no Python spellings, no empty header rows.
    cells = re.findall(r"<t[dh][^>]*>([^<]*)</t[dh]>", page)
    assert not {"True", "False", "None"} & set(cells)
    assert "<th></th>" not in page
