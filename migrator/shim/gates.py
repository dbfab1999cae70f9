"""The gates the shim provides: ``divergence``, ``latency``, ``error_rate`` and ``no_dirty_keys``.

Registered with ``migrator.gates.gate``; the phase table names them on the steps that leave
``mirroring`` and ``reads-on-target``.
"""

from __future__ import annotations

from migrator import registry, reports, sides
from migrator.gates import GateContext, gate, repair_advice
from migrator.phases import Phase
from migrator.shim.dirty import list_dirty
from migrator.shim.divergence import latest_complete_sync, read_counters
from migrator.shim.metrics import BUCKETS, Histogram
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


def _step(ctx: GateContext):
    """The playbook section whose limits apply to the current phase, and its name (None: one-sided phase)."""
    if ctx.state.phase == Phase.MIRRORING:
        return ctx.playbook.steps.mirror, "steps.mirror"
    if ctx.state.phase == Phase.READS_ON_TARGET:
        return ctx.playbook.steps.read_cutover, "steps.read_cutover"
    return None, ""


def _ms(seconds: float) -> str:
    if seconds == float("inf"):
        return f"over {BUCKETS[-1] * 1000:,.0f} ms"
    return f"{seconds * 1000:.3g} ms"


def _few(n: int, minimum: int, field: str, window: str) -> str:
    return (f"only {n:,} command{'' if n == 1 else 's'} answered by both sides {window}; at least {minimum:,} are "
            f"needed ({field}.min_compared): send the application's traffic through the shim")


@gate("latency")
def latency(ctx: GateContext):
    """The target's p50 and p99 latency over the phase are within the step's factor of the source's, over the same commands."""
    step, field = _step(ctx)
    sync_id, window = _window(ctx)
    counters = read_counters(ctx.store.dir, ctx.state.generation, after_sync=sync_id)
    src, tgt = (Histogram(), Histogram())
    src.add(counters["latency"]["source"])
    tgt.add(counters["latency"]["target"])
    data: dict = {"phase": str(ctx.state.phase), "window": window, "sync": sync_id, "shims": counters["shims"],
                  "source": {"count": src.count}, "target": {"count": tgt.count}}
    if step is None:
        return True, f"only one side serves in {ctx.state.phase}; no latency to compare", data
    ratio, floor = step.max_latency_ratio, step.latency_floor_ms / 1000
    data.update(max_ratio=ratio, floor_ms=step.latency_floor_ms, min_compared=step.min_compared)
    if counters["shims"] == 0:
        return False, (f"no shim has reported latency for {ctx.state.phase} (generation {ctx.state.generation}); "
                       "run the shim and send traffic through it"), data
    n = min(src.count, tgt.count)
    if n < step.min_compared:
        return False, _few(n, step.min_compared, field, window), data
    if n == 0:
        return True, f"no command was answered by both sides {window}; nothing to compare", data
    ok, parts, worst = True, [], []
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        s, t = src.estimate(q), tgt.estimate(q)
        data["source"][name], data["target"][name] = s, t
        limit = ratio * max(s, floor)
        within = t <= limit and t != float("inf")
        ok = ok and within
        parts.append(f"{name} target {_ms(t)} vs source {_ms(s)}")
        if not within:
            worst.append(f"target {name} {_ms(t)} > {ratio:g} × {_ms(max(s, floor))}")
    ev = (f"{'; '.join(parts)} over {tgt.count:,} target and {src.count:,} source replies {window}; "
          f"limit {ratio:g} × the source's ({field}.max_latency_ratio; quantiles under {step.latency_floor_ms:g} ms "
          f"count as {step.latency_floor_ms:g} ms, {field}.latency_floor_ms)")
    if not ok:
        ev = f"the target is slower than the source allows: {', '.join(worst)}; " + ev
    return ok, ev, data


@gate("error_rate")
def error_rate(ctx: GateContext):
    """The target returned errors the source did not for at most the step's fraction of the commands both answered."""
    step, field = _step(ctx)
    sync_id, window = _window(ctx)
    c = read_counters(ctx.store.dir, ctx.state.generation, after_sync=sync_id)
    errors, lacks, paired = c["target_errors"], c["target_lacks"], c["paired"]
    n = paired + lacks
    data: dict = {"phase": str(ctx.state.phase), "window": window, "sync": sync_id, "shims": c["shims"], "commands": n,
                  "target_errors": errors, "target_lacks": lacks, "source_errors": c["source_errors"],
                  "by_command": c["target_error_commands"]}
    if step is None:
        return True, f"only one side serves in {ctx.state.phase}; no errors to compare", data
    data.update(max_rate=step.max_error_rate, min_compared=step.min_compared)
    if c["shims"] == 0:
        return False, (f"no shim has reported replies for {ctx.state.phase} (generation {ctx.state.generation}); "
                       "run the shim and send traffic through it"), data
    if n < step.min_compared:
        return False, _few(n, step.min_compared, field, window), data
    rate = errors / n if n else 0.0
    data["rate"] = rate
    ok = rate <= step.max_error_rate
    ev = (f"target error rate {rate * 100:.3f}% ({errors:,} error{'' if errors == 1 else 's'} the source did not return, "
          f"in {n:,} commands sent to both sides {window}) {'<=' if ok else '>'} {step.max_error_rate * 100:.3f}% "
          f"({field}.max_error_rate)")
    if lacks:
        ev += f"; {lacks:,} of them not sent to the target: it does not have the command"
    if errors:
        top = sorted(c["target_error_commands"].items(), key=lambda kv: -kv[1])[:5]
        ev += "; by command: " + ", ".join(f"{k} {v:,}" for k, v in top)
    if c["source_errors"]:
        ev += f"; the source alone returned {c['source_errors']:,} error(s) (not counted)"
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
    records = (f"etcd {ctx.store.control.key('shims/')}" if ctx.store.control is not None
               else f"{ctx.playbook.state_path}/shims")
    return False, (f"shim(s) {names} stopped without draining in {ctx.state.phase}: writes they had not applied to both "
                   f"sides may be missing on one; run `migrator check --full --repair -p {ctx.playbook.path}`, then "
                   f"`migrator check --full` (clean), or remove the record in {records} once "
                   "the shim is known to have drained"), data
