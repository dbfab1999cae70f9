"""The promise under a careless operator and dead servers: authority never moves onto a dead side,
the way back always exists, gates need evidence (fresh evidence), and a re-run never takes a
second step. Real servers, the real CLI; a stand-in shim (``AckingShim``) where only the state
machine is under test."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from migrator import command, gates, playbook
from migrator.phases import Phase
from migrator.shim import gates as shim_gates
from migrator.shim.divergence import DivergenceRecorder
from migrator.state import StateStore, iso, now
from tests.helpers import AckingShim, run_cli

SKIP_DATA = ("--override", "sync_complete", "--override", "divergence", "--override", "latency",
             "--override", "error_rate", "--override", "consistency", "--reason", "state-machine test")
SKIP_DATA_WRITE = ("--override", "divergence", "--override", "latency", "--override", "error_rate",
                   "--override", "consistency", "--reason", "state-machine test")


def force_phase(pb, phase: Phase) -> None:
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    st.phase, st.generation, st.endpoints_hash = phase, st.generation + 1, pb.endpoints_hash()
    store.save(st)


def write_dirty_mark(state_dir, key=b"k"):
    import base64

    d = state_dir / "dirty"
    d.mkdir(parents=True, exist_ok=True)
    line = {"db": 0, "key": base64.b64encode(key).decode(), "reason": "shadow-error", "command": "SET",
            "ts": time.time(), "time": iso(now()), "shim": "test-shim"}
    (d / "test-shim.1.jsonl").write_text(json.dumps(line) + "\n")


@pytest.fixture
def two(server_factory, make_playbook):
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    path = make_playbook(src, tgt, shim={"ack_timeout": "2s"}, source={"url": src.url, "connect_timeout": "1s"},
                         target={"url": tgt.url, "connect_timeout": "1s"})
    return src, tgt, path, playbook.load(path)


# --- A2: cutover onto a dead side; the way back ---------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.MIRRORING, Phase.READS_ON_TARGET])
def test_authority_never_moves_onto_a_dead_target(two, phase):
    """With the target killed, neither the read cutover nor the write cutover is taken, even with every data gate overridden."""
    src, tgt, path, pb = two
    force_phase(pb, phase)
    tgt.proc.kill()
    tgt.proc.wait(10)
    with AckingShim(pb.state_path, pb.name):
        out = run_cli("advance", "--yes", *(SKIP_DATA if phase == Phase.MIRRORING else SKIP_DATA_WRITE), playbook=path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sides_live" in out.stderr and "unreachable" in out.stdout
    assert StateStore(pb.state_path, pb.name).load().phase == phase


def test_rollback_onto_the_source_works_with_the_target_dead_and_the_override_really_overrides(two):
    """In writes-on-target with the target dead and dirty keys, `rollback --override no_dirty_keys` is taken (the hold no longer refuses)."""
    src, tgt, path, pb = two
    force_phase(pb, Phase.WRITES_ON_TARGET)
    tgt.proc.kill()
    tgt.proc.wait(10)
    write_dirty_mark(pb.state_path)
    with AckingShim(pb.state_path, pb.name) as shim:
        shim.record.dirty_keys = 1
        refused = run_cli("rollback", "--yes", playbook=path)
        assert refused.returncode == 1 and "no_dirty_keys" in refused.stderr
        out = run_cli("rollback", "--yes", "--override", "no_dirty_keys", "--reason", "target is gone", playbook=path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert StateStore(pb.state_path, pb.name).load().phase == Phase.READS_ON_TARGET
    started = [e for e in command.history(pb) if e["event"] == "transition-started"][-1]
    assert started["overrides"][0]["gate"] == "no_dirty_keys" and started["overrides"][0]["reason"] == "target is gone"


def test_a_rollback_against_a_stopped_source_fails_within_a_bounded_time(two):
    """A SIGSTOPped source makes the rollback fail in about one connect timeout (1 s here), not the 60 s of ten client retries."""
    src, tgt, path, pb = two
    force_phase(pb, Phase.WRITES_ON_TARGET)
    os.kill(src.proc.pid, signal.SIGSTOP)
    try:
        with AckingShim(pb.state_path, pb.name):
            t0 = time.monotonic()
            out = run_cli("rollback", "--yes", playbook=path, timeout=60)
            took = time.monotonic() - t0
    finally:
        os.kill(src.proc.pid, signal.SIGCONT)
    assert out.returncode == 1 and "source_reachable" in out.stderr, out.stdout + out.stderr
    assert took < 10, f"rollback took {took:.1f}s"


def test_the_source_restarted_since_the_write_switch_blocks_the_rollback(two):
    """A source that restarted empty after authority left it is not taken back to: the rollback names the restart."""
    from tests.helpers import restart_empty

    src, tgt, path, pb = two
    src.client().mset({f"k{i}": i for i in range(50)})
    tgt.client().mset({f"k{i}": i for i in range(50)})
    force_phase(pb, Phase.READS_ON_TARGET)
    with AckingShim(pb.state_path, pb.name):
        assert run_cli("advance", "--yes", *SKIP_DATA_WRITE, playbook=path).returncode == 0
        time.sleep(1.6)  # the restart must be visible in the uptime as well as the run_id
        restart_empty(src)
        out = run_cli("rollback", "--yes", playbook=path)
    assert out.returncode == 1
    assert "source_reachable" in out.stderr and "restarted" in out.stdout and "source_keys" in out.stderr


# --- A3: no evidence is not good evidence ---------------------------------------------------------------------


def test_the_divergence_gate_needs_a_minimum_of_compared_replies(tmp_path):
    """With no (or few) replies compared the divergence gate fails, naming steps.mirror.min_compared; with enough it passes."""
    from tests.conftest import write_playbook

    pb = playbook.load(write_playbook(tmp_path / "m.yaml", "redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0",
                                      steps={"mirror": {"min_compared": 100}}))
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    st.phase, st.generation = Phase.MIRRORING, 3
    ctx = gates.GateContext(pb, store, st, now())
    rec = DivergenceRecorder(pb.state_path, "s")
    rec.start_generation(3, "mirroring")
    for _ in range(99):
        rec.compared()
    rec.flush()
    few = shim_gates.divergence(ctx)
    assert not few.passed and "only 99 replies compared" in few.evidence and "steps.mirror.min_compared" in few.evidence
    rec.compared()
    rec.flush()
    assert shim_gates.divergence(ctx).passed
    assert playbook.load(write_playbook(tmp_path / "d.yaml", "redis://a:1/0", "redis://b:2/0")).steps.mirror.min_compared == 0
    default = playbook.loads("version: 1\nname: x\nsource: {url: 'redis://a:1/0'}\ntarget: {url: 'redis://b:2/0'}\n")
    assert default.steps.mirror.min_compared == 1000 and default.steps.read_cutover.min_compared == 1000


# --- A4: the confirmation prompt ------------------------------------------------------------------------------


def test_gates_are_judged_again_after_the_confirmation(two):
    """A shim that stops while the prompt waits makes the step refused after the answer; the preview never says the run itself is in progress."""
    src, tgt, path, pb = two
    force_phase(pb, Phase.COMPATIBLE)
    shim = AckingShim(pb.state_path, pb.name).__enter__()
    seen = {}

    def confirm(preview):
        seen["note"] = preview.note
        shim.__exit__(None, None, None)
        from migrator import registry

        registry.remove(pb.state_path, shim.record.id)
        return True

    with pytest.raises(command.GatesFailed) as e:
        command.advance(pb, confirm=confirm)
    assert [r.name for r in e.value.results if not r.passed] == ["shim_running"]
    assert not (seen["note"] or "").startswith("in progress")
    assert StateStore(pb.state_path, pb.name).load().phase == Phase.COMPATIBLE
    refused = [x for x in command.history(pb) if x["event"] == "refused"][-1]
    assert refused.get("after") == "confirmation"


# --- A5: a re-run of a killed command --------------------------------------------------------------------------


def test_a_rerun_after_a_kill_past_completion_takes_no_second_step(two):
    """advance killed -9 after its step completed: running it again says so and stays; the run after that takes the next step."""
    src, tgt, path, pb = two
    force_phase(pb, Phase.COMPATIBLE)
    with AckingShim(pb.state_path, pb.name):
        out = run_cli("advance", "--yes", playbook=path, env={"MIGRATOR_CRASH_AT": "after-complete"})
        assert out.returncode == -signal.SIGKILL
        assert StateStore(pb.state_path, pb.name).load().phase == Phase.MIRRORING
        again = run_cli("advance", "--yes", *SKIP_DATA, playbook=path)
        assert again.returncode == 0, again.stderr
        assert "was interrupted after it reached mirroring; no further step was taken" in again.stdout
        assert StateStore(pb.state_path, pb.name).load().phase == Phase.MIRRORING
        third = run_cli("advance", "--yes", *SKIP_DATA, playbook=path)
        assert third.returncode == 0, third.stderr
        assert StateStore(pb.state_path, pb.name).load().phase == Phase.READS_ON_TARGET


# --- C7: advice that works in the phase --------------------------------------------------------------------


def test_dirty_key_advice_is_a_command_that_works_in_the_phase(two):
    """no_dirty_keys advises `sync --dirty` while the source is authoritative and `check --full --repair` once the target is."""
    src, tgt, path, pb = two
    write_dirty_mark(pb.state_path)
    store = StateStore(pb.state_path, pb.name)
    for phase, advice, not_advice in ((Phase.MIRRORING, "migrator sync --dirty", "--repair"),
                                      (Phase.WRITES_ON_TARGET, "migrator check --full --repair", "sync --dirty`")):
        force_phase(pb, phase)
        r = shim_gates.no_dirty_keys(gates.make_context(pb, store, store.load()))
        assert not r.passed and advice in r.evidence and not_advice not in r.evidence, r.evidence
    force_phase(pb, Phase.WRITES_ON_TARGET)
    out = run_cli("sync", "--dirty", playbook=path)
    assert out.returncode == 1  # which is why it must not be the advice


# --- D: dry run, wrong password, the mirror clock, status --------------------------------------------------


def test_a_dry_run_from_planned_is_read_only(server_factory, make_playbook):
    """advance --dry-run writes no report, runs no test suite and leaves the target's data alone."""
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-9.1")
    tgt.client().set("keep", "me")
    marker = tgt.dir / "suite-ran"
    path = make_playbook(src, tgt, steps={"compatibility": {"test_command": f"touch {marker}", "scratch": "target",
                                                            "allow_non_empty_target": True}})
    pb = playbook.load(path)
    out = run_cli("advance", "--dry-run", playbook=path)
    assert out.returncode in (0, 1), out.stderr
    assert not marker.exists()
    assert tgt.client().get("keep") == b"me"
    assert not (pb.state_path / "reports").exists() or not any((pb.state_path / "reports").iterdir())
    assert not any(e["event"] in ("refused", "transition-started") for e in command.history(pb))


