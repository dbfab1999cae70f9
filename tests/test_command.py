"""plan / advance / rollback / status / history against real servers, through the real CLI."""

from __future__ import annotations

import json
import signal

import pytest

from migrator import command, playbook
from migrator.phases import Phase
from migrator.state import StateStore
from tests.helpers import AckingShim, run_cli, start_cli, wait_for


# The sync, divergence and consistency gates are tested with real data in test_data*/test_shim*;
# here they are overridden (as an operator could) to test the state machine around them.
SKIP_DATA_GATES = ("--override", "sync_complete", "--override", "divergence", "--override", "latency",
                   "--override", "error_rate", "--override", "consistency", "--reason", "state-machine test")
SKIP_DATA_GATES_AT_WRITE_CUTOVER = ("--override", "divergence", "--override", "latency", "--override", "error_rate",
                                    "--override", "consistency", "--reason", "state-machine test")


def load(path):
    return playbook.load(path)


def force_phase(pb, phase: Phase) -> None:
    """Put a migration in ``phase`` directly (test set-up only; no journal)."""
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    st.phase, st.generation, st.endpoints_hash = phase, st.generation + 1, pb.endpoints_hash()
    store.save(st)


@pytest.fixture
def servers_pb(server_factory, make_playbook):
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    return make_playbook(src, tgt, shim={"ack_timeout": "2s"})


def test_plan_identifies_both_servers_across_pairs(pair, make_playbook):
    """plan connects read-only and names each side's server and version, changing nothing."""
    src, tgt = pair
    path = make_playbook(src, tgt)
    out = run_cli("plan", "--output", "json", playbook=path)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    servers = {s["role"]: s for s in p["servers"]}
    assert servers["source"]["server"] == src.binary.kind and servers["source"]["version"] == src.binary.version
    assert servers["target"]["server"] == "valkey" and servers["target"]["version"] == tgt.binary.version
    assert p["phase"] == "planned" and p["to_phase"] == "compatible" and p["started"] is False
    assert [g["gate"] for g in p["gates"]] == ["compatibility"]
    assert not (path.parent / "state" / "state.json").exists()


def test_plan_shows_time_gates_with_evidence(servers_pb):
    """In mirroring, plan reports how long the mirror has run against its minimum."""
    pb = load(servers_pb)
    text = servers_pb.read_text().replace('"min_duration": "0s"', '"min_duration": "7d"', 1)
    servers_pb.write_text(text)
    pb = load(servers_pb)
    force_phase(pb, Phase.MIRRORING)
    out = run_cli("plan", playbook=servers_pb)
    assert out.returncode == 0, out.stderr
    assert "mirroring → reads-on-target" in out.stdout
    assert "mirror has run" in out.stdout and "of 7d" in out.stdout
    assert "no shim is running" in out.stdout
    assert "advance would be refused" in out.stdout


def test_refused_advance_prints_evidence_changes_nothing_and_exits_1(servers_pb):
    """A failing gate refuses the step with its evidence, exit code 1, and leaves the state as it was."""
    pb = load(servers_pb)
    force_phase(pb, Phase.COMPATIBLE)
    before = (pb.state_path / "state.json").read_bytes()
    out = run_cli("advance", "--yes", playbook=servers_pb)
    assert out.returncode == 1
    assert "shim_running" in out.stdout and "no shim is running" in out.stdout
    assert out.stderr.startswith("FAILED: advance to mirroring refused")
    assert (pb.state_path / "state.json").read_bytes() == before
    assert command.history(pb)[-1]["event"] == "refused"


def test_override_needs_a_reason_and_is_journaled(servers_pb):
    """--override without --reason is a usage error; with it the step is taken and the journal says who and why."""
    pb = load(servers_pb)
    force_phase(pb, Phase.COMPATIBLE)
    assert run_cli("advance", "--yes", "--override", "shim_running", playbook=servers_pb).returncode == 2
    bad = run_cli("advance", "--yes", "--override", "nonsense", "--reason", "x", playbook=servers_pb)
    assert bad.returncode == 2 and "has no such gate" in bad.stderr
    out = run_cli("advance", "--yes", "--override", "shim_running", "--reason", "shim deployed later", playbook=servers_pb)
    assert out.returncode == 0, out.stderr
    started = [e for e in command.history(pb) if e["event"] == "transition-started"][-1]
    assert started["overrides"] == [{"gate": "shim_running", "reason": "shim deployed later", "operator": started["operator"]}]
    assert "@" in started["operator"] and started["playbook_hash"] and started["endpoints_hash"]
    assert StateStore(pb.state_path, pb.name).load().phase == Phase.MIRRORING


