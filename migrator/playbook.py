"""Playbooks: one YAML file per migration, validated with pydantic.

Every problem is reported as ``PATH:LINE:COL: field.path: message`` (all of them, not just the
first), using ruamel.yaml's line numbers. Strings may use ``${VAR}`` / ``${VAR:-default}``;
passwords come from the URL or from ``password_env`` and are registered as secrets so that
nothing migrator writes ever shows them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from migrator.durations import Duration
from migrator.errors import PlaybookError
from migrator.redact import redact_url, register_secret

DEFAULT_PLAYBOOK = "migrator.yaml"
PLAYBOOK_ENV = "MIGRATOR_PLAYBOOK"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_default=True)


class TLSConfig(_Strict):
    """TLS options for a ``rediss://`` endpoint (or the shim's client side)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify: bool = True
    server_name: str | None = None


def _host_port(v: str) -> str:
    """``host:port`` (IPv6 in brackets), the port in range; returned as given."""
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError(f"{v!r} is not host:port")
    return v


# One ``host:port`` entry: a bad one is reported at its own line and column.
HostPort = Annotated[str, AfterValidator(_host_port)]


class SentinelConfig(_Strict):
    """A primary managed by Redis Sentinel: the sentinels to ask and the name they know it by.

    ``password_env`` names the variable holding the *data nodes'* password (as the endpoint's
    own ``password_env`` does); ``sentinel_password_env`` the sentinels' own, when they have one.
    """

    addresses: list[HostPort] = Field(min_length=1)
    master_name: str = Field(min_length=1)
    username: str | None = None  # the data nodes' ACL user (the endpoint's username also works)
    password_env: str | None = None
    sentinel_username: str | None = None
    sentinel_password_env: str | None = None
    # The sentinels themselves speak TLS (the data nodes' TLS is the endpoint's ``tls``).
    sentinel_tls: bool = False

    _password: str | None = PrivateAttr(default=None)
    _sentinel_password: str | None = PrivateAttr(default=None)

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("an address is listed twice")
        return v

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def sentinel_password(self) -> str | None:
        return self._sentinel_password


