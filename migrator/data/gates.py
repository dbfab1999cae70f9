"""Gates owned by data sync and the consistency checker.

- ``sync_complete``: a full sync finished (every database walked, every key verified, none
  unsettled) in a pass that started after the current phase began, so every write since then
  was either mirrored or copied; and no dirty keys recorded by the shim are waiting.
- ``consistency``: a check newer than the phase start found no mismatch, and the mismatch
  rate's 95% upper bound is below ``check.max_mismatch_rate``.
"""

from __future__ import annotations

from migrator import replication, reports, sides
from migrator.cluster import format_ranges
from migrator.data import dirty, stats
from migrator.gates import GateContext, gate, repair_advice
from migrator.state import parse_iso
from migrator.topology_evidence import topology_since


def _since_phase(ctx: GateContext, stamp: str | None) -> bool:
    return bool(stamp) and parse_iso(stamp) >= ctx.state.phase_started


def voided(ctx: GateContext, report: dict | None, began: str | None) -> list[str]:
    """Why a report's evidence no longer holds: a side restarted after it began (``migrator.sides``)."""
    if report is None:
        return []
    return sides.restarted_since(ctx.current_sides(), began, sides.recorded(report))


@gate("sync_complete")
def sync_complete(ctx: GateContext):
    """A full sync started in this phase completed and verified every key; no dirty keys wait."""
    if replication.strategy_of(ctx.state) == "replication":
        return True, ("not needed: the mirror strategy is replication, so the target's copy is the server's own full "
                      "sync (gate replica_in_sync judges it)"), {"strategy": "replication"}
    state_dir = ctx.playbook.state_path
    last = reports.latest(state_dir, "sync", lambda r: r.get("mode") == "full")
    if last is None:
        return False, f"no sync has run (run: migrator sync -p {ctx.playbook.path})", {}
    data = {"report": last["id"], "complete": last.get("complete"), "keys": last.get("keys")}
    if not last.get("complete"):
        return False, f"the last sync ({last['id']}) is not complete: {last['summary']}", data
    mirror_since = ctx.state.mirror_started or ctx.state.phase_started
    started = last.get("pass_started_at")
    if not started or parse_iso(started) < mirror_since:
        return False, (f"the last complete sync ({last['id']}) started at {started}, before writes began to be "
                       f"mirrored at {mirror_since.isoformat()}: writes in between may be missing; run it again"), data
    void = voided(ctx, last, started)
    if void:
        data["voided_by"] = void
        return False, (f"the sync {last['id']} no longer counts: {'; '.join(void)} after it began, so the keys it copied "
                       f"may be gone; {repair_advice(ctx)}"), data
    # Marks older than the pass were repaired by it; newer ones wait for ``sync --dirty``.
    waiting = dirty.list_dirty(state_dir, since=parse_iso(last["pass_started_at"]).timestamp()).count
    data["dirty_keys"] = waiting
    if waiting:
        return False, f"{waiting} dirty key(s) recorded by the shim since the sync await `migrator sync --dirty`", data
    when = last["finished_at"][11:16]
    return True, f"sync at {when}: {last['summary']}", data


@gate("consistency")
def consistency(ctx: GateContext):
    """A consistency check in this phase found no mismatch, with a 95% bound below check.max_mismatch_rate."""
    last = reports.latest(ctx.playbook.state_path, "check")
    limit = ctx.playbook.check.max_mismatch_rate
    if last is None or not _since_phase(ctx, last.get("started_at")):
        return False, f"no consistency check since {ctx.state.phase} began (run: migrator check -p {ctx.playbook.path})", {}
    k, n, bound = last["mismatch_count"], last["checked"], last["bound"]
    data = {"report": last["id"], "checked": n, "mismatches": k, "bound": bound, "limit": limit}
    void = voided(ctx, last, last.get("started_at"))
    if void:
        data["voided_by"] = void
        return False, (f"the consistency check {last['id']} no longer counts: {'; '.join(void)} after it ran; "
                       f"{repair_advice(ctx)}"), data
    moved, slots = topology_since(ctx, last, last.get("started_at"))
    if moved:
        data["topology_changes"], data["slots_to_recheck"] = moved, slots
        full = " --full" if any(m.get("kind") in ("failover", "lost") for m in moved) else ""
        p = f" -p {ctx.playbook.path}" if ctx.playbook.path else ""
        return False, (f"the consistency check {last['id']} began before the topology changed: "
                       f"{'; '.join(m['text'] for m in moved)}; it does not vouch for slots {format_ranges(slots)} as they "
                       f"are now: run `migrator check{full}{p}` again"), data
    kind = "exact rate" if last.get("exhaustive") else "95% bound"
    rel = "<" if bound < limit else "≥"
    ev = (f"consistency check at {last['created_at'][11:16]}: {k} mismatch{'es' if k != 1 else ''} in {n:,} keys "
          f"({kind} {stats.format_rate(bound)} {rel} {stats.format_rate(limit)})")
    return k == 0 and bound < limit, ev, data


@gate("replica_in_sync")
def replica_in_sync(ctx: GateContext):
    """In the replication strategy: the target's link is up, its full sync done, its offset at the source's."""
    if replication.strategy_of(ctx.state) != "replication":
        return True, "not the strategy in use: mirroring is dual-write, so sync_complete applies", {"strategy": "dual-write"}
    from migrator.data import replica

    st = replica.status(ctx.playbook, ctx.store, ctx.probe_timeout)
    return st.in_sync, st.evidence, {**st.data, "problem": st.problem}
