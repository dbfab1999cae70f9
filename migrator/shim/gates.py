"""The gates the shim provides: ``divergence`` and ``no_dirty_keys``.

Registered with ``migrator.gates.gate``; the phase table names them on the steps that leave
``mirroring`` and ``reads-on-target``.
"""

from __future__ import annotations

from migrator import registry, reports, sides
from migrator.gates import GateContext, gate, repair_advice
from migrator.phases import Phase
from migrator.shim.dirty import list_dirty
from migrator.shim.divergence import latest_complete_sync, read_counters
from migrator.state import parse_iso


def _limit(ctx: GateContext) -> tuple[float, str, int, str] | None:
    phase = ctx.state.phase
    if phase == Phase.MIRRORING:
        m = ctx.playbook.steps.mirror
        return m.max_divergence_rate, "steps.mirror.max_divergence_rate", m.min_compared, "steps.mirror.min_compared"
    if phase == Phase.READS_ON_TARGET:
        r = ctx.playbook.steps.read_cutover
        return (r.max_divergence_rate, "steps.read_cutover.max_divergence_rate", r.min_compared,
                "steps.read_cutover.min_compared")
    return None


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _window(ctx: GateContext) -> tuple[str | None, str]:
    """Count from the phase's start, or from the end of a complete full sync that finished later.

    Mirroring starts before the sync has copied the existing keys, so until then a write to a
    key the target does not have yet legitimately differs; once a full sync has copied and
    verified every key, any difference is real.
    """
    last = latest_complete_sync(ctx.store.dir)
    finished = last.get("finished_at") if last else None
    if finished and parse_iso(finished) > ctx.state.phase_started:
        return last.get("id"), f"since sync {last.get('id')} finished at {finished}"
    return None, f"since {ctx.state.phase} began at {ctx.state.phase_since}"


@gate("divergence")
def divergence(ctx: GateContext):
    """Compared replies diverged no more than the step allows since the phase began (or its full sync finished)."""
    limit = _limit(ctx)
    sync_id, window = _window(ctx)
    counters = read_counters(ctx.store.dir, ctx.state.generation, after_sync=sync_id)
    compared, divergent = counters["compared"], counters["divergent"]
    data = {**counters, "phase": str(ctx.state.phase), "window": window, "sync": sync_id}
    if limit is None:
        return True, f"no replies are compared in {ctx.state.phase}; nothing to check", data
    max_rate, field_name, min_compared, min_field = limit
    data["max_rate"], data["min_compared"] = max_rate, min_compared
    if counters["shims"] == 0:
        return False, (f"no shim has reported comparisons for {ctx.state.phase} (generation {ctx.state.generation}); "
                       "run the shim and send traffic through it"), data
    rate = divergent / compared if compared else 0.0
    data["rate"] = rate
    kinds = ", ".join(f"{k} {n}" for k, n in counters["by_kind"].items() if n)
    ev = f"divergence rate {_pct(rate)} ({divergent:,} in {compared:,} compared)"
    ok = rate <= max_rate
    ev += f" {'<=' if ok else '>'} {_pct(max_rate)} ({field_name}), {window}"
    if compared < min_compared:
        # No evidence is not good evidence: a rate over a handful of replies proves nothing.
        ok = False
        ev = (f"only {compared:,} repl{'y' if compared == 1 else 'ies'} compared {window} ({divergent:,} diverged); at least "
              f"{min_compared:,} are needed ({min_field}): send the application's traffic through the shim")
    if kinds:
        ev += f"; by kind: {kinds}"
    if counters["awaiting_repair"]:
        ev += f"; {counters['awaiting_repair']:,} on keys awaiting repair not counted (see no_dirty_keys)"
    return ok, ev, data


@gate("no_dirty_keys")
def no_dirty_keys(ctx: GateContext):
    """No key is waiting for repair after a write the other side did not apply."""
    marks = list_dirty(ctx.store.dir)
    # A complete full sync copies every key after its pass started, so marks made before that
    # are repaired by it (the repair, ``migrator sync --dirty``, deletes them when it runs).
    last = latest_complete_sync(ctx.store.dir)
    started = last.get("pass_started_at") if last else None
    if last is not None and sides.restarted_since(ctx.current_sides(), started, sides.recorded(last)):
        last, started = None, None  # a side restarted since: that sync repaired nothing that still holds
    cutoff = parse_iso(started).timestamp() if started else 0.0
    dirty = [d for d in marks if d.since >= cutoff]
    resolved = len(marks) - len(dirty)
    data = {"dirty_keys": len(dirty), "examples": [d.display for d in dirty[:5]], "resolved_by_sync": resolved}
    note = f" ({resolved} older mark(s) covered by sync {last.get('id')})" if resolved else ""
    if not dirty:
        return True, "no dirty keys" + note, data
    reasons = sorted({d.reason for d in dirty})
    names = ", ".join(d.display for d in dirty[:5]) + (", ..." if len(dirty) > 5 else "")
    return False, (f"{len(dirty):,} dirty key(s) awaiting repair ({names}); reasons: {', '.join(reasons)}; "
                   f"{_dirty_advice(ctx, dirty)}{note}"), data


def _dirty_advice(ctx: GateContext, dirty) -> str:
    """A repair that works in this phase, for these marks."""
    p = f" -p {ctx.playbook.path}" if ctx.playbook.path else ""
    if ctx.state.phase in (Phase.WRITES_ON_TARGET, Phase.COMPLETED):
        return (f"repair them from the target with `migrator check --full --repair{p}` (sync copies source → target "
                "and is refused once the target is authoritative)")
    if any(d.key is None for d in dirty):
        return f"a whole database needs copying again: {repair_advice(ctx)}"
    return f"repair them with `migrator sync --dirty{p}` before the next cutover"


@gate("no_lost_shims")
def no_lost_shims(ctx: GateContext):
    """No shim stopped without draining in this phase, unless a clean full check ran after it.

    A shim killed (or frozen) in a two-sided phase takes with it the writes it had applied to
    the authoritative side and not yet to the other, and dirty marks it had not yet flushed:
    nothing else records them. Before authority moves, a full check must show both sides equal.
    """
    since = ctx.state.phase_started
    lost = [r for r in registry.read_all(ctx.playbook.state_path)
            if r.liveness() != "live" and parse_iso(r.heartbeat_at) >= since]
    if not lost:
        return True, f"no shim stopped without draining since {ctx.state.phase} began", {}
    last_seen = max(parse_iso(r.heartbeat_at) for r in lost)
    names = ", ".join(f"{r.id} ({r.listen}, {r.liveness()}, last heartbeat {r.heartbeat_at[11:19]})" for r in lost)
    data = {"lost": [r.id for r in lost]}
    check = reports.latest(ctx.playbook.state_path, "check")
    if (check is not None and check.get("exhaustive") and check.get("mismatch_count") == 0
            and parse_iso(check["started_at"]) > last_seen
            and not sides.restarted_since(ctx.current_sides(), check["started_at"], sides.recorded(check))):
        data["check"] = check["id"]
        return True, f"shim(s) {names} stopped without draining; the full check {check['id']} after it found both sides equal", data
    return False, (f"shim(s) {names} stopped without draining in {ctx.state.phase}: writes they had not applied to both "
                   f"sides may be missing on one; run `migrator check --full --repair -p {ctx.playbook.path}`, then "
                   f"`migrator check --full` (clean), or remove the record in {ctx.playbook.state_path}/shims once "
                   "the shim is known to have drained"), data
