"""What every area's commands share: the click group ``cli``, the context, the common options.

Apart from ``migrator.cli`` (which registers the areas' modules on ``cli``) so that an area's
module imports this one, not the package that imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import click

from migrator import __version__, logs, playbook
from migrator.redact import redact


@dataclass
class Ctx:
    playbook_path: str | None
    traceback: bool

    def load_playbook(self) -> playbook.Playbook:
        return playbook.load(self.playbook_path)


pass_ctx = click.make_pass_decorator(Ctx)

# -p/--playbook is accepted on the group and on each subcommand alike.
_PLAYBOOK_FLAGS = ("-p", "--playbook")
_PLAYBOOK_KW: dict[str, Any] = {
    "envvar": playbook.PLAYBOOK_ENV,
    "type": click.Path(dir_okay=False, path_type=str),
    "default": None,
    "help": f"Playbook file (default ./{playbook.DEFAULT_PLAYBOOK}, or ${playbook.PLAYBOOK_ENV}).",
}
playbook_option = click.option(*_PLAYBOOK_FLAGS, "playbook_path", **_PLAYBOOK_KW)

output_option = click.option(
    "--output", "output", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Output format."
)


def with_playbook(f):
    """Accept -p/--playbook on the subcommand as well as on the group."""

    def callback(ctx: click.Context, _param, value):
        if value is not None:
            ctx.ensure_object(Ctx).playbook_path = value
        return value

    # Without the envvar: the group reads $MIGRATOR_PLAYBOOK, which must not override an explicit
    # `migrator -p PATH <command>`.
    kw = {k: v for k, v in _PLAYBOOK_KW.items() if k != "envvar"}
    return click.option(*_PLAYBOOK_FLAGS, "_playbook", expose_value=False, is_eager=True, callback=callback, **kw)(f)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(redact(data), indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@playbook_option
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto", show_default=True)
@click.option("--log-level", type=click.Choice(list(logs.LEVELS)), default="warning", show_default=True)
@click.option("--traceback", "show_traceback", is_flag=True, help="Show the traceback of an error.")
@click.version_option(version=__version__, prog_name="migrator")  # from the package: works from a checkout too
@click.pass_context
def cli(ctx: click.Context, playbook_path, log_format, log_level, show_traceback) -> None:
    """Move a live Redis deployment to Valkey without losing a write, with a way back at every step."""
    logs.configure(log_format, log_level)
    ctx.obj = Ctx(playbook_path=playbook_path, traceback=show_traceback)
