"""Commands for the data: sync (copy the keyspace), check (compare it), report (read reports)."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import click

from migrator import logs, reports
from migrator.cli.base import Ctx, cli, emit_json, output_option, pass_ctx, with_playbook
from migrator.data import check as check_mod
from migrator.data import render
from migrator.data import sync as sync_mod
from migrator.errors import Interrupted, UsageError
from migrator.logs import get_logger
from migrator.redact import redact


class _Progress:
    """A rich progress bar on a terminal; a structlog line every few seconds otherwise."""

    def __init__(self, interval: float = 5.0) -> None:
        self.tty = sys.stderr.isatty()
        self.interval = interval
        self.last = 0.0
        self.bar = None
        self.task = None
        self.log = get_logger("migrator.sync")

    def __enter__(self) -> _Progress:
        if self.tty:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            # The total is None until the keyspace size is known: MofNCompleteColumn shows "?" then
            # (a format spec on it raised TypeError, so a sync on a terminal exited 70).
            self.bar = Progress(TextColumn("db{task.fields[db]}"), BarColumn(), MofNCompleteColumn(), TextColumn("keys"),
                                TextColumn("{task.fields[bytes]}"), TextColumn("{task.fields[rate]} keys/s"),
                                TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("sync", total=None, db=0, bytes="0 B", rate="0")
        return self

    def __call__(self, p: sync_mod.SyncProgress) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=p.keys, total=max(p.total_keys, p.keys) or None, db=p.db,
                            bytes=render.human_bytes(p.bytes), rate=f"{p.keys_per_s:,.0f}")
            return
        t = time.monotonic()
        if t - self.last >= self.interval:
            self.last = t
            self.log.info("sync progress", db=p.db, keys=p.keys, total_keys=p.total_keys, bytes=p.bytes,
                          keys_per_s=round(p.keys_per_s), eta_s=round(p.eta_s) if p.eta_s is not None else None)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fewer_collections() -> None:
    """For a long copy or check: the cyclic collector ran about every 700 allocations and took a
    fifth of a check's CPU time walking long-lived objects; what start-up built is frozen and
    young objects are collected less often (nearly all are freed by reference counting anyway)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _progress_logs_visible(cctx: click.Context) -> None:
    """Progress lines are info events: show them unless the user chose a log level."""
    root = cctx.find_root()
    if root.get_parameter_source("log_level") == click.core.ParameterSource.DEFAULT:
        logs.configure(root.params.get("log_format", "auto"), "info")


@cli.command()
@with_playbook
@click.option("--restart", is_flag=True, help="Start over instead of resuming from the checkpoint.")
@click.option("--dirty", is_flag=True, help="Re-copy only the keys the shim recorded as dirty.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None, help="At most this many keys/s (default sync.rate).")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Keys per pipelined batch (default sync.batch).")
@click.option("--chunk", type=click.IntRange(min=1), default=sync_mod.DEFAULT_CHUNK, show_default=True,
              help="Elements per read of a big key; keys with more elements are copied in chunks.")
@click.option("--no-keyspace-events", "no_events", is_flag=True,
              help="Do not turn on the source's keyspace events; verify every key by re-reading both sides instead.")
@click.option("--wait", is_flag=True,
              help="Replication strategy: wait until the target's own full sync is done and its lag is nil.")
@output_option
@pass_ctx
@click.pass_context
def sync(cctx: click.Context, ctx: Ctx, restart: bool, dirty: bool, rate, batch, chunk, no_events: bool, wait: bool,
         output: str) -> None:
    """Copy every key from source to target (resumable; verified against live mirrored writes).

    In the replication strategy it copies nothing: it reports (with --wait, follows) the target's
    own full sync and lag, and exits 0 once the target is in sync."""
    if restart and dirty:
        raise UsageError("--restart and --dirty cannot be combined")
    pb = ctx.load_playbook()
    if sync_mod.replicated(pb):
        _replica_sync(cctx, pb, wait, output)
        return
    _progress_logs_visible(cctx)
    _fewer_collections()
    try:
        with _Progress() as progress:
            res = sync_mod.run(pb, restart=restart, dirty=dirty, rate=rate, batch=batch, progress=progress, chunk=chunk,
                               keyspace_events=not no_events)
    except KeyboardInterrupt:
        again = f"migrator sync{' --dirty' if dirty else ''} -p {pb.path}"
        kept = ("the dirty keys not yet repaired stay marked" if dirty else
                "the checkpoint (saved about once a second) is kept, so it resumes where it stopped")
        raise Interrupted(f"sync interrupted (Ctrl-C): {kept}; resume with `{again}`") from None
    report = reports.load(pb.state_path, res.report_id)
    if output == "json":
        emit_json(report)
    else:
        click.echo(f"{report['verdict'].upper()}: {redact(report['summary'])}")
        for sh in report.get("shards") or []:  # a cluster source: one line per source shard
            click.echo(f"  shard {sh['address']} slots {sh['slots']}: {sh['slots_done']:,}/{sh['slots_total']:,} slots, "
                       f"{sh['keys']:,} keys ({sh['run_keys']:,} this run), read from {sh['reader'] or '-'}")
        for e in report.get("errors", [])[:SHOWN_ERRORS]:
            click.echo(f"error: db {e['db']} key {e['key']}: {redact(e['error'])}")
        if len(res.errors) > SHOWN_ERRORS:
            click.echo(f"... {len(res.errors) - SHOWN_ERRORS} more errors in the report")
        click.echo(f"report: {res.report_id} ({reports.reports_dir(pb.state_path)})")
    if not res.complete:
        cctx.exit(1)


