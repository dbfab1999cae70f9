"""The final migration report: what a change-approval board signs off from, on its own.

Written by the ``final_report`` action when the migration completes, as a report of kind
``migration`` (JSON, Markdown and HTML, like every report). Everything in it is read from the
record the migration kept, never recomputed or assumed:

- every step taken, refused or abandoned, with each gate's measured evidence, from the
  journal's ``transition-started`` and ``refused`` entries, and how each step ended;
- the overrides (gate, reason, operator, the evidence that was overridden);
- the rollbacks, asked for (``migrator rollback``) or automatic (a step reverted);
- the write pauses measured at each switch of write authority (the ``write_pause`` action);
- the shims' divergence counters, per phase generation and in total;
- the last complete full sync (not a later ``--dirty`` pass, which are listed apart), the last
  consistency check and the compatibility report.
"""

from __future__ import annotations

import html
from typing import Any

from migrator import reports
from migrator.durations import format_duration
from migrator.playbook import Playbook
from migrator.state import State, StateStore, iso, now, parse_iso

# How a transition ended, by the journal event that ended it.
_OUTCOMES = {"transition-completed": "completed", "transition-aborted": "abandoned (phase unchanged)",
             "transition-reverted": "reverted", "transition-stalled": "stalled", "transition-superseded": "superseded"}


def _gate_rows(gates: list[dict]) -> list[dict[str, Any]]:
    return [{"gate": g.get("gate"), "passed": bool(g.get("passed")), "overridden": bool(g.get("overridden")),
             "override_reason": g.get("override_reason"), "evidence": g.get("evidence", "")} for g in gates]


def _gate_result(g: dict) -> str:
    if g["passed"]:
        return "pass"
    return f"OVERRIDDEN: {g['override_reason']}" if g["overridden"] else "FAIL"


def steps_from_journal(entries: list[dict], state: State) -> list[dict[str, Any]]:
    """Every transition started, in order, with its gates' evidence and how it ended."""
    steps: dict[str, dict[str, Any]] = {}
    for e in entries:
        ev, tid = e.get("event"), e.get("id")
        if ev == "transition-started":
            steps[tid] = {"id": tid, "step": e.get("step"), "direction": e.get("direction"), "from": e.get("from"),
                          "to": e.get("to"), "started_at": e.get("time"), "operator": e.get("operator"),
                          "playbook_hash": e.get("playbook_hash"), "gates": _gate_rows(e.get("gates") or []),
                          "outcome": "in progress", "ended_at": None, "reason": None, "actions": []}
        elif tid in steps and ev in _OUTCOMES:
            s = steps[tid]
            s["outcome"], s["ended_at"] = _OUTCOMES[ev], e.get("time")
            s["reason"] = e.get("reason") or s["reason"]
            s["actions"] = [{"action": a.get("action"), "ok": bool(a.get("ok")), "evidence": a.get("evidence", "")}
                            for a in e.get("actions") or []] or s["actions"]
    t = state.transition
    if t is not None and t.id in steps:  # the step completing now, which writes this report
        steps[t.id]["outcome"] = "completing (this report is one of its actions)"
    return list(steps.values())


def refusals_from_journal(entries: list[dict]) -> list[dict[str, Any]]:
    """Every ``advance``/``rollback`` a gate refused, with the failing gates' evidence."""
    out = []
    for e in entries:
        if e.get("event") != "refused":
            continue
        failing = [g for g in _gate_rows(e.get("gates") or []) if not g["passed"] and not g["overridden"]]
        out.append({"time": e.get("time"), "direction": e.get("direction"), "step": e.get("step"), "from": e.get("from"),
                    "to": e.get("to"), "operator": e.get("operator"),
                    "failing": [{"gate": g["gate"], "evidence": g["evidence"]} for g in failing]})
    return out


def overrides_of(steps: list[dict]) -> list[dict[str, Any]]:
    return [{"time": s["started_at"], "step": s["step"], "direction": s["direction"], "from": s["from"], "to": s["to"],
             "gate": g["gate"], "reason": g["override_reason"], "operator": s["operator"], "evidence": g["evidence"]}
            for s in steps for g in s["gates"] if g["overridden"]]


