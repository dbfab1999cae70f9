"""The compatibility report: JSON for the sync code and machines, Markdown and HTML for people.

Verdict first, then what must be fixed (failures with their remediation), then warnings and
what could not be checked, then every check and the details (copy methods, keyspace,
configuration, the test run). Rendering is a pure function of the report's JSON.
"""

from __future__ import annotations

import html
from typing import Any

from migrator import reports
from migrator.compat.model import FAIL, PASS, UNKNOWN, WARN, ordered
from migrator.playbook import Playbook

KIND = "compat"
_LABEL = {PASS: "PASS", WARN: "WARN", FAIL: "FAIL", UNKNOWN: "COULD NOT CHECK"}


def build(playbook: Playbook, result) -> dict[str, Any]:
    """The report's JSON: the common fields, every check, and the facts the sync code reads."""
    return reports.common(
        KIND, playbook.name, result.verdict, result.summary,
        endpoints_hash=playbook.endpoints_hash(), playbook_hash=playbook.playbook_hash(),
        checks=[c.to_json() for c in ordered(result.checks)], **result.data,
    )


def write(playbook: Playbook, result) -> reports.ReportRef:
    data = build(playbook, result)
    return reports.write(playbook.state_path, data, markdown(data), html_report(data))


# --- Markdown ---------------------------------------------------------------------------------


def _servers_line(data: dict) -> str:
    s, t = data["source"], data["target"]
    return f"source {s['kind']} {s['version']} ({s['url']}) → target {t['kind']} {t['version']} ({t['url']})"


def _groups(data: dict) -> tuple[list, list]:
    checks = data["checks"]
    return [c for c in checks if c["status"] == FAIL], [c for c in checks if c["status"] in (WARN, UNKNOWN)]


def markdown(data: dict) -> str:
    failures, warnings = _groups(data)
    out = [f"# Compatibility report {data['id']}", "",
           f"**Verdict: {data['verdict'].upper()}** — {data['summary']}", "",
           f"Migration `{data['migration']}`, {data['created_at']}: {_servers_line(data)}", ""]
    for heading, group in (("Must fix", failures), ("Warnings and checks that could not run", warnings)):
        if group:
            out += [f"## {heading}", ""]
            out += [f"- **{c['title']}** ({_LABEL[c['status']]}): {c['evidence']}  \n  *Do:* {c['remediation']}"
                    for c in group]
            out.append("")
    out += ["## All checks", "", reports.md_table(["status", "check", "evidence", "remediation"],
            [(_LABEL[c["status"]], c["title"], c["evidence"], c["remediation"]) for c in data["checks"]]), ""]
    out += _md_details(data)
    return "\n".join(out) + "\n"


def _copy_rows(data: dict) -> list[tuple[str, Any]]:
    rep = data.get("replication") or {}
    versions = data.get("rdb_versions") or {}
    return [("sync copy method (copy_method)", data.get("copy_method") or "none"),
            ("rollback copy method (rollback_copy_method)", data.get("rollback_copy_method") or "none"),
            ("RDB version written by source / target", f"{versions.get('source')} / {versions.get('target')}"),
            ("target as replica of source", rep.get("target_replicates_source", "not checked")),
            ("source as replica of target (rollback)", rep.get("source_replicates_target", "not checked")),
            ("mirror strategy", _strategy(data.get("mirror")))]


def _strategy(mirror: dict | None) -> str:
    if not mirror:
        return "not decided"
    return f"{mirror['strategy']}{'' if mirror.get('ok', True) else ' (CANNOT WORK)'} (asked: {mirror['requested']}): {mirror['why']}"


def _keyspace_rows(data: dict) -> list[tuple]:
    rows = []
    for role in ("source", "target"):
        for d in data.get("keyspace", {}).get(role, {}).get("dbs", []):
            types = ", ".join(f"{k} {v}" for k, v in sorted(d["types"].items()))
            rows.append((role, f"db{d['db']}", d["keys"], d["expires"], f"{d['sampled']}{'' if d['complete'] else '+'}",
                         types, d["estimated_memory"] if d["estimated_memory"] is not None else "?"))
    return rows


_KEYSPACE_HEAD = ["server", "db", "keys", "with TTL", "sampled", "types (sampled)", "est. memory (bytes)"]
_CONFIG_HEAD = ["setting", "source", "target", "status", "note"]


def _config_rows(data: dict) -> list[tuple]:
    check = next((c for c in data["checks"] if c["name"] == "config"), None)
    settings = (check or {}).get("data", {}).get("settings", [])
    return [(s["setting"], s["source"], s["target"], _LABEL[s["status"]], s["note"]) for s in settings]


_NODES_HEAD = ["side", "node", "role", "slots", "server", "RDB", "modules", "used_memory", "maxmemory", "problem"]
_SHARDS_HEAD = ["target primary", "slots", "source data (est. bytes)", "used now", "projected", "maxmemory", "status"]


def _node_rows(data: dict) -> list[tuple]:
    """Every node of each cluster side (``clusters`` in the JSON)."""
    rows = []
    for role in ("source", "target"):
        for n in (data.get("clusters") or {}).get(role, {}).get("nodes", []):
            mods = "?" if n["modules"] is None else ", ".join(n["modules"]) or "none"
            rows.append((role, n["address"], n["role"], n["slots"] or "—", n["server"] or "?",
                         n["rdb_version"] or "?", mods, n["used_memory"] if n["used_memory"] is not None else "?",
                         n["maxmemory"] if n["maxmemory"] is not None else "?", n["error"]))
    return rows


