"""Where a command goes in each phase: a pure function of (phase, mode, command class), as a table.

Two roles per phase: the side that answers reads (R) and the side that answers writes (W).
The other side, when the phase uses both, is the *shadow*: it receives writes (so it stays in
step) and, for comparison, reads. The shim's session interprets a ``Plan``; it decides nothing
about routing itself.

The mode is how the second server is kept in step (``state.mirror``, see ``mode_of``):

- ``dual-write``: the shim writes to both sides (the shadow gets every write).
- ``replication``: the target is a replica of the source (mirroring, reads-on-target). Writes
  go to the source only (a replica answers them READONLY); the target still gets connection
  state (SELECT, HELLO...) and reads, to compare or to answer them.
- ``reverse-replication``: after the write cutover, the source is a replica of the target
  (``state.mirror.reverse == "replication"``): everything goes to the target only.
"""

from __future__ import annotations

from dataclasses import dataclass

from migrator.phases import Phase
from migrator.shim.commands import SOURCE, TARGET, Cls

SHIM = -1  # "answered by the shim itself"


@dataclass(frozen=True)
class Plan:
    answer: int  # SOURCE, TARGET or SHIM: whose reply the client gets
    shadow: int | None = None  # the other side that also receives the command, if any
    compare: bool = False  # compare the shadow's reply with the answer
    sampled: bool = False  # shadow + comparison only for the ``shim.compare_reads`` fraction
    sequential: bool = False  # the shadow gets it only after the answer side replied
    wait_shadow: bool = False  # the client's reply waits until the shadow applied it too
    fallback: bool = False  # if the answer side is unavailable, the shadow's reply answers
    effect: bool = False  # the shadow gets the command's effect, computed from the answer
    combine: bool = False  # the client's reply is made from both sides' replies (see server_cmds.combine)

    def sides(self) -> tuple[int, ...]:
        return (self.answer,) if self.shadow is None else (self.answer, self.shadow)


@dataclass(frozen=True)
class Roles:
    reads: int  # R
    writes: int  # W
    write_shadow: int | None  # where writes are also applied
    read_shadow: int | None  # where reads are also sent, to compare
    sequential_writes: bool  # writes: W first, then the shadow, acknowledged after both
    both_connected: bool  # the phase uses both sides (connection state goes to both)


DUAL_WRITE = "dual-write"
REPLICATION = "replication"
REVERSE_REPLICATION = "reverse-replication"
MODES = (DUAL_WRITE, REPLICATION, REVERSE_REPLICATION)

ROLES: dict[Phase, Roles] = {
    Phase.PLANNED: Roles(SOURCE, SOURCE, None, None, False, False),
    Phase.COMPATIBLE: Roles(SOURCE, SOURCE, None, None, False, False),
    Phase.MIRRORING: Roles(SOURCE, SOURCE, TARGET, TARGET, False, True),
    Phase.READS_ON_TARGET: Roles(TARGET, SOURCE, TARGET, SOURCE, True, True),
    Phase.WRITES_ON_TARGET: Roles(TARGET, TARGET, SOURCE, None, False, True),
    Phase.COMPLETED: Roles(TARGET, TARGET, None, None, False, False),
}


# The replication strategy: no side is ever a write shadow (the server copies every write to its
# replica, in its own order). The replica is still connected for reads: compared against the
# primary in mirroring (lag-aware, see ``shim.lag``), answering them in reads-on-target (compared
# against the source, and with read-your-writes: a connection's reads after its own write go to
# the source until the replica has it).
REPLICATION_ROLES: dict[Phase, Roles] = {
    **ROLES,
    Phase.MIRRORING: Roles(SOURCE, SOURCE, None, TARGET, False, True),
    Phase.READS_ON_TARGET: Roles(TARGET, SOURCE, None, SOURCE, False, True),
}
REVERSE_ROLES: dict[Phase, Roles] = {
    **ROLES,
    Phase.WRITES_ON_TARGET: Roles(TARGET, TARGET, None, None, False, False),
}
_ROLES_BY_MODE = {DUAL_WRITE: ROLES, REPLICATION: REPLICATION_ROLES, REVERSE_REPLICATION: REVERSE_ROLES}

# In a replication mode, the side that replicates the other in ``phase`` (None: none does, or
# the shim does not route as if one did).
_REPLICA: dict[tuple[str, Phase], int] = {
    (REPLICATION, Phase.MIRRORING): TARGET,
    (REPLICATION, Phase.READS_ON_TARGET): TARGET,
    (REVERSE_REPLICATION, Phase.WRITES_ON_TARGET): SOURCE,
}