def rollbacks_of(steps: list[dict]) -> list[dict[str, Any]]:
    """Rollbacks asked for, and steps reverted automatically after an action failed."""
    out = []
    for s in steps:
        if s["direction"] == "rollback":
            out.append({"time": s["started_at"], "kind": "rollback", "from": s["from"], "to": s["to"],
                        "outcome": s["outcome"], "operator": s["operator"], "reason": s["reason"] or ""})
        elif s["outcome"] == "reverted":
            out.append({"time": s["ended_at"], "kind": "automatic revert", "from": s["to"], "to": s["from"],
                        "outcome": "reverted", "operator": s["operator"], "reason": s["reason"] or ""})
    return out


def write_pauses_from_journal(entries: list[dict], steps: list[dict]) -> list[dict[str, Any]]:
    """The pause each switch of write authority imposed on clients, as the ``write_pause`` action measured it."""
    by_id = {s["id"]: s for s in steps}
    out = []
    for e in entries:
        if e.get("event") != "transition-completed":
            continue
        for a in e.get("actions") or []:
            if a.get("action") != "write_pause":
                continue
            s = by_id.get(e.get("id"), {})
            data = a.get("data") or {}
            out.append({"time": e.get("time"), "step": s.get("step"), "direction": e.get("direction"),
                        "from": e.get("from"), "to": e.get("to"), "max_pause_ms": data.get("max_pause_ms"),
                        "pause_ms": data.get("pause_ms", {}), "evidence": a.get("evidence", "")})
    return out


def divergence_totals(state_dir, full_sync_id: str | None = None) -> dict[str, Any]:
    """The shims' counters summed per phase generation and over the whole migration, and the log's length.

    ``after_full_sync``: what was counted after the shims saw the full sync ``full_sync_id``
    finish (writes to keys not copied yet differ legitimately before that). Generations in
    which nothing was compared (one-sided phases, the write switch's hold) are left out.
    """
    from migrator.control import files
    from migrator.shim import divergence

    d = divergence.counters_dir(state_dir)
    generations = sorted({int(f.name[1:].split(".", 1)[0]) for f in files.listdir(d)
                          if f.name.startswith("g") and f.name.endswith(".json")})
    rows = []
    total = {"compared": 0, "divergent": 0, "awaiting_repair": 0, "after_full_sync": 0, "by_kind": {}}
    for gen in generations:
        c = divergence.read_counters(state_dir, gen)
        if not (c["compared"] or c["divergent"] or c["awaiting_repair"]):
            continue
        after = divergence.read_counters(state_dir, gen, after_sync=full_sync_id)["divergent"] if full_sync_id else None
        rows.append({"generation": gen, "phase": _phase_of_generation(d, gen), "compared": c["compared"],
                     "divergent": c["divergent"], "after_full_sync": after, "awaiting_repair": c["awaiting_repair"],
                     "shims": c["shims"], "by_kind": {k: n for k, n in c["by_kind"].items() if n}})
        for k in ("compared", "divergent", "awaiting_repair"):
            total[k] += c[k]
        total["after_full_sync"] += after or 0
        for k, n in c["by_kind"].items():
            if n:
                total["by_kind"][k] = total["by_kind"].get(k, 0) + n
    log = divergence.read_log(state_dir)
    logged = sum(int(x.get("count", 0)) if x.get("kind") == "suppressed" else 1 for x in log)
    return {"by_generation": rows, "total": total, "full_sync": full_sync_id, "logged": logged,
            "log": str(divergence.log_path(state_dir))}


def _phase_of_generation(counters_dir, generation: int) -> str:
    import json

    from migrator.control import files

    for f in files.listdir(counters_dir):
        if not (f.name.startswith(f"g{generation}.") and f.name.endswith(".json")):
            continue
        try:
            return json.loads(files.read_text(f)).get("phase", "")
        except (OSError, ValueError):
            continue
    return ""


_SYNC_FIELDS = ("id", "created_at", "verdict", "summary", "phase", "mode", "complete", "pass_started_at", "finished_at",
                "resumed", "keys", "bytes", "verified", "recopied", "duration_s", "method")
_CHECK_FIELDS = ("id", "created_at", "verdict", "summary", "phase", "mode", "exhaustive", "checked", "mismatch_count",
                 "repaired_count", "bound_text", "authoritative")