def test_advance_and_rollback_with_a_shim_acknowledging(servers_pb):
    """With a shim following the state, advance and rollback wait for its acknowledgement and report it."""
    pb = load(servers_pb)
    force_phase(pb, Phase.MIRRORING)
    with AckingShim(pb.state_path, pb.name):
        out = run_cli("advance", "--yes", *SKIP_DATA_GATES, playbook=servers_pb)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "mirroring → reads-on-target" in out.stdout and "1 of 1 shim(s) applied generation" in out.stdout
        out = run_cli("rollback", "--yes", "--output", "json", playbook=servers_pb)
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        assert (r["from_phase"], r["to_phase"]) == ("reads-on-target", "mirroring")
        st = json.loads(run_cli("status", "--output", "json", playbook=servers_pb).stdout)
        assert st["phase"] == "mirroring" and st["shims"][0]["current"] is True
        assert st["other_side"] == "target: in sync"
        assert [h["direction"] for h in st["history"]] == ["advance", "rollback"]


def test_a_shim_that_does_not_acknowledge_makes_the_step_revert(servers_pb):
    """If a running shim does not apply the new phase in time, the previous phase is restored and the step refused."""
    pb = load(servers_pb)
    force_phase(pb, Phase.MIRRORING)
    with AckingShim(pb.state_path, pb.name) as shim:
        wait_for(lambda: shim.record.applied_generation == 1, what="shim ack")
        shim.stuck = True
        out = run_cli("advance", "--yes", "--override", "shim_ack", *SKIP_DATA_GATES, playbook=servers_pb)
        assert out.returncode == 1
        assert "reverted to mirroring" in out.stderr and "test-shim" in out.stderr
        st = StateStore(pb.state_path, pb.name).load()
        assert st.phase == Phase.MIRRORING and st.transition is None and st.generation == 3
        assert command.history(pb)[-1]["event"] == "transition-reverted"


def test_rollback_refused_at_the_ends(servers_pb):
    """Nothing to roll back from planned; no way back from completed (the source is released)."""
    pb = load(servers_pb)
    out = run_cli("rollback", "--yes", playbook=servers_pb)
    assert out.returncode == 1 and "nothing to roll back" in out.stderr
    force_phase(pb, Phase.COMPLETED)
    out = run_cli("rollback", "--yes", playbook=servers_pb)
    assert out.returncode == 1 and "no way back" in out.stderr
    assert "it can be decommissioned" in run_cli("status", playbook=servers_pb).stdout
    out = run_cli("advance", "--yes", playbook=servers_pb)
    assert out.returncode == 1 and "no further step" in out.stderr


def test_second_run_fails_at_once_while_the_lock_is_held(servers_pb):
    """Two advance/rollback runs cannot interleave: the second fails immediately, naming the holder."""
    pb = load(servers_pb)
    store = StateStore(pb.state_path, pb.name)
    with store.locked("advance"):
        out = run_cli("advance", "--yes", playbook=servers_pb, timeout=20)
    assert out.returncode == 4
    assert "another migrator run holds the lock" in out.stderr and "advance by" in out.stderr


def test_changed_endpoints_are_refused(servers_pb, server_factory):
    """Pointing the playbook at another server in the middle of a migration is refused with a clear message."""
    pb = load(servers_pb)
    force_phase(pb, Phase.MIRRORING)
    other = server_factory("valkey-8.1")
    doc = json.loads(servers_pb.read_text())
    doc["target"]["url"] = other.url
    servers_pb.write_text(json.dumps(doc))
    out = run_cli("advance", "--yes", playbook=servers_pb)
    assert out.returncode == 1 and "source/target changed since this migration began" in out.stderr