def mode_of(phase: Phase, mirror) -> str:
    """The routing mode for ``phase`` under ``state.mirror`` (a ``MirrorMode`` or None).

    None or strategy "dual-write": today's routing everywhere. Strategy "replication": the
    replication routes while the target replicates the source (mirroring, reads-on-target);
    in writes-on-target, the source replicating the target (``reverse == "replication"``) or
    the dual-write fallback (any other ``reverse``).
    """
    if mirror is None or getattr(mirror, "strategy", None) != REPLICATION:
        return DUAL_WRITE
    if phase in (Phase.MIRRORING, Phase.READS_ON_TARGET):
        return REPLICATION
    if phase == Phase.WRITES_ON_TARGET:
        return REVERSE_REPLICATION if getattr(mirror, "reverse", None) == REPLICATION else DUAL_WRITE
    return DUAL_WRITE  # one side only: nothing to keep in step


def replica_side(phase: Phase, mode: str) -> int | None:
    """The side that is a replica of the other in ``phase`` under ``mode`` (None: none)."""
    return _REPLICA.get((mode, phase))


def route(phase: Phase, cls: Cls, mode: str = DUAL_WRITE) -> Plan:
    """The plan for a command of class ``cls`` while ``phase`` is applied in ``mode``."""
    r = _ROLES_BY_MODE[mode][phase]
    seq = r.sequential_writes
    if cls is Cls.READ:
        # Only after the read cutover may the other side answer a read when the read side
        # cannot: it is the write-authoritative side then. Before, the source is the truth and
        # its failure must show as it would without the shim.
        return Plan(r.reads, r.read_shadow, compare=r.read_shadow is not None, sampled=r.read_shadow is not None,
                    fallback=r.read_shadow is not None and r.reads != r.writes)
    if cls in (Cls.WRITE, Cls.SCRIPT, Cls.SCRIPT_ADMIN):
        return Plan(r.writes, r.write_shadow, compare=r.write_shadow is not None, sequential=seq and r.write_shadow is not None,
                    wait_shadow=seq and r.write_shadow is not None)
    if cls is Cls.BLOCKING:
        # Blocks only on the answering side; the shadow gets the effect of what it returned,
        # so it necessarily comes after the answer.
        has = r.write_shadow is not None
        return Plan(r.writes, r.write_shadow, sequential=has, wait_shadow=seq and has, effect=has)
    if cls is Cls.TX:
        # A transaction runs whole on the write side; the shadow gets it (as a transaction,
        # with non-deterministic commands replaced by their effects) once EXEC has answered.
        has = r.write_shadow is not None
        return Plan(r.writes, r.write_shadow, compare=has, sequential=has, wait_shadow=seq and has, effect=has)
    if cls is Cls.CONNECTION:
        return Plan(r.writes, (1 - r.writes) if r.both_connected else None)
    if cls is Cls.PUBLISH and _REPLICA.get((mode, phase)) is not None:
        # The primary propagates PUBLISH (and SPUBLISH) to its replicas: subscribers on the
        # replica get it from there. Sent to both, they would get every message twice.
        return Plan(r.writes)
    if cls in (Cls.PUBLISH, Cls.PUBSUB_COUNT, Cls.SERVER_BOTH):
        # Subscribers may sit on either side, and a server setting must hold on whichever side
        # serves after a cutover: both sides in use get it, and the client's reply is made from
        # both replies (receivers added up; a script killed on either side).
        both = r.both_connected
        return Plan(r.writes, (1 - r.writes) if both else None, combine=both)
    if cls in (Cls.BLOCKING_READ, Cls.SUBSCRIBE):
        return Plan(r.reads)
    if cls in (Cls.ADMIN, Cls.UNKNOWN):
        return Plan(r.writes)
    if cls in (Cls.LOCAL, Cls.UNSUPPORTED):
        return Plan(SHIM)
    raise ValueError(f"no route for class {cls!r}")  # pragma: no cover - every class is listed above


ROUTES_BY_MODE: dict[str, dict[Phase, dict[Cls, Plan]]] = {
    m: {p: {c: route(p, c, m) for c in Cls} for p in Phase} for m in MODES}
ROUTES: dict[Phase, dict[Cls, Plan]] = ROUTES_BY_MODE[DUAL_WRITE]


def routes_for(phase: Phase, mode: str = DUAL_WRITE) -> dict[Cls, Plan]:
    return ROUTES_BY_MODE[mode][phase]


def roles_for(phase: Phase, mode: str = DUAL_WRITE) -> Roles:
    return _ROLES_BY_MODE[mode][phase]


def publish_reaches(phase: Phase, mode: str = DUAL_WRITE) -> frozenset[int]:
    """The sides a PUBLISH through the shim reaches (its replica too): subscribers elsewhere must move."""
    sides = set(ROUTES_BY_MODE[mode][phase][Cls.PUBLISH].sides())
    replica = _REPLICA.get((mode, phase))
    if replica is not None and (1 - replica) in sides:
        sides.add(replica)
    return frozenset(sides)
