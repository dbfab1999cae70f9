"""The migration's phases and the steps between them: one table, as data.

Each step names its gates (checks that must pass, with evidence, before it is taken) and its
actions (what happens once the new phase is recorded in the state, which is what shims follow),
for the forward direction and for its rollback. The runner (``migrator.command``) only interprets this table; gates and actions are
looked up by name in ``migrator.gates`` and ``migrator.actions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Phase(str, Enum):
    PLANNED = "planned"
    COMPATIBLE = "compatible"
    MIRRORING = "mirroring"
    READS_ON_TARGET = "reads-on-target"
    WRITES_ON_TARGET = "writes-on-target"
    COMPLETED = "completed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Step:
    """One forward step ``source → dest`` and, if ``reversible``, its rollback ``dest → source``."""

    name: str
    source: Phase
    dest: Phase
    description: str
    gates: tuple[str, ...]
    actions: tuple[str, ...]
    reversible: bool = True
    rollback_gates: tuple[str, ...] = ()
    rollback_actions: tuple[str, ...] = ()
    rollback_description: str = ""
    # Run after the journal records the start and before the new phase is recorded; if one
    # fails the step is abandoned with the phase unchanged.
    prepare: tuple[str, ...] = ()
    rollback_prepare: tuple[str, ...] = ()


STEPS: tuple[Step, ...] = (
    Step(
        name="compatibility",
        source=Phase.PLANNED,
        dest=Phase.COMPATIBLE,
        description="run the compatibility checks and the test suite against Valkey",
        gates=("compatibility",),
        actions=("await_shim_ack",),
        # stop_mirror: a target left attached (a mirror step reverted after its attach) is not
        # left replicating the source of an abandoned migration.
        rollback_actions=("await_shim_ack", "stop_mirror"),
        rollback_description="forget the compatibility result; nothing is routed differently",
    ),
    Step(
        name="mirror",
        source=Phase.COMPATIBLE,
        dest=Phase.MIRRORING,
        description="mirror every write to Valkey and compare reads; the source stays authoritative",
        gates=("shim_running", "mirror_strategy"),
        # Decides the mirror strategy on fresh evidence and, in replication, makes the target a
        # replica of the source, before shims learn of the new phase.
        prepare=("start_mirror",),
        actions=("await_shim_ack",),
        rollback_actions=("await_shim_ack", "stop_mirror"),
        rollback_description="stop mirroring at once; the source was authoritative throughout",
    ),
    Step(
        name="read_cutover",
        source=Phase.MIRRORING,
        dest=Phase.READS_ON_TARGET,
        description="serve reads from Valkey; writes still go to both, source first",
        gates=("mirror_duration", "shim_ack", "no_lost_shims", "sides_live", "key_counts", "sync_complete", "replica_in_sync",
               "no_dirty_keys", "divergence", "latency", "error_rate", "consistency"),
        actions=("await_shim_ack",),
        rollback_actions=("await_shim_ack",),
        rollback_description="serve reads from the source again at once; writes kept going to both",
    ),
    Step(
        name="write_cutover",
        source=Phase.READS_ON_TARGET,
        dest=Phase.WRITES_ON_TARGET,
        description="make Valkey authoritative; Redis is kept in sync for the rollback window",
        gates=("read_cutover_duration", "shim_ack", "no_lost_shims", "sides_live", "key_counts", "no_dirty_keys", "divergence",
               "latency", "error_rate", "consistency"),
        # In the replication strategy the servers swap roles inside the hold (migrator.roleswap).
        prepare=("hold_writes", "role_swap"),
        actions=("release_pause", "await_shim_ack", "write_pause"),
        # Not ``sides_live``: a rollback onto the source, which holds every acknowledged write,
        # must stay possible when the target is dead.
        rollback_gates=("shim_ack", "no_lost_shims", "source_reachable", "source_keys", "no_dirty_keys"),
        rollback_prepare=("hold_writes", "role_swap_back"),
        rollback_actions=("release_pause", "await_shim_ack", "write_pause"),
        rollback_description="make the source authoritative again; it was kept in sync",
    ),
    Step(
        name="complete",
        source=Phase.WRITES_ON_TARGET,
        dest=Phase.COMPLETED,
        description="stop writing to Redis; it can be decommissioned",
        gates=("rollback_window", "shim_ack", "sides_live", "key_counts", "no_dirty_keys", "consistency"),
        actions=("await_shim_ack", "detach_source", "final_report"),
        reversible=False,
    ),
)

INITIAL = Phase.PLANNED
FINAL = Phase.COMPLETED


def step_from(phase: Phase) -> Step | None:
    """The forward step that leaves ``phase`` (None at the end)."""
    return next((s for s in STEPS if s.source == phase), None)


def step_into(phase: Phase) -> Step | None:
    """The step that entered ``phase`` — the one ``rollback`` reverses (None at the start)."""
    return next((s for s in STEPS if s.dest == phase), None)


def rollback_target(phase: Phase) -> Phase | None:
    step = step_into(phase)
    return step.source if step and step.reversible else None


def all_gate_names() -> set[str]:
    names: set[str] = set()
    for s in STEPS:
        names.update(s.gates, s.rollback_gates)
    return names


def all_action_names() -> set[str]:
    names: set[str] = set()
    for s in STEPS:
        names.update(s.actions, s.rollback_actions, s.prepare, s.rollback_prepare)
    return names
