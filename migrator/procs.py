"""Whether a process on this host still runs: how a dead lock holder or shim is told on its own host."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True unless ``pid`` is certainly gone (a pid we may not signal belongs to someone: alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
