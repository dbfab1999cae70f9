"""Clients for the playbook's endpoints: TLS, credentials and timeouts applied in one place."""

from __future__ import annotations

import ssl
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from migrator.errors import UnreachableError
from migrator.playbook import Endpoint


def client_kwargs(ep: Endpoint, db: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``redis.Redis`` (and ``valkey.Valkey``) for this endpoint."""
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
        kw["ssl"] = True
        tls = ep.tls
        if tls is not None:
            kw["ssl_ca_certs"] = str(tls.ca_file) if tls.ca_file else None
            kw["ssl_certfile"] = str(tls.cert_file) if tls.cert_file else None
            kw["ssl_keyfile"] = str(tls.key_file) if tls.key_file else None
            kw["ssl_cert_reqs"] = ssl.CERT_REQUIRED if tls.verify else ssl.CERT_NONE
            kw["ssl_check_hostname"] = bool(tls.verify)
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


def connect(ep: Endpoint, role: str, db: int | None = None, **extra: Any) -> redis.Redis:
    """A connected client; raises UnreachableError naming the role and the (redacted) URL."""
    kw = client_kwargs(ep, db)
    kw.update(extra)
    c = redis.Redis(**kw)
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
