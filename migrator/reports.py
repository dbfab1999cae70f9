"""Reports for review: every compatibility run, sync and check leaves one in ``state_dir/reports``.

A report is three files with one id: ``<id>.json`` for machines, ``<id>.md`` and a
self-contained ``<id>.html`` for people. The JSON always holds ``id``, ``kind``, ``migration``,
``created_at``, ``verdict`` (``pass``/``warn``/``fail``) and a one-line ``summary``; each kind
adds its own fields. Everything written is redacted.
"""

from __future__ import annotations

import html
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from migrator.errors import UsageError
from migrator.redact import redact
from migrator.state import atomic_write_json, atomic_write_text, iso, now

REPORTS_DIR = "reports"
VERDICTS = ("pass", "warn", "fail")


@dataclass
class ReportRef:
    id: str
    json_path: Path
    md_path: Path
    html_path: Path


def reports_dir(state_dir: Path | str) -> Path:
    return Path(state_dir) / REPORTS_DIR


def new_id(kind: str) -> str:
    """``check-20261127T101502Z-3f2a``: sorts by time, unique, readable."""
    return f"{kind}-{now().strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(2)}"


def write(state_dir: Path | str, data: dict[str, Any], markdown: str, html_text: str) -> ReportRef:
    """Write one report's three files. ``data`` must hold the common fields listed above."""
    for key in ("id", "kind", "migration", "created_at", "verdict", "summary"):
        if key not in data:
            raise ValueError(f"report data lacks {key!r}")
    if data["verdict"] not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}")
    d = reports_dir(state_dir)
    ref = ReportRef(data["id"], d / f"{data['id']}.json", d / f"{data['id']}.md", d / f"{data['id']}.html")
    atomic_write_text(ref.md_path, redact(markdown))
    atomic_write_text(ref.html_path, redact(html_text))
    atomic_write_json(ref.json_path, data)  # last: a report is listed only once complete
    return ref


def list_reports(state_dir: Path | str, kind: str | None = None) -> list[dict[str, Any]]:
    """Every report's JSON, oldest first (optionally of one kind)."""
    out = []
    d = reports_dir(state_dir)
    if not d.is_dir():
        return out
    for f in d.glob("*.json"):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if kind is None or data.get("kind") == kind:
            out.append(data)
    out.sort(key=lambda r: (r.get("created_at", ""), r.get("id", "")))
    return out


def latest(state_dir: Path | str, kind: str, where: Callable[[dict], bool] | None = None) -> dict[str, Any] | None:
    """The newest report of ``kind`` (that satisfies ``where``), or None."""
    for r in reversed(list_reports(state_dir, kind)):
        if where is None or where(r):
            return r
    return None


def load(state_dir: Path | str, report_id: str) -> dict[str, Any]:
    d = reports_dir(state_dir)
    path = d / f"{report_id}.json"
    if not path.exists():
        matches = sorted(d.glob(f"{report_id}*.json")) if d.is_dir() else []
        if len(matches) != 1:
            raise UsageError(f"no report {report_id!r} in {d}" + (" (ambiguous prefix)" if matches else ""))
        path = matches[0]
    return json.loads(path.read_text(encoding="utf-8"))


def path_of(state_dir: Path | str, report_id: str, fmt: str) -> Path:
    return reports_dir(state_dir) / f"{load(state_dir, report_id)['id']}.{fmt}"


def common(kind: str, migration: str, verdict: str, summary: str, **fields: Any) -> dict[str, Any]:
    """The common fields of a new report."""
    return {"id": new_id(kind), "kind": kind, "migration": migration, "created_at": iso(now()),
            "verdict": verdict, "summary": summary, **fields}


# --- rendering helpers shared by every kind of report --------------------------------------

def cell_text(v: Any) -> str:
    """A value as a person reads it: ``yes``/``no`` for booleans, an empty cell for None (never Python's spelling)."""
    if v is True:
        return "yes"
    if v is False:
        return "no"
    if v is None:
        return ""
    return str(v)


def md_table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    def cell(v: Any) -> str:
        return cell_text(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(headers: list[str], rows: Iterable[Iterable[Any]], classes: Iterable[str] | None = None) -> str:
    """A table; with headers all empty it is a field/value list: no header row, each row's first cell a row header."""
    kv = not any(headers)
    head = "" if kv else "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr></thead>"
    body = []
    cls = list(classes) if classes is not None else None
    for i, row in enumerate(rows):
        c = f' class="{html.escape(cls[i])}"' if cls and i < len(cls) and cls[i] else ""
        cells = [html.escape(cell_text(v)) for v in row]
        tds = "".join(f"<th scope=row>{v}</th>" if kv and j == 0 else f"<td>{v}</td>" for j, v in enumerate(cells))
        body.append(f"<tr{c}>{tds}</tr>")
    return f"<table{' class=kv' if kv else ''}>{head}<tbody>{''.join(body)}</tbody></table>"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;color:#1b1f24}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.verdict{display:inline-block;padding:.3rem .8rem;border-radius:4px;font-weight:700;color:#fff;text-transform:uppercase}
.verdict.pass{background:#1a7f37}.verdict.warn{background:#9a6700}.verdict.fail{background:#cf222e}
table{border-collapse:collapse;width:100%;margin:.6rem 0} th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa} table.kv th{width:32%;font-weight:600} tr.fail td{background:#ffebe9} tr.warn td{background:#fff8c5} tr.pass td{background:#f0fff4}
code,pre{font-family:ui-monospace,Menlo,monospace;font-size:12px} pre{background:#f6f8fa;padding:.6rem;overflow:auto}
.muted{color:#57606a} svg{max-width:100%;height:auto}
"""


def html_page(title: str, verdict: str, summary: str, body_html: str, meta: str = "") -> str:
    """A self-contained HTML page (inline CSS, no external resources), verdict first."""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=muted>{html.escape(meta)}</p>"
        f"<p><span class='verdict {html.escape(verdict)}'>{html.escape(verdict)}</span> {html.escape(summary)}</p>"
        f"{body_html}</body></html>\n"
    )
