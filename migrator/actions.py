"""Actions: what a step does once its new phase is recorded in the state.

Recording the phase is what makes shims switch routing (they follow ``state.json``); an action
then makes sure the world caught up, e.g. every shim acknowledged the new generation. Actions
must be idempotent: after a crash, running the command again runs them again.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

from migrator import registry
from migrator.action_types import ActionContext, ActionResult
from migrator.crash import crashpoint
from migrator.state import Barrier, iso, now, operator

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


@action("hold_writes")
def hold_writes(ctx: ActionContext) -> ActionResult:
    """Make every shim hold new commands and drain in-flight ones, so authority can switch with no write reordered."""
    max_pause = ctx.playbook.steps.write_cutover.max_pause
    barrier = Barrier(id=uuid.uuid4().hex[:12], generation=ctx.state.generation + 1,
                      deadline=iso(now() + max_pause), purpose=f"{ctx.direction} write authority")
    ctx.state.barrier, ctx.state.generation = barrier, barrier.generation
    ctx.store.save(ctx.state)
    # Leave a margin before the deadline so the switch lands while shims still hold.
    # An operator who overrode ``no_dirty_keys`` accepted that the side taking authority misses
    # those keys: the hold then waits for the in-flight writes only, not for the marks.
    ignore_dirty = "no_dirty_keys" in ctx.overrides
    held = registry.await_hold(ctx.store.dir, barrier.id, max_pause.total_seconds() * 0.6, ignore_dirty=ignore_dirty)
    data = {"barrier": barrier.id, "held": [r.id for r in held.held], "missing": [r.id for r in held.missing],
            "waited_s": round(held.waited, 3)}
    if not held.ok:
        ctx.state.barrier, ctx.state.generation = None, ctx.state.generation + 1
        ctx.store.save(ctx.state)
    return ActionResult("hold_writes", held.ok, held.evidence(), data)


@action("write_pause")
def write_pause(ctx: ActionContext) -> ActionResult:
    """Report how long each shim held client commands during the switch."""
    pauses = {r.id: r.last_pause_ms for r in registry.active(ctx.store.dir) if r.last_pause_ms is not None}
    if not pauses:
        return ActionResult("write_pause", True, "no shim held commands (none running)", {})
    worst = max(pauses.values())
    return ActionResult("write_pause", True, f"write pause {worst:.1f} ms (worst of {len(pauses)} shim(s))",
                        {"pause_ms": pauses, "max_pause_ms": worst})


@action("role_swap")
def role_swap(ctx: ActionContext) -> ActionResult:
    """In the replication strategy, while writes are held: promote the target, make the source its replica (or fall back to dual-write)."""
    from migrator import roleswap

    return roleswap.run_swap(ctx)


@action("role_swap_back")
def role_swap_back(ctx: ActionContext) -> ActionResult:
    """In the replication strategy, while writes are held: make the source the primary again and the target its replica."""
    from migrator import roleswap

    return roleswap.run_swap(ctx)


@action("release_pause")
def release_pause(ctx: ActionContext) -> ActionResult:
    """Lift the role swap's CLIENT PAUSE on the servers and report how long their writes were paused."""
    from migrator import roleswap

    return roleswap.release(ctx)


@action("detach_source")
def detach_source(ctx: ActionContext) -> ActionResult:
    """In the replication strategy, stop the source replicating the target and restore the settings the swap changed."""
    from migrator import roleswap

    return roleswap.run_detach(ctx)


@action("final_report")
def final_report(ctx: ActionContext) -> ActionResult:
    """Write the migration's final report: every step's evidence, overrides, rollbacks, pauses, divergences, sync and check."""
    from migrator import final_report as final
    from migrator import reports

    data, md, html = final.build(ctx.playbook, ctx.store, ctx.state)
    ref = reports.write(ctx.playbook.state_path, data, md, html)
    return ActionResult("final_report", True, f"final report {ref.id} ({data['verdict']}): {ref.html_path}",
                        {"report": ref.id, "html": str(ref.html_path), "verdict": data["verdict"]})