def test_a_wrong_password_is_unreachable_not_a_failed_gate(server_factory, make_playbook):
    """A wrong target password makes advance exit 3 with a plain message, and journals no failed compatibility gate."""
    src = server_factory("redis-7.0")
    tgt = server_factory("valkey-9.1", password="right")
    path = make_playbook(src, tgt.url.replace(":right@", ":wrong@"))
    pb = playbook.load(path)
    out = run_cli("advance", "--yes", playbook=path)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "UnreachableError" not in out.stdout + out.stderr
    assert not any(e["event"] == "refused" for e in command.history(pb))
    force_phase(pb, Phase.MIRRORING)  # later steps probe both sides in their gates: the same answer
    with AckingShim(pb.state_path, pb.name):
        out = run_cli("advance", "--yes", *SKIP_DATA, playbook=path)
    assert out.returncode == 3 and "authentication failed" in out.stderr and "credentials" in out.stderr, out.stderr
    assert not any(e["event"] == "refused" for e in command.history(pb))


def test_a_clean_read_cutover_rolled_back_keeps_the_mirror_clock(two):
    """Rolled back from reads-on-target with nothing diverged or dirty, the mirror's clock keeps its start; with a dirty key, it restarts."""
    src, tgt, path, pb = two
    store = StateStore(pb.state_path, pb.name)
    force_phase(pb, Phase.COMPATIBLE)
    with AckingShim(pb.state_path, pb.name):
        assert run_cli("advance", "--yes", playbook=path).returncode == 0  # → mirroring
        first = store.load().phase_since
        time.sleep(0.3)
        assert run_cli("advance", "--yes", *SKIP_DATA, playbook=path).returncode == 0  # → reads-on-target
        assert run_cli("rollback", "--yes", playbook=path).returncode == 0  # clean: clock kept
        st = store.load()
        since, kept = gates.mirror_clock(st)
        assert since.isoformat().startswith(first[:19]) and "rolled back" in kept
        plan = run_cli("plan", playbook=path)
        assert "clock kept since" in plan.stdout, plan.stdout

        assert run_cli("advance", "--yes", *SKIP_DATA, playbook=path).returncode == 0  # → reads-on-target
        write_dirty_mark(pb.state_path)
        assert run_cli("rollback", "--yes", playbook=path).returncode == 0  # dirty: the clock restarts
        st = store.load()
        since, kept = gates.mirror_clock(st)
        assert since == st.phase_started and kept == ""
        assert "dirty key" in [e for e in command.history(pb) if e["event"] == "transition-started"][-1]["mirror_clock"]["why_not"]


