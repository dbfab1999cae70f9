"""Commands that walk the phases: plan, advance, rollback, status, history."""

from __future__ import annotations

import json
import sys
import time

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from migrator import command
from migrator.cli.base import Ctx, cli, emit_json, output_option, pass_ctx, with_playbook
from migrator.durations import format_duration
from migrator.errors import UsageError
from migrator.gates import GateResult
from migrator.redact import redact


def console() -> Console:
    # Piped output (logs, CI, tests) must not be wrapped at 80 columns mid-evidence.
    return Console(highlight=False, soft_wrap=True, emoji=False, width=None if sys.stdout.isatty() else 200)


def _mark(ok: bool, overridden: bool = False) -> str:
    if overridden:
        return "[yellow]OVERRIDDEN[/]"
    return "[green]pass[/]" if ok else "[red]FAIL[/]"


def render_gates(con: Console, gates: list[GateResult]) -> None:
    if not gates:
        con.print("  (no gates)")
        return
    con.print(_gates_table(gates))


def _gates_table(gates: list[GateResult]) -> Table:
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("gate")
    table.add_column("result")
    table.add_column("evidence")
    for g in gates:
        ev = g.evidence + (f" — override reason: {g.override_reason}" if g.overridden else "")
        table.add_row(escape(g.name), _mark(g.passed, g.overridden), escape(redact(ev)))
    return table


def render_plan(con: Console, p: command.PlanResult) -> None:
    con.print(f"[bold]Migration {escape(p.migration)}[/]  playbook {escape(p.playbook)}")
    if p.started:
        con.print(f"Phase: [bold]{p.phase}[/] since {p.phase_since} (generation {p.generation})")
    else:
        con.print(f"Phase: [bold]{p.phase}[/] (no step taken yet; state will live in {escape(p.state_dir)})")
    for s in p.servers:
        con.print(f"  {escape(redact(s.describe()))}")
    if p.note:
        con.print(f"[yellow]Note:[/] {escape(p.note)}")
    if p.step is None:
        return
    desc = p.step.description if p.direction == "advance" else (p.step.rollback_description or f"undo {p.step.name}")
    con.print(f"Next {p.direction}: [bold]{p.phase} → {p.to_phase}[/] ({p.step.name}): {escape(desc)}")
    con.print("Gates:")
    render_gates(con, p.gates)
    if p.prepare:
        con.print(f"Actions {p.direction} would take before recording {p.to_phase} (the step is abandoned if one fails):")
        for a in p.prepare:
            con.print(f"  - {a}: {command.actions_mod.describe(a)}")
    if p.actions:
        con.print(f"Actions {p.direction} would take after recording {p.to_phase}:")
        for a in p.actions:
            con.print(f"  - {a}: {command.actions_mod.describe(a)}")
    failing = [g for g in p.gates if not g.passed and not g.overridden]
    if failing:
        con.print(f"[red]{p.direction} would be refused:[/] {len(failing)} gate(s) failing ({', '.join(g.name for g in failing)})")
    else:
        con.print(f"[green]{p.direction} is allowed now.[/]")


@cli.command()
@with_playbook
@output_option
@click.option("--rollback", "for_rollback", is_flag=True, help="Plan the rollback instead of the next advance.")
@pass_ctx
def plan(ctx: Ctx, output: str, for_rollback: bool) -> None:
    """Validate the playbook and show the next step, its gates with evidence, and its actions. Changes nothing."""
    pb = ctx.load_playbook()
    p = command.plan(pb, "rollback" if for_rollback else "advance")
    if output == "json":
        emit_json(p.to_json())
    else:
        render_plan(console(), p)
    command.require_reachable(p.servers)


def _overrides(override: tuple[str, ...], reason: str | None) -> dict[str, str]:
    if override and not (reason and reason.strip()):
        raise UsageError("--override needs --reason TEXT: the journal records why a gate was overridden")
    if reason and not override:
        raise UsageError("--reason is only meaningful with --override GATE")
    return {name: reason.strip() for name in override} if reason else {}