def _shard_rows(data: dict) -> list[tuple]:
    check = next((c for c in data["checks"] if c["name"] == "cluster.memory"), None)
    return [(s["address"], s["slots"], s["share"], s["used"], s["projected"], s["maxmemory"] or "none",
             _LABEL[s["status"]]) for s in (check or {}).get("data", {}).get("shards", [])]


_CAPS_HEAD = ["server", "command", "state", "how probed / the server's answer", "what migrator does instead"]


def _capability_rows(data: dict) -> list[tuple]:
    """Each server's probed commands (``capabilities`` in the JSON), the refused ones first."""
    rows = []
    for role, prof in (data.get("capabilities") or {}).items():
        caps = sorted(prof.get("capabilities", []), key=lambda c: c["state"] == "available")
        rows += [(role, c["name"], c["state"], f"{c['how']}{': ' + c['answer'] if c['answer'] else ''}",
                  c["instead"] if c["state"] != "available" else "") for c in caps]
    return rows


def _providers_line(data: dict) -> str:
    parts = [f"{role}: {' or '.join(p['providers'])}" for role, p in (data.get("capabilities") or {}).items()
             if p.get("providers")]
    if not parts:
        return "No managed provider's pattern matched."
    return "Matches the documented restrictions of " + "; ".join(parts)


def _test(data: dict) -> dict:
    check = next((c for c in data["checks"] if c["name"] == "tests"), None)
    return (check or {}).get("data", {})


def _md_details(data: dict) -> list[str]:
    out = ["## Copy methods and replication", "", reports.md_table(["", ""], _copy_rows(data)), "",
           "## Keyspace", "", reports.md_table(_KEYSPACE_HEAD, _keyspace_rows(data)), ""]
    if rows := _node_rows(data):
        out += ["## Cluster nodes", "", reports.md_table(_NODES_HEAD, rows), ""]
    if rows := _shard_rows(data):
        out += ["## Memory per target shard", "", reports.md_table(_SHARDS_HEAD, rows), ""]
    if rows := _capability_rows(data):
        out += ["## Provider profile", "", _providers_line(data), "", reports.md_table(_CAPS_HEAD, rows), ""]
    if rows := _config_rows(data):
        out += ["## Configuration", "", reports.md_table(_CONFIG_HEAD, rows), ""]
    test = _test(data)
    if test.get("run"):
        run = test["run"]
        out += ["## Test run", "", f"Scratch: {test['scratch']['mode']} ({test['scratch']['version']}); "
                f"exit code {run['exit_code']}{' (timed out)' if run['timed_out'] else ''}; {run['duration_s']}s", "",
                "```", run["tail"], "```", ""]
    return out


# --- HTML -------------------------------------------------------------------------------------


def _items(group: list[dict]) -> str:
    return "<ul>" + "".join(
        f"<li><b>{html.escape(c['title'])}</b> ({_LABEL[c['status']]}): {html.escape(c['evidence'])}"
        f"<br><i>Do:</i> {html.escape(c['remediation'])}</li>" for c in group) + "</ul>"


def html_report(data: dict) -> str:
    failures, warnings = _groups(data)
    body = [f"<p>{html.escape(_servers_line(data))}</p>"]
    if failures:
        body.append("<h2>Must fix</h2>" + _items(failures))
    if warnings:
        body.append("<h2>Warnings and checks that could not run</h2>" + _items(warnings))
    checks = data["checks"]
    body.append("<h2>All checks</h2>" + reports.html_table(
        ["status", "check", "evidence", "remediation"],
        [(_LABEL[c["status"]], c["title"], c["evidence"], c["remediation"]) for c in checks],
        classes=[c["status"] if c["status"] != UNKNOWN else WARN for c in checks]))
    body.append("<h2>Copy methods and replication</h2>" + reports.html_table(["", ""], _copy_rows(data)))
    body.append("<h2>Keyspace</h2>" + reports.html_table(_KEYSPACE_HEAD, _keyspace_rows(data)))
    if rows := _node_rows(data):
        body.append("<h2>Cluster nodes</h2>" + reports.html_table(_NODES_HEAD, rows))
    if rows := _shard_rows(data):
        body.append("<h2>Memory per target shard</h2>" + reports.html_table(
            _SHARDS_HEAD, rows, classes=[{"COULD NOT CHECK": WARN}.get(r[6], r[6].lower()) for r in rows]))
    if rows := _capability_rows(data):
        body.append(f"<h2>Provider profile</h2><p>{html.escape(_providers_line(data))}</p>" + reports.html_table(
            _CAPS_HEAD, rows, classes=["pass" if r[2] == "available" else WARN for r in rows]))
    if rows := _config_rows(data):
        body.append("<h2>Configuration</h2>" + reports.html_table(_CONFIG_HEAD, rows,
                    classes=[{"COULD NOT CHECK": WARN}.get(r[3], r[3].lower()) for r in rows]))
    test = _test(data)
    if test.get("run"):
        run = test["run"]
        body.append(f"<h2>Test run</h2><p>Scratch: {html.escape(test['scratch']['mode'])} "
                    f"({html.escape(test['scratch']['version'])}); exit code {run['exit_code']}"
                    f"{' (timed out)' if run['timed_out'] else ''}; {run['duration_s']}s</p>"
                    f"<pre>{html.escape(run['tail'])}</pre>")
    return reports.html_page(f"Compatibility report {data['id']}", data["verdict"], data["summary"], "".join(body),
                             meta=f"migration {data['migration']} · {data['created_at']}")
