"""The Python API of migrator's phase commands: plan, advance, rollback, status, history.

One plain function per command; no printing (the CLI renders what these return). The runner
interprets the phase table (``migrator.phases``); gates and actions are looked up by name.

A transition is crash-safe because of its order:
1. the gates' evidence is appended to the journal (``transition-started``), fsynced;
2. the state records the new phase and generation with a ``transition`` marker, atomically —
   shims follow this file, so this is the moment routing changes;
3. the step's actions run (e.g. waiting for every shim's acknowledgement);
4. the state clears the marker and appends to its history; the journal gets
   ``transition-completed``.
A crash before 2 leaves the old phase (the journal shows an attempt that changed nothing); a
crash after 2 leaves the new phase with the marker, and running the same command again runs the
actions again (they are idempotent) and completes the step.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from migrator import actions as actions_mod
from migrator import gates as gates_mod
from migrator import hooks, registry, roleswap, sides
from migrator.compat.identify import identify
from migrator.connect import make_client
from migrator.crash import crashpoint
from migrator.durations import format_duration
from migrator.errors import RefusedError, StateError, UnreachableError, UsageError
from migrator.phases import STEPS, Phase, Step, step_from, step_into
from migrator.playbook import Endpoint, Playbook
from migrator.state import State, StateStore, Transition, iso, now, operator, parse_iso


class GatesFailed(RefusedError):
    """A step was refused because at least one gate failed; carries every gate's result."""

    def __init__(self, step: Step, direction: str, results: list[gates_mod.GateResult]) -> None:
        failed = [r for r in results if not r.passed and not r.overridden]
        names = ", ".join(r.name for r in failed)
        super().__init__(f"{direction} to {target_of(step, direction)} refused: gate(s) failed: {names}")
        self.step = step
        self.direction = direction
        self.results = results


def target_of(step: Step, direction: str) -> Phase:
    return step.dest if direction == "advance" else step.source


@dataclass
class ServerInfo:
    role: str
    url: str
    reachable: bool
    server: str | None = None
    version: str | None = None
    error: str | None = None
    mode: str | None = None  # standalone, cluster (the node the URL names), sentinel

    def describe(self) -> str:
        if not self.reachable:
            return f"{self.role} {self.url}: unreachable ({self.error})"
        mode = f" ({self.mode})" if self.mode and self.mode != "standalone" else ""
        return f"{self.role} {self.url}: {self.server} {self.version}{mode}"


@dataclass
class PlanResult:
    migration: str
    playbook: str
    state_dir: str
    phase: Phase
    generation: int
    phase_since: str
    direction: str
    step: Step | None
    gates: list[gates_mod.GateResult] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    prepare: list[str] = field(default_factory=list)  # run before the new phase is recorded
    servers: list[ServerInfo] = field(default_factory=list)
    pending: Transition | None = None
    note: str | None = None
    started: bool = True  # False until the first step writes the state

    @property
    def allowed(self) -> bool:
        return self.step is not None and all(g.passed or g.overridden for g in self.gates)

    @property
    def to_phase(self) -> Phase | None:
        return target_of(self.step, self.direction) if self.step else None

    def to_json(self) -> dict[str, Any]:
        return {
            "migration": self.migration,
            "playbook": self.playbook,
            "state_dir": self.state_dir,
            "phase": self.phase.value,
            "generation": self.generation,
            "phase_since": self.phase_since,
            "direction": self.direction,
            "step": self.step.name if self.step else None,
            "to_phase": self.to_phase.value if self.to_phase else None,
            "allowed": self.allowed,
            "gates": [g.to_json() for g in self.gates],
            "prepare": [{"action": a, "description": actions_mod.describe(a)} for a in self.prepare],
            "actions": [{"action": a, "description": actions_mod.describe(a)} for a in self.actions],
            "servers": [vars(s) for s in self.servers],
            "pending_transition": vars(self.pending) if self.pending else None,
            "note": self.note,
            "started": self.started,
        }


@dataclass
class TransitionResult:
    migration: str
    direction: str
    from_phase: Phase
    to_phase: Phase
    generation: int
    dry_run: bool
    gates: list[gates_mod.GateResult]
    actions: list[actions_mod.ActionResult]
    resumed: bool = False
    transition_id: str | None = None
    hooks: list[hooks.HookResult] = field(default_factory=list)
    already_done: str | None = None  # a killed run of the same command had already taken the step

    def to_json(self) -> dict[str, Any]:
        return {
            "migration": self.migration,
            "direction": self.direction,
            "already_done": self.already_done,
            "hooks": [h.to_json() for h in self.hooks],
            "from_phase": self.from_phase.value,
            "to_phase": self.to_phase.value,
            "generation": self.generation,
            "dry_run": self.dry_run,
            "resumed": self.resumed,
            "transition_id": self.transition_id,
            "gates": [g.to_json() for g in self.gates],
            "actions": [a.to_json() for a in self.actions],
        }