def _move(ctx: Ctx, direction: str, yes: bool, dry_run: bool, override: tuple[str, ...], reason: str | None, output: str) -> None:
    pb = ctx.load_playbook()
    con = console()
    overrides = _overrides(override, reason)

    def confirm(p: command.PlanResult) -> bool:
        render_plan(con, p)
        return click.confirm(f"{direction.capitalize()} {pb.name} from {p.phase} to {p.to_phase}?", default=False)

    interactive = sys.stdin.isatty() and sys.stdout.isatty() and not yes and not dry_run
    fn = command.advance if direction == "advance" else command.rollback
    try:
        result = fn(pb, overrides=overrides, dry_run=dry_run, confirm=confirm if interactive else None)
    except command.GatesFailed as e:
        if output == "json":
            emit_json({"refused": True, "direction": direction, "gates": [g.to_json() for g in e.results]})
        else:
            con.print(f"{direction} refused; gates:")
            render_gates(con, e.results)
        raise
    if output == "json":
        emit_json(result.to_json())
        return
    if result.already_done:
        con.print(f"{pb.name}: {escape(result.already_done)}")
        return
    verb = "would move" if result.dry_run else ("finished the interrupted step" if result.resumed else "moved")
    con.print(f"{pb.name}: {verb} {result.from_phase} → {result.to_phase} (generation {result.generation})")
    if result.gates:
        render_gates(con, result.gates)
    for a in result.actions:
        con.print(f"  {a.name}: {'ok' if a.ok else 'FAILED'} — {escape(a.evidence)}")
    for h in result.hooks:
        con.print(f"  {h.when} hook: {'ok' if h.ok else f'FAILED (exit {h.exit_code})'} — {escape(h.command)}")
        if not h.ok:
            con.print(f"[yellow]warning:[/] the step is complete but its {h.when} hook failed; see `migrator history`")


def _move_options(f):
    f = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation on a terminal.")(f)
    f = click.option("--dry-run", is_flag=True, help="Evaluate the gates and show what would happen; change nothing.")(f)
    f = click.option("--override", multiple=True, metavar="GATE", help="Take the step although GATE fails (needs --reason).")(f)
    f = click.option("--reason", metavar="TEXT", help="Why the gate is overridden; recorded in the journal.")(f)
    return output_option(with_playbook(f))


@cli.command()
@_move_options
@pass_ctx
def advance(ctx: Ctx, yes: bool, dry_run: bool, override: tuple[str, ...], reason: str | None, output: str) -> None:
    """Take the next step of the migration if every gate passes."""
    _move(ctx, "advance", yes, dry_run, override, reason, output)


@cli.command()
@_move_options
@pass_ctx
def rollback(ctx: Ctx, yes: bool, dry_run: bool, override: tuple[str, ...], reason: str | None, output: str) -> None:
    """Reverse the last step, after its own safety checks."""
    _move(ctx, "rollback", yes, dry_run, override, reason, output)


@cli.command()
@with_playbook
@output_option
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C (which exits 0).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
              help="With --watch: seconds between redraws (or JSON lines); default 1.")
@pass_ctx
def status(ctx: Ctx, output: str, watch: bool, interval: float | None) -> None:
    """Show the phase, time in phase, history and the running shims (live with --watch)."""
    if interval is not None and not watch:
        raise UsageError("--interval is only meaningful with --watch")
    pb = ctx.load_playbook()
    if watch:
        _watch(pb, output, 1.0 if interval is None else interval)
        return
    st = command.status(pb)
    if output == "json":
        emit_json(st)
        return
    con = console()
    for part in status_view(st):
        con.print(part)


def _cluster_line(role: str, side: dict) -> str:
    """``target: cluster, 4 primaries (4 replicas), all 16384 slots, 1,234 keys`` (or why it is unreachable)."""
    from migrator.topology_watch import summary

    keys = f", {side['keys']:,} keys" if side.get("reachable") and side.get("keys") is not None else ""
    down = "" if side.get("reachable") else f" — UNREACHABLE: {side.get('error')}"
    return f"{role}: cluster, {summary(side['cluster'].get('view'))}{keys}{down}"