def test_unreachable_server_has_its_own_exit_code(make_playbook, server_factory):
    """plan against a server that does not answer shows the plan and exits 3."""
    src = server_factory("redis-7.0")
    from migrator.servers import free_port

    path = make_playbook(src, f"redis://127.0.0.1:{free_port()}/0")
    out = run_cli("plan", playbook=path)
    assert out.returncode == 3
    assert "target redis://127.0.0.1" in out.stdout and "unreachable" in out.stdout


def test_malformed_playbook_exits_2_with_positions(tmp_path):
    """A malformed playbook prints every problem as file:line:col and exits 2."""
    p = tmp_path / "migrator.yaml"
    p.write_text("version: 2\nname: x\nsource: {url: 'redis://a:1'}\ntarget: {url: 'redis://a:2', bogus: 1}\n")
    out = run_cli("plan", playbook=p)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"{p}:1:10: version:")
    assert lines[1] == f"{p}:4:30: target.bogus: unknown field"


def test_playbook_from_environment_variable(servers_pb):
    """MIGRATOR_PLAYBOOK names the playbook when -p is not given."""
    out = run_cli("status", "--output", "json", env={"MIGRATOR_PLAYBOOK": str(servers_pb)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["phase"] == "planned"


def test_secrets_never_reach_output_state_or_journal(server_factory, make_playbook):
    """A password in the URL and one from password_env appear nowhere in output, state or journal."""
    src = server_factory("redis-7.0", password="src-pass-AAA")
    tgt = server_factory("valkey-9.1", password="tgt-pass-BBB")
    bare_target = tgt.url.replace(":tgt-pass-BBB@", "")
    path = make_playbook(src, bare_target, target={"url": bare_target, "password_env": "TGT_PW"})
    env = {"TGT_PW": "tgt-pass-BBB"}
    outputs = [run_cli("plan", playbook=path, env=env), run_cli("plan", "--output", "json", playbook=path, env=env)]
    pb = playbook.load(path, env=env)
    force_phase(pb, Phase.COMPATIBLE)
    outputs.append(run_cli("advance", "--yes", "--override", "shim_running", "--reason", "x", playbook=path, env=env))
    outputs += [run_cli(c, playbook=path, env=env) for c in ("status", "history")]
    assert outputs[0].returncode == 0 and "redis 7.0" in outputs[0].stdout and "valkey 9.1" in outputs[0].stdout
    everything = "".join(o.stdout + o.stderr for o in outputs)
    everything += "".join(f.read_text() for f in pb.state_path.rglob("*") if f.is_file() and f.suffix in (".json", ".jsonl"))
    assert "src-pass-AAA" not in everything and "tgt-pass-BBB" not in everything
    assert "***" in everything


# --- crash safety: kill -9 at the dangerous points ------------------------------------------------


@pytest.mark.parametrize("point", ["after-journal", "after-state", "after-actions"])
def test_kill_9_at_each_point_leaves_a_state_that_continues(servers_pb, point):
    """Killed at any point of a transition, status reads the state and the same command finishes the step."""
    pb = load(servers_pb)
    force_phase(pb, Phase.MIRRORING)
    with AckingShim(pb.state_path, pb.name):
        out = run_cli("advance", "--yes", *SKIP_DATA_GATES, playbook=servers_pb, env={"MIGRATOR_CRASH_AT": point})
        assert out.returncode == -signal.SIGKILL
        st = run_cli("status", "--output", "json", playbook=servers_pb)
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        if point == "after-journal":
            assert status["phase"] == "mirroring" and "stopped before the phase changed" in status["note"]
        else:
            assert status["phase"] == "reads-on-target" and status["pending_transition"]["to_phase"] == "reads-on-target"
            assert "run `migrator advance` to finish it" in status["note"]
        again = run_cli("advance", "--yes", *SKIP_DATA_GATES, playbook=servers_pb)
        assert again.returncode == 0, again.stderr
        final = StateStore(pb.state_path, pb.name).load()
        assert final.phase == Phase.READS_ON_TARGET and final.transition is None
        assert len(final.history) == 1
        events = [e["event"] for e in command.history(pb)]
        assert events[-1] == "transition-completed"


def test_kill_9_while_waiting_for_shim_acknowledgement(servers_pb):
    """Killed while waiting for a shim, the step is pending; once the shim catches up, advance finishes it."""
    pb = load(servers_pb)
    force_phase(pb, Phase.MIRRORING)
    doc = json.loads(servers_pb.read_text())
    doc["shim"]["ack_timeout"] = "60s"
    servers_pb.write_text(json.dumps(doc))
    with AckingShim(pb.state_path, pb.name) as shim:
        wait_for(lambda: shim.record.applied_generation == 1, what="shim ack")
        shim.stuck = True
        proc = start_cli("advance", "--yes", *SKIP_DATA_GATES, playbook=servers_pb)
        store = StateStore(pb.state_path, pb.name)
        wait_for(lambda: store.load().transition is not None, what="the phase change to be recorded")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        assert store.load().phase == Phase.READS_ON_TARGET and store.load().transition is not None
        st = json.loads(run_cli("status", "--output", "json", playbook=servers_pb).stdout)
        assert st["shims"][0]["current"] is False and "interrupted advance" in st["note"]
        shim.stuck = False
        again = run_cli("advance", "--yes", *SKIP_DATA_GATES, playbook=servers_pb)
        assert again.returncode == 0, again.stderr
        assert store.load().transition is None and store.load().phase == Phase.READS_ON_TARGET


# --- hooks -----------------------------------------------------------------------------------------


def test_hooks_run_around_steps_with_migration_environment(servers_pb, tmp_path):
    """before/after hooks run around advance and rollback with MIGRATOR_* variables; output goes to the journal."""
    log = tmp_path / "hooks.log"
    doc = json.loads(servers_pb.read_text())
    doc["hooks"] = {
        "every_step": {"before": f"echo before $MIGRATOR_STEP $MIGRATOR_DIRECTION >> {log}",
                       "after_rollback": f"echo after-rollback $MIGRATOR_FROM_PHASE $MIGRATOR_TO_PHASE >> {log}"},
        "read_cutover": {"after": [f"echo after $MIGRATOR_TO_PHASE $MIGRATOR_TARGET_URL >> {log}", "echo visible-output"]},
    }
    servers_pb.write_text(json.dumps(doc))
    pb = load(servers_pb)
    force_phase(pb, Phase.MIRRORING)
    with AckingShim(pb.state_path, pb.name):
        assert run_cli("advance", "--yes", *SKIP_DATA_GATES, playbook=servers_pb).returncode == 0
        assert run_cli("rollback", "--yes", playbook=servers_pb).returncode == 0
    lines = log.read_text().splitlines()
    assert lines[0] == "before read_cutover advance"
    assert lines[1].startswith("after reads-on-target redis://127.0.0.1:")
    assert lines[2] == "after-rollback reads-on-target mirroring"
    hooks = [e for e in command.history(pb) if e["event"] == "hook"]
    assert [h["exit_code"] for h in hooks] == [0, 0, 0, 0]
    assert "visible-output" in hooks[2]["output_tail"]


def test_failing_before_hook_aborts_the_step_cleanly(servers_pb):
    """A before hook that fails stops the step before anything changes, exit 1, its output in the journal."""
    doc = json.loads(servers_pb.read_text())
    doc["hooks"] = {"mirror": {"before": "echo apps not ready >&2; exit 3"}}
    servers_pb.write_text(json.dumps(doc))
    pb = load(servers_pb)
    force_phase(pb, Phase.COMPATIBLE)
    out = run_cli("advance", "--yes", "--override", "shim_running", "--reason", "t", playbook=servers_pb)
    assert out.returncode == 1 and "before hook failed (exit 3)" in out.stderr and "apps not ready" in out.stderr
    st = StateStore(pb.state_path, pb.name).load()
    assert st.phase == Phase.COMPATIBLE and st.transition is None
    events = command.history(pb)
    assert events[-1]["event"] == "hook" and events[-1]["exit_code"] == 3
    assert not any(e["event"] == "transition-started" for e in events)


# --- the write switch --------------------------------------------------------------------------------


def test_write_cutover_holds_shims_switches_and_reports_the_pause(servers_pb):
    """reads-on-target → writes-on-target holds every shim, switches authority in one state write, and reports the pause."""
    pb = load(servers_pb)
    force_phase(pb, Phase.READS_ON_TARGET)
    with AckingShim(pb.state_path, pb.name) as shim:
        out = run_cli("advance", "--yes", *SKIP_DATA_GATES_AT_WRITE_CUTOVER, "--output", "json", playbook=servers_pb)
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        assert r["to_phase"] == "writes-on-target"
        pause = next(a for a in r["actions"] if a["action"] == "write_pause")
        assert pause["data"]["max_pause_ms"] > 0 and shim.record.barrier_state == "released"
        st = StateStore(pb.state_path, pb.name).load()
        assert st.barrier is None and st.phase == Phase.WRITES_ON_TARGET


def test_write_cutover_abandoned_when_a_shim_still_owes_writes(servers_pb):
    """A shim with writes still owed to the other side makes the switch abandon, phase unchanged, hold lifted."""
    doc = json.loads(servers_pb.read_text())
    doc["steps"]["write_cutover"]["max_pause"] = "1s"
    servers_pb.write_text(json.dumps(doc))
    pb = load(servers_pb)
    force_phase(pb, Phase.READS_ON_TARGET)
    with AckingShim(pb.state_path, pb.name) as shim:
        shim.owed = 3
        out = run_cli("advance", "--yes", *SKIP_DATA_GATES_AT_WRITE_CUTOVER, playbook=servers_pb)
        assert out.returncode == 1
        assert "abandoned, phase unchanged" in out.stderr and "owes the other side 3 write(s)" in out.stderr
        st = StateStore(pb.state_path, pb.name).load()
        assert st.phase == Phase.READS_ON_TARGET and st.barrier is None and st.transition is None
        wait_for(lambda: shim.record.barrier_state == "released", what="the shim to release")


def test_kill_9_while_shims_hold_is_bounded_and_recovered(servers_pb):
    """advance killed while shims hold: the hold has a deadline, and the next run lifts it and switches."""
    pb = load(servers_pb)
    force_phase(pb, Phase.READS_ON_TARGET)
    with AckingShim(pb.state_path, pb.name):
        out = run_cli("advance", "--yes", *SKIP_DATA_GATES_AT_WRITE_CUTOVER, playbook=servers_pb, env={"MIGRATOR_CRASH_AT": "after-prepare"})
        assert out.returncode == -signal.SIGKILL
        st = StateStore(pb.state_path, pb.name).load()
        assert st.barrier is not None and st.phase == Phase.READS_ON_TARGET
        from migrator.state import now, parse_iso

        assert (parse_iso(st.barrier.deadline) - now()).total_seconds() <= pb.steps.write_cutover.max_pause.total_seconds()
        again = run_cli("advance", "--yes", *SKIP_DATA_GATES_AT_WRITE_CUTOVER, playbook=servers_pb)
        assert again.returncode == 0, again.stderr
        events = [e["event"] for e in command.history(pb)]
        assert "barrier-lifted" in events and events[-1] == "transition-completed"
        assert StateStore(pb.state_path, pb.name).load().phase == Phase.WRITES_ON_TARGET


def test_text_from_the_world_is_printed_literally(servers_pb):
    """Key names, commands and evidence with [brackets] or :emoji: codes are shown as written, not as markup."""
    doc = json.loads(servers_pb.read_text())
    doc["hooks"] = {"compatibility": {"before": "echo '[bold]key[1]' :ledger: && exit 1"}}
    servers_pb.write_text(json.dumps(doc))
    assert run_cli("advance", "--yes", "--override", "compatibility", "--reason", "x", playbook=servers_pb).returncode == 1
    out = run_cli("history", playbook=servers_pb)
    assert "echo '[bold]key[1]' :ledger: && exit 1" in out.stdout
