"""``migrator shim``: run the mirroring shim in the foreground until SIGTERM."""

from __future__ import annotations

import click

from migrator.cli.base import Ctx, cli, pass_ctx, with_playbook
from migrator.errors import UsageError
from migrator.playbook import is_loopback, split_hostport


@cli.command()
@with_playbook
@click.option("--listen", default=None, metavar="HOST:PORT", help="Address clients connect to (overrides shim.listen).")
@click.option("--admin", default=None, metavar="HOST:PORT",
              help="Admin HTTP address for /metrics and /status (overrides shim.admin; '' disables it).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes sharing the listen port (SO_REUSEPORT); each registers as a shim.")
@click.option("--id", "shim_id", default=None, help="Shim id in the registry, unique per start (default host-port-pid-start time in ms).")
@pass_ctx
def shim(ctx: Ctx, listen: str | None, admin: str | None, workers: int, shim_id: str | None) -> int:
    """Run the mirroring shim: applications connect here; it routes each command by the phase."""
    # Imported here: the other commands do not need asyncio and uvloop.
    from migrator import shim as shim_mod

    pb = ctx.load_playbook()
    if listen is not None:
        try:
            host, _port = split_hostport(listen)
        except ValueError as e:
            raise UsageError(f"--listen: {e}") from None
        if not is_loopback(host) and pb.shim.auth_mode == "none":
            raise UsageError("--listen on a non-loopback address needs shim.password (or shim.password_env, "
                             "or shim.auth: passthrough) in the playbook")
    if admin:
        try:
            split_hostport(admin)
        except ValueError as e:
            raise UsageError(f"--admin: {e}") from None

    def ready(bound: str, admin_bound: str | None) -> None:
        admin_text = f"admin {admin_bound}" if admin_bound else "no admin endpoint"
        click.echo(f"shim listening on {bound} ({admin_text}); SIGTERM or Ctrl-C drains and stops it")

    return shim_mod.run(pb, listen=listen, admin=admin, shim_id=shim_id, workers=workers, ready=ready)
