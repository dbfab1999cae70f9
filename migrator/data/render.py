"""The sync and check reports: JSON data, Markdown, and self-contained HTML with inline SVG charts.

Reports show keys (names) but never values, unless the check ran with ``--show-values``.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from migrator import reports
from migrator.data import compare, stats, values
from migrator.durations import format_duration

MAX_LISTED = 1000  # mismatched keys listed in one report; the counts always cover all


def key_text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --- sync ------------------------------------------------------------------------------------


def sync_report_data(pb, res, phase: str) -> dict[str, Any]:
    if res.complete:
        verdict = "pass"
    elif res.errors or res.unsettled:
        verdict = "fail"
    else:
        verdict = "warn"
    what = "dirty keys re-copied" if res.mode == "dirty" else "keys copied"
    equal = f"{res.equal:,} found already equal, " if res.mode == "dirty" else ""
    if res.mode == "full" and res.runs > 1:
        # A resumed pass: the counts are the whole pass's; the time and rate are this run's.
        how = (f"over {res.runs} runs (this run: {res.run_keys:,} keys in {format_duration(res.duration_s)}, "
               f"{res.keys_per_s:,.0f} keys/s)")
    else:
        how = f"in {format_duration(res.duration_s)}, {res.keys_per_s:,.0f} keys/s"
    held = f"; the source held {res.source_keys:,}" if res.mode == "full" else ""
    summary = (f"{equal}{res.keys:,} {what} ({human_bytes(res.bytes)}) {how} by {res.method or 'n/a'}{held}; "
               f"{res.recopied} re-copied after verify, "
               f"{len(res.unsettled)} unsettled, {len(res.errors)} errors" + ("" if res.complete else "; NOT complete"))
    return reports.common(
        "sync", pb.name, verdict, summary, mode=res.mode, complete=res.complete, phase=phase,
        method=res.method, method_reason=res.method_reason, pass_started_at=res.pass_started_at,
        finished_at=res.finished_at, resumed=res.resumed, keys=res.keys, bytes=res.bytes, deleted=res.deleted,
        big_keys=res.big, verified=res.verified, recopied=res.recopied, equal=res.equal, duration_s=round(res.duration_s, 3),
        keys_per_s=round(res.keys_per_s, 1), functions=res.functions, runs=res.runs, run_keys=res.run_keys,
        run_bytes=res.run_bytes, source_keys=res.source_keys,
        dbs={str(k): v for k, v in res.dbs.items()},
        unsettled=[{"db": db, "key": key_text(_b64(k)), "key_b64": k} for db, k in res.unsettled[:MAX_LISTED]],
        errors=[{"db": db, "key": key_text(_b64(k)), "key_b64": k, "error": e} for db, k, e in res.errors[:MAX_LISTED]],
        source=pb.source.display, target=pb.target.display,
        **({"shards": res.shards, "replanned": res.replanned} if getattr(res, "shards", None) else {}))


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def _sync_rows(data: dict) -> list[tuple[str, Any]]:
    return [("mode", data["mode"]), ("complete", data["complete"]), ("phase at run", data["phase"]),
            ("method", f"{data['method']} — {data['method_reason']}"), ("pass started", data["pass_started_at"]),
            ("finished", data["finished_at"]), ("resumed", data["resumed"]), ("keys", f"{data['keys']:,}"),
            ("runs of this pass", data.get("runs", 1)), ("keys this run", f"{data.get('run_keys', data['keys']):,}"),
            ("source keys at this run's start", f"{data.get('source_keys', 0):,}"),
            ("bytes", human_bytes(data["bytes"])), ("deleted on target (gone from source)", data["deleted"]),
            ("big keys (chunked)", data["big_keys"]), ("verified equal", f"{data['verified']:,}"),
            ("re-copied after verify", data["recopied"]), ("dirty keys already equal (not copied)", data.get("equal", 0)),
            ("keys/s", f"{data['keys_per_s']:,.0f}"),
            ("functions", data["functions"]), ("source", data["source"]), ("target", data["target"])]


def sync_markdown(data: dict) -> str:
    out = [f"# Sync report {data['id']}", "", f"**{data['verdict'].upper()}** — {data['summary']}", "",
           reports.md_table(["", ""], _sync_rows(data)), "", "## Databases", "",
           reports.md_table(["db", "keys", "bytes", "done"],
                            [(db, v.get("keys", ""), human_bytes(v.get("bytes", 0)), v.get("done", "")) for db, v in data["dbs"].items()])]
    if data.get("shards"):
        out += ["", "## Source shards (cluster)", "", reports.md_table(_SYNC_SHARD_HEADERS, _sync_shard_rows(data))]
        if data.get("replanned"):
            out += ["", "Rounds re-planned (failover, reshard or redirect):", "", *(f"- {x}" for x in data["replanned"])]
    if data["unsettled"]:
        out += ["", "## Unsettled keys (still differing after every re-copy)", "",
                reports.md_table(["db", "key"], [(u["db"], u["key"]) for u in data["unsettled"]])]
    if data["errors"]:
        out += ["", "## Errors", "", reports.md_table(["db", "key", "error"], [(e["db"], e["key"], e["error"]) for e in data["errors"]])]
    return "\n".join(out) + "\n"


_SYNC_SHARD_HEADERS = ["primary", "slots", "read from", "slots done", "keys (pass)", "keys (this run)", "bytes", "state"]


def _sync_shard_rows(data: dict) -> list[tuple]:
    return [(s["address"], s["slots"], s["reader"], f"{s['slots_done']:,}/{s['slots_total']:,}", f"{s['keys']:,}",
             f"{s['run_keys']:,}", human_bytes(s["bytes"]), s["state"] + (f" ({s['note']})" if s["note"] else ""))
            for s in data.get("shards", [])]


def sync_html(data: dict) -> str:
    body = ["<h2>Run</h2>", reports.html_table(["", ""], _sync_rows(data)), "<h2>Databases</h2>",
            reports.html_table(["db", "keys", "bytes", "done"],
                               [(db, v.get("keys", ""), human_bytes(v.get("bytes", 0)), v.get("done", "")) for db, v in data["dbs"].items()])]
    if data.get("shards"):
        body += ["<h2>Source shards (cluster)</h2>", reports.html_table(_SYNC_SHARD_HEADERS, _sync_shard_rows(data))]
    if data["unsettled"]:
        body += ["<h2>Unsettled keys</h2>", reports.html_table(["db", "key"], [(u["db"], u["key"]) for u in data["unsettled"]])]
    if data["errors"]:
        body += ["<h2>Errors</h2>", reports.html_table(["db", "key", "error"], [(e["db"], e["key"], e["error"]) for e in data["errors"]])]
    return reports.html_page(f"Sync report {data['id']}", data["verdict"], data["summary"], "".join(body),
                             meta=f"{data['migration']} · {data['created_at']}")


# --- check -----------------------------------------------------------------------------------


def _state(st: values.KeyState) -> dict[str, Any]:
    digest = st.digest.decode() if isinstance(st.digest, bytes) else st.digest
    return {"type": st.type, "size": st.size, "pttl": st.pttl, "digest": digest}


def _mismatch(m) -> dict[str, Any]:
    import base64

    d = {"db": m.db, "key": key_text(m.key), "key_b64": base64.b64encode(m.key).decode(), "kind": m.kind,
         "detail": m.detail, "source": _state(m.source), "target": _state(m.target)}
    if m.source_value is not None or m.target_value is not None:
        d["source_value"], d["target_value"] = m.source_value, m.target_value
    if getattr(m, "slot", None) is not None:
        d["slot"] = m.slot
    return d


def ttl_histogram(deltas: list[int]) -> list[dict[str, Any]]:
    """Counts of (target − source) expiry deltas in fixed bins, in ms."""
    edges = [-10**12, -60_000, -10_000, -2_000, -500, -100, -10, 10, 100, 500, 2_000, 10_000, 60_000, 10**12]
    bins = [{"lo": lo, "hi": hi, "count": 0} for lo, hi in zip(edges, edges[1:])]
    for dlt in deltas:
        for b in bins:
            if b["lo"] <= dlt < b["hi"]:
                b["count"] += 1
                break
    return bins


def check_report_data(pb, res) -> dict[str, Any]:
    by_kind = {k: 0 for k in compare.KINDS}
    by_db: dict[str, dict[str, int]] = {}
    for m in res.mismatches:
        by_kind[m.kind] += 1
        by_db.setdefault(str(m.db), {k: 0 for k in compare.KINDS})[m.kind] += 1
    return reports.common(
        "check", pb.name, res.verdict, res.summary, mode=res.mode, exhaustive=res.exhaustive, checked=res.checked,
        mismatch_count=len(res.mismatches), in_flux=res.in_flux, transient=res.transient,
        repaired_count=len(res.repaired), bound=res.bound, bound_text=stats.format_rate(res.bound),
        max_mismatch_rate=res.max_rate, clean=res.clean and res.bound < res.max_rate, rounds=res.rounds,
        phase=res.phase, authoritative=res.authoritative, started_at=res.started_at,
        duration_s=round(res.duration_s, 3), keys_per_s=round(res.keys_per_s, 1), by_kind=by_kind, by_db=by_db,
        counts={str(k): v for k, v in res.counts.items()}, ttl_histogram=ttl_histogram(res.ttl_deltas_ms),
        mismatches=[_mismatch(m) for m in res.mismatches[:MAX_LISTED]],
        repaired=[_mismatch(m) for m in res.repaired[:MAX_LISTED]],
        source=pb.source.display, target=pb.target.display,
        **({"shards": res.shards, "recovered_slots": res.recovered, "still_moving_slots": res.still_moving}
           if res.shards else {}))


_KIND_LABELS = {"missing": "missing on target", "extra": "extra on target", "type": "type", "value": "value", "ttl": "TTL"}


def _mismatch_rows(ms: list[dict]) -> list[tuple]:
    rows = []
    for m in ms:
        s, t = m["source"], m["target"]
        row = (m["db"], *((m.get("slot", ""),) if any("slot" in x for x in ms) else ()), m["key"], _KIND_LABELS[m["kind"]], m["detail"], f"{s['type']} / {s['size']} / {s['pttl']}",
               f"{t['type']} / {t['size']} / {t['pttl']}", f"{s['digest'][:12]} / {t['digest'][:12]}")
        if "source_value" in m:
            row += (m["source_value"], m["target_value"])
        rows.append(row)
    return rows


def _mismatch_headers(ms: list[dict]) -> list[str]:
    h = ["db", *(["slot"] if any("slot" in m for m in ms) else []), "key", "kind", "detail", "source type/size/pttl", "target type/size/pttl", "digests"]
    return h + (["source value", "target value"] if any("source_value" in m for m in ms) else [])


def _check_rows(data: dict) -> list[tuple[str, Any]]:
    return [("mode", data["mode"] + (" (every key)" if data["exhaustive"] else " (sampled)")),
            ("keys compared", f"{data['checked']:,}"), ("mismatches", data["mismatch_count"]),
            ("mismatch rate bound", f"{data['bound_text']} ({'exact' if data['exhaustive'] else '95% upper, Clopper-Pearson'})"
             f", limit {stats.format_rate(data['max_mismatch_rate'])}"),
            ("in flux (changed between rounds)", data["in_flux"]), ("transient (equal on recheck)", data["transient"]),
            ("repaired", data["repaired_count"]), ("rounds", data["rounds"]),
            ("phase / authoritative side", f"{data['phase']} / {data['authoritative']}"),
            ("duration", f"{data['duration_s']}s ({data['keys_per_s']:,.0f} keys/s)"),
            ("source", data["source"]), ("target", data["target"])]


def check_markdown(data: dict) -> str:
    out = [f"# Consistency check {data['id']}", "", f"**{data['verdict'].upper()}** — {data['summary']}", "",
           reports.md_table(["", ""], _check_rows(data)), "", "## Mismatches by kind", "",
           reports.md_table(["kind", "keys"], [(_KIND_LABELS[k], v) for k, v in data["by_kind"].items()]), "",
           "## By database", "", reports.md_table(["db", "source keys", "target keys", *(_KIND_LABELS[k] for k in compare.KINDS)],
                                                  _db_rows(data))]
    if data.get("shards"):
        out += ["", "## By shard (cluster)", "", reports.md_table(_SHARD_HEADERS, _shard_rows(data))]
        if data.get("recovered_slots"):
            out += ["", f"Slots that moved during the check and were compared again: {data['recovered_slots']}"]
        if data.get("still_moving_slots"):
            out += ["", f"Slots still moving when the check ended: {data['still_moving_slots']}"]
    for title, ms in (("Mismatched keys", data["mismatches"]), ("Repaired keys", data["repaired"])):
        if ms:
            out += ["", f"## {title}", "", reports.md_table(_mismatch_headers(ms), _mismatch_rows(ms))]
    return "\n".join(out) + "\n"


_SHARD_HEADERS = ["side", "node", "slots", "keys", "drawn", "compared", "only on target", "mismatches in its slots"]


def _shard_rows(data: dict) -> list[tuple]:
    return [(s["side"], s["address"], s["slots"], f"{s['keys']:,}", f"{s['drawn']:,}", f"{s['compared']:,}",
             s["missing_elsewhere"] if s["side"] == "target" else "", s["mismatches"]) for s in data.get("shards", [])]


def _db_rows(data: dict) -> list[tuple]:
    rows = []
    for db, c in data["counts"].items():
        kinds = data["by_db"].get(db, {})
        rows.append((db, c["source"], c["target"], *(kinds.get(k, 0) for k in compare.KINDS)))
    return rows


def check_html(data: dict, state_dir: Path | str | None = None) -> str:
    history = [r for r in reports.list_reports(state_dir, "check")] if state_dir else []
    history = [h for h in history if h["id"] != data["id"]][-19:] + [data]
    body = ["<h2>Summary</h2>", reports.html_table(["", ""], _check_rows(data)),
            "<h2>Mismatches by kind</h2>",
            reports.html_table(["kind", "keys"], [(_KIND_LABELS[k], v) for k, v in data["by_kind"].items()]),
            "<h2>By database</h2>",
            reports.html_table(["db", "source keys", "target keys", *(_KIND_LABELS[k] for k in compare.KINDS)], _db_rows(data)),
            *(["<h2>By shard (cluster)</h2>", reports.html_table(_SHARD_HEADERS, _shard_rows(data))]
              if data.get("shards") else []),
            "<h2>Expiry deltas (target − source)</h2>", svg_bars([(_bin_label(b), b["count"]) for b in data["ttl_histogram"]]),
            "<h2>Mismatches over successive checks</h2>",
            svg_bars([(h["created_at"][11:19], h.get("mismatch_count", 0)) for h in history])]
    for title, ms in (("Mismatched keys", data["mismatches"]), ("Repaired keys", data["repaired"])):
        if ms:
            body += [f"<h2>{title}</h2>", reports.html_table(_mismatch_headers(ms), _mismatch_rows(ms),
                                                             ["fail" if title.startswith("Mis") else "pass"] * len(ms))]
    return reports.html_page(f"Consistency check {data['id']}", data["verdict"], data["summary"], "".join(body),
                             meta=f"{data['migration']} · {data['created_at']}")


def _bin_label(b: dict) -> str:
    def fmt(ms: int) -> str:
        if abs(ms) >= 10**12:
            return "∞" if ms > 0 else "−∞"
        return f"{ms / 1000:g}s" if abs(ms) >= 1000 else f"{ms}ms"

    return f"{fmt(b['lo'])}…{fmt(b['hi'])}"


def svg_bars(items: list[tuple[str, float]], width: int = 720, height: int = 180) -> str:
    """A bar chart as inline SVG (no scripts, no external resources).

    Every label stays inside the drawing: a margin above the tallest bar for its value, and
    room below (and to the left) for the category labels, which are slanted when they would
    not fit side by side.
    """
    if not items:
        return "<p class=muted>no data</p>"
    char_w, font = 6.2, 10  # an upper bound of one character's width at this font size
    top = max(v for _, v in items) or 1
    longest = max(len(label) for label, _ in items) * char_w
    pad_top, pad_side = 16, 8
    slot = (width - 2 * pad_side) / len(items)
    slanted = longest > slot * 0.95
    # A label slanted by 40° reaches cos(40°) of its length to the left and sin(40°) below.
    pad_left = pad_side + (longest * 0.77 if slanted else max(0.0, longest / 2 - slot / 2))
    pad_bottom = (longest * 0.65 + 16) if slanted else 22
    slot = (width - pad_left - pad_side) / len(items)
    bar_w = max(2.0, slot * 0.7)
    total_h = pad_top + height + pad_bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h:.0f}" '
             f'viewBox="0 0 {width} {total_h:.0f}" role="img" font-family="system-ui,sans-serif">',
             f'<line x1="{pad_left:.1f}" y1="{pad_top + height}" x2="{width - pad_side}" y2="{pad_top + height}" '
             'stroke="#8c959f" stroke-width="1"/>']
    for i, (label, v) in enumerate(items):
        h = (v / top) * height
        x = pad_left + i * slot + (slot - bar_w) / 2
        cx = x + bar_w / 2
        base = pad_top + height
        parts.append(f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="#0969da">'
                     f"<title>{html.escape(label)}: {v}</title></rect>")
        parts.append(f'<text x="{cx:.1f}" y="{base - h - 4:.1f}" font-size="{font}" text-anchor="middle">{v:g}</text>')
        if slanted:
            parts.append(f'<text x="{cx:.1f}" y="{base + 12:.1f}" font-size="{font}" text-anchor="end" '
                         f'transform="rotate(-40 {cx:.1f} {base + 12:.1f})">{html.escape(label)}</text>')
        else:
            parts.append(f'<text x="{cx:.1f}" y="{base + 14:.1f}" font-size="{font}" text-anchor="middle">'
                         f"{html.escape(label)}</text>")
    parts.append("</svg>")
    return "".join(parts)


# --- comparing two checks --------------------------------------------------------------------------


def compare_checks(a: dict, b: dict) -> dict[str, Any]:
    """What changed from check ``a`` to check ``b``: counts by kind, new and resolved mismatches."""
    if a.get("kind") != "check" or b.get("kind") != "check":
        raise ValueError("--compare takes two check reports")
    key = lambda m: (m["db"], m["key_b64"])  # noqa: E731
    ka, kb = {key(m): m for m in a["mismatches"]}, {key(m): m for m in b["mismatches"]}
    return {
        "from": a["id"], "to": b["id"], "verdict": [a["verdict"], b["verdict"]], "checked": [a["checked"], b["checked"]],
        "mismatches": [a["mismatch_count"], b["mismatch_count"]], "bound": [a["bound_text"], b["bound_text"]],
        "by_kind": {k: [a["by_kind"].get(k, 0), b["by_kind"].get(k, 0)] for k in compare.KINDS},
        "new": [kb[k] for k in kb if k not in ka], "resolved": [ka[k] for k in ka if k not in kb],
        "persisting": [kb[k] for k in kb if k in ka],
    }


def compare_markdown(c: dict) -> str:
    rows = [("verdict", *c["verdict"]), ("keys compared", *c["checked"]), ("mismatches", *c["mismatches"]),
            ("mismatch rate bound", *c["bound"])]
    rows += [(_KIND_LABELS[k], *v) for k, v in c["by_kind"].items()]
    out = [f"# {c['from']} → {c['to']}", "", reports.md_table(["", c["from"], c["to"]], rows)]
    for title in ("new", "resolved", "persisting"):
        ms = c[title]
        out += ["", f"## {title.capitalize()} mismatches ({len(ms)})"]
        if ms:
            out += ["", reports.md_table(["db", "key", "kind", "detail"], [(m["db"], m["key"], m["kind"], m["detail"]) for m in ms])]
    return "\n".join(out) + "\n"