GateEvaluator = Callable[[tuple[str, ...], gates_mod.GateContext], list[gates_mod.GateResult]]
Confirm = Callable[[PlanResult], bool]


def store_for(pb: Playbook) -> StateStore:
    return StateStore(pb.state_path, pb.name)  # on the playbook's control plane (migrator.control)


# --- reading ---------------------------------------------------------------------------------


def probe_server(ep: Endpoint, role: str) -> ServerInfo:
    """Identify a server read-only (INFO server); never raises for an unreachable server."""
    c = make_client(ep, socket_timeout=ep.connect_timeout.total_seconds(), retry=Retry(NoBackoff(), 0))
    try:
        info = c.info("server")
    except (redis.exceptions.RedisError, OSError) as e:
        return ServerInfo(role, ep.display, False, error=str(e) or type(e).__name__)
    finally:
        c.close()
    ident = identify(info)
    return ServerInfo(role, ep.display, True, ident.kind, ident.version, mode=ident.mode)


def check_endpoints(pb: Playbook, state: State) -> None:
    if state.endpoints_hash and state.endpoints_hash != pb.endpoints_hash():
        raise RefusedError(
            f"the playbook's source/target changed since this migration began (now {pb.source.display} → "
            f"{pb.target.display}); a migration cannot switch servers midway: restore the original endpoints, "
            "or roll back to planned and start a new migration with its own state_dir"
        )


def _older_than_journal(store: StateStore, state: State, entries: list[dict]) -> str | None:
    """Why ``state.json`` is older than what the journal (``entries``) says was written (restored from a backup?)."""
    written = [e.get("generation") for e in entries if e.get("event") in ("transition-completed", "transition-reverted")]
    newest = max((g for g in written if isinstance(g, int)), default=0)
    if state.generation < newest:
        return (f"{store.state_path} is at generation {state.generation} but the journal records generation {newest} "
                "written: the file is older than the migration (restored from a backup?). Shims may be routing by a "
                "newer phase; put the newest state.json back")
    return None


def _next_step(state: State, direction: str) -> tuple[Step | None, str | None]:
    if direction == "advance":
        step = step_from(state.phase)
        return step, None if step else f"the migration is {state.phase}; there is no further step"
    step = step_into(state.phase)
    if step is None:
        return None, f"the migration is {state.phase}; there is nothing to roll back"
    if not step.reversible:
        return None, f"the migration is {state.phase}: the source was released for decommissioning, so there is no way back"
    return step, None


def _interrupted_note(store: StateStore, state: State) -> str | None:
    running = store.running()
    if running and not running.endswith(f" pid {os.getpid()}") and f" pid {os.getpid()} " not in running:
        return f"in progress: {running}"
    entries = store.read_journal()
    older = _older_than_journal(store, state, entries)
    if older:
        return older
    if state.transition:
        t = state.transition
        return (f"an interrupted {t.direction} from {t.from_phase} to {t.to_phase} (started {t.started_at}) "
                f"changed the phase but did not finish; run `migrator {t.direction}` to finish it")
    last_event = next((e for e in reversed(entries) if str(e.get("event", "")).startswith("transition-")), None)
    if last_event is not None and last_event.get("event") == "transition-reverting":
        return (f"a revert to {last_event.get('restoring')} (generation {last_event.get('generation')}) was interrupted: "
                "the phase changed and was put back; check with `migrator status` that every shim applied it")
    last = _dangling_start(entries, state)
    if last and roleswap.begun_after(entries, last):
        return (f"an attempt to {last['direction']} from {last['from']} to {last['to']} at {last['time']} was interrupted "
                f"while the servers swapped roles: run `migrator {last['direction']}` again; it reads their roles and "
                "finishes the swap, or says what to do")
    if last:
        return (f"an attempt to {last['direction']} from {last['from']} to {last['to']} at {last['time']} "
                "stopped before the phase changed; nothing was applied")
    return None


def _dangling_start(entries: list[dict], state: State) -> dict | None:
    """The journal's (``entries``) last ``transition-started`` if nothing completed it and the state never moved."""
    for e in reversed(entries):
        if e.get("event") in ("transition-completed", "transition-reverted", "transition-aborted", "transition-reverting"):
            return None
        if e.get("event") == "transition-started":
            return e if e.get("from") == state.phase.value and state.transition is None else None
    return None