class Endpoint(_Strict):
    """A Redis or Valkey deployment.

    - standalone: ``url: redis://[user[:password]@]host[:port][/db]`` (or ``rediss://``);
    - Redis Cluster: the same ``url`` naming any node, plus optional ``seeds: [host:port, ...]``
      (the topology is read from the servers: ``cluster_enabled``);
    - Sentinel-managed: no ``url`` but ``sentinel: {addresses, master_name, ...}``, with ``db``
      and ``tls`` beside it (``tls`` present means the data nodes speak TLS).
    """

    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)

    url: str | None = None
    sentinel: SentinelConfig | None = None
    seeds: list[str] = Field(default_factory=list)
    database: int | None = Field(None, alias="db", ge=0)
    username: str | None = None
    password_env: str | None = None
    tls: TLSConfig | None = None
    connect_timeout: Duration = timedelta(seconds=5)
    socket_timeout: Duration = timedelta(seconds=30)

    _password: str | None = PrivateAttr(default=None)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            parts = urlsplit(v)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"not a valid URL ({e})") from None
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"URL scheme must be redis:// or rediss://, not {parts.scheme + '://' if parts.scheme else 'missing'}")
        if not parts.hostname:
            raise ValueError("URL has no host")
        if port is not None and not (0 < port < 65536):
            raise ValueError(f"port {port} out of range")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"database in URL path must be a number, not {path!r}")
        if parts.password:
            register_secret(unquote(parts.password))
        return v

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, v: list[str]) -> list[str]:
        for a in v:
            _host_port(a)
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> "Endpoint":
        if self.url is None and self.sentinel is None:
            raise ValueError("give url (a server or any cluster node) or sentinel (a Sentinel-managed primary)")
        if self.url is not None and self.sentinel is not None:
            raise ValueError("give url or sentinel, not both: with sentinel, the sentinels say where the primary is")
        if self.seeds and self.url is None:
            raise ValueError("seeds go with url (cluster nodes), not with sentinel")
        if self.url is not None:
            if self.tls is not None and not self.use_tls:
                raise ValueError("tls options given but the URL is not rediss://")
            path = self._parts.path.strip("/")
            if self.database is not None and path and int(path) != self.database:
                raise ValueError(f"db {self.database} differs from the database in the URL ({path})")
        return self

    # Derived, password-free views -------------------------------------------------------
    @property
    def kind(self) -> str:
        """What the playbook says: "sentinel", or "server" (standalone or cluster: read from the server)."""
        return "sentinel" if self.sentinel is not None else "server"

    @property
    def _parts(self):
        return urlsplit(self.url or "")

    @property
    def host(self) -> str:
        """The URL's host. For a Sentinel endpoint, the primary as last resolved by
        ``migrator.sentinel`` (``set_resolved``); before that, the first sentinel's host."""
        if self.sentinel is not None:
            return (self._resolved or _split(self.sentinel.addresses[0]))[0]
        return self._parts.hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        if self.sentinel is not None:
            return (self._resolved or _split(self.sentinel.addresses[0]))[1]
        return self._parts.port or 6379

    @property
    def _resolved(self) -> tuple[str, int] | None:
        return getattr(self, "_resolved_primary", None)

    def set_resolved(self, host: str, port: int) -> None:
        """Record where a Sentinel endpoint's primary is now (``migrator.sentinel`` calls this)."""
        object.__setattr__(self, "_resolved_primary", (host, int(port)))

    @property
    def db(self) -> int:
        if self.database is not None:
            return self.database
        path = self._parts.path.strip("/")
        return int(path) if path else 0

    @property
    def use_tls(self) -> bool:
        if self.sentinel is not None:
            return self.tls is not None
        return self._parts.scheme == "rediss"

    @property
    def user(self) -> str | None:
        if self.username:
            return self.username
        if self.sentinel is not None:
            return self.sentinel.username
        u = self._parts.username
        return unquote(u) if u else None

    @property
    def password(self) -> str | None:
        if self._password is not None:
            return self._password
        if self.sentinel is not None:
            return self.sentinel.password
        p = self._parts.password
        return unquote(p) if p else None

    @property
    def display(self) -> str:
        """The URL with any password masked (for Sentinel: the sentinels and the master name)."""
        if self.sentinel is not None:
            scheme = "sentinel+tls" if self.use_tls else "sentinel"
            return f"{scheme}://{','.join(self.sentinel.addresses)}/{self.sentinel.master_name}/{self.db}"
        return redact_url(self.url or "")

    def tls_kwargs(self) -> dict[str, Any]:
        """The TLS keyword arguments of a redis-py client of this endpoint's data nodes (``ssl`` and
        the files, verification on unless ``tls.verify`` is false)."""
        kw: dict[str, Any] = {"ssl": True}
        tls = self.tls
        if tls is not None:
            kw["ssl_ca_certs"] = str(tls.ca_file) if tls.ca_file else None
            kw["ssl_certfile"] = str(tls.cert_file) if tls.cert_file else None
            kw["ssl_keyfile"] = str(tls.key_file) if tls.key_file else None
            kw["ssl_cert_reqs"] = ssl.CERT_REQUIRED if tls.verify else ssl.CERT_NONE
            kw["ssl_check_hostname"] = bool(tls.verify)
        return kw

    def identity(self) -> dict[str, Any]:
        """What identifies the deployment (no secrets): used to notice endpoints changing mid-migration."""
        if self.sentinel is not None:
            return {"sentinel": sorted(self.sentinel.addresses), "master_name": self.sentinel.master_name,
                    "db": self.db, "tls": self.use_tls, "user": self.user}
        return {"host": self.host, "port": self.port, "db": self.db, "tls": self.use_tls, "user": self.user}


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class ShimConfig(_Strict):
    """The mirroring shim applications point at during the migration."""

    listen: str = "127.0.0.1:6380"
    admin: str = "127.0.0.1:9121"
    compare_reads: float = Field(1.0, ge=0.0, le=1.0)
    log_values: bool = False
    password: str | None = None
    password_env: str | None = None
    tls: TLSConfig | None = None
    shadow_timeout: Duration = timedelta(milliseconds=500)
    ack_timeout: Duration = timedelta(seconds=10)
    max_request_bytes: int = Field(512 * 1024 * 1024, gt=0)
    max_client_buffer_bytes: int = Field(64 * 1024 * 1024, gt=0)
    mirror_queue_size: int = Field(10000, gt=0)
    # Upstream connections per side shared by clients that carry no connection state, in the
    # one-sided phases (planned, compatible, completed); 0: every client gets its own.
    shared_connections: int = Field(1, ge=0, le=64)
    # Upstream connections per side kept from ended sessions for the next client (reset with
    # RESET in between); 0: each session opens its own.
    pool_size: int = Field(16, ge=0, le=1024)
    # The replication strategy (mirror.strategy): a compared read that differs from the replica's
    # is confirmed against the replication offsets for at most this long, then counted as
    # unconfirmed (never as a divergence).
    replica_lag_timeout: Duration = timedelta(seconds=5)
    # In reads-on-target with the replication strategy: a connection's reads after its own write
    # are answered by the source until the replica has that write (false: always the replica).
    read_your_writes: bool = True
    # How clients log in (docs/shim.md, "Client authentication"): "password" (the shim checks
    # shim.password; upstream connections use the playbook's credentials), "none" (no check), or
    # "passthrough" (the client's own AUTH / HELLO AUTH is forwarded as that user to the servers,
    # which decide). Unset: "password" when shim.password(_env) is set, else "none".
    auth: Literal["password", "none", "passthrough"] | None = None

    _resolved_password: str | None = PrivateAttr(default=None)

    @field_validator("listen", "admin")
    @classmethod
    def _check_addr(cls, v: str) -> str:
        split_hostport(v)
        return v

    @field_validator("password")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        register_secret(v)
        return v

    @property
    def client_password(self) -> str | None:
        return self._resolved_password or self.password

    @property
    def auth_mode(self) -> str:
        """``auth`` as it applies: set, or "password" with a shim password, else "none"."""
        if self.auth is not None:
            return self.auth
        return "password" if (self.password or self.password_env) else "none"

    @model_validator(mode="after")
    def _check_auth(self) -> ShimConfig:
        has_password = bool(self.password or self.password_env)
        if self.auth == "password" and not has_password:
            raise ValueError("shim.auth is password but neither shim.password nor shim.password_env is set")
        if self.auth in ("none", "passthrough") and has_password:
            raise ValueError(f"shim.auth is {self.auth} but shim.password (or password_env) is set: "
                             "remove the password, or use shim.auth: password")
        return self

    @property
    def listen_is_loopback(self) -> bool:
        return is_loopback(split_hostport(self.listen)[0])


