"""Gates: the checks a step requires, each returning pass/fail with measured evidence.

A gate is one function ``(GateContext) -> GateResult`` registered under a name with
``@gate("name")``; the phase table (``migrator.phases``) says which step needs it. Adding a gate
is one function here (or in the module that owns the idea, imported in ``_GATE_MODULES``) and
one entry in the table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Callable

from migrator import registry, sides
from migrator.durations import format_duration
from migrator.errors import UnreachableError
from migrator.phases import Phase
from migrator.playbook import Playbook
from migrator.state import State, StateStore, now, operator, parse_iso
from migrator.topology_evidence import topology_since


@dataclass
class GateResult:
    name: str
    passed: bool
    evidence: str
    data: dict[str, Any] = field(default_factory=dict)
    overridden: bool = False
    override_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"gate": self.name, "passed": self.passed, "evidence": self.evidence, "data": self.data,
                "overridden": self.overridden, "override_reason": self.override_reason}


@dataclass
class GateContext:
    playbook: Playbook
    store: StateStore
    state: State
    now: datetime
    # ``plan`` evaluates gates read-only: a gate that would run something heavy with side
    # effects (the compatibility run writes a report) may report its last result instead.
    read_only: bool = False
    probe_timeout: float | None = None  # per side; None: each endpoint's connect_timeout
    # Probed (or read from the journal) once per evaluation and shared by every gate that asks.
    _sides: dict[str, sides.Side] | None = None
    _phase_start_sides: dict[str, sides.Side] | None = None

    def current_sides(self) -> dict[str, sides.Side]:
        """Both sides as they answer now (run_id, start, keys), probed once for all the gates."""
        if self._sides is None:
            self._sides = sides.snapshot(self.playbook, self.probe_timeout)
        return self._sides

    def phase_start_sides(self) -> dict[str, sides.Side]:
        """The sides journaled by the transition that began the current phase (empty for older journals)."""
        if self._phase_start_sides is None:
            self._phase_start_sides = next(
                (sides.recorded(e) for e in reversed(self.store.read_journal())
                 if e.get("event") == "transition-started" and e.get("to") == self.state.phase.value), {})
        return self._phase_start_sides

    def probed_sides(self) -> dict[str, sides.Side] | None:
        """The sides if a gate probed them, without probing."""
        return self._sides


GateFn = Callable[[GateContext], GateResult]
GATES: dict[str, GateFn] = {}

# Modules that register gates of their own (imported on first use, to avoid import cycles).
_GATE_MODULES: tuple[str, ...] = ("migrator.compat", "migrator.shim.gates", "migrator.data.gates")
_loaded = False


def gate(name: str) -> Callable[[Callable[[GateContext], tuple[bool, str] | GateResult]], GateFn]:
    """Register a gate. The function may return a GateResult or ``(passed, evidence)``."""

    def register(fn):
        def run(ctx: GateContext) -> GateResult:
            out = fn(ctx)
            if isinstance(out, GateResult):
                return out
            passed, evidence, *rest = out
            return GateResult(name, bool(passed), evidence, rest[0] if rest else {})

        run.__name__ = fn.__name__
        run.__doc__ = fn.__doc__
        GATES[name] = run
        return run

    return register


def load_gate_modules() -> None:
    global _loaded
    if not _loaded:
        for mod in _GATE_MODULES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:
                    raise
                # Its gates stay unregistered and so fail as "no such gate": refusing is safe.
        _loaded = True


def evaluate(names: tuple[str, ...], ctx: GateContext) -> list[GateResult]:
    """Run the named gates; a gate that raises fails with the error as its evidence."""
    load_gate_modules()
    results = []
    for name in names:
        fn = GATES.get(name)
        if fn is None:
            results.append(GateResult(name, False, f"no such gate {name!r} (a bug in the phase table)"))
            continue
        try:
            results.append(fn(ctx))
        except UnreachableError:
            # A server that cannot be reached (or refuses our credentials) is not a gate's verdict:
            # the command fails as unreachable (exit 3), and no gate is recorded as failed.
            raise
        except Exception as e:  # noqa: BLE001 - a gate that cannot measure must fail, with why
            results.append(GateResult(name, False, f"could not evaluate: {e}" if str(e) else f"could not evaluate: {type(e).__name__}"))
    return results


def describe(name: str) -> str:
    load_gate_modules()
    fn = GATES.get(name)
    return (fn.__doc__ or "").strip().splitlines()[0] if fn and fn.__doc__ else name


# --- the gates of the core state machine ----------------------------------------------------


def _time_in_phase(ctx: GateContext, required: timedelta, what: str) -> tuple[bool, str, dict]:
    elapsed = ctx.now - ctx.state.phase_started
    ok = elapsed >= required
    remaining = required - elapsed
    ev = f"{what} has run {format_duration(elapsed)} of {format_duration(required)}"
    if not ok:
        ev += f" ({format_duration(remaining)} to go)"
    return ok, ev, {"elapsed_s": elapsed.total_seconds(), "required_s": required.total_seconds()}


@gate("mirror_duration")
def mirror_duration(ctx: GateContext):
    """The mirror has run for steps.mirror.min_duration (a clean read-cutover excursion keeps its clock)."""
    since, kept = mirror_clock(ctx.state)
    required = ctx.playbook.steps.mirror.min_duration
    elapsed = ctx.now - since
    ok = elapsed >= required
    ev = f"mirror has run {format_duration(elapsed)} of {format_duration(required)}"
    if not ok:
        ev += f" ({format_duration(required - elapsed)} to go)"
    if kept:
        ev += f"; clock kept since {since.isoformat(timespec='seconds')} across {kept}"
    return ok, ev, {"elapsed_s": elapsed.total_seconds(), "required_s": required.total_seconds(),
                    "clock_since": since.isoformat(), "kept_across": kept}


def mirror_clock(state: State) -> tuple[datetime, str]:
    """When the current mirror's clock started, and across what it was kept ('' if not).

    A rollback from reads-on-target to mirroring restarts the phase, but writes reached both
    sides throughout: if nothing diverged and no key was marked dirty while reads were on the
    target (``Transition.clean_excursion``, measured when the rollback began), the clock
    keeps running from the mirror's earlier start. Otherwise it restarts: something differed,
    and the mirror must prove itself again.
    """
    since, kept = state.phase_started, []
    if state.phase != Phase.MIRRORING:
        return since, ""
    for h in reversed(state.history):
        if h.get("to") != Phase.MIRRORING.value:
            continue
        if h.get("direction") == "rollback" and h.get("from") == Phase.READS_ON_TARGET.value and h.get("mirror_clock_since"):
            since = parse_iso(h["mirror_clock_since"])
            kept.append(f"the clean read cutover rolled back at {h.get('completed_at', '?')[11:19]}")
        break
    return since, "; ".join(kept)


@gate("read_cutover_duration")
def read_cutover_duration(ctx: GateContext):
    """Reads have been served by the target for steps.read_cutover.min_duration."""
    return _time_in_phase(ctx, ctx.playbook.steps.read_cutover.min_duration, "read cutover")


@gate("rollback_window")
def rollback_window(ctx: GateContext):
    """The rollback window (steps.write_cutover.rollback_window) has elapsed."""
    return _time_in_phase(ctx, ctx.playbook.steps.write_cutover.rollback_window, "rollback window")


def _shims_behind(ctx: GateContext) -> tuple[list[registry.ShimRecord], list[registry.ShimRecord]]:
    """(active shims, those not live at the current generation): what both shim gates measure."""
    shims = registry.active(ctx.store.dir)
    behind = [s for s in shims if s.applied_generation < ctx.state.generation or s.liveness() != "live"]
    return shims, behind


@gate("shim_running")
def shim_running(ctx: GateContext):
    """At least one shim is running and applies the current phase, so writes can be mirrored."""
    shims, behind = _shims_behind(ctx)
    data = {"shims": len(shims), "current": len(shims) - len(behind)}
    if not shims:
        return False, f"no shim is running (start one: migrator shim -p {ctx.playbook.path})", data
    ev = f"{len(shims) - len(behind)} of {len(shims)} shim(s) live at generation {ctx.state.generation} ({ctx.state.phase})"
    return not behind, ev, data


@gate("mirror_strategy")
def mirror_strategy(ctx: GateContext):
    """The mirror strategy decided now (auto: replication where the source allows PSYNC and the target loads its
    RDB) can start: in replication, the target can become the source's replica."""
    from migrator import replication
    from migrator.connect import connect

    pb = ctx.playbook
    if pb.mirror.strategy == "dual-write":
        return True, "dual-write (mirror.strategy): each shim writes to both servers", {"strategy": "dual-write"}
    t = ctx.probe_timeout
    extra = {"socket_connect_timeout": t, "socket_timeout": t} if t else {}
    source = connect(pb.source, "source", **extra)
    try:
        target = connect(pb.target, "target", **extra)
    except BaseException:
        source.close()
        raise
    try:
        d = replication.fresh_decision(pb, source, target)
        data = d.to_json()
        if not d.ok or d.strategy == "dual-write":
            return d.ok, f"{d.strategy}: {d.why}", data
        out = replication.attach(pb, source, target, dry_run=True)
        data["attach"] = out.data
        return out.ok, f"replication: {d.why}; {out.evidence}", data
    finally:
        source.close()
        target.close()