def _pick(report: dict | None, names: tuple[str, ...]) -> dict[str, Any] | None:
    return {k: report.get(k) for k in names} if report else None


def evidence_reports(state_dir) -> dict[str, Any]:
    """The last complete full sync, the ``--dirty`` passes after it, the last check and the compatibility report."""
    from migrator.shim.divergence import latest_complete_sync

    full = latest_complete_sync(state_dir)
    after = full["created_at"] if full else ""
    dirty = [r for r in reports.list_reports(state_dir, "sync") if r.get("mode") == "dirty" and r.get("created_at", "") > after]
    checks = reports.list_reports(state_dir, "check")
    compat = reports.latest(state_dir, "compat")
    return {
        "full_sync": _pick(full, _SYNC_FIELDS),
        "dirty_syncs_after": {"count": len(dirty), "keys": sum(int(r.get("keys", 0)) for r in dirty),
                              "last": _pick(dirty[-1], _SYNC_FIELDS) if dirty else None},
        "last_check": _pick(checks[-1] if checks else None, _CHECK_FIELDS),
        "checks": {"count": len(checks), "not_pass": sum(1 for r in checks if r.get("verdict") != "pass")},
        "compat": _pick(compat, ("id", "created_at", "verdict", "summary")),
    }


def topology_changes_from_journal(entries: list[dict]) -> list[dict[str, Any]]:
    """Each reshard or failover seen on a cluster side (``topology-changed``), when and in which phase."""
    out = []
    for e in entries:
        if e.get("event") != "topology-changed":
            continue
        not_seen = ", ".join(f"{role} {t}" for role, t in (e.get("since") or {}).items() if t)
        out += [{"time": e.get("seen_at") or e.get("time"), "not_before": not_seen, "phase": e.get("phase"),
                 "role": c.get("role"), "kind": c.get("kind"), "slots": c.get("slots"), "text": c.get("text")}
                for c in e.get("changes") or []]
    return out


_TOPO_HEADERS = ["seen at", "not seen at", "phase", "change"]
_TOPO_NOTE = ("Reshards and failovers on a cluster side, as the gates saw them between two pieces of evidence; a "
              "consistency check that began before a change did not count for the step after it.")


def _topo_rows(d: dict) -> list[tuple]:
    return [(c["time"], c["not_before"], c["phase"], c["text"]) for c in d.get("topology_changes") or []]


def build(pb: Playbook, store: StateStore, state: State) -> tuple[dict[str, Any], str, str]:
    """The final report's JSON data, Markdown and HTML."""
    entries = store.read_journal()
    steps = steps_from_journal(entries, state)
    refusals = refusals_from_journal(entries)
    overrides = overrides_of(steps)
    rollbacks = rollbacks_of(steps)
    pauses = write_pauses_from_journal(entries, steps)
    ev = evidence_reports(store.dir)
    div = divergence_totals(store.dir, (ev["full_sync"] or {}).get("id"))
    started = steps[0]["started_at"] if steps else None
    completed = iso(now())
    duration = format_duration(parse_iso(completed) - parse_iso(started)) if started else ""
    concerns = []
    if overrides:
        concerns.append(f"{len(overrides)} gate override(s)")
    if ev["last_check"] is None or ev["last_check"]["verdict"] != "pass":
        concerns.append("the last consistency check did not pass")
    if ev["full_sync"] is None:
        concerns.append("no complete full sync on record")
    summary = (f"{pb.name} completed: {pb.target.display} is the only server written; "
               f"{pb.source.display} can be decommissioned")
    if concerns:
        summary += "; read before signing off: " + ", ".join(concerns)
    operators = sorted({s["operator"] for s in steps if s.get("operator")})
    topology = topology_changes_from_journal(entries)
    data = reports.common(
        "migration", pb.name, "warn" if concerns else "pass", summary, source=pb.source.display, target=pb.target.display,
        started_at=started, completed_at=completed, duration=duration, operators=operators, steps=steps,
        refusals=refusals, overrides=overrides, rollbacks=rollbacks, write_pauses=pauses, divergences=div, **ev,
        topology_changes=topology,
        history=state.history, latest_reports={"compat": (ev["compat"] or {}).get("id"),
                                               "sync": (ev["full_sync"] or {}).get("id"),
                                               "check": (ev["last_check"] or {}).get("id")})
    return data, render_markdown(data), render_html(data)


