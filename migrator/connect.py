"""Clients for the playbook's endpoints: TLS, credentials and timeouts applied in one place."""

from __future__ import annotations

import ssl
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from migrator.errors import UnreachableError
from migrator.playbook import Endpoint

# How many times a Sentinel endpoint's client reconnects (backoff up to 1 s) while a failover
# is under way: about 30 seconds in all.
FAILOVER_RETRIES = 35


def client_kwargs(ep: Endpoint, db: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis`` (and ``valkey.Valkey``) for this endpoint.

    For a Sentinel endpoint, ``host``/``port`` are its primary as resolved now (a client built
    from them does not follow a later failover: use ``make_client``, which does).
    """
    if ep.sentinel is not None:
        from migrator import sentinel

        sentinel.resolve(ep)
    return _kwargs(ep, db)


def _kwargs(ep: Endpoint, db: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "host": ep.host,
        "port": ep.port,
        "db": ep.db if db is None else db,
        "username": ep.user,
        "password": ep.password,
        "socket_connect_timeout": ep.connect_timeout.total_seconds(),
        "socket_timeout": ep.socket_timeout.total_seconds(),
        "health_check_interval": 0,
        # The client library retries ten times by default, timeouts included: against a stopped
        # server (SIGSTOP) one call then hangs for eleven socket timeouts. A timeout has already
        # waited long enough; a dropped connection is retried twice, quickly.
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2, supported_errors=(redis.exceptions.ConnectionError,)),
    }
    if ep.use_tls:
        kw.update(ep.tls_kwargs())
    return kw


def ssl_context(ep: Endpoint) -> ssl.SSLContext | None:
    """An SSLContext for raw sockets (the shim's upstream connections); None without TLS."""
    if not ep.use_tls:
        return None
    tls = ep.tls
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls and tls.ca_file else None)
    if tls and tls.cert_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    if tls and not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def make_client(ep: Endpoint, db: int | None = None, **extra: Any) -> redis.Redis:
    """A client of ``ep`` (not connected yet); ``extra`` overrides ``client_kwargs``.

    For a Sentinel endpoint it follows the primary (``migrator.sentinel.follow_client``): every
    new connection asks the sentinels, so a client made before a failover reaches the new
    primary after it. Resolution failures surface as ``redis.exceptions.ConnectionError``
    (``MasterNotFoundError``) on first use, as an unreachable server does.
    """
    if ep.sentinel is not None:
        from migrator import sentinel

        kw = _kwargs(ep, db)
        # A failover (a few seconds, more with a long down-after-milliseconds) is waited for:
        # reconnect with backoff until a primary is named again (READONLY from a demoted
        # primary, a refused connection, no primary yet), for about FAILOVER_WAIT seconds.
        kw["retry"] = Retry(ExponentialBackoff(cap=1.0, base=0.05), FAILOVER_RETRIES,
                            supported_errors=(redis.exceptions.ConnectionError,))
        kw.update(extra)
        return sentinel.follow_client(ep, **kw)
    kw = client_kwargs(ep, db)
    kw.update(extra)
    return redis.Redis(**kw)


def connect(ep: Endpoint, role: str, db: int | None = None, **extra: Any) -> redis.Redis:
    """A connected client; raises UnreachableError naming the role and the (redacted) URL.

    A Sentinel endpoint's client follows its primary through failovers (``make_client``).
    """
    if ep.sentinel is not None:
        from migrator import sentinel

        sentinel.resolve(ep, role)  # the sentinels' own answer, when none names a primary
    c = make_client(ep, db, **extra)
    try:
        c.ping()
    except redis.exceptions.AuthenticationError as e:
        c.close()
        raise UnreachableError(f"{role} {ep.display}: authentication failed ({e})") from None
    except redis.exceptions.ResponseError as e:
        c.close()
        raise UnreachableError(f"{role} {ep.display}: {e}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
        c.close()
        raise UnreachableError(f"{role} {ep.display}: cannot connect ({e})") from None
    return c
