"""The error hierarchy. Every error the CLI can meet is a MigratorError with an exit code.

The CLI catches MigratorError, prints one line (``FAILED: ...``) and exits with ``exit_code``;
anything else is a bug and is shown with its traceback.
"""

from __future__ import annotations

# Exit codes, documented in the README. Keep this table and the README in step.
EXIT_OK = 0
EXIT_REFUSED = 1  # a gate or check failed; nothing changed
EXIT_USAGE = 2  # bad command line or playbook
EXIT_UNREACHABLE = 3  # a server could not be reached
EXIT_BUSY = 4  # another migrator run holds the lock, or the state needs an operator
EXIT_INTERNAL = 70  # a bug (uncaught exception)
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (SIGINT), as shells report it; resumable where it says so


class MigratorError(Exception):
    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(MigratorError):
    exit_code = EXIT_USAGE


class PlaybookError(MigratorError):
    """One or more problems in a playbook; each problem is a ``PATH:LINE:COL: loc: msg`` line."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RefusedError(MigratorError):
    """A step was refused: a gate failed, a check failed, or a precondition does not hold."""

    exit_code = EXIT_REFUSED


class UnreachableError(MigratorError):
    exit_code = EXIT_UNREACHABLE


class LockedError(MigratorError):
    exit_code = EXIT_BUSY


class StateError(MigratorError):
    """The persisted state cannot be used as it is (corrupt, or from another migration)."""

    exit_code = EXIT_BUSY


class Interrupted(MigratorError):
    """The user pressed Ctrl-C (SIGINT); the message says what was kept and how to go on."""

    exit_code = EXIT_INTERRUPTED
