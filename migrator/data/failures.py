"""Server errors met in the middle of a sync or check, as one-line migrator errors.

A lost connection is ``UnreachableError`` (exit 3): the checkpoint is saved, so a sync run
again resumes. A command the server refuses (ACLs, a renamed command) is ``RefusedError``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import redis

from migrator.errors import RefusedError, UnreachableError


@contextlib.contextmanager
def server_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        raise UnreachableError(f"{what}: lost a server connection: {e}") from None
    except redis.exceptions.ResponseError as e:
        raise RefusedError(f"{what}: a server refused a command: {e}") from None