# --- rendering -------------------------------------------------------------------------------


def _pause(ms: float | None) -> str:
    return f"{ms:.1f} ms" if ms is not None else "no shim held commands"


def _overview_rows(d: dict) -> list[tuple[str, Any]]:
    div, fs, lc, cp = d["divergences"], d["full_sync"], d["last_check"], d["compat"]
    worst = max((p["max_pause_ms"] for p in d["write_pauses"] if p["max_pause_ms"] is not None), default=None)
    advances = sum(1 for s in d["steps"] if s["direction"] == "advance")
    return [
        ("migration", d["migration"]), ("source (released)", d["source"]), ("target (serves everything)", d["target"]),
        ("first step started", d["started_at"] or ""), ("completed", d["completed_at"]), ("duration", d["duration"]),
        ("steps started", f"{len(d['steps'])} ({advances} advance, {len(d['steps']) - advances} rollback)"),
        ("refusals", len(d["refusals"])), ("gate overrides", len(d["overrides"])), ("rollbacks and reverts", len(d["rollbacks"])),
        ("write pauses", f"{len(d['write_pauses'])} switch(es), worst {_pause(worst)}"),
        ("divergences (shim counters)", f"{div['total']['divergent']:,} in {div['total']['compared']:,} compared replies, "
                                        + (f"{div['total']['after_full_sync']:,} after the full sync" if div["full_sync"]
                                           else "no full sync to count from")
                                        + f" ({div['total']['awaiting_repair']:,} more on keys awaiting repair)"),
        ("full sync", f"{fs['id']}: {fs['summary']}" if fs else "none complete"),
        ("--dirty passes after it", f"{d['dirty_syncs_after']['count']} ({d['dirty_syncs_after']['keys']:,} keys re-copied)"),
        ("last consistency check", f"{lc['id']}: {lc['verdict'].upper()} — {lc['summary']}" if lc else "none"),
        ("checks run", f"{d['checks']['count']} ({d['checks']['not_pass']} not passing)"),
        ("compatibility", f"{cp['id']}: {cp['verdict'].upper()} — {cp['summary']}" if cp else "none"),
        ("operators", ", ".join(d["operators"])),
    ]


def _step_title(i: int, s: dict) -> str:
    return f"{i}. {s['from']} → {s['to']} ({s['direction']}, step {s['step']}): {s['outcome']}"


def _step_meta(s: dict) -> str:
    ended = f", ended {s['ended_at']}" if s["ended_at"] else ""
    reason = f"; reason: {s['reason']}" if s["reason"] else ""
    return f"started {s['started_at']}{ended} by {s['operator']}; playbook hash {s['playbook_hash']}{reason}"


def _sync_rows(fs: dict) -> list[tuple[str, Any]]:
    return [("report", fs["id"]), ("verdict", fs["verdict"].upper()), ("summary", fs["summary"]), ("phase at run", fs["phase"]),
            ("complete", fs["complete"]), ("pass started", fs["pass_started_at"]), ("finished", fs["finished_at"]),
            ("resumed", fs["resumed"]), ("keys copied", f"{fs['keys']:,}"), ("verified equal", f"{fs['verified']:,}"),
            ("re-copied after verify", fs["recopied"]), ("method", fs["method"])]


def _check_rows(c: dict) -> list[tuple[str, Any]]:
    return [("report", c["id"]), ("verdict", c["verdict"].upper()), ("summary", c["summary"]), ("taken", c["created_at"]),
            ("phase / authoritative side", f"{c['phase']} / {c['authoritative']}"),
            ("mode", f"{c['mode']} ({'every key' if c['exhaustive'] else 'sampled'})"), ("keys compared", f"{c['checked']:,}"),
            ("mismatches", c["mismatch_count"]), ("mismatch rate bound", c["bound_text"]), ("repaired", c["repaired_count"])]


