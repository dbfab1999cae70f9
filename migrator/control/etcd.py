"""The etcd backend of the control plane (docs/control.md).

The client is etcd3gw: etcd's v3 API as JSON over HTTP through the gateway every etcd ≥ 3.3
serves on its client port. It needs no gRPC or protobuf (the old ``etcd3`` package breaks on
current protobuf), is maintained by OpenStack, and is synchronous, like the commands and the
shim's blocking helpers. What it lacks is added here: several endpoints with fail-over,
user/password authentication (etcd's token, re-taken when it expires) and a watch that notices
its stream ending.

Keys, under ``prefix`` (default ``/migrator/<migration>/``):

- ``state``: the state as JSON (``State.to_json``); saved with compare-and-swap on its
  ``mod_revision``, so two runs on two hosts cannot both advance;
- ``journal/<time>-<id>``: one entry per key, in etcd's revision order (append-only);
- ``lock``: who runs ``advance``/``rollback`` now, on a lease kept alive while it runs;
- ``intent``: the step a run means to take (``command.INTENT_FILE`` on the folder backend);
- ``shims/<id>``: each shim's record (``registry.ShimRecord``), kept after it stops or dies;
- ``alive/<id>``: on the shim's lease: gone ``lease_ttl`` after the shim last renewed it;
- ``files/<path>``: the shims' dirty-key marks and divergence counters, as on the folder
  backend but shared (``migrator.shim.dirty``, ``migrator.shim.divergence``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import (
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
    InternalServerError,
)

from migrator.errors import LockedError, StateError, UnreachableError
from migrator.logs import get_logger
from migrator.procs import pid_alive
from migrator.redact import redact

T = TypeVar("T")
_RETRYABLE_TEXT = ("leader", "timed out", "timeout", "unavailable", "too many requests", "not capable",
                   "stopped", "connection", "EOF")
_AUTH_EXPIRED_TEXT = ("invalid auth token", "auth token is invalid", "invalid token", "unauthenticated")


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def _range_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return _b64(bytes(b))


def _detail(e: Exception) -> str:
    text = getattr(e, "detail_text", None) or str(e) or type(e).__name__
    low = text.lower()
    if "refused" in low or "newconnectionerror" in low or "failed to establish" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return "timed out"
    if "remotedisconnected" in low or "connection aborted" in low or "reset by peer" in low:
        return "connection lost"
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        d = json.loads(text)
        text = d.get("error") or d.get("message") or text
    return " ".join(str(text).split())[:200]


class EtcdControl:
    """One migration's keys in one etcd cluster: requests with fail-over between the endpoints."""

    def __init__(self, cfg: Any, migration: str) -> None:
        self.cfg = cfg
        self.migration = migration
        self.prefix = cfg.prefix or f"/migrator/{migration}/"
        self.endpoints = [e if "://" in e else f"http://{e}" for e in cfg.endpoints]
        self.timeout = cfg.request_timeout.total_seconds()
        self.lease_ttl = max(1, round(cfg.lease_ttl.total_seconds()))
        self._clients: list[Etcd3Client | None] = [None] * len(self.endpoints)
        self._current = 0
        self._mutex = threading.Lock()
        self._shim_leases: dict[str, int] = {}
        self.last_error: str | None = None
        self.down = False  # no member answered the last request: the next one tries each member once
        self.log = get_logger("migrator.control")

    def same_config(self, pb: Any) -> bool:
        other = pb.control.etcd
        return (other is not None and pb.name == self.migration and other.model_dump() == self.cfg.model_dump()
                and other.password == self.cfg.password)

    def forget_connections(self) -> None:
        """Drop connections and leases without closing them (they belong to the parent of a fork)."""
        self._clients = [None] * len(self.endpoints)
        self._shim_leases = {}
        self._mutex = threading.Lock()

    def close(self) -> None:
        for c in self._clients:
            if c is not None:
                with contextlib.suppress(Exception):
                    c.session.close()

    def key(self, name: str) -> str:
        return self.prefix + name

    # --- requests, with fail-over --------------------------------------------------------
    def _client(self, i: int) -> Etcd3Client:
        c = self._clients[i]
        if c is None:
            parts = urlsplit(self.endpoints[i])
            tls = self.cfg.tls
            c = Etcd3Client(host=parts.hostname or "127.0.0.1", port=parts.port or 2379, protocol=parts.scheme,
                            ca_cert=str(tls.ca_file) if tls and tls.ca_file else None,
                            cert_key=str(tls.key_file) if tls and tls.key_file else None,
                            cert_cert=str(tls.cert_file) if tls and tls.cert_file else None,
                            timeout=self.timeout, api_path="/v3/")
            if self.cfg.username:
                self._authenticate(c, i)
            self._clients[i] = c
        return c

    def _authenticate(self, c: Etcd3Client, i: int) -> None:
        """Take a token for the playbook's user (the password is sent to etcd only, never stored)."""
        try:
            reply = c.post(c.get_url("/auth/authenticate"), json={"name": self.cfg.username, "password": self.cfg.password or ""})
        except (ConnectionFailedError, ConnectionTimeoutError, InternalServerError):
            raise
        except Etcd3Exception as e:
            raise UnreachableError(f"etcd {self.endpoints[i]} refused user {self.cfg.username!r} ({_detail(e)}): "
                                   "check control.etcd.username and password_env") from None
        c.session.headers["Authorization"] = reply["token"]

    def call(self, what: str, fn: Callable[[Etcd3Client], T]) -> T:
        """Run ``fn`` on a member that answers; raise UnreachableError when none does.

        A member that is down, has no leader or times out is skipped for the next one, round
        after round until ``2 × request_timeout`` has passed (long enough for a leader election).
        While no member answers (``down``), one round only: a shim's writers must not stall on
        an outage (a write switch's hold ends on time).
        """
        n = len(self.endpoints)
        deadline = time.monotonic() + (0 if self.down else max(2 * self.timeout, 1.0))
        errors: dict[str, str] = {}
        while True:
            for step in range(n):
                i = (self._current + step) % n
                for _auth_retry in range(2):
                    try:
                        result = fn(self._client(i))
                    except (ConnectionFailedError, ConnectionTimeoutError, InternalServerError, requests.RequestException) as e:
                        errors[self.endpoints[i]] = _detail(e)
                        self._clients[i] = None  # a fresh connection (and token) next time
                        break
                    except Etcd3Exception as e:
                        text = _detail(e)
                        low = text.lower()
                        if self.cfg.username and any(t in low for t in _AUTH_EXPIRED_TEXT) and _auth_retry == 0:
                            self._clients[i] = None  # the token expired: authenticate again
                            continue
                        if any(t.lower() in low for t in _RETRYABLE_TEXT):
                            errors[self.endpoints[i]] = text
                            break
                        if "permission denied" in low:
                            raise UnreachableError(f"etcd {self.endpoints[i]}: user {self.cfg.username!r} may not {what} "
                                                   f"under {self.prefix} ({text}): grant it a role on that prefix") from None
                        raise StateError(f"etcd {self.endpoints[i]}: {what} failed: {text}") from None
                    self._current = i
                    self.last_error, self.down = None, False
                    return result
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        self.last_error, self.down = "; ".join(f"{ep}: {err}" for ep, err in errors.items()), True
        raise UnreachableError(f"etcd control plane unreachable (no member answered to {what}: {self.last_error})")

    def post(self, what: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.call(what, lambda c: c.post(c.get_url(path), json=body))

    # --- key-value -----------------------------------------------------------------------
    def get(self, name: str, what: str = "read") -> tuple[bytes, int] | None:
        """(value, mod_revision) of one key, or None."""
        r = self.post(what, "/kv/range", {"key": _b64(self.key(name))})
        kvs = r.get("kvs") or []
        if not kvs:
            return None
        return _unb64(kvs[0].get("value")), int(kvs[0].get("mod_revision", 0))

    def get_prefix(self, name: str, what: str = "read") -> list[tuple[str, bytes]]:
        """(name, value) of every key under ``prefix + name``, in the order they were created."""
        full = self.key(name)
        r = self.post(what, "/kv/range", {"key": _b64(full), "range_end": _range_end(full),
                                          "sort_order": "ASCEND", "sort_target": "CREATE"})
        return [(_unb64(kv["key"]).decode()[len(self.prefix):], _unb64(kv.get("value"))) for kv in r.get("kvs") or []]

    def keys_prefix(self, name: str) -> set[str]:
        full = self.key(name)
        r = self.post("list", "/kv/range", {"key": _b64(full), "range_end": _range_end(full), "keys_only": True})
        return {_unb64(kv["key"]).decode()[len(self.prefix):] for kv in r.get("kvs") or []}

    def put(self, name: str, value: bytes | str, lease: int | None = None, what: str = "write") -> None:
        body: dict[str, Any] = {"key": _b64(self.key(name)), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        self.post(what, "/kv/put", body)

    def delete(self, name: str, what: str = "delete") -> None:
        self.post(what, "/kv/deleterange", {"key": _b64(self.key(name))})

    def txn(self, what: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.post(what, "/kv/txn", body)

    def grant(self, ttl: int) -> int:
        return int(self.post("grant a lease", "/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's TTL after renewing it; 0 or less if it had expired."""
        r = self.post("renew a lease", "/lease/keepalive", {"ID": lease})
        return int((r.get("result") or r).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        with contextlib.suppress(UnreachableError, StateError):
            self.post("revoke a lease", "/kv/lease/revoke", {"ID": lease})

    def revision(self) -> int:
        r = self.post("read", "/kv/range", {"key": _b64(self.key("state")), "count_only": True})
        return int(r["header"]["revision"])

    # --- the shim registry ---------------------------------------------------------------
    def shim_write(self, record: Any) -> None:
        """Publish a shim's record, and renew (or take) its lease: ``alive/<id>`` lives on it."""
        lease = self._shim_leases.get(record.id)
        if lease is not None and self.keepalive(lease) <= 0:
            self.log.warning("control.lease_expired", shim=record.id, lease=lease)
            lease = None  # it expired (etcd was out of reach longer than lease_ttl): a new one
        if lease is None:
            lease = self.grant(self.lease_ttl)
            self._shim_leases[record.id] = lease
        value = json.dumps(redact(asdict(record)), default=str)
        self.txn("register a shim", {"compare": [], "success": [
            {"request_put": {"key": _b64(self.key(f"alive/{record.id}")), "value": _b64(str(lease)), "lease": lease}},
            {"request_put": {"key": _b64(self.key(f"shims/{record.id}")), "value": _b64(value)}},
        ], "failure": []})

    def shim_remove(self, shim_id: str) -> None:
        self.txn("remove a shim", {"compare": [], "success": [
            {"request_delete_range": {"key": _b64(self.key(f"alive/{shim_id}"))}},
            {"request_delete_range": {"key": _b64(self.key(f"shims/{shim_id}"))}},
        ], "failure": []})
        lease = self._shim_leases.pop(shim_id, None)
        if lease is not None:
            self.revoke(lease)

    def shim_read_all(self) -> list[tuple[dict[str, Any], bool]]:
        """Every shim record, with whether its lease is still alive."""
        alive = {k[len("alive/"):] for k in self.keys_prefix("alive/")}
        out = []
        for name, value in self.get_prefix("shims/", "read the shim registry"):
            with contextlib.suppress(ValueError):
                out.append((json.loads(value), name[len("shims/"):] in alive))
        return out

    # --- files shared by the shims (dirty marks, divergence counters) ----------------------
    def file_put(self, rel: str, text: str) -> None:
        self.put(f"files/{rel}", text, what=f"write {rel}")

    def file_get(self, rel: str) -> str | None:
        got = self.get(f"files/{rel}", f"read {rel}")
        return None if got is None else got[0].decode()

    def file_delete(self, rel: str) -> None:
        self.delete(f"files/{rel}", f"delete {rel}")

    def file_list(self, folder: str) -> list[str]:
        """The files directly in ``folder`` (relative paths), sorted."""
        base = folder.rstrip("/") + "/"
        return sorted(k[len("files/"):] for k in self.keys_prefix(f"files/{base}") if "/" not in k[len("files/") + len(base):])

    def files_revision(self, folder: str) -> int:
        """A number that changes whenever a file in ``folder`` is written or deleted (0 if empty)."""
        full = self.key(f"files/{folder.rstrip('/')}/")
        r = self.post("list", "/kv/range", {"key": _b64(full), "range_end": _range_end(full), "keys_only": True})
        kvs = r.get("kvs") or []
        return hash((len(kvs), max((int(kv.get("mod_revision", 0)) for kv in kvs), default=0)))

    # --- the state, journal, lock and intent (``migrator.state.StateStore`` delegates here) ----
    def save_state(self, value: str, expect_rev: int, where: str) -> int:
        """Write the state if its key is still at ``expect_rev`` (compare-and-swap); the new revision."""
        key = _b64(self.key("state"))
        r = self.txn("save the state", {
            "compare": [{"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": expect_rev}],
            "success": [{"request_put": {"key": key, "value": _b64(value)}}],
            "failure": [{"request_range": {"key": key}}],
        })
        if r.get("succeeded"):
            return int(r["header"]["revision"])
        kvs = ((r.get("responses") or [{}])[0].get("response_range") or {}).get("kvs") or []
        if kvs and _unb64(kvs[0].get("value")) == value.encode():  # a retried request whose first try went through
            return int(kvs[0].get("mod_revision", 0))
        raise StateError(f"{where} changed since this run read it (another migrator run, on another host?); "
                         "nothing was written: run `migrator status` and the command again")

    def journal_append(self, time_text: str, line: str) -> None:
        # One key per entry, named uniquely: a retried request cannot append it twice.
        self.put(f"journal/{time_text}-{uuid.uuid4().hex[:8]}", line, what="append to the journal")

    def journal_lines(self) -> list[bytes]:
        """Every journal entry, in the order they were appended (etcd's revisions)."""
        return [value for _name, value in self.get_prefix("journal/", "read the journal")]

    def lock_owner(self) -> str | None:
        got = self.get("lock", "read the lock")
        if got is None:
            return None
        try:
            return json.loads(got[0]).get("owner") or "owner unknown"
        except ValueError:
            return "owner unknown"

    def _take_lock(self, key: str, value: str, lease: int) -> tuple[bool, dict[str, Any], int]:
        """(taken, the holder's record, its mod_revision)."""
        r = self.txn("take the lock", {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            "success": [{"request_put": {"key": key, "value": _b64(value), "lease": lease}}],
            "failure": [{"request_range": {"key": key}}],
        })
        if r.get("succeeded"):
            return True, {}, 0
        kvs = ((r.get("responses") or [{}])[0].get("response_range") or {}).get("kvs") or []
        if not kvs:
            return False, {}, 0
        try:
            held = json.loads(_unb64(kvs[0].get("value")))
        except ValueError:
            held = {}
        return False, held, int(kvs[0].get("mod_revision", 0))

    @contextlib.contextmanager
    def hold_lock(self, owner: str) -> Iterator[None]:
        """Hold the lock key on a lease renewed while this runs: a killed holder's lock goes with its lease.

        A holder that ran on this host and whose process is gone (kill -9) is known dead at once,
        as with the folder's lock: its lock is taken over without waiting for the lease.
        """
        token = uuid.uuid4().hex
        lease = self.grant(self.lease_ttl)
        key = _b64(self.key("lock"))
        value = json.dumps({"owner": owner, "token": token, "host": socket.gethostname(), "pid": os.getpid()})
        taken, held, rev = self._take_lock(key, value, lease)
        if not taken and held.get("token") != token and held.get("host") == socket.gethostname() \
                and isinstance(held.get("pid"), int) and not pid_alive(held["pid"]):
            self.txn("take over a dead run's lock", {
                "compare": [{"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": rev}],
                "success": [{"request_delete_range": {"key": key}}], "failure": []})
            self.log.warning("control.dead_lock_taken_over", owner=held.get("owner"))
            taken, held, rev = self._take_lock(key, value, lease)
        if not taken and held.get("token") != token:  # not our own retried request
            self.revoke(lease)
            raise LockedError(f"another migrator run holds the lock in etcd {self.key('lock')} "
                              f"({held.get('owner', 'owner unknown')}); wait for it to finish (or, if it was killed, "
                              f"for its lease to expire within {self.lease_ttl}s) and try again")
        stop = threading.Event()
        keeper = threading.Thread(target=self._keep_lock, args=(lease, stop), name="migrator-lock-lease", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join(timeout=5)
            with contextlib.suppress(UnreachableError, StateError):
                self.txn("release the lock", {
                    "compare": [{"key": key, "result": "EQUAL", "target": "LEASE", "lease": lease}],
                    "success": [{"request_delete_range": {"key": key}}], "failure": []})
            self.revoke(lease)

    def _keep_lock(self, lease: int, stop: threading.Event) -> None:
        while not stop.wait(max(0.2, self.lease_ttl / 3)):
            try:
                if self.keepalive(lease) <= 0:
                    self.log.error("control.lock_lease_lost", lease=lease)
                    return  # the state's compare-and-swap refuses this run's saves if another run took over
            except (UnreachableError, StateError) as e:
                self.log.warning("control.lock_lease_renewal_failed", error=str(e))

    def put_json(self, name: str, data: Any, what: str) -> None:
        self.put(name, json.dumps(redact(data), default=str), what=what)

    def get_json(self, name: str, what: str) -> Any:
        got = self.get(name, what)
        if got is None:
            return None
        try:
            return json.loads(got[0])
        except ValueError:
            return None

    # --- watching the state ----------------------------------------------------------------
    def watch(self, name: str, start_revision: int, stop: threading.Event, idle: float) -> Iterator[tuple[bytes | None, int]]:
        """(value, mod_revision) of each change to one key from ``start_revision`` on (None: deleted).

        Ends when the stream does (a member went away) or after ``idle`` seconds without an
        event: the caller reads the key again and watches anew (the slow poll).
        """
        i = self._current
        c = self._client(i)
        body = {"create_request": {"key": _b64(self.key(name)), "start_revision": start_revision}}
        try:
            resp = c.session.post(c.get_url("/watch"), json=body, stream=True, timeout=(self.timeout, idle))
        except requests.RequestException as e:
            self._clients[i] = None
            self._current = (i + 1) % len(self.endpoints)
            raise UnreachableError(f"etcd {self.endpoints[i]}: cannot watch: {_detail(e)}") from None
        try:
            if resp.status_code != 200:
                raise UnreachableError(f"etcd {self.endpoints[i]}: cannot watch: HTTP {resp.status_code}")
            for line in resp.iter_lines(chunk_size=None):
                if stop.is_set():
                    return
                if not line.strip():
                    continue
                result = json.loads(line).get("result") or {}
                if result.get("canceled"):
                    return  # compacted past start_revision, or the server went away: read again
                for ev in result.get("events") or []:
                    kv = ev.get("kv") or {}
                    deleted = ev.get("type") == "DELETE"
                    yield (None if deleted else _unb64(kv.get("value"))), int(kv.get("mod_revision", 0))
        except (requests.RequestException, ValueError) as e:
            if "timed out" not in str(e).lower() and "timeout" not in type(e).__name__.lower():
                self._clients[i] = None
                self._current = (i + 1) % len(self.endpoints)
            return
        finally:
            resp.close()