@gate("shim_ack")
def shim_ack(ctx: GateContext):
    """Every running shim has acknowledged the current phase."""
    shims, behind = _shims_behind(ctx)
    if not shims:
        return False, "no shim is running, so no client traffic is being mirrored", {"shims": 0}
    ids = ", ".join(f"{s.id} at generation {s.applied_generation} ({s.liveness()})" for s in behind)
    ev = f"{len(shims) - len(behind)} of {len(shims)} shim(s) acknowledged {ctx.state.phase} (generation {ctx.state.generation})"
    return not behind, ev + (f"; behind: {ids}" if behind else ""), {"shims": len(shims), "behind": len(behind)}


@gate("source_reachable")
def source_reachable(ctx: GateContext):
    """The source answers and has not restarted since authority left it, so it can take authority back."""
    src = ctx.current_sides()["source"]
    data = {"reachable": src.reachable, "source": src.to_json()}
    if not src.reachable:
        return False, src.describe(), data
    then = ctx.phase_start_sides()
    why = sides.restarted_since({"source": src}, ctx.state.phase_started, then)
    # A replica promoted on a cluster source may lack writes its old primary acknowledged: like a
    # restart, only a clean full check that began after the failover vouches for the source.
    lossy = _lossy_changes(ctx, "source", {"sides": {r: s.to_json() for r, s in then.items()}}, ctx.state.phase_since)
    covered = None
    if lossy:
        data["topology_changes"] = lossy
        covered = _clean_full_check_after(ctx, "source")
        if covered is not None and _lossy_changes(ctx, "source", _latest_check(ctx), _latest_check(ctx).get("started_at")):
            covered = None
        if covered is None:
            return False, (f"{'; '.join(c['text'] for c in lossy)} since {ctx.state.phase} began: the promoted replica may "
                           "lack writes its old primary had acknowledged; repair the source from the target with "
                           f"`migrator check --full --repair -p {ctx.playbook.path}`, then a clean `migrator check --full`"), data
    if lossy and not why:
        return True, f"{'; '.join(c['text'] for c in lossy)}; the full check {covered} since then found both sides equal", data
    if why:
        check = _clean_full_check_after(ctx, "source")
        if check is None:
            return False, (f"{why[0]} since {ctx.state.phase} began: it may have lost writes it was kept in sync with; "
                           f"repair it from the target with `migrator check --full --repair -p {ctx.playbook.path}`, "
                           "then a clean `migrator check --full`"), data
        return True, f"{why[0]}; the full check {check} since then found both sides equal", data
    return True, f"source answers ({src.describe()}), no restart since {ctx.state.phase} began", data


