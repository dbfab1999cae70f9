"""Gates: the checks a step requires, each returning pass/fail with measured evidence.

A gate is one function ``(GateContext) -> GateResult`` registered under a name with
``@gate("name")``; the phase table (``migrator.phases``) says which step needs it. Adding a gate
is one function here (or in the module that owns the idea, imported in ``_GATE_MODULES``) and
one entry in the table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable

from migrator import registry
from migrator.durations import format_duration
from migrator.playbook import Playbook
from migrator.state import State, StateStore, now


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
        except Exception as e:  # noqa: BLE001 - a gate that cannot measure must fail, with why
            results.append(GateResult(name, False, f"could not evaluate: {type(e).__name__}: {e}"))
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
    """The mirror has run for steps.mirror.min_duration."""
    return _time_in_phase(ctx, ctx.playbook.steps.mirror.min_duration, "mirror")


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
    """The source answers, so it can take authority back."""
    from migrator.command import probe_server  # the runner imports this module

    info = probe_server(ctx.playbook.source, "source")
    return info.reachable, info.describe(), {"reachable": info.reachable}


def make_context(playbook: Playbook, store: StateStore, state: State, read_only: bool = False) -> GateContext:
    return GateContext(playbook=playbook, store=store, state=state, now=now(), read_only=read_only)