# --- the mirror strategy (``migrator.replication``) ---------------------------------------------


@action("start_mirror")
def start_mirror(ctx: ActionContext) -> ActionResult:
    """Decide the mirror strategy on fresh evidence and, in replication, make the target a replica of the source."""
    from migrator import replication
    from migrator.connect import connect
    from migrator.state import MirrorMode

    pb = ctx.playbook
    if pb.mirror.strategy == "dual-write":
        d = replication.decide("dual-write", replication.SyncAllowed(None, ""), None, "")
        ctx.state.mirror = MirrorMode(d.strategy, d.why)
        return ActionResult("start_mirror", True, f"mirror strategy dual-write: {d.why}", d.to_json())
    source = connect(pb.source, "source")
    try:
        target = connect(pb.target, "target")
    except BaseException:
        source.close()
        raise
    try:
        d = replication.fresh_decision(pb, source, target)
        data = {"decision": d.to_json()}
        if not d.ok:
            return ActionResult("start_mirror", False, d.why, data)
        host, port = replication.source_address(pb)
        if d.strategy == "dual-write":
            note = ""
            if replication.read(target).replicates(host, port):
                # An earlier attach (the strategy decided differently then): shims will write to
                # the target, which a replica would refuse.
                note = "; " + replication.detach(target).evidence
            ctx.state.mirror = MirrorMode(d.strategy, d.why)
            ctx.store.journal("mirror-strategy", **d.to_json(), evidence=f"dual-write: {d.why}{note}", operator=operator())
            return ActionResult("start_mirror", True, f"mirror strategy dual-write: {d.why}{note}", data)
        out = replication.attach(pb, source, target)
        data["attach"] = out.data
        if not out.ok:
            return ActionResult("start_mirror", False, out.evidence, data)
        if not out.data.get("already") or replication.attachment(ctx.store.read_journal()) is None:
            ctx.store.journal(replication.ATTACHED_EVENT, source_address=f"{host}:{port}",
                              source_sync_full=out.data.get("source_sync_full"),
                              source_offset=out.data.get("source_offset"), evidence=out.evidence, operator=operator())
        crashpoint("after-attach")
        ctx.store.journal("mirror-strategy", **d.to_json(), evidence=f"replication: {d.why}", operator=operator())
        ctx.state.mirror = MirrorMode(d.strategy, d.why)
        return ActionResult("start_mirror", True, f"mirror strategy replication: {d.why}; {out.evidence}", data)
    finally:
        source.close()
        target.close()


@action("stop_mirror")
def stop_mirror(ctx: ActionContext) -> ActionResult:
    """Stop the target replicating the source (REPLICAOF NO ONE; it keeps its data) and forget the strategy."""
    import redis

    from migrator import replication
    from migrator.connect import connect
    from migrator.errors import UnreachableError

    pb = ctx.playbook
    was = replication.strategy_of(ctx.state)
    evidence = "mirror strategy was dual-write: nothing to undo on the servers"
    data: dict[str, Any] = {"strategy": was}
    if was == "replication" or (ctx.state.mirror is None and pb.mirror.strategy != "dual-write"):
        try:
            target = connect(pb.target, "target")
        except UnreachableError as e:
            # The rollback onto the source must not depend on the target: say what is left to do.
            evidence = (f"{e.message}: it may still replicate the source; run REPLICAOF NO ONE on it when it is back "
                        "(advancing again re-attaches it as it is)")
            data["detached"] = False
        else:
            try:
                host, port = replication.source_address(pb)
                t = replication.read(target)
                if t.is_replica and not t.replicates(host, port):
                    evidence = f"the target replicates {t.master_host}:{t.master_port}, not the source: left as it is"
                else:
                    evidence = replication.detach(target).evidence
                data["detached"] = True
            except redis.exceptions.RedisError as e:
                return ActionResult("stop_mirror", False, f"REPLICAOF NO ONE on the target failed: {e}", data)
            finally:
                target.close()
    ctx.state.mirror = None
    ctx.store.save(ctx.state)
    return ActionResult("stop_mirror", True, evidence, data)
