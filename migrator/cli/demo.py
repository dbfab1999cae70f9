"""``migrator demo``: a whole migration on local servers with a live workload."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from migrator import demo
from migrator.cli.base import cli
from migrator.cli.phases import console
from migrator.errors import RefusedError


class _RichStatus:
    """rich's spinner line, with the text taken literally (evidence may contain brackets)."""

    def __init__(self, con, text: str) -> None:
        self._status = con.status(escape(text))

    def __enter__(self) -> "_RichStatus":
        self._status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._status.__exit__(*exc)

    def update(self, text: str) -> None:
        self._status.update(escape(text))


def _status(con) -> demo.Status:
    """A spinner on a terminal; otherwise a line when a wait starts and at most one a second after."""
    if con.is_terminal:
        return lambda text: _RichStatus(con, text)
    return demo.line_status(con.print)


@cli.command("demo")
@click.option("--keep", is_flag=True, help="Leave the servers, shim and state running for exploration.")
@click.option("--dir", "base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work in this folder (default: a new temporary one). Playbook, state and reports stay there.")
@click.option("--keys", "seed_keys", type=click.IntRange(0, 1_000_000), default=3000, show_default=True,
              help="Keys to seed the source with before the migration.")
def demo_cmd(keep: bool, base: Path | None, seed_keys: int) -> None:
    """Walk a whole Redis → Valkey migration on local servers, with a workload running, and audit it."""
    con = console()
    s = demo.run(con.print, keep=keep, base=base, seed_keys=seed_keys, status=_status(con))
    con.print("\n[bold]Summary[/]")
    con.print(f"  source {s.source} → target {s.target}")
    con.print(f"  steps: {' | '.join(s.steps)}")
    con.print(f"  keys copied by sync: {s.keys_copied}")
    for c in s.checks:
        con.print(f"  {escape(c)}")
    con.print(f"  divergences logged by the shim: {s.divergences} ({s.divergences_after_sync} after the sync finished"
              + (f", plus {s.divergences_awaiting_repair} on keys awaiting repair" if s.divergences_awaiting_repair else "")
              + "; earlier ones are writes to keys not yet copied)")
    con.print(f"  write pause at cutover: {f'{s.write_pause_ms:.1f} ms' if s.write_pause_ms is not None else 'n/a'}")
    if s.audit:
        con.print(f"  ledger: {escape(s.audit.summary())}")
    if s.final_report and s.kept_dir:
        con.print(f"  final migration report ({s.final_report_verdict}): {s.final_report}")
    else:
        con.print("  final migration report: written, then removed with the temporary folder "
                  "(run `migrator demo --dir DIR` to keep it and the playbook, state and other reports)")
    if not s.ok:
        raise RefusedError("the demo's audit or final check found a problem (see above)")
    con.print("[green]Demo complete: every acknowledged write is on the Valkey.[/]")