def plan(pb: Playbook, direction: str = "advance", evaluate: GateEvaluator | None = None, probe: bool = True) -> PlanResult:
    """What ``advance`` (or ``rollback``) would do now: gates with current evidence, actions. Read-only."""
    store = store_for(pb)
    state = store.load()
    check_endpoints(pb, state)
    step, why_not = _next_step(state, direction)
    result = PlanResult(
        migration=pb.name, playbook=str(pb.path), state_dir=str(store.dir), phase=state.phase,
        generation=state.generation, phase_since=state.phase_since, direction=direction, step=step,
        pending=state.transition, note=why_not or _interrupted_note(store, state), started=store.exists(),
    )
    if probe:
        result.servers = [probe_server(pb.source, "source"), probe_server(pb.target, "target")]
    if step is not None:
        names = step.gates if direction == "advance" else step.rollback_gates
        ctx = gates_mod.make_context(pb, store, state, read_only=True)
        result.gates = (evaluate or gates_mod.evaluate)(names, ctx)
        result.actions = list(step.actions if direction == "advance" else step.rollback_actions)
        result.prepare = list(step.prepare if direction == "advance" else step.rollback_prepare)
    return result


# --- changing ----------------------------------------------------------------------------------


def advance(pb: Playbook, *, overrides: dict[str, str] | None = None, dry_run: bool = False,
            confirm: Confirm | None = None, evaluate: GateEvaluator | None = None) -> TransitionResult:
    """Take the next step if every gate passes (or is overridden with a reason)."""
    return _move(pb, "advance", overrides or {}, dry_run, confirm, evaluate)


def rollback(pb: Playbook, *, overrides: dict[str, str] | None = None, dry_run: bool = False,
             confirm: Confirm | None = None, evaluate: GateEvaluator | None = None) -> TransitionResult:
    """Reverse the step that entered the current phase, after its own safety checks."""
    return _move(pb, "rollback", overrides or {}, dry_run, confirm, evaluate)


def _move(pb: Playbook, direction: str, overrides: dict[str, str], dry_run: bool,
          confirm: Confirm | None, evaluate: GateEvaluator | None) -> TransitionResult:
    store = store_for(pb)
    with store.locked(direction):
        state = store.load()
        check_endpoints(pb, state)
        entries = store.read_journal()
        if (older := _older_than_journal(store, state, entries)) is not None:
            raise StateError(older)
        done = None if dry_run else _intent_already_done(store, state, direction)
        if done is not None:
            return done
        if state.barrier is not None and state.transition is None and not dry_run:
            # A run died while shims held commands; they released at the deadline. Clear it.
            store.journal("barrier-lifted", barrier=state.barrier.id, reason="left by an interrupted run")
            state.barrier, state.generation = None, state.generation + 1
            store.save(state)
            registry.await_ack(store.dir, state.generation, pb.shim.ack_timeout.total_seconds())
        pending = state.transition
        if pending and pending.direction == direction:
            if not dry_run:
                _write_intent(store, direction, Phase(pending.from_phase), Phase(pending.to_phase))
            try:
                result = _finish(pb, store, state, dry_run, overrides=overrides)
            except Exception:
                _clear_intent(store, dry_run)
                raise
            _clear_intent(store, dry_run)
            return result
        if pending and not dry_run:
            store.journal("transition-superseded", id=pending.id, by=direction, operator=operator())
        elif (dangling := _dangling_start(entries, state)) is not None and not dry_run:
            why = ("stopped during the role swap, before the phase changed: this run reads the servers' roles"
                   if roleswap.begun_after(entries, dangling) else "stopped before the phase changed; nothing was applied")
            store.journal("transition-aborted", id=dangling.get("id"), reason=why)
        step, why_not = _next_step(state, direction)
        if step is None:
            raise RefusedError(why_not or "no step")
        names = step.gates if direction == "advance" else step.rollback_gates
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise UsageError(f"--override {unknown[0]}: the {direction} to {target_of(step, direction)} has no such gate "
                             f"(its gates: {', '.join(names) or 'none'})")
        # A dry run is read-only: gates that would run something (the compatibility run writes a
        # report, runs the test suite, may flush a scratch target) report their last result.
        ctx = gates_mod.make_context(pb, store, state, read_only=dry_run)
        results = _judge(names, ctx, overrides, evaluate)
        failed = [r for r in results if not r.passed and not r.overridden]
        if failed:
            if not dry_run:
                store.journal("refused", direction=direction, step=step.name, **{"from": state.phase.value},
                              to=target_of(step, direction).value, gates=[r.to_json() for r in results], operator=operator())
            raise GatesFailed(step, direction, results)
        to = target_of(step, direction)
        if dry_run:
            return TransitionResult(pb.name, direction, state.phase, to, state.generation, True, results, [])
        if confirm is not None:
            preview = plan(pb, direction, evaluate=lambda _n, _c: results, probe=False)
            if not confirm(preview):
                raise RefusedError(f"{direction} to {to} not confirmed; nothing changed")
            # The answer may come minutes later: the evidence shown may no longer hold (a shim
            # stopped, a side restarted). Judge again; what is journaled is what holds now.
            ctx = gates_mod.make_context(pb, store, state)
            results = _judge(names, ctx, overrides, evaluate)
            failed = [r for r in results if not r.passed and not r.overridden]
            if failed:
                store.journal("refused", direction=direction, step=step.name, **{"from": state.phase.value}, to=to.value,
                              gates=[r.to_json() for r in results], operator=operator(), after="confirmation")
                raise GatesFailed(step, direction, results)
        _write_intent(store, direction, state.phase, to)
        try:
            hooks.run(pb, store, step, direction, state.phase.value, to.value, "before")
            result = _transition(pb, store, state, step, direction, results, ctx, overrides)
        except Exception:
            _clear_intent(store, False)  # this run ends here, knowingly: the next one decides afresh
            raise
        _clear_intent(store, False)
        return result


