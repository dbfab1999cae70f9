"""The two servers as the checks see them: one connection each, with restricted commands told apart.

Managed services disable or rename commands (CONFIG, DEBUG, MODULE, ACL...): the server then
answers ``unknown command`` or ``NOPERM``. ``Side.call`` turns those answers into
``Unavailable`` so a check can say "could not check" instead of crashing; a lost connection
becomes ``UnreachableError`` (exit code 3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import redis

from migrator.connect import connect
from migrator.errors import UnreachableError
from migrator.playbook import Endpoint

# Lower-case fragments of the errors a server gives for a command it will not run for us.
_RESTRICTED = ("unknown command", "unknown subcommand", "not allowed", "noperm", "disabled", "no permissions")


class Unavailable(Exception):
    """A server refused a command as unknown, disabled or not permitted."""

    def __init__(self, role: str, command: str, reason: str) -> None:
        super().__init__(f"{command} is not available on the {role} ({reason})")
        self.role = role
        self.command = command
        self.reason = reason


def is_restricted(err: Exception) -> bool:
    if isinstance(err, redis.exceptions.NoPermissionError):
        return True
    return isinstance(err, redis.exceptions.ResponseError) and any(s in str(err).lower() for s in _RESTRICTED)


_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ", re.S)


def first_line(err: Exception) -> str:
    """The server's message, without redis-py's pipeline preamble (which quotes the command and its values)."""
    msg = _PIPELINE_PREFIX.sub("", str(err).strip())
    return msg.splitlines()[0] if msg else type(err).__name__


@dataclass
class Side:
    """One server (``source`` or ``target``) and the connections the checks use on it."""

    role: str
    endpoint: Endpoint
    client: redis.Redis
    _by_db: dict[int, redis.Redis] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, role: str, endpoint: Endpoint) -> "Side":
        return cls(role, endpoint, connect(endpoint, role))

    @property
    def db(self) -> int:
        return self.endpoint.db

    def call(self, *args: Any, raw: bool = False) -> Any:
        """Run one command. ``raw`` skips redis-py's reply parsing (COMMAND, COMMAND DOCS)."""
        return self._guard(args, lambda: _raw(self.client, args) if raw else self.client.execute_command(*args))

    def on_db(self, db: int) -> redis.Redis:
        """A client for another database of the same server (sampling walks every database)."""
        if db == self.db:
            return self.client
        if db not in self._by_db:
            self._by_db[db] = connect(self.endpoint, self.role, db=db)
        return self._by_db[db]

    def guard(self, what: str, fn):
        """Run ``fn()`` (a pipeline, a multi-step read) with the same error mapping as ``call``."""
        return self._guard((what,), fn)

    def _guard(self, args: tuple, fn):
        words = 2 if str(args[0]).upper() in _CONTAINERS else 1
        command = " ".join(str(a) for a in args[:words])
        try:
            return fn()
        except redis.exceptions.ReadOnlyError:
            raise Unavailable(self.role, command, "the server is a read-only replica") from None
        except redis.exceptions.ResponseError as e:
            if is_restricted(e):
                raise Unavailable(self.role, command, first_line(e)) from None
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
            where = f"{self.role} {self.endpoint.display}"
            raise UnreachableError(f"{where}: connection lost during {command} ({e})") from None

    def close(self) -> None:
        for c in self._by_db.values():
            c.close()
        self.client.close()


# Commands whose first argument is a subcommand: errors name both words.
_CONTAINERS = {"CONFIG", "ACL", "MODULE", "FUNCTION", "COMMAND", "CLIENT", "MEMORY", "OBJECT", "SCRIPT", "CLUSTER", "DEBUG"}


def _raw(client: redis.Redis, args: tuple) -> Any:
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_command(*args)
        reply = conn.read_response()
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    if isinstance(reply, redis.exceptions.ResponseError):
        raise reply
    return reply


def pairs(reply: Any) -> list[tuple[Any, Any]]:
    """A map reply as (key, value) pairs, whether it came as a flat RESP2 list or a parsed dict."""
    if isinstance(reply, dict):
        return list(reply.items())
    return list(zip(reply[::2], reply[1::2]))


def text(value: Any) -> str:
    """A reply element as str (replies are bytes unless redis-py parsed them)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
