"""The phase table walked exhaustively, and random advance/rollback sequences against the persisted state."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from migrator import actions, command, gates, phases
from migrator.errors import RefusedError
from migrator.phases import FINAL, INITIAL, STEPS, Phase
from migrator.state import StateStore
from tests.conftest import write_playbook


def test_every_phase_is_reachable_from_the_start():
    """Walking forward from planned visits every phase exactly once and ends at completed."""
    seen, phase = [INITIAL], INITIAL
    while (step := phases.step_from(phase)) is not None:
        phase = step.dest
        assert phase not in seen, "the table has a cycle"
        seen.append(phase)
    assert seen == list(Phase)
    assert phase == FINAL


def test_every_forward_step_but_completion_has_its_rollback():
    """Each step except completion can be reversed, and the reverse leads back to where it came from."""
    for step in STEPS:
        assert phases.step_into(step.dest) is step
        if step.dest == FINAL:
            assert not step.reversible and phases.rollback_target(step.dest) is None
        else:
            assert step.reversible and phases.rollback_target(step.dest) == step.source


def test_no_dead_ends():
    """Every phase but the last has a way forward, and every phase but the first and last a way back."""
    for phase in Phase:
        assert (phases.step_from(phase) is None) == (phase == FINAL)
        assert (phases.rollback_target(phase) is None) == (phase in (INITIAL, FINAL))


def test_every_gate_and_action_named_in_the_table_exists():
    """The table names only registered gates and actions, and each has a description."""
    gates.load_gate_modules()
    assert phases.all_gate_names() <= set(gates.GATES), phases.all_gate_names() - set(gates.GATES)
    assert phases.all_action_names() <= set(actions.ACTIONS)
    for name in phases.all_gate_names():
        assert gates.describe(name) != name, f"gate {name} has no docstring"


def always_pass(names, ctx):
    return [gates.GateResult(n, True, "test: passes") for n in names]


class Walk(RuleBasedStateMachine):
    """Random advance/rollback sequences; after each, the persisted state matches a simple model."""

    def __init__(self):
        super().__init__()
        import tempfile
        from pathlib import Path

        self.dir = Path(tempfile.mkdtemp(prefix="migrator-walk-"))
        path = write_playbook(self.dir / "pb.yaml", "redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0")
        from migrator import playbook

        self.pb = playbook.load(path)
        self.store = StateStore(self.pb.state_path, self.pb.name)
        self.phase = INITIAL
        self.generation = 0
        self.transitions = 0

    def teardown(self):
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    @rule()
    def advance(self):
        step = phases.step_from(self.phase)
        if step is None:
            with pytest.raises(RefusedError):
                command.advance(self.pb, evaluate=always_pass)
            return
        r = command.advance(self.pb, evaluate=always_pass)
        assert (r.from_phase, r.to_phase) == (self.phase, step.dest)
        # A step that holds the shims first (write switch) uses one generation for the hold.
        self.generation += 1 + ("hold_writes" in step.prepare)
        self.phase, self.transitions = step.dest, self.transitions + 1

    @rule()
    def rollback(self):
        back = phases.rollback_target(self.phase)
        if back is None:
            with pytest.raises(RefusedError):
                command.rollback(self.pb, evaluate=always_pass)
            return
        r = command.rollback(self.pb, evaluate=always_pass)
        assert r.to_phase == back
        self.generation += 1 + ("hold_writes" in phases.step_into(self.phase).rollback_prepare)
        self.phase, self.transitions = back, self.transitions + 1

    @rule(dry=st.booleans())
    def dry_run_changes_nothing(self, dry):
        before = self.store.state_path.read_bytes() if self.store.exists() else None
        try:
            command.advance(self.pb, evaluate=always_pass, dry_run=True)
        except RefusedError:
            pass
        after = self.store.state_path.read_bytes() if self.store.exists() else None
        assert before == after

    @invariant()
    def persisted_state_matches(self):
        st_ = self.store.load()
        assert st_.phase == self.phase
        assert st_.generation == self.generation
        assert st_.transition is None and st_.barrier is None
        assert len(st_.history) == self.transitions
        if self.store.exists():
            json.loads(self.store.state_path.read_text())  # always whole JSON
        events = [e["event"] for e in self.store.read_journal()]
        assert events.count("transition-started") == events.count("transition-completed") == self.transitions


Walk.TestCase.settings = settings(max_examples=25, stateful_step_count=20, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])
test_random_walks = Walk.TestCase


def test_mirroring_survives_rollbacks_above_it():
    """Writes reach both servers from compatible→mirroring until a rollback to compatible; rollbacks above keep it."""
    from migrator.state import State

    st = State(migration="m", phase=Phase.READS_ON_TARGET, history=[
        {"from": "compatible", "to": "mirroring", "started_at": "2026-01-01T00:00:00.000Z"},
        {"from": "mirroring", "to": "reads-on-target", "started_at": "2026-01-02T00:00:00.000Z"},
        {"from": "reads-on-target", "to": "mirroring", "started_at": "2026-01-03T00:00:00.000Z"},
        {"from": "mirroring", "to": "reads-on-target", "started_at": "2026-01-04T00:00:00.000Z"},
    ])
    assert st.mirror_started.isoformat().startswith("2026-01-01")
    st.phase = Phase.COMPATIBLE
    assert st.mirror_started is None