def _judge(names: tuple[str, ...], ctx: gates_mod.GateContext, overrides: dict[str, str],
           evaluate: GateEvaluator | None) -> list[gates_mod.GateResult]:
    results = (evaluate or gates_mod.evaluate)(names, ctx)
    refused = [s for s in (ctx.probed_sides() or {}).values() if not s.reachable and (s.error or "").startswith("authentication")]
    if refused:
        # Wrong credentials are the playbook's problem, not the world's: exit 3, nothing journaled.
        raise UnreachableError("; ".join(f"{s.describe()}: check the playbook's credentials" for s in refused))
    for r in results:
        if r.name in overrides and not r.passed:
            r.overridden, r.override_reason = True, overrides[r.name]
    return results


# --- the intent of a run: so that re-running a killed command does not take a second step ------



def _write_intent(store: StateStore, direction: str, from_phase: Phase, to: Phase) -> None:
    """Record, before anything changes, which step this run means to take.

    A run killed after its step completed (during an after-hook, or before it printed) leaves
    this file behind; running the same command again then finds the step done and does not take
    another one (``_intent_already_done``).
    """
    store.write_intent({"direction": direction, "from": from_phase.value, "to": to.value,
                                                "pid": os.getpid(), "operator": operator(), "at": iso(now())})


def _clear_intent(store: StateStore, dry_run: bool) -> None:
    if not dry_run:
        store.clear_intent()


def read_intent(store: StateStore) -> dict[str, Any] | None:
    return store.read_intent()


def _intent_already_done(store: StateStore, state: State, direction: str) -> TransitionResult | None:
    """If a killed run of this command had already reached its phase: say so, take no step."""
    intent = read_intent(store)
    if not intent:
        return None
    _clear_intent(store, False)  # either way it is answered now: the next run is a new intent
    if intent.get("direction") != direction or state.transition is not None or state.phase.value != intent.get("to"):
        return None  # it did not get there (or another command ran since): this run decides afresh
    store.journal("intent-found-done", direction=direction, **{"from": intent.get("from")}, to=intent.get("to"),
                  killed_run=f"pid {intent.get('pid')} at {intent.get('at')}", operator=operator())
    result = TransitionResult(store.migration, direction, Phase(intent["from"]), state.phase, state.generation, False, [], [])
    result.already_done = (f"the {direction} started at {intent.get('at')} (pid {intent.get('pid')}) was interrupted after it "
                           f"reached {state.phase}; no further step was taken. Run `migrator {direction}` again to take the next one")
    return result