def _lossy_changes(ctx: GateContext, role: str, evidence: dict | None, began: str | None) -> list[dict]:
    """Failovers (and primaries lost) on ``role``'s cluster since ``evidence`` began (``migrator.topology_evidence``)."""
    changes, _ = topology_since(ctx, evidence, began)
    return [c for c in changes if c.get("role") == role and c.get("kind") in ("failover", "lost")]


def _latest_check(ctx: GateContext) -> dict:
    from migrator import reports

    return reports.latest(ctx.playbook.state_path, "check") or {}


@gate("sides_live")
def sides_live(ctx: GateContext):
    """Both servers answer now: authority (reads or writes) never moves onto, or away from, a dead side."""
    cur = ctx.current_sides()
    down = [s for s in cur.values() if not s.reachable]
    data = {role: s.to_json() for role, s in cur.items()}
    changes = topology_since_recorded(ctx)
    if changes:
        data["topology_changes"] = [c.to_json() for c in changes]
    moved = f"; topology changed since the last evidence: {'; '.join(c.text for c in changes)}" if changes else ""
    if down:
        return False, "; ".join(s.describe() for s in down) + moved, data
    return True, "; ".join(s.describe() for s in cur.values()) + moved, data


def topology_since_recorded(ctx: GateContext) -> list:
    """What changed in each cluster side's topology since the journal last recorded it (the
    transition that began this phase, or the last change seen); journaled now unless read-only,
    so a later gate can tell which evidence is older than the change (``migrator.topology_watch``)."""
    from migrator import topology_watch

    cur = ctx.current_sides()
    if not any(s.cluster is not None for s in cur.values()):
        return []
    entries = ctx.store.read_journal() if ctx.store.exists() else []
    changes, dated, views, since = [], [], {}, {}
    for role, side in cur.items():
        if side.cluster is None:
            continue
        old, at = topology_watch.last_recorded(entries, role)
        found = topology_watch.diff(role, old, side.cluster.get("view"))
        if found:
            when = f" (seen at {side.probed_at[11:19]}; not at {at[11:19]})" if at else f" (seen at {side.probed_at[11:19]})"
            changes += found
            dated += [replace(c, text=c.text + when) for c in found]
            views[role], since[role] = side.cluster["view"], at
    if changes and not ctx.read_only and ctx.store.exists():
        seen = min(cur[r].probed_at for r in views)
        ctx.store.journal(topology_watch.EVENT, seen_at=seen, since=since, views=views, phase=ctx.state.phase.value,
                          changes=[c.to_json() for c in changes],
                          slots=topology_watch.changed_slots(changes), operator=operator())
    return dated


