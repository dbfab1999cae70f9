"""Sentinel-managed endpoints: where the primary is now, and clients that follow a failover.

A playbook endpoint with ``sentinel: {addresses, master_name, ...}`` names no server: the
sentinels say which one is the primary. ``resolve(ep)`` asks them, one after the other (the
last one that answered well first), and trusts no single answer blindly:

- a sentinel that cannot be reached, refuses its credentials or does not know the master name
  is skipped;
- a sentinel that reports the primary subjectively or objectively down (``is_sdown``/``is_odown``)
  is skipped;
- the address a sentinel names is asked ``ROLE`` with the data nodes' credentials and TLS: a
  server that is not ``master`` (a primary demoted by a failover the sentinel has not seen yet)
  is never used.

The answer is recorded with ``ep.set_resolved(host, port)`` (so ``ep.host``/``ep.port`` and
logs name the current primary). No usable answer raises ``UnreachableError`` naming the master
name and what each sentinel said.

``follow_client(ep)`` is a ``redis.Redis`` on redis-py's ``SentinelConnectionPool`` whose
master discovery is ``resolve``: every new connection goes to the primary of the moment, a
connection to a primary demoted meanwhile fails with READONLY (redis-py then reconnects to the
new primary), and idle connections to an old primary are closed when the answer changes. So a
client made before a failover reaches the new primary after it, without a restart.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

from migrator.errors import UnreachableError

# The sentinels answer from memory: a sentinel slower than this is treated as down for this
# resolution (the next one is asked), however long the data nodes' timeouts are.
SENTINEL_TIMEOUT = 2.0
# A client that follows a primary asks the sentinels again at most this often (seconds), when it
# takes a connection from its pool.
RECHECK = 1.0


def address_text(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def sentinel_kwargs(ep) -> dict[str, Any]:
    """Keyword arguments for a client of one of ``ep``'s sentinels (their own user/password/TLS)."""
    sen = ep.sentinel
    t = min(ep.connect_timeout.total_seconds(), SENTINEL_TIMEOUT)
    kw: dict[str, Any] = {"socket_connect_timeout": t, "socket_timeout": max(t, SENTINEL_TIMEOUT),
                          "username": sen.sentinel_username, "password": sen.sentinel_password,
                          "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
    if sen.sentinel_tls:
        kw.update(ep.tls_kwargs())
    return kw


def node_kwargs(ep, host: str, port: int) -> dict[str, Any]:
    """A short-lived client of one data node of ``ep``'s group (its credentials and TLS)."""
    t = ep.connect_timeout.total_seconds()
    kw: dict[str, Any] = {"host": host, "port": port, "username": ep.user, "password": ep.password,
                          "socket_connect_timeout": t, "socket_timeout": max(t, SENTINEL_TIMEOUT),
                          "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
    if ep.use_tls:
        kw.update(ep.tls_kwargs())
    return kw


def role_of(ep, addr: tuple[str, int]) -> str:
    """What the server at ``addr`` says it is (``ROLE``'s first element: master, slave, ...)."""
    with contextlib.closing(redis.Redis(**node_kwargs(ep, *addr))) as c:
        reply = c.execute_command("ROLE")
    role = reply[0]
    return role.decode() if isinstance(role, bytes) else str(role)


class CheckedSentinel(Sentinel):
    """redis-py's Sentinel manager whose master discovery checks the answer (see the module doc)."""

    def __init__(self, ep) -> None:
        sen = ep.sentinel
        super().__init__([_split(a) for a in sen.addresses], min_other_sentinels=0,
                         sentinel_kwargs=sentinel_kwargs(ep))
        self.ep = ep
        self.addresses = list(sen.addresses)
        self._order_lock = threading.Lock()

    def discover_master(self, service_name: str):
        said: list[str] = []
        for sentinel in list(self.sentinels):
            kw = sentinel.connection_pool.connection_kwargs
            where = address_text((kw["host"], kw["port"]))
            try:
                masters = sentinel.sentinel_masters()
            except redis.exceptions.AuthenticationError as e:
                said.append(f"{where}: authentication failed ({e})")
                continue
            except (redis.exceptions.RedisError, OSError) as e:
                said.append(f"{where}: {e or type(e).__name__}")
                continue
            state = masters.get(service_name)
            if not state:
                said.append(f"{where}: does not monitor {service_name!r}")
                continue
            addr = (state["ip"], int(state["port"]))
            if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                said.append(f"{where}: names {address_text(addr)}, down in its view")
                continue
            try:
                role = role_of(self.ep, addr)
            except redis.exceptions.AuthenticationError as e:
                said.append(f"{where}: names {address_text(addr)}, which refused the data nodes' credentials ({e})")
                continue
            except (redis.exceptions.RedisError, OSError) as e:
                said.append(f"{where}: names {address_text(addr)}, unreachable ({e or type(e).__name__})")
                continue
            if role != "master":
                said.append(f"{where}: names {address_text(addr)}, whose ROLE is {role}")
                continue
            with self._order_lock:  # the sentinel that answered well is asked first next time
                if sentinel in self.sentinels:
                    self.sentinels.remove(sentinel)
                    self.sentinels.insert(0, sentinel)
            self.ep.set_resolved(*addr)
            return addr
        raise MasterNotFoundError(f"no primary for master name {service_name!r} from the sentinels "
                                  f"{', '.join(self.addresses)} ({'; '.join(said)})")

    def close(self) -> None:
        for s in self.sentinels:
            with contextlib.suppress(Exception):
                s.close()


_managers: dict[int, CheckedSentinel] = {}
_managers_lock = threading.Lock()


def manager(ep) -> CheckedSentinel:
    """The (cached) sentinel manager of endpoint ``ep``."""
    with _managers_lock:
        m = _managers.get(id(ep))
        if m is None or m.ep is not ep:
            m = _managers[id(ep)] = CheckedSentinel(ep)
        return m


def resolve(ep, role: str = "") -> tuple[str, int]:
    """Ask ``ep``'s sentinels where its primary is now; record and return ``(host, port)``.

    Raises UnreachableError (exit code 3) naming the master name and what every sentinel said.
    """
    try:
        return manager(ep).discover_master(ep.sentinel.master_name)
    except MasterNotFoundError as e:
        raise UnreachableError(f"{role + ' ' if role else ''}{ep.display}: {e}") from None


class FollowingPool(SentinelConnectionPool):
    """redis-py's SentinelConnectionPool, re-asking the sentinels at most every RECHECK seconds
    when a connection is taken: a switch of primary then closes the idle connections to the old
    one (redis-py's own behaviour when the master address changes), so a busy client does not
    keep writing to a demoted primary that still accepts writes (until the sentinels reconfigure
    it as a replica) for longer than that."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._checked = 0.0
        self._check_lock = threading.Lock()

    def get_connection(self, *args: Any, **kw: Any):
        now = time.monotonic()
        if now - self._checked >= RECHECK and self._check_lock.acquire(blocking=False):
            try:
                self._checked = now
                with contextlib.suppress(MasterNotFoundError):
                    self.get_master_address()
            finally:
                self._check_lock.release()
        conn = super().get_connection(*args, **kw)
        addr = self.master_address
        if addr is not None and conn.host is not None and (conn.host, conn.port) != addr and conn._sock is not None:
            conn.disconnect()  # in use when the switch was seen: reconnect now, to the new primary
            conn.connect()
        return conn


def follow_pool(ep, db: int | None = None, **kw: Any) -> SentinelConnectionPool:
    """A connection pool whose every new connection goes to the primary of the moment."""
    kw = dict(kw)
    kw.pop("host", None)
    kw.pop("port", None)
    kw["db"] = ep.db if db is None else db
    return FollowingPool(ep.sentinel.master_name, manager(ep), **kw)


def follow_client(ep, db: int | None = None, **kw: Any) -> redis.Redis:
    """A ``redis.Redis`` that follows ``ep``'s primary through failovers (``kw``: client_kwargs)."""
    client = redis.Redis(connection_pool=follow_pool(ep, db, **kw))
    client.auto_close_connection_pool = True  # the pool is this client's own: close() closes its sockets
    return client