def _transition(pb: Playbook, store: StateStore, state: State, step: Step, direction: str,
                results: list[gates_mod.GateResult], ctx: gates_mod.GateContext | None = None,
                overrides: dict[str, str] | None = None) -> TransitionResult:
    from_phase, to = state.phase, target_of(step, direction)
    tid = uuid.uuid4().hex[:12]
    overrides = overrides or {}
    if not store.exists():
        store.save(state)  # a journaled step implies a state file (see StateStore.load)
    # Each side's identity as the step is taken: a later restart (a new run_id) voids what was
    # known then (``migrator.sides``).
    seen = (ctx.current_sides() if ctx is not None else sides.snapshot(pb))
    if ctx is not None and not ctx.read_only:
        # A reshard or failover since the last record is journaled before the sides this step
        # records become the new baseline, whether or not one of its gates looked.
        gates_mod.topology_since_recorded(ctx)
    clock = _mirror_clock_kept(pb, store, state) if (step.name, direction) == ("read_cutover", "rollback") else None
    store.journal(
        "transition-started", id=tid, step=step.name, direction=direction, **{"from": from_phase.value},
        to=to.value, generation=state.generation + 1, gates=[r.to_json() for r in results],
        overrides=[{"gate": r.name, "reason": r.override_reason, "operator": operator()} for r in results if r.overridden],
        operator=operator(), playbook=str(pb.path), playbook_hash=pb.playbook_hash(), endpoints_hash=pb.endpoints_hash(),
        sides={role: side.to_json() for role, side in seen.items()},
        **({"mirror_clock": clock} if clock else {}),
    )
    crashpoint("after-journal")
    prepare = step.prepare if direction == "advance" else step.rollback_prepare
    if prepare:
        pre = actions_mod.run(prepare, actions_mod.ActionContext(pb, store, state, direction, overrides))
        crashpoint("after-prepare")
        failed = [a for a in pre if not a.ok]
        if failed:
            if state.barrier is not None:
                # A later prepare (the role swap) failed while shims hold: release them now, not at the deadline.
                state.barrier, state.generation = None, state.generation + 1
                store.save(state)
            store.journal("transition-aborted", id=tid, reason=f"{failed[0].name}: {failed[0].evidence}",
                          actions=[a.to_json() for a in pre])
            raise RefusedError(f"{direction} to {to} abandoned, phase unchanged: {failed[0].name} failed: {failed[0].evidence}")
        moved = any(a.data.get("authority_moved") for a in pre)
        if moved and state.barrier is not None and not _barrier_in_force(pb, state.barrier):
            # The servers swapped roles: the old phase would send writes to a replica (or to one
            # side only), so the switch is written even late.
            store.journal("switch-late", id=tid, barrier=state.barrier.id, deadline=state.barrier.deadline)
        elif state.barrier is not None and not _barrier_in_force(pb, state.barrier):
            # Too late: the shims release at the deadline, in the old phase, and may already have.
            why = f"the hold's deadline (barrier {state.barrier.id}) was too close when the switch was ready"
            state.barrier, state.generation = None, state.generation + 1
            store.save(state)
            store.journal("transition-aborted", id=tid, reason=why, actions=[a.to_json() for a in pre])
            raise RefusedError(f"{direction} to {to} abandoned, phase unchanged: {why}; run it again")
    started = now()
    state.transition = Transition(id=tid, step=step.name, direction=direction, from_phase=from_phase.value,
                                  to_phase=to.value, started_at=iso(started),
                                  mirror_clock_since=(clock or {}).get("since") if (clock or {}).get("kept") else None)
    state.phase, state.generation, state.phase_since = to, state.generation + 1, iso(started)
    state.barrier = None  # the same write that switches the phase releases held commands
    state.endpoints_hash = state.endpoints_hash or pb.endpoints_hash()
    store.save(state)
    crashpoint("after-state")
    result = _finish(pb, store, state, dry_run=False, resumed=False, overrides=overrides)
    result.gates = results
    result.from_phase = from_phase
    return result


def _mirror_clock_kept(pb: Playbook, store: StateStore, state: State) -> dict[str, Any]:
    """Whether a rollback from reads-on-target keeps the mirror's clock, measured now (see gates.mirror_clock).

    Kept when, since reads moved to the target, no compared reply diverged and no key was marked
    dirty (none waiting, none repaired meanwhile): writes reached both sides throughout.
    """
    from migrator import reports
    from migrator.shim.dirty import list_dirty
    from migrator.shim.divergence import read_counters

    out_at = state.phase_started
    entries = store.read_journal()
    g0 = next((e.get("generation") for e in reversed(entries)
               if e.get("event") == "transition-started" and e.get("to") == Phase.READS_ON_TARGET.value), state.generation)
    divergent = sum(read_counters(store.dir, g)["divergent"] for g in range(int(g0), state.generation + 1))
    dirty = [d for d in list_dirty(store.dir) if d.since >= out_at.timestamp()]
    repaired = [r for r in reports.list_reports(store.dir, "sync")
                if r.get("mode") == "dirty" and parse_iso(r["created_at"]) >= out_at and r.get("keys")]
    before = next((h for h in reversed(state.history) if h.get("to") == Phase.MIRRORING.value), None)
    since = (before or {}).get("mirror_clock_since") or (before or {}).get("started_at")
    why = []
    if divergent:
        why.append(f"{divergent} divergence(s)")
    if dirty or repaired:
        why.append(f"{len(dirty)} dirty key(s) waiting, {len(repaired)} repair(s) that copied keys")
    kept = bool(since) and not why
    return {"kept": kept, "since": since, "divergent": divergent, "dirty": len(dirty),
            "why_not": "; ".join(why) or (None if since else "no earlier mirror start recorded")}


