"""The compatibility pre-flight: can this Redis deployment move to this Valkey, and how?

``run(playbook)`` connects to both servers, runs every check (identity, data format with
canaries, data the target cannot hold, modules, commands, configuration, ACLs, functions,
keyspace, the user's tests on a scratch server) and writes a ``compat`` report. It changes
nothing in the user's data: its only writes are canary keys under ``__migrator:canary:``
(deleted afterwards) and, with ``scratch: target``, test data on an empty target that is
flushed afterwards.

This module also registers the ``compatibility`` gate (the ``planned → compatible`` step).
"""

from __future__ import annotations

from migrator import reports
from migrator.compat.model import FAIL, PASS, UNKNOWN, WARN, Check, CompatResult, counts
from migrator.compat.report import KIND
from migrator.compat.runner import run
from migrator.durations import format_duration
from migrator.gates import GateContext, gate
from migrator.state import parse_iso

__all__ = ["run", "Check", "CompatResult", "PASS", "WARN", "FAIL", "UNKNOWN", "compatibility"]


def _counts_text(n: dict[str, int]) -> str:
    text = f"{n[PASS]} pass, {n[WARN]} warn, {n[FAIL]} fail"
    return text + (f", {n[UNKNOWN]} could not check" if n[UNKNOWN] else "")


@gate("compatibility")
def compatibility(ctx: GateContext):
    """The compatibility pre-flight (migrator compat) finds nothing that fails."""
    if ctx.read_only:
        return _newest_report(ctx)
    result = run(ctx.playbook)
    n = counts(result.checks)
    evidence = f"compatibility report {result.report_id}: {_counts_text(n)}"
    failed = [c.title for c in result.checks if c.status == FAIL]
    if failed:
        evidence += f"; failed: {', '.join(failed)}"
    return result.verdict != "fail", evidence, {"report_id": result.report_id, "verdict": result.verdict, "counts": n}


def _newest_report(ctx: GateContext):
    """What ``plan`` shows: the newest report's verdict and age, without running anything."""
    newest = reports.latest(ctx.playbook.state_path, KIND)
    if newest is None:
        where = f" -p {ctx.playbook.path}" if ctx.playbook.path else ""
        return False, f"no compatibility run yet (run: migrator compat{where})", {}
    age = format_duration(ctx.now - parse_iso(newest["created_at"]))
    data = {"report_id": newest["id"], "verdict": newest["verdict"], "age": age}
    if newest.get("endpoints_hash") != ctx.playbook.endpoints_hash():
        return False, f"newest compatibility report {newest['id']} ({age} ago) is for other servers: run migrator compat", data
    return (newest["verdict"] != "fail",
            f"newest compatibility report {newest['id']}: {newest['verdict']} ({newest['summary']}), {age} ago; "
            "advance runs it again", data)
