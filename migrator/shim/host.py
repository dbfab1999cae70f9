"""What a session needs of the shim that hosts it, and of the links it writes through.

The core (``session`` and the modules it is made of) never imports the IO layer: it is given
a host (``server.Shim`` in production, a recorder in ``tests/test_shim_core.py``), one
``ClientLink`` and, per upstream connection, an ``UpstreamLink``. Its *outputs* are calls on
these: bytes to write to the client or to a side, a side's connection to open
(``open_upstream``), a connection to close, reading from the client paused or resumed. Its
*inputs* are the session's ``on_*`` methods (see ``session.Session``).

Typing only: nothing here runs, so the core depends on no concrete host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from migrator.shim.commands import Cls, CommandTable
    from migrator.shim.dirty import DirtyRecorder
    from migrator.shim.divergence import DivergenceRecorder
    from migrator.shim.lag import Mismatch, OffsetTracker
    from migrator.shim.metrics import Stats
    from migrator.shim.routing import Plan
    from migrator.shim.sequencer import Sequencer


class ClientLink(Protocol):
    """The session's client connection (``io.ClientProtocol``)."""

    peer: str

    def write(self, data: bytes) -> None: ...

    def close(self) -> None:
        """Close after what was written has been sent."""

    def buffer_size(self) -> int:
        """Bytes written and not yet taken by the client."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class UpstreamLink(Protocol):
    """One open connection to a side (an asyncio transport in production)."""

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def abort(self) -> None:
        """Drop the connection now (what is buffered is lost)."""

    def close(self) -> None: ...


class ShimHost(Protocol):
    """The shim as its sessions see it: configuration, shared state, counters, and a few actions."""

    # Configuration and the phase now applied.
    cfg: Any  # playbook.ShimConfig
    endpoints: tuple[Any, Any]  # playbook.Endpoint per side (AUTH replayed on each new connection)
    endpoint_dbs: tuple[int, int]
    password: bytes | None
    passthrough: bool  # shim.auth: passthrough (clients' own logins go to the servers, see connstate)
    shadow_timeout: float
    ttl_tolerance_ms: int
    client_window: int
    routes: dict[Cls, Plan]
    mode: str  # routing.DUAL_WRITE, REPLICATION or REVERSE_REPLICATION (see routing.mode_of)
    lag_aware: bool  # compared reads go against a replica: a mismatch is confirmed (confirm_mismatch)
    ryw: bool  # a replica answers reads: a connection's reads after its write follow Dispatch._ryw_redirect
    sequence_keys: bool  # two connections' writes to a key must be put in one order (dual-write)
    tracker: OffsetTracker  # the replication offsets, read by the IO layer
    generation: int
    holding: bool  # the write switch's barrier: new client bytes are held
    stalled_until: float
    rdb_versions: list[int | None]
    table: CommandTable
    facade: Any  # shim.facade.Facade when a side is a cluster: the shim answers CLUSTER as one node; else None
    # Shared by every session of the process.
    seq: Sequencer
    stats: Stats
    dirty: DirtyRecorder
    divergence: DivergenceRecorder
    outstanding: dict[int, int]  # commands in flight per generation (the phase acknowledgement waits)
    mirror_depth: int
    script_bodies: dict[bytes, bytes]
    scripts_loaded: tuple[set[bytes], set[bytes]]
    log: Any

    # Actions and notifications.
    def open_upstream(self, session: Any, side: int, attempt: int) -> None:
        """Open a connection to ``side``; answer with ``session.on_upstream_connected`` / ``_failed``."""

    def session_closed(self, session: Any, reason: str) -> None: ...

    def give_back(self, side: int, transport: Any, named: bool) -> bool:
        """A cleanly ended session offers an upstream connection for the next one (``shim.pool``)."""
        ...

    def open_shared(self, session: Any, side: int, attempt: int) -> bool:
        """Give ``session`` a share of a shared upstream connection to ``side`` (``shim.mux.VirtualConn``),
        answered by ``on_upstream_connected``; False: it must open a connection of its own."""
        ...

    def entry_finished(self, gen: int, count: int = 1) -> None: ...

    def confirm_mismatch(self, m: Mismatch) -> None:
        """Confirm (or not) a compared read that differed from a replica's, against offsets (``shim.lag``)."""

    def side_failed(self, side: int, reason: str) -> None:
        """The side itself failed: every session backs off from it (see ``may_retry``)."""

    def side_ok(self, side: int) -> None: ...

    def may_retry(self, side: int) -> bool: ...

    def sample(self) -> bool:
        """Whether this read is one of the ``shim.compare_reads`` fraction that is compared."""

    def warn_unknown(self, side: int, name: bytes) -> None: ...

    def warn_noscript(self, side: int, sha: bytes) -> None: ...

    def note_script(self, args: list[bytes], name: bytes) -> None: ...

    def facade_reply(self, args: list[bytes], client: Any) -> bytes | None:
        """A CLUSTER command answered as a one-node cluster at the address ``client`` reached (None: forwarded)."""

    def script_result(self, side: int, args: list[bytes], name: bytes, raw: bytes) -> None: ...