SWITCH_MARGIN = 0.2  # of max_pause: the switch is written only this long before the hold's deadline, or not at all


def _barrier_in_force(pb: Playbook, barrier) -> bool:
    max_pause = pb.steps.write_cutover.max_pause.total_seconds()
    return (parse_iso(barrier.deadline) - now()).total_seconds() > SWITCH_MARGIN * max_pause


def _finish(pb: Playbook, store: StateStore, state: State, dry_run: bool, resumed: bool = True,
            overrides: dict[str, str] | None = None) -> TransitionResult:
    """Run the actions of the recorded transition and complete it (again, after a crash)."""
    t = state.transition
    assert t is not None
    step = next(s for s in STEPS if s.name == t.step)
    names = step.actions if t.direction == "advance" else step.rollback_actions
    from_phase, to = Phase(t.from_phase), Phase(t.to_phase)
    if dry_run:
        return TransitionResult(pb.name, t.direction, from_phase, to, state.generation, True, [], [], resumed, t.id)
    if resumed:
        store.journal("transition-resumed", id=t.id, operator=operator())
    results = actions_mod.run(names, actions_mod.ActionContext(pb, store, state, t.direction, overrides or {}))
    crashpoint("after-actions")
    failed = [a for a in results if not a.ok]
    if failed:
        if not step.reversible:
            # Completing cannot be undone by reverting: shims that applied it already stopped
            # writing to the source. Completed it stays; the laggard applies it when it polls.
            _complete(pb, store, state, step, results, resumed)
            raise StateError(f"{t.direction} to {t.to_phase} is done but {failed[0].name} failed: {failed[0].evidence}; "
                             "the phase stays completed: restart or stop the shims that did not acknowledge it")
        unsafe = _revert_unsafe(pb, store, state, step, overrides or {})
        if unsafe:
            store.journal("transition-stalled", id=t.id, reason=f"{failed[0].name}: {failed[0].evidence}",
                          not_reverted_because=unsafe, operator=operator())
            raise StateError(
                f"{t.direction} to {t.to_phase} is written but {failed[0].name} failed: {failed[0].evidence}; "
                f"not reverted to {t.from_phase} because {unsafe}. Run `migrator {t.direction}` again to wait for the "
                "shims, or stop the ones that do not acknowledge; `migrator status` shows them")
        _revert(pb, store, state, failed[0])
    return _complete(pb, store, state, step, results, resumed)


def _revert_unsafe(pb: Playbook, store: StateStore, state: State, step: Step, overrides: dict[str, str]) -> str | None:
    """Why putting the previous phase back would lose writes, or None if it would not.

    Only a switch of write authority can: the side that becomes authoritative again must have
    every write (no dirty keys) and, if it is the source, be reachable. Other steps only move
    reads or mirroring, and go back at once.
    """
    if "hold_writes" not in (step.prepare + step.rollback_prepare):
        return None
    if state.mirror is not None and state.mirror.strategy == "replication":
        # The servers' roles were swapped inside the hold: the previous phase would route by roles
        # they no longer have. Swapping back takes a hold of its own: ``rollback``.
        return ("the servers swapped roles for the write switch (migrator.roleswap): run `migrator rollback` to swap "
                "them back under a hold")
    names = ["no_dirty_keys"] + (["source_reachable"] if Phase(state.transition.from_phase) != Phase.WRITES_ON_TARGET else [])
    results = gates_mod.evaluate(names, gates_mod.make_context(pb, store, state))
    failing = [r for r in results if not r.passed and r.name not in overrides]
    return "; ".join(f"{r.name}: {r.evidence}" for r in failing) or None


def _complete(pb: Playbook, store: StateStore, state: State, step: Step,
              results: list[actions_mod.ActionResult], resumed: bool) -> TransitionResult:
    t = state.transition
    assert t is not None
    from_phase, to = Phase(t.from_phase), Phase(t.to_phase)
    state.history.append({"id": t.id, "direction": t.direction, "from": t.from_phase, "to": t.to_phase,
                          "started_at": t.started_at, "completed_at": iso(now()), "operator": operator(),
                          **({"mirror_clock_since": t.mirror_clock_since} if t.mirror_clock_since else {})})
    state.transition = None
    store.save(state)
    store.journal("transition-completed", id=t.id, direction=t.direction, **{"from": t.from_phase}, to=t.to_phase,
                  generation=state.generation, actions=[a.to_json() for a in results], operator=operator())
    crashpoint("after-complete")
    after = hooks.run(pb, store, step, t.direction, t.from_phase, t.to_phase, "after")
    return TransitionResult(pb.name, t.direction, from_phase, to, state.generation, False, [], results, resumed, t.id,
                            hooks=after)