def _div_rows(div: dict) -> list[tuple]:
    def kinds(k: dict) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in k.items()) or "none"

    def after(n: int | None) -> str:
        return "" if n is None else f"{n:,}"

    rows = [(r["generation"], r["phase"], f"{r['compared']:,}", f"{r['divergent']:,}", after(r["after_full_sync"]),
             f"{r['awaiting_repair']:,}", kinds(r["by_kind"]), r["shims"]) for r in div["by_generation"]]
    t = div["total"]
    rows.append(("all", "whole migration", f"{t['compared']:,}", f"{t['divergent']:,}",
                 after(t["after_full_sync"] if div["full_sync"] else None), f"{t['awaiting_repair']:,}", kinds(t["by_kind"]), ""))
    return rows


_DIV_HEADERS = ["generation", "phase", "compared", "divergent", "divergent after the full sync", "on keys awaiting repair",
                "by kind", "shims"]
_DIV_NOTE = ("Counted by every shim while each phase generation was applied (generations that compared nothing are "
             "left out). In mirroring, writes to keys the full sync had not copied yet differ legitimately, so each "
             "cutover's divergence gate (in the steps above) counts only after it; divergences on keys already marked "
             "dirty are counted apart, and the no_dirty_keys gate holds the cutover until they are repaired.")


def render_markdown(d: dict) -> str:
    t = reports.md_table
    out = [f"# Migration {d['migration']}: completed", "", f"**{d['verdict'].upper()}** — {d['summary']}", "",
           "## Sign-off summary", "", t(["", ""], _overview_rows(d)), "", "## Gate overrides", ""]
    out.append(t(["time", "step", "gate", "reason", "operator", "overridden evidence"],
                 [(o["time"], f"{o['from']} → {o['to']}", o["gate"], o["reason"], o["operator"], o["evidence"])
                  for o in d["overrides"]]) if d["overrides"] else "None: every step's gates passed on their evidence.")
    out += ["", "## Steps and their gate evidence"]
    for i, s in enumerate(d["steps"], 1):
        out += ["", f"### {_step_title(i, s)}", "", _step_meta(s), ""]
        out.append(t(["gate", "result", "evidence"], [(g["gate"], _gate_result(g), g["evidence"]) for g in s["gates"]])
                   if s["gates"] else "No gates.")
        if s["actions"]:
            out += ["", t(["action", "ok", "evidence"], [(a["action"], a["ok"], a["evidence"]) for a in s["actions"]])]
    out += ["", "## Refusals", ""]
    out.append(t(["time", "command", "step", "failing gates", "operator"],
                 [(r["time"], r["direction"], f"{r['from']} → {r['to']}",
                   "; ".join(f"{g['gate']}: {g['evidence']}" for g in r["failing"]), r["operator"]) for r in d["refusals"]])
               if d["refusals"] else "None.")
    out += ["", "## Rollbacks", ""]
    out.append(t(["time", "kind", "from → to", "outcome", "operator", "reason"],
                 [(r["time"], r["kind"], f"{r['from']} → {r['to']}", r["outcome"], r["operator"], r["reason"])
                  for r in d["rollbacks"]]) if d["rollbacks"] else "None.")
    out += ["", "## Write pauses", ""]
    out.append(t(["time", "switch", "worst pause", "per shim"],
                 [(p["time"], f"{p['from']} → {p['to']}", _pause(p["max_pause_ms"]),
                   ", ".join(f"{k}: {v:.1f} ms" for k, v in p["pause_ms"].items())) for p in d["write_pauses"]])
               if d["write_pauses"] else "None recorded.")
    out += ["", "## Topology changes", ""]
    out.append(f"{_TOPO_NOTE}\n\n" + t(_TOPO_HEADERS, _topo_rows(d)) if _topo_rows(d) else "None seen.")
    out += ["", "## Divergences", "", _DIV_NOTE, "", t(_DIV_HEADERS, _div_rows(d["divergences"])), "",
            f"{d['divergences']['logged']:,} divergence(s) in the log {d['divergences']['log']}.", "", "## Full sync", ""]
    out.append(t(["", ""], _sync_rows(d["full_sync"])) if d["full_sync"] else "No complete full sync on record.")
    ds = d["dirty_syncs_after"]
    out += ["", f"`--dirty` passes after it: {ds['count']}, {ds['keys']:,} key(s) re-copied"
            + (f"; the last: {ds['last']['id']} — {ds['last']['summary']}" if ds["last"] else "") + ".",
            "", "## Last consistency check", ""]
    out.append(t(["", ""], _check_rows(d["last_check"])) if d["last_check"] else "No check on record.")
    return "\n".join(out) + "\n"