@gate("key_counts")
def key_counts(ctx: GateContext):
    """Both sides hold about as many keys (check.max_key_count_drift): a side that lost its data is caught."""
    return _key_counts(ctx, None)


@gate("source_keys")
def source_keys(ctx: GateContext):
    """The source holds about as many keys as the target (check.max_key_count_drift), so it can take authority back."""
    return _key_counts(ctx, "source")


def _key_counts(ctx: GateContext, short: str | None):
    cur = ctx.current_sides()
    drift = ctx.playbook.check.max_key_count_drift
    data = {role: s.to_json() for role, s in cur.items()} | {"max_drift": drift}
    down = [s for s in cur.values() if not s.reachable]
    if down:
        # Judged by ``sides_live`` where a step needs both sides; a rollback onto the live side
        # must stay possible when the other is dead.
        return True, f"not compared: {'; '.join(s.describe() for s in down)}", data
    sel = ctx.playbook.sync
    if sel.exclude or sel.include != ["*"]:
        # Only a subset of the keys is migrated: whole-database counts are not comparable. A
        # restart is still caught by its run_id (``migrator.sides.restarted_since``).
        return True, "not compared: sync.include/exclude migrate a subset of the keys, so counts differ by design", data
    problem = sides.compare_sizes(cur, drift, sel.databases, short=short)
    if problem:
        lost = f"the {short} may have lost its data" if short else "a side may have lost its data"
        return False, (f"key counts disagree: {problem} (check.max_key_count_drift {drift:.1%}){_per_node(cur)}; {lost} "
                       f"(restarted empty?): {repair_advice(ctx)}"), data
    s, t = cur["source"], cur["target"]
    return True, f"source {s.keys:,} keys, target {t.keys:,} keys (within {drift:.1%})", data