def _revert(pb: Playbook, store: StateStore, state: State, failure: actions_mod.ActionResult) -> None:
    """An action failed after the phase changed: put the previous phase back, then refuse."""
    t = state.transition
    assert t is not None
    store.journal("transition-reverting", id=t.id, reason=f"{failure.name}: {failure.evidence}", restoring=t.from_phase,
                  generation=state.generation + 1, operator=operator())
    state.phase, state.generation, state.phase_since = Phase(t.from_phase), state.generation + 1, iso(now())
    state.transition = None
    one_sided = (Phase.PLANNED, Phase.COMPATIBLE)
    if Phase(t.to_phase) in one_sided and Phase(t.from_phase) not in one_sided:
        # Shims that applied the rollback stopped mirroring until now: mirroring starts again
        # here, so a sync from before the gap does not count (State.mirror_started).
        state.history.append({"id": t.id, "direction": "revert", "from": t.to_phase, "to": t.from_phase,
                              "started_at": state.phase_since, "completed_at": state.phase_since, "operator": operator()})
    store.save(state)
    back = registry.await_ack(store.dir, state.generation, pb.shim.ack_timeout.total_seconds())
    store.journal("transition-reverted", id=t.id, reason=f"{failure.name}: {failure.evidence}",
                  restored=t.from_phase, generation=state.generation, restore_ack=back.evidence(), operator=operator())
    raise RefusedError(f"{t.direction} to {t.to_phase} reverted to {t.from_phase}: {failure.name} failed: {failure.evidence}; "
                       f"restoring {t.from_phase}: {back.evidence()}")


def status(pb: Playbook, gates: bool = False) -> dict[str, Any]:
    """The migration's phase, time in it, pending transition, history, shims and both sides now,
    the mirror's compared replies, dirty keys and any running sync or check; with ``gates``, the
    next step's gates evaluated now (read-only). Read-only."""
    store = store_for(pb)
    state = store.load()
    shims = registry.read_all(store.dir)
    in_phase = now() - state.phase_started
    # status must answer quickly even with a side stopped: at most 2 s per side.
    ctx = gates_mod.make_context(pb, store, state, read_only=True, probe_timeout=min(2.0, pb.source.connect_timeout.total_seconds()))
    alerts = _alerts(ctx)
    from migrator.data import replica

    repl = replica.summary(pb, store, state, ctx.probe_timeout)
    if repl and repl.get("problem"):
        alerts.append(f"replication: {repl['evidence']}")
    out = {
        "migration": pb.name,
        "playbook": str(pb.path),
        "state_dir": str(store.dir),
        "control": {"backend": "etcd", "endpoints": store.control.endpoints, "prefix": store.control.prefix}
        if store.control is not None else {"backend": "local", "state_dir": str(store.dir)},
        "started": store.exists(),
        "phase": state.phase.value,
        "generation": state.generation,
        "phase_since": state.phase_since,
        "time_in_phase": format_duration(in_phase),
        "time_in_phase_s": round(in_phase.total_seconds(), 3),
        "source": pb.source.display,
        "target": pb.target.display,
        "endpoints_changed": bool(state.endpoints_hash and state.endpoints_hash != pb.endpoints_hash()),
        "pending_transition": vars(state.transition) if state.transition else None,
        "note": _interrupted_note(store, state),
        "history": state.history,
        "sides": {role: side.to_json() for role, side in ctx.current_sides().items()},
        "alerts": alerts,
        "shims": [
            {"id": s.id, "listen": s.listen, "admin": s.admin, "pid": s.pid, "host": s.host,
             "liveness": s.liveness(), "heartbeat_age_s": round(s.age(), 1), "applied_phase": s.applied_phase,
             "applied_generation": s.applied_generation, "current": s.applied_generation >= state.generation,
             "pending_shadow": s.pending_shadow, "dirty_keys": s.dirty_keys}
            for s in shims
        ],
        "other_side": _other_side(state.phase, shims, alerts),
    }
    out.update(_live(ctx))
    out["replication"] = repl
    if gates:
        out["next"] = next_gates(ctx)
    return out


