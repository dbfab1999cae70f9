"""Actions: what a step does once its new phase is recorded in the state.

Recording the phase is what makes shims switch routing (they follow ``state.json``); an action
then makes sure the world caught up, e.g. every shim acknowledged the new generation. Actions
must be idempotent: after a crash, running the command again runs them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from migrator import registry
from migrator.playbook import Playbook
from migrator.state import State, StateStore


@dataclass
class ActionResult:
    name: str
    ok: bool
    evidence: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"action": self.name, "ok": self.ok, "evidence": self.evidence, "data": self.data}


@dataclass
class ActionContext:
    playbook: Playbook
    store: StateStore
    state: State  # already holds the new phase and generation
    direction: str  # "advance" or "rollback"


ActionFn = Callable[[ActionContext], ActionResult]
ACTIONS: dict[str, ActionFn] = {}


def action(name: str) -> Callable[[ActionFn], ActionFn]:
    def register(fn: ActionFn) -> ActionFn:
        ACTIONS[name] = fn
        return fn

    return register


def describe(name: str) -> str:
    fn = ACTIONS.get(name)
    return (fn.__doc__ or name).strip().splitlines()[0] if fn else name


def run(names: tuple[str, ...], ctx: ActionContext) -> list[ActionResult]:
    """Run actions in order, stopping at the first that fails."""
    results = []
    for name in names:
        fn = ACTIONS.get(name)
        result = fn(ctx) if fn else ActionResult(name, False, f"no such action {name!r} (a bug in the phase table)")
        results.append(result)
        if not result.ok:
            break
    return results


@action("await_shim_ack")
def await_shim_ack(ctx: ActionContext) -> ActionResult:
    """Wait until every running shim applies the new phase."""
    timeout = ctx.playbook.shim.ack_timeout.total_seconds()
    ack = registry.await_ack(ctx.store.dir, ctx.state.generation, timeout)
    return ActionResult(
        "await_shim_ack",
        ack.ok,
        ack.evidence() + (f" (waited {ack.waited:.1f}s)" if ack.acked or ack.missing else ""),
        {"acked": [r.id for r in ack.acked], "missing": [r.id for r in ack.missing], "waited_s": round(ack.waited, 3)},
    )
