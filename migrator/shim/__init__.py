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
``server`` (all the sockets), ``gates`` (the gates advance evaluates).
"""

from __future__ import annotations

from migrator.shim.dirty import DirtyKey, clear_dirty, count_dirty, list_dirty
from migrator.shim.server import Shim, ShimThread, run

__all__ = ["DirtyKey", "Shim", "ShimThread", "clear_dirty", "count_dirty", "list_dirty", "run"]
