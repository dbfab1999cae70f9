"""Cutover with several real shims: a shim killed in the middle of a switch, and one restarted."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from migrator import playbook, registry
from migrator.demo import ShimProcess
from migrator.servers import free_port
from migrator.state import StateStore
from migrator.workload import Workload
from tests.helpers import run_cli, start_cli, wait_for


@pytest.mark.slow
def test_a_shim_killed_mid_switch_is_ignored_and_a_restarted_one_applies_the_phase(server_factory, make_playbook, tmp_path):
    """advance waits for a frozen shim; killed -9 meanwhile, it is dead and the switch completes; restarted, it applies the phase."""
    src, tgt = server_factory("redis-7.0"), server_factory("valkey-8.1")
    path = make_playbook(src, tgt, shim={"ack_timeout": "30s"})
    pb = playbook.load(path)
    a = ShimProcess(path, tmp_path / "a.log")
    b = ShimProcess(path, tmp_path / "b.log", listen=f"127.0.0.1:{free_port()}")
    workload = None
    try:
        wait_for(lambda: a.registered(pb.state_path) and b.registered(pb.state_path), timeout=30, what="both shims")
        assert run_cli("advance", "--yes", "--override", "compatibility", "--reason", "covered by test_compat",
                       playbook=path).returncode == 0
        assert run_cli("advance", "--yes", playbook=path).returncode == 0  # → mirroring: both shims live
        workload = Workload(f"redis://{pb.shim.listen}/0", clients=2, rate=100.0, seed=3).start()
        time.sleep(0.5)
        for cmd in (("sync",), ("sync", "--dirty"), ("check", "--full")):
            out = run_cli(*cmd, playbook=path)
            assert out.returncode == 0, out.stdout + out.stderr

        os.kill(b.proc.pid, signal.SIGSTOP)  # alive but silent: it must hold the switch up
        proc = start_cli("advance", "--yes", playbook=path)
        store = StateStore(pb.state_path, pb.name)
        wait_for(lambda: store.load().transition is not None, timeout=20, what="the switch to start")
        time.sleep(0.5)
        assert proc.poll() is None, "advance must wait for the frozen shim"
        os.kill(b.proc.pid, signal.SIGKILL)  # killed in the middle of the switch
        b.proc.wait(10)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stdout + stderr
        assert "1 of 1 shim(s) applied generation" in stdout
        assert store.load().phase.value == "reads-on-target" and store.load().transition is None

        b2 = ShimProcess(path, tmp_path / "b2.log", listen=b.listen)
        try:
            wait_for(lambda: b2.registered(pb.state_path), timeout=30, what="the restarted shim")
            st = store.load()
            wait_for(lambda: all(r.applied_generation == st.generation for r in registry.active(pb.state_path)),
                     what="every shim on one phase")
            status = json.loads(run_cli("status", "--output", "json", playbook=path).stdout)
            live = [s for s in status["shims"] if s["liveness"] == "live"]
            assert len(live) == 2 and {s["applied_phase"] for s in live} == {"reads-on-target"}
        finally:
            b2.stop()
        workload.stop()
        audit = workload.audit(tgt.client())
        assert audit.ok and not audit.errors, (audit.problems[:5], audit.errors[:5])
        assert run_cli("check", "--full", playbook=path).returncode == 0
    finally:
        if workload is not None:
            workload.stop()
        b.stop()
        a.stop()