def _live(ctx: gates_mod.GateContext) -> dict[str, Any]:
    """What ``status --watch`` follows besides the phase: the mirror's comparisons in this
    generation, keys awaiting repair, and the last sync and check (running or not)."""
    from migrator.data import dirty as dirtymod
    from migrator.data import progress
    from migrator.shim.divergence import read_counters

    c = read_counters(ctx.store.dir, ctx.state.generation)
    return {
        "mirror": {"generation": c["generation"], "compared": c["compared"], "divergent": c["divergent"],
                   "divergence_rate": round(c["divergent"] / c["compared"], 6) if c["compared"] else None,
                   "by_kind": {k: v for k, v in c["by_kind"].items() if v}, "awaiting_repair": c["awaiting_repair"]},
        "dirty_keys": dirtymod.list_dirty(ctx.store.dir).count,
        "jobs": {kind: progress.read(ctx.store.dir, kind) for kind in ("sync", "check")},
    }


def next_gates(ctx: gates_mod.GateContext) -> dict[str, Any]:
    """The next advance's gates evaluated now, read-only (what ``plan`` shows), with how long
    that took and the time-in-phase gates' elapsed and required durations."""
    import time

    step, why_not = _next_step(ctx.state, "advance")
    if step is None:
        return {"step": None, "note": why_not, "gates": [], "allowed": False, "durations": [],
                "evaluated_at": iso(now()), "took_s": 0.0}
    t0 = time.monotonic()
    try:
        results = gates_mod.evaluate(step.gates, ctx)
    except UnreachableError as e:  # a side down is what a watcher must see, not the end of the watch
        results = [gates_mod.GateResult("(gates)", False, f"not evaluated: {e.message}")]
    return {
        "step": step.name, "from": ctx.state.phase.value, "to": step.dest.value,
        "gates": [g.to_json() for g in results],
        "allowed": all(g.passed for g in results),
        "durations": [{"gate": g.name, "elapsed_s": round(g.data["elapsed_s"], 1), "required_s": g.data["required_s"]}
                      for g in results if "required_s" in g.data and "elapsed_s" in g.data],
        "evaluated_at": iso(now()), "took_s": round(time.monotonic() - t0, 3),
    }


TWO_SIDED = (Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET)


def _alerts(ctx: gates_mod.GateContext) -> list[str]:
    """What stands between the two sides and "in sync" now: a side down or restarted, lost shims, key counts."""
    out = [s.describe() for s in ctx.current_sides().values() if not s.reachable]
    if ctx.state.phase not in TWO_SIDED:
        return out
    out += gates_mod.restart_notes(ctx)
    out += [f"topology: {c.text}" for c in gates_mod.topology_since_recorded(ctx)]
    names = ("no_lost_shims", "key_counts") if ctx.state.phase != Phase.MIRRORING or _synced(ctx) else ("no_lost_shims",)
    out += [f"{r.name}: {r.evidence}" for r in gates_mod.evaluate(names, ctx) if not r.passed]
    return out


def _synced(ctx: gates_mod.GateContext) -> bool:
    from migrator.shim.divergence import latest_complete_sync

    return latest_complete_sync(ctx.store.dir) is not None


def _other_side(phase: Phase, shims: list[registry.ShimRecord], alerts: list[str] | None = None) -> str:
    """What the non-authoritative server is owed, in words: the rollback's precondition."""
    if phase == Phase.COMPLETED:
        return "the source no longer receives writes: it can be decommissioned"
    if phase in (Phase.PLANNED, Phase.COMPATIBLE):
        return "writes reach the source only"
    side = "source (kept in sync for rollback)" if phase == Phase.WRITES_ON_TARGET else "target"
    live = [s for s in shims if s.liveness() != "dead"]
    if not live:
        return f"{side}: not known to be in sync: no shim is running, so writes are not being mirrored"
    owed = sum(s.pending_shadow for s in live)
    dirty = max((s.dirty_keys for s in live), default=0)
    if alerts:
        return f"{side}: NOT known to be in sync ({len(alerts)} problem(s) below; {owed} write(s) queued, {dirty} dirty key(s))"
    state = "in sync" if not owed and not dirty else f"{owed} write(s) queued, {dirty} dirty key(s) awaiting repair"
    return f"{side}: {state}"


def history(pb: Playbook) -> list[dict[str, Any]]:
    """Every journal entry, oldest first."""
    return store_for(pb).read_journal()


def require_reachable(infos: list[ServerInfo]) -> None:
    down = [i for i in infos if not i.reachable]
    if down:
        raise UnreachableError("; ".join(i.describe() for i in down))