def _h(x: Any) -> str:
    return html.escape(reports.cell_text(x))


def render_html(d: dict) -> str:
    tb = reports.html_table
    body = ["<h2>Sign-off summary</h2>", tb(["", ""], _overview_rows(d)), "<h2>Gate overrides</h2>"]
    body.append(tb(["time", "step", "gate", "reason", "operator", "overridden evidence"],
                   [(o["time"], f"{o['from']} → {o['to']}", o["gate"], o["reason"], o["operator"], o["evidence"])
                    for o in d["overrides"]], ["warn"] * len(d["overrides"]))
                if d["overrides"] else "<p>None: every step's gates passed on their evidence.</p>")
    body.append("<h2>Steps and their gate evidence</h2>")
    for i, s in enumerate(d["steps"], 1):
        body += [f"<h3>{_h(_step_title(i, s))}</h3>", f"<p class=muted>{_h(_step_meta(s))}</p>"]
        cls = ["pass" if g["passed"] else "warn" if g["overridden"] else "fail" for g in s["gates"]]
        body.append(tb(["gate", "result", "evidence"], [(g["gate"], _gate_result(g), g["evidence"]) for g in s["gates"]], cls)
                    if s["gates"] else "<p>No gates.</p>")
        if s["actions"]:
            body.append(tb(["action", "ok", "evidence"], [(a["action"], a["ok"], a["evidence"]) for a in s["actions"]]))
    body.append("<h2>Refusals</h2>")
    body.append(tb(["time", "command", "step", "failing gates", "operator"],
                   [(r["time"], r["direction"], f"{r['from']} → {r['to']}",
                     "; ".join(f"{g['gate']}: {g['evidence']}" for g in r["failing"]), r["operator"]) for r in d["refusals"]])
                if d["refusals"] else "<p>None.</p>")
    body.append("<h2>Rollbacks</h2>")
    body.append(tb(["time", "kind", "from → to", "outcome", "operator", "reason"],
                   [(r["time"], r["kind"], f"{r['from']} → {r['to']}", r["outcome"], r["operator"], r["reason"])
                    for r in d["rollbacks"]]) if d["rollbacks"] else "<p>None.</p>")
    body.append("<h2>Write pauses</h2>")
    body.append(tb(["time", "switch", "worst pause", "per shim"],
                   [(p["time"], f"{p['from']} → {p['to']}", _pause(p["max_pause_ms"]),
                     ", ".join(f"{k}: {v:.1f} ms" for k, v in p["pause_ms"].items())) for p in d["write_pauses"]])
                if d["write_pauses"] else "<p>None recorded.</p>")
    body.append("<h2>Topology changes</h2>")
    body.append(f"<p>{_h(_TOPO_NOTE)}</p>" + tb(_TOPO_HEADERS, _topo_rows(d)) if _topo_rows(d) else "<p>None seen.</p>")
    body += ["<h2>Divergences</h2>", f"<p>{_h(_DIV_NOTE)}</p>", tb(_DIV_HEADERS, _div_rows(d["divergences"])),
             f"<p class=muted>{d['divergences']['logged']:,} divergence(s) in the log {_h(d['divergences']['log'])}.</p>",
             "<h2>Full sync</h2>"]
    body.append(tb(["", ""], _sync_rows(d["full_sync"])) if d["full_sync"] else "<p>No complete full sync on record.</p>")
    ds = d["dirty_syncs_after"]
    body.append(f"<p><code>--dirty</code> passes after it: {ds['count']}, {ds['keys']:,} key(s) re-copied"
                + (f"; the last: {_h(ds['last']['id'])} — {_h(ds['last']['summary'])}" if ds["last"] else "") + ".</p>")
    body.append("<h2>Last consistency check</h2>")
    body.append(tb(["", ""], _check_rows(d["last_check"])) if d["last_check"] else "<p>No check on record.</p>")
    return reports.html_page(f"Migration {d['migration']}: completed", d["verdict"], d["summary"], "".join(body),
                             meta=f"{d['migration']} · {d['created_at']}")