class CompatibilityStep(_Strict):
    test_command: str | list[str] | None = None
    test_timeout: Duration = timedelta(minutes=30)
    scratch: Literal["local", "docker", "target"] | None = None
    scratch_seed: int = Field(0, ge=0)
    allow_non_empty_target: bool = False


class MirrorStep(_Strict):
    min_duration: Duration = timedelta(days=7)
    max_divergence_rate: float = Field(0.0, ge=0.0, le=1.0)
    min_compared: int = Field(1000, ge=0)  # replies compared (commands answered by both) before those gates can pass
    # The latency and error_rate gates (the target as the shadow, over the same commands as the source).
    max_latency_ratio: float = Field(1.5, ge=1.0)  # target p50 and p99 within this factor of the source's
    latency_floor_ms: float = Field(1.0, ge=0.0)  # quantiles under this count as this (noise, bucket resolution)
    max_error_rate: float = Field(0.001, ge=0.0, le=1.0)  # errors only the target returned, per command


class ReadCutoverStep(_Strict):
    min_duration: Duration = timedelta(hours=48)
    max_divergence_rate: float = Field(0.0, ge=0.0, le=1.0)
    min_compared: int = Field(1000, ge=0)
    max_latency_ratio: float = Field(1.5, ge=1.0)
    latency_floor_ms: float = Field(1.0, ge=0.0)
    max_error_rate: float = Field(0.001, ge=0.0, le=1.0)


class WriteCutoverStep(_Strict):
    rollback_window: Duration = timedelta(hours=72)
    max_pause: Duration = timedelta(seconds=5)


class Steps(_Strict):
    compatibility: CompatibilityStep = Field(default_factory=CompatibilityStep)
    mirror: MirrorStep = Field(default_factory=MirrorStep)
    read_cutover: ReadCutoverStep = Field(default_factory=ReadCutoverStep)
    write_cutover: WriteCutoverStep = Field(default_factory=WriteCutoverStep)


class SyncConfig(_Strict):
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    databases: list[int] | None = None
    batch: int = Field(500, gt=0)
    rate: float | None = Field(None, gt=0)
    # Cluster source: read each shard from one of its replicas (verified against the primary;
    # see docs/data.md "Cluster"). Standalone and Sentinel sources are always read from the primary.
    read_from_replicas: bool = False