def status_view(st: dict, history: int = 10) -> list[RenderableType]:
    """``command.status`` as lines and tables, for ``status`` and each redraw of ``status --watch``."""
    out: list[RenderableType] = []
    line = out.append
    line(f"[bold]Migration {escape(st['migration'])}[/]  {escape(st['source'])} → {escape(st['target'])}")
    line(f"Phase: [bold]{st['phase']}[/] for {st['time_in_phase']} (since {st['phase_since']}, generation {st['generation']})")
    nxt = st.get("next")
    for d in (nxt or {}).get("durations", []):
        left = d["required_s"] - d["elapsed_s"]
        line(f"  {escape(d['gate'])}: {format_duration(d['elapsed_s'])} of {format_duration(d['required_s'])}"
             + (f" ({format_duration(left)} to go)" if left > 0 else " [green](met)[/]"))
    if st.get("control", {}).get("backend") == "etcd":
        line(f"Control plane: etcd {escape(', '.join(st['control']['endpoints']))} under {escape(st['control']['prefix'])}")
    if st["endpoints_changed"]:
        line("[red]The playbook's endpoints differ from the ones this migration started with.[/]")
    if st["note"]:
        line(f"[yellow]Note:[/] {escape(st['note'])}")
    line(f"Other side: {escape(st['other_side'])}")
    for a in st.get("alerts", []):
        line(f"  [red]![/] {escape(a)}")
    for role, side in st.get("sides", {}).items():
        if side.get("cluster"):
            line(f"  {escape(_cluster_line(role, side))}")
            from migrator.sides import first_slot

            for nid, n in sorted(side["cluster"].get("nodes", {}).items(), key=lambda kv: first_slot(kv[1].get("slots"))):
                line(f"    {escape(n['address'])} {nid[:8]} slots {escape(n.get('slots') or '-')}: {n['keys']:,} keys, "
                     f"run_id {(n['run_id'] or '?')[:8]}, up {n['uptime_s']}s")
        elif side["reachable"]:
            line(f"  {role}: run_id {(side['run_id'] or '?')[:8]}, up {side['uptime_s']}s, {side['keys']:,} keys")
    if st["shims"]:
        table = Table("shim", "listen", "liveness", "applied", "current", "queued", "dirty", box=None, header_style="bold")
        for s in st["shims"]:
            table.add_row(escape(s["id"]), escape(s["listen"]), f"{s['liveness']} ({s['heartbeat_age_s']}s)",
                          f"{s['applied_phase']} (gen {s['applied_generation']})", "yes" if s["current"] else "[red]no[/]",
                          str(s["pending_shadow"]), str(s["dirty_keys"]))
        out.append(table)
    else:
        line("Shims: none running")
    m = st.get("mirror")
    if m:
        rate = "-" if m["divergence_rate"] is None else f"{m['divergence_rate']:.4%}"
        kinds = ", ".join(f"{k} {v}" for k, v in m["by_kind"].items())
        line(f"Mirror (generation {m['generation']}): {m['compared']:,} replies compared, "
             f"{'[red]' if m['divergent'] else ''}{m['divergent']:,} divergent{'[/]' if m['divergent'] else ''} "
             f"(rate {rate}){f' — {kinds}' if kinds else ''}")
        line(f"Dirty keys: {'[red]' if st['dirty_keys'] else ''}{st['dirty_keys']:,}{'[/]' if st['dirty_keys'] else ''}")
    r = st.get("replication")
    if r:
        line(f"Mirror strategy: [bold]{escape(r['strategy'])}[/] — {escape(r['why'])}")
        if r.get("evidence"):
            color = "green" if r.get("in_sync") else ("red" if r.get("problem") else "yellow")
            line(f"  replication: [{color}]{escape(r['evidence'])}[/] (link {r.get('link') or '-'}, source offset "
                 f"{r.get('source_offset', '-')}, target offset {r.get('target_offset', '-')})")
        if r.get("reverse"):
            line(f"  rollback window: {escape(r['reverse'])} — {escape(r.get('reverse_why') or '')}")
    for kind, job in (st.get("jobs") or {}).items():
        if job:
            line(f"{kind.capitalize()}: {_job_line(job)}")
            for sh in job.get("shards") or []:  # a cluster source: one line per source shard
                line(f"  shard {escape(sh['address'])} slots {sh['slots']}: {sh['slots_done']:,}/{sh['slots_total']:,} "
                     f"slots done, {sh['keys']:,} keys, read from {escape(sh['reader'] or '-')} ({escape(sh['state'])})")
    if nxt is not None:
        if nxt["step"] is None:
            line(f"Next: {escape(nxt.get('note') or 'no further step')}")
        else:
            verdict = "[green]advance is allowed now[/]" if nxt["allowed"] else "[red]advance would be refused[/]"
            line(f"Next advance: [bold]{nxt['from']} → {nxt['to']}[/] ({nxt['step']}): {verdict} "
                 f"(gates evaluated {nxt.get('age_s', 0):.0f}s ago in {nxt['took_s']:.2f}s)")
            out.append(_gates_table([GateResult(g["gate"], g["passed"], g["evidence"], g.get("data") or {},
                                                g.get("overridden", False), g.get("override_reason"))
                                     for g in nxt["gates"]]))
    if st["history"] and history:
        line("History:")
        for h in st["history"][-history:]:
            line(f"  {h['completed_at']}  {h['direction']:<8} {h['from']} → {h['to']}  by {h['operator']}")
    return out


