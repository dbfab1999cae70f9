"""The mirroring shim: a RESP proxy that routes each command by the migration's phase.

Applications point at the shim instead of Redis. It follows ``state_dir/state.json`` without a
restart: passthrough to the source while ``planned``/``compatible``; the source answers and
Valkey is kept in step and compared while ``mirroring``; reads come from Valkey during
``reads-on-target``; Valkey is authoritative and Redis kept in step during ``writes-on-target``;
Valkey only once ``completed``. See docs/shim.md.

Modules, one idea each: ``resp`` (wire format), ``commands`` (classification from COMMAND),
``routing`` (phase × class → plan), ``effects`` (non-deterministic writes as effects),
``compare`` (reply comparison), ``divergence`` and ``dirty`` (what is recorded in state_dir),
``metrics`` and ``admin`` (observability), ``session`` (one connection, no sockets),
``host`` (what a session may call on its shim), ``io`` (all the sockets), ``server`` (the
controller: phase, registry, timers, counters), ``workers`` (N processes), ``gates`` (the gates
advance evaluates). See docs/shim.md, "Code layout".
"""

from __future__ import annotations

from migrator.playbook import Playbook
from migrator.shim.dirty import DirtyKey, clear_dirty, count_dirty, list_dirty
from migrator.shim.server import Shim, ShimThread
from migrator.shim.server import run as run_one


def run(playbook: Playbook, *, workers: int = 1, **kw) -> int:
    """Run a shim until SIGTERM/SIGINT (see ``server.run``); returns the exit code.

    With ``workers`` > 1, that many processes share the listen port (SO_REUSEPORT) and this
    process only supervises them and serves the admin endpoint with their numbers added up.
    """
    if workers > 1:
        from migrator.shim.workers import run_workers

        return run_workers(playbook, workers, **kw)
    return run_one(playbook, **kw)


__all__ = ["DirtyKey", "Shim", "ShimThread", "clear_dirty", "count_dirty", "list_dirty", "run"]