def test_status_does_not_say_in_sync_while_a_shim_was_lost(two):
    """A shim that died without draining in mirroring makes status say the target is NOT known to be in sync, and why."""
    src, tgt, path, pb = two
    force_phase(pb, Phase.MIRRORING)
    from migrator import registry

    dead = AckingShim(pb.state_path, pb.name, shim_id="crashed")
    dead.record.pid = 2 ** 22 + 12345  # no such process: a crashed shim
    registry.write(pb.state_path, dead.record)
    time.sleep(2.0)
    with AckingShim(pb.state_path, pb.name):  # another shim, live and owing nothing
        st = json.loads(run_cli("status", "--output", "json", playbook=path).stdout)
    assert st["other_side"].startswith("target: NOT known to be in sync"), st["other_side"]
    assert any(a.startswith("no_lost_shims") for a in st["alerts"]), st["alerts"]


def test_at_a_terminal_the_answer_is_judged_on_fresh_evidence(two):
    """At a real terminal (a pty): the shim stops while the prompt waits; "y" then refuses the step instead of journaling stale evidence."""
    import pty
    import re
    import select
    import subprocess
    import sys

    from migrator import registry

    src, tgt, path, pb = two
    force_phase(pb, Phase.COMPATIBLE)
    shim = AckingShim(pb.state_path, pb.name).__enter__()
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"}
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(path), "advance"], stdin=follower,
                            stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    out = bytearray()

    def read_until(pattern: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while pattern not in out and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.2)[0]:
                try:
                    out.extend(os.read(leader, 65536))
                except OSError:
                    return

    try:
        read_until(b"[y/N]")
        assert b"[y/N]" in out, out[-2000:]
        shim.__exit__(None, None, None)
        registry.remove(pb.state_path, shim.record.id)  # the only shim is gone while the prompt waits
        os.write(leader, b"y\n")
        read_until(b"FAILED")
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", out.decode("utf-8", "replace"))
    assert "in progress" not in text, text
    assert "shim_running" in text and "refused" in text, text
    assert StateStore(pb.state_path, pb.name).load().phase == Phase.COMPATIBLE
    refused = [x for x in command.history(pb) if x["event"] == "refused"][-1]
    assert refused.get("after") == "confirmation" and not any(
        x["event"] == "transition-started" for x in command.history(pb))
