"""Named crash points: the crash-safety tests kill -9 a command exactly where a crash hurts most."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "MIGRATOR_CRASH_AT"


def crashpoint(name: str) -> None:
    """Kill this process with SIGKILL at a named point when $MIGRATOR_CRASH_AT says so.

    The crash-safety tests use it to kill -9 ``advance``/``rollback`` exactly at the dangerous
    points of a transition (and of the role swap); it does nothing otherwise.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