class CheckConfig(_Strict):
    sample: int = Field(10000, gt=0)
    ttl_tolerance: Duration = timedelta(seconds=2)
    rounds: int = Field(3, ge=1)
    interval: Duration = timedelta(seconds=1)
    max_mismatch_rate: float = Field(0.001, ge=0.0, le=1.0)
    # How far apart the two sides' key counts may be (a fraction of the larger) before the
    # key_counts gate says a side lost its data; lazy expiry and writes in flight make them differ a little.
    max_key_count_drift: float = Field(0.01, ge=0.0, le=1.0)


HookCommands = str | list[str]


class HookSet(_Strict):
    """Shell commands run around one step (each field: one command or a list, run in order)."""

    before: HookCommands = Field(default_factory=list)
    after: HookCommands = Field(default_factory=list)
    before_rollback: HookCommands = Field(default_factory=list)
    after_rollback: HookCommands = Field(default_factory=list)

    def commands(self, field_name: str) -> list[str]:
        value = getattr(self, field_name)
        return [value] if isinstance(value, str) else list(value)


class Hooks(_Strict):
    """Commands run before and after steps and rollbacks (like gh-ost's hooks)."""

    timeout: Duration = timedelta(minutes=5)
    every_step: HookSet = Field(default_factory=HookSet)
    compatibility: HookSet = Field(default_factory=HookSet)
    mirror: HookSet = Field(default_factory=HookSet)
    read_cutover: HookSet = Field(default_factory=HookSet)
    write_cutover: HookSet = Field(default_factory=HookSet)
    complete: HookSet = Field(default_factory=HookSet)


class ReplicationConfig(_Strict):
    """How the servers replicate each other when the mirror strategy is ``replication``."""

    # host:port the *target server* uses to reach the source (REPLICAOF), when it differs from
    # the source URL's (NAT, container networks); likewise the source reaching the target for
    # the rollback window.
    source_address: str | None = None
    target_address: str | None = None
    # REPLICAOF discards whatever the target holds: refused on a non-empty target unless true.
    replace_target_data: bool = False
    # The initial full sync must finish within ``sync_timeout``; no progress for
    # ``stall_timeout`` (or a full sync that restarts) is reported as stalled or looping.
    sync_timeout: Duration = timedelta(hours=1)
    stall_timeout: Duration = timedelta(seconds=60)

    @field_validator("source_address", "target_address")
    @classmethod
    def _check_addr(cls, v: str | None) -> str | None:
        if v is not None:
            split_hostport(v)
        return v


class MirrorConfig(_Strict):
    """How writes reach the second server while both are in use.

    ``replication``: the target replicates the source (the servers order every write, so any
    number of shims and writers that bypass them are mirrored); ``dual-write``: each shim writes
    to both servers; ``auto``: replication where the pre-flight finds the pair supports it.
    """

    strategy: Literal["auto", "replication", "dual-write"] = "auto"
    replication: ReplicationConfig = Field(default_factory=ReplicationConfig)