def _per_node(cur: dict[str, sides.Side]) -> str:
    """``; target by primary: 10.0.2.1:7000 (0-5460) 0 keys, …`` for each cluster side: which node is short."""
    out = []
    for role, side in cur.items():
        nodes = (side.cluster or {}).get("nodes") or {}
        if nodes:
            each = sorted(nodes.values(), key=lambda n: sides.first_slot(n.get("slots")))
            out.append(f"{role} by primary: " + ", ".join(f"{n['address']} ({n.get('slots')}) {n['keys']:,} keys" for n in each))
    return "".join(f"; {x}" for x in out)


def repair_advice(ctx: GateContext) -> str:
    """The repair that works in this phase: sync copies source → target only while the source is authoritative."""
    p = f" -p {ctx.playbook.path}" if ctx.playbook.path else ""
    if ctx.state.phase in (Phase.WRITES_ON_TARGET, Phase.COMPLETED):
        lost = authority_lost(ctx) if ctx.state.phase == Phase.WRITES_ON_TARGET else None
        if lost:
            return (f"the target, which is authoritative, lost data the source still holds ({lost}): "
                    f"do not repair from it; roll back to the source with `migrator rollback --override no_dirty_keys "
                    f"--reason ...{p}`, then copy the data again with `migrator sync{p}`")
        return f"repair from the target with `migrator check --full --repair{p}`, then a clean `migrator check --full{p}`"
    return f"run `migrator sync{p}` (a full sync), then `migrator check --full{p}`"


def authority_lost(ctx: GateContext) -> str | None:
    """Why the authoritative side may have lost data since this phase began (a restart, or far fewer keys), or None.

    Repairs copy from the authoritative side: from a side that lost data they would copy the
    loss onto the side that still holds it.
    """
    role = "target" if ctx.state.phase in (Phase.WRITES_ON_TARGET, Phase.COMPLETED) else "source"
    cur = ctx.current_sides()
    # A Sentinel failover to a replica is not a loss of the data (a restart is); far fewer keys still is.
    why = sides.restarted_since({role: cur[role]}, ctx.state.phase_started, ctx.phase_start_sides(), failover_ok=True)
    sel = ctx.playbook.sync
    comparable = not sel.exclude and sel.include == ["*"]
    short = comparable and sides.compare_sizes(cur, ctx.playbook.check.max_key_count_drift, sel.databases, short=role)
    return "; ".join(why + ([f"it holds fewer keys: {short}"] if short else [])) or None



def _clean_full_check_after(ctx: GateContext, role: str) -> str | None:
    """The id of a clean, exhaustive check that ran against the side as it answers now, if any."""
    from migrator import reports

    check = reports.latest(ctx.playbook.state_path, "check")
    if not check or not check.get("exhaustive") or check.get("mismatch_count") != 0:
        return None
    cur = ctx.current_sides()
    if sides.restarted_since({role: cur[role]}, check.get("started_at"), sides.recorded(check)):
        return None
    return check["id"]


def restart_notes(ctx: GateContext) -> list[str]:
    """Each piece of this phase's evidence that a side's restart voided, in words (for ``status``)."""
    from migrator import reports

    cur = ctx.current_sides()
    notes = []
    then = ctx.phase_start_sides()
    for why in sides.restarted_since(cur, ctx.state.phase_started, then):
        notes.append(f"{why} since {ctx.state.phase} began")
    sync = reports.latest(ctx.playbook.state_path, "sync", lambda r: r.get("mode") == "full" and bool(r.get("complete")))
    check = reports.latest(ctx.playbook.state_path, "check")
    for kind, rep, began in (("sync", sync, (sync or {}).get("pass_started_at")), ("check", check, (check or {}).get("started_at"))):
        why = sides.restarted_since(cur, began, sides.recorded(rep)) if rep else []
        if why:
            notes.append(f"the {kind} {rep['id']} no longer counts: {'; '.join(why)}")
    if notes:
        notes.append(repair_advice(ctx))
    return notes


def make_context(playbook: Playbook, store: StateStore, state: State, read_only: bool = False,
                 probe_timeout: float | None = None) -> GateContext:
    return GateContext(playbook=playbook, store=store, state=state, now=now(), read_only=read_only,
                       probe_timeout=probe_timeout)
