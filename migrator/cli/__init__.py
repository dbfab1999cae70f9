"""The command line: parses options, calls plain functions, renders results. No work lives here.

Each area's commands live in a module of this package and are registered on ``main`` below.
"""

from __future__ import annotations

import sys
import traceback

import click

from migrator.cli.base import Ctx, cli, emit_json, output_option, pass_ctx, playbook_option, with_playbook
from migrator.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, Interrupted, MigratorError, PlaybookError
from migrator.redact import redact


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI, turning MigratorError into one line and its exit code."""
    try:
        rv = cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort as e:
        # click turns Ctrl-C (and end of input at a prompt) into Abort: an interrupt is not a refusal.
        if isinstance(e.__context__, KeyboardInterrupt):
            click.echo("interrupted (Ctrl-C)", err=True)
            sys.exit(EXIT_INTERRUPTED)
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except Interrupted as e:
        click.echo(redact(e.message), err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except PlaybookError as e:
        for line in e.problems:
            click.echo(redact(line), err=True)
        sys.exit(e.exit_code)
    except MigratorError as e:
        if "--traceback" in (argv or sys.argv):
            traceback.print_exc()
        click.echo(f"FAILED: {redact(e.message)}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted (Ctrl-C)", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception:  # noqa: BLE001 - a bug: show it
        click.echo(redact(traceback.format_exc()), err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(rv if isinstance(rv, int) else 0)


__all__ = ["Ctx", "cli", "emit_json", "main", "output_option", "pass_ctx", "playbook_option", "with_playbook"]


# Commands, one module per area. Each module defines click commands and registers them here.
from migrator.cli import phases as _phases  # noqa: E402,F401
from migrator.cli import data as _data  # noqa
from migrator.cli import compat as _compat  # noqa
from migrator.cli import shim as _shim  # noqa
from migrator.cli import demo as _demo  # noqa