class EtcdTLS(_Strict):
    """TLS to the etcd members (``https://`` endpoints): the CA that signed them, and a client certificate if they require one."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class EtcdConfig(_Strict):
    """The etcd cluster that holds the migration's control plane (see docs/control.md)."""

    endpoints: list[str] = Field(min_length=1)
    prefix: str | None = None  # default /migrator/<name>/
    username: str | None = None
    password_env: str | None = None
    tls: EtcdTLS | None = None
    # A shim's registration lives on a lease of this many seconds: a shim that stops renewing it
    # (killed, frozen, cut off from etcd) is a lost shim once it expires.
    lease_ttl: Duration = timedelta(seconds=10)
    # How long one request may take on one member before the next member is tried.
    request_timeout: Duration = timedelta(seconds=2)

    _password: str | None = PrivateAttr(default=None)

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, v: list[str]) -> list[str]:
        for e in v:
            parts = urlsplit(e if "://" in e else f"http://{e}")
            try:
                _ = parts.port
            except ValueError as err:
                raise ValueError(f"etcd endpoint {e!r}: {err}") from None
            if parts.username or parts.password or "@" in parts.netloc:
                # Not echoed: it may hold a password.
                raise ValueError("an etcd endpoint must not carry credentials: use username and password_env")
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
                raise ValueError(f"etcd endpoint must be [http[s]://]HOST:PORT, not {e!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or not v.endswith("/") or len(v) < 3):
            raise ValueError(f"prefix must start and end with '/' (e.g. /migrator/orders/), not {v!r}")
        return v

    @model_validator(mode="after")
    def _checks(self) -> EtcdConfig:
        if self.password_env and not self.username:
            raise ValueError("password_env needs username")
        if self.lease_ttl.total_seconds() < 1:
            raise ValueError("lease_ttl must be at least 1s")
        if self.request_timeout.total_seconds() <= 0:
            raise ValueError("request_timeout must be positive")
        if self.tls is not None and not all(e.startswith("https://") for e in self.endpoints):
            raise ValueError("tls options given but not every endpoint is https://")
        return self

    @property
    def password(self) -> str | None:
        return self._password


class ControlConfig(_Strict):
    """Where the migration's state, journal, lock, intent and shim registry live: the state
    folder (default) or an etcd cluster shared by every host (docs/control.md)."""

    etcd: EtcdConfig | None = None


class Playbook(_Strict):
    """A whole migration: where from, where to, how the shim runs, and what each step requires."""

    version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    source: Endpoint
    target: Endpoint
    shim: ShimConfig = Field(default_factory=ShimConfig)
    state_dir: Path | None = None
    steps: Steps = Field(default_factory=Steps)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)
    hooks: Hooks = Field(default_factory=Hooks)
    mirror: MirrorConfig = Field(default_factory=MirrorConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)

    # Where the playbook came from (not part of the YAML).
    _path: Path | None = PrivateAttr(default=None)
    _raw_hash: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Playbook":
        if self.source.identity() == self.target.identity():
            raise ValueError("source and target are the same server")
        if not self.shim.listen_is_loopback and self.shim.auth_mode == "none":
            raise ValueError("shim.password (or shim.password_env, or shim.auth: passthrough) is required when "
                             "shim.listen is not a loopback address")
        return self

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def state_path(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir

    def endpoints_hash(self) -> str:
        """A hash of the servers' identities (no secrets): a change mid-migration is refused."""
        blob = json.dumps({"source": self.source.identity(), "target": self.target.identity()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def playbook_hash(self) -> str:
        """A hash of the playbook's content as written (secrets are in it only as ${ENV} references or not at all)."""
        return self._raw_hash


# --- addresses ---------------------------------------------------------------------------


def split_hostport(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ValueError with a clear message."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\s]+):(\d+)", addr or "")
    if not m:
        raise ValueError(f"address must be HOST:PORT, not {addr!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not (0 <= port < 65536):
        raise ValueError(f"port {port} out of range")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- loading -----------------------------------------------------------------------------


def resolve_path(path: str | os.PathLike | None) -> Path:
    """The playbook path: the argument, else $MIGRATOR_PLAYBOOK, else ./migrator.yaml."""
    return Path(path or os.environ.get(PLAYBOOK_ENV) or DEFAULT_PLAYBOOK)


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Playbook:
    """Read, interpolate and validate a playbook. Raises PlaybookError listing every problem."""
    env = dict(os.environ if env is None else env)
    p = resolve_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlaybookError([f"{p}: playbook not found (give -p PATH or set {PLAYBOOK_ENV})"]) from None
    except IsADirectoryError:
        raise PlaybookError([f"{p}: is a directory, not a playbook file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlaybookError([f"{p}: cannot read playbook: {e}"]) from None
    return loads(text, p, env)


def loads(text: str, path: Path | str = "<playbook>", env: dict[str, str] | None = None) -> Playbook:
    env = dict(os.environ if env is None else env)
    path = Path(path)
    yaml = YAML(typ="rt")
    try:
        root = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = (e.problem or e.context or "invalid YAML").strip()
        raise PlaybookError([f"{path}:{line}:{col}: yaml: {problem}"]) from None
    except YAMLError as e:
        raise PlaybookError([f"{path}:1:1: yaml: {str(e).splitlines()[0]}"]) from None
    if root is None:
        raise PlaybookError([f"{path}:1:1: playbook is empty"])
    if not isinstance(root, CommentedMap):
        raise PlaybookError([f"{path}:1:1: playbook must be a mapping of fields, not {type(root).__name__}"])

    problems: list[tuple[int, int, str]] = []
    unresolved: set[tuple] = set()  # values with an unset ${VAR}: their other errors would be noise
    data = _interpolate(root, root, (), env, problems, unresolved)
    model: Playbook | None = None
    try:
        model = Playbook.model_validate(data)
    except ValidationError as e:
        for err in e.errors(include_url=False):
            loc = tuple(err["loc"])
            if any(loc[: len(u)] == u for u in unresolved):
                continue
            line, col = _position(root, loc, key=err["type"] == "extra_forbidden")
            where = _dotted(loc) or "playbook"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            elif msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            problems.append((line, col, f"{where}: {msg}"))
    if model is not None:
        for section, ep in (("source", model.source), ("target", model.target)):
            if ep.password_env:
                value = env.get(ep.password_env)
                if value is None:
                    line, col = _position(root, (section, "password_env"))
                    problems.append((line, col, f"{section}.password_env: environment variable {ep.password_env} is not set"))
                else:
                    register_secret(value)
                    ep._password = value
            sen = ep.sentinel
            for field, attr in (("password_env", "_password"), ("sentinel_password_env", "_sentinel_password")):
                name = getattr(sen, field) if sen is not None else None
                if not name:
                    continue
                value = env.get(name)
                if value is None:
                    line, col = _position(root, (section, "sentinel", field))
                    problems.append((line, col, f"{section}.sentinel.{field}: environment variable {name} is not set"))
                else:
                    register_secret(value)
                    setattr(sen, attr, value)
        if model.shim.password_env:
            value = env.get(model.shim.password_env)
            if value is None:
                line, col = _position(root, ("shim", "password_env"))
                problems.append((line, col, f"shim.password_env: environment variable {model.shim.password_env} is not set"))
            else:
                register_secret(value)
                model.shim._resolved_password = value
        etcd = model.control.etcd
        if etcd is not None and etcd.password_env:
            value = env.get(etcd.password_env)
            if value is None:
                line, col = _position(root, ("control", "etcd", "password_env"))
                problems.append((line, col, f"control.etcd.password_env: environment variable {etcd.password_env} is not set"))
            else:
                register_secret(value)
                etcd._password = value
    if problems:
        problems.sort()
        raise PlaybookError([f"{path}:{line}:{col}: {msg}" for line, col, msg in problems])
    assert model is not None
    base = path.resolve().parent
    if model.state_dir is None:
        model.state_dir = base / ".migrator" / model.name
    elif not model.state_dir.is_absolute():
        model.state_dir = (base / model.state_dir).resolve()
    for ep in (model.source, model.target):
        if ep.tls:
            for field in ("ca_file", "cert_file", "key_file"):
                f = getattr(ep.tls, field)
                if f is not None and not f.is_absolute():
                    setattr(ep.tls, field, (base / f).resolve())
    if model.control.etcd is not None and model.control.etcd.tls is not None:
        for field in ("ca_file", "cert_file", "key_file"):
            f = getattr(model.control.etcd.tls, field)
            if f is not None and not f.is_absolute():
                setattr(model.control.etcd.tls, field, (base / f).resolve())
    model._path = path.resolve()
    model._raw_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
    from migrator import control

    control.bind(model)  # the state folder's control plane (docs/control.md); connects on first use
    return model


def _interpolate(root: CommentedMap, node: Any, loc: tuple, env: dict[str, str], problems: list,
                 unresolved: set[tuple]) -> Any:
    """Plain Python data from the ruamel tree, with ${VAR} references replaced."""
    if isinstance(node, CommentedMap):
        return {k: _interpolate(root, v, loc + (k,), env, problems, unresolved) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [_interpolate(root, v, loc + (i,), env, problems, unresolved) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append((*_position(root, loc), f"{_dotted(loc)}: environment variable {name} is not set"))
            unresolved.add(loc)
            return m.group(0)

        return _ENV_REF.sub(sub, str(node))
    if isinstance(node, str):
        return str(node)
    return node


def _position(root: Any, loc: tuple, key: bool = False) -> tuple[int, int]:
    """1-based (line, col) of the node at ``loc``; the nearest existing parent if it is missing.

    ``key`` points at the key rather than the value (for unknown fields). A nested block is
    located by its key, which is where a human looks.
    """
    node, pos = root, (root.lc.line, root.lc.col)
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, CommentedMap) and part in node:
            child = node[part]
            nested = isinstance(child, (CommentedMap, CommentedSeq))
            pos = node.lc.key(part) if (key and last) or nested else node.lc.value(part)
            node = child
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            pos = node.lc.item(part)
            node = node[part]
        else:
            break  # a missing field, or pydantic's tag for a union member
    return pos[0] + 1, pos[1] + 1


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out