SHOWN_ERRORS = 5  # copy errors printed under a sync's summary line; the report lists more


def _replica_sync(cctx: click.Context, pb, wait: bool, output: str) -> None:
    """``sync`` in the replication strategy: the server's own full sync, reported (and watched)."""
    from migrator.data import replica
    from migrator.state import StateStore

    store = StateStore(pb.state_path, pb.name)
    seen: list[str] = []

    def show(st) -> None:
        if output != "json" and st.evidence not in seen[-1:]:
            seen.append(st.evidence)
            if not st.in_sync and not st.problem and wait:
                click.echo(f"waiting: {st.evidence}")

    st = replica.watch(pb, store, wait=wait, on_update=show)
    if output == "json":
        emit_json({"strategy": "replication", "copied": 0, "in_sync": st.in_sync, "problem": st.problem,
                   "evidence": st.evidence, **st.data})
    else:
        head = "IN SYNC" if st.in_sync else (st.problem or "not in sync").upper()
        click.echo(f"{head}: {st.evidence}")
        click.echo("nothing copied: the target replicates the source (mirror strategy replication)")
    if not st.in_sync:
        cctx.exit(1)


@cli.command()
@with_playbook
@click.option("--sample", type=click.IntRange(min=1), default=None, help="Keys to draw (default check.sample).")
@click.option("--full", is_flag=True, help="Compare every key instead of a sample.")
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="Comparisons of a differing key (default check.rounds).")
@click.option("--repair", is_flag=True, help="Re-copy persistent mismatches from the authoritative side, then recheck.")
@click.option("--show-values", is_flag=True, help="Put (truncated) values of mismatched keys in the report.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None, help="At most this many keys/s.")
@output_option
@pass_ctx
@click.pass_context
def check(cctx: click.Context, ctx: Ctx, sample, full: bool, rounds, repair: bool, show_values: bool, rate, output: str) -> None:
    """Compare source and target: a sample (default) or every key; exit 1 on a persistent mismatch."""
    if sample and full:
        raise UsageError("--sample and --full cannot be combined")
    pb = ctx.load_playbook()
    _fewer_collections()
    res = check_mod.run(pb, sample=sample, full=full, rounds=rounds, repair=repair, show_values=show_values, rate=rate)
    report = reports.load(pb.state_path, res.report_id)
    if output == "json":
        emit_json(report)
    else:
        click.echo(f"{report['verdict'].upper()}: {redact(report['summary'])}")
        for kind, n in report["by_kind"].items():
            if n:
                click.echo(f"  {kind}: {n}")
        click.echo(f"report: {res.report_id} ({reports.reports_dir(pb.state_path)})")
    if not res.clean:
        cctx.exit(1)


@cli.command()
@with_playbook
@click.argument("report_id", required=False)
@click.option("--format", "fmt", type=click.Choice(["md", "html", "json"]), default="md", show_default=True)
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to FILE instead of printing.")
@click.option("--compare", "compare", nargs=2, metavar="ID1 ID2", default=None, help="What changed between two checks.")
@click.option("--kind", default=None, help="List only reports of this kind (sync, check, compat...).")
@output_option
@pass_ctx
def report(ctx: Ctx, report_id, fmt: str, out: Path | None, compare, kind, output: str) -> None:
    """List this migration's reports, print or write one, or compare two checks."""
    pb = ctx.load_playbook()
    if compare:
        a, b = (reports.load(pb.state_path, x) for x in compare)
        try:
            diff = render.compare_checks(a, b)
        except ValueError as e:
            raise UsageError(str(e)) from None
        _emit(diff if fmt == "json" else render.compare_markdown(diff), out)
        return
    if report_id is None:
        rows = reports.list_reports(pb.state_path, kind)
        if output == "json":
            emit_json([{k: r.get(k) for k in ("id", "kind", "created_at", "verdict", "summary")} for r in rows])
            return
        if not rows:
            click.echo(f"no reports yet in {reports.reports_dir(pb.state_path)}")
        for r in rows:
            click.echo(f"{r['id']:<36} {r.get('kind', ''):<8} {r.get('verdict', ''):<5} {redact(r.get('summary', ''))}")
        return
    path = reports.path_of(pb.state_path, report_id, fmt)
    _emit(path.read_text(encoding="utf-8"), out)


def _emit(content, out: Path | None) -> None:
    if not isinstance(content, str):
        import json

        content = json.dumps(redact(content), indent=2, default=str) + "\n"
    if out is None:
        click.echo(content, nl=False)
    else:
        out.write_text(content, encoding="utf-8")
        click.echo(f"wrote {out}")
