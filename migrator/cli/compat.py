"""``migrator compat``: run the compatibility pre-flight and show its checks.

Exit codes: 0 when nothing failed (pass or warn), 1 when a check failed, 2 for a bad
playbook, 3 when a server cannot be reached.
"""

from __future__ import annotations

import sys

import click

from migrator import compat as compat_api
from migrator.cli.base import cli, emit_json, output_option, pass_ctx, with_playbook
from migrator.compat.model import FAIL, PASS, UNKNOWN, WARN, ordered
from migrator.errors import EXIT_OK, EXIT_REFUSED
from migrator.redact import redact

_STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red", UNKNOWN: "magenta"}


@cli.command()
@with_playbook
@output_option
@click.option("--no-report", is_flag=True, help="Do not write a report to state_dir/reports.")
@pass_ctx
def compat(ctx, output: str, no_report: bool) -> int:
    """Check that the source can move to the target: versions, data format, commands, config, ACLs, tests.

    Read-only towards your data: the only writes are canary keys under __migrator:canary:
    (deleted afterwards) and the scratch server the tests run on.
    """
    pb = ctx.load_playbook()
    result = compat_api.run(pb, write_report=not no_report)
    if output == "json":
        emit_json(result.to_json())
    elif sys.stdout.isatty():
        _rich(result, pb)
    else:
        _plain(result, pb)
    return EXIT_REFUSED if result.verdict == "fail" else EXIT_OK


def _footer(result, pb) -> str:
    where = f"report {result.report_id} in {pb.state_path / 'reports'}" if result.report_id else "no report written"
    return f"{result.verdict.upper()}: {result.summary} ({where})"


def _plain(result, pb) -> None:
    for c in ordered(result.checks):
        click.echo(redact(f"{c.status.upper():16} {c.title}: {c.evidence}"))
        if c.remediation:
            click.echo(redact(f"{'':16} do: {c.remediation}"))
    click.echo(redact(_footer(result, pb)))


def _rich(result, pb) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Compatibility: {pb.source.display} → {pb.target.display}", show_lines=True)
    for col in ("status", "check", "evidence", "do"):
        table.add_column(col, overflow="fold")
    for c in ordered(result.checks):
        # Text, not markup: evidence may hold brackets (key names, patterns) rich would parse.
        table.add_row(Text(c.status, style=_STYLE[c.status]), Text(c.title), Text(redact(c.evidence)),
                      Text(redact(c.remediation)))
    console = Console()
    console.print(table)
    console.print(Text(redact(_footer(result, pb)), style=_STYLE.get(result.verdict, "bold")))