def _job_line(job: dict) -> str:
    """One sync or check from its progress file (``migrator.data.progress``)."""
    done, total = job.get("done", 0), job.get("total", 0)
    count = f"{done:,}/{total:,} keys ({job['percent']:.1f}%)" if job.get("percent") is not None else f"{done:,} keys"
    head = f"{job['mode']} {job['state']}"
    if job["state"] == "running":
        eta = f"ETA {format_duration(job['eta_s'])}" if job.get("eta_s") is not None else "ETA unknown"
        return f"[bold]{head}[/], {count}, {job.get('rate', 0):,.0f} keys/s, {eta} (pid {job.get('pid')}, {job.get('elapsed_s', 0):.0f}s in)"
    color = {"complete": "green", "finished": "green"}.get(job["state"], "yellow")
    return f"[{color}]{head}[/] at {job.get('updated_at', '?')}, {count}"


# Gates are re-evaluated at most every GATES_COST_FACTOR times what their last evaluation took
# (and at least every --interval): slow gates (a side timing out) cannot load the servers.
GATES_COST_FACTOR = 10


def _watch(pb, output: str, interval: float) -> None:
    """Redraw ``status`` (or print one JSON line) every ``interval`` seconds; Ctrl-C ends it, exit 0."""
    last: dict | None = None
    due = 0.0

    def sample() -> dict:
        nonlocal last, due
        t0 = time.monotonic()
        fresh = t0 >= due
        st = command.status(pb, gates=fresh)
        if fresh:
            last = st["next"]
            # From this sample's start, so that cheap gates are fresh in every sample.
            due = t0 + max(interval, GATES_COST_FACTOR * last["took_s"]) - interval / 10
            last["_at"] = time.monotonic()
        st["next"] = {k: v for k, v in last.items() if k != "_at"}
        st["next"]["age_s"] = round(time.monotonic() - last["_at"], 1)
        return st

    def pause(t0: float) -> None:
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))

    try:
        if output == "json":
            while True:
                t0 = time.monotonic()
                click.echo(json.dumps(redact(sample()), default=str))
                sys.stdout.flush()
                pause(t0)
        con = console()
        if not con.is_terminal:  # piped: each redraw printed in turn
            while True:
                t0 = time.monotonic()
                for part in status_view(sample(), history=3):
                    con.print(part)
                con.print()
                sys.stdout.flush()
                pause(t0)
        with Live(Group(*status_view(sample(), history=3)), console=con, auto_refresh=False) as live:
            while True:
                t0 = time.monotonic()
                pause(t0)
                live.update(Group(*status_view(sample(), history=3)), refresh=True)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends: not an error


@cli.command()
@with_playbook
@output_option
@click.option("--limit", type=int, default=0, help="Show only the last N entries.")
@pass_ctx
def history(ctx: Ctx, output: str, limit: int) -> None:
    """Show the journal: every transition, refusal and override, with its evidence."""
    entries = command.history(ctx.load_playbook())
    if limit > 0:
        entries = entries[-limit:]
    if output == "json":
        emit_json(entries)
        return
    con = console()
    if not entries:
        con.print("The journal is empty: no step has been attempted yet.")
    for e in entries:
        move = f"{e.get('from', '')} → {e.get('to', '')}" if e.get("from") or e.get("to") else ""
        con.print(f"{e['time']}  [bold]{e['event']}[/] {e.get('direction', '')} {move}  {escape(e.get('operator', ''))}")
        for g in e.get("gates", []):
            flag = "overridden" if g.get("overridden") else ("pass" if g["passed"] else "FAIL")
            con.print(f"    {g['gate']}: {flag} — {escape(g['evidence'])}")
        for o in e.get("overrides", []):
            con.print(f"    override {o['gate']}: {escape(o['reason'])}")
        if e["event"] == "hook":
            con.print(f"    {e['hook']}: exit {e['exit_code']} in {e['seconds']}s — {escape(e['command'])}")
        for a in e.get("actions", []):
            con.print(f"    {a['action']}: {'ok' if a['ok'] else 'FAILED'} — {escape(a['evidence'])}")
        if e.get("reason"):
            con.print(f"    reason: {escape(e['reason'])}")
        if isinstance(e.get("evidence"), str):  # replica-attached, mirror-strategy
            con.print(f"    {escape(e['evidence'])}")
        for c in e.get("changes", []) if e["event"] == "topology-changed" else []:
            con.print(f"    {escape(c['text'])} (seen in {e.get('phase', '?')})")
