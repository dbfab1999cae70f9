"""``migrator status --watch``: a live view of the migration, redrawn until Ctrl-C.

The watch runs as a real process, on a pseudo-terminal (rich's live display) or with
``--output json`` (one JSON object a line), against real servers, a real shim and a real sync
running in another process.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from migrator.data import check, progress, sync
from migrator.phases import Phase
from tests.helpers import run_cli
from tests.test_cli_terminal import _ANSI
from tests.test_data_helpers import FAST, bulk, load

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "60"}
    env.pop("NO_COLOR", None)
    return env


class Watch:
    """``python -m migrator -p PLAYBOOK ARGS`` on a pseudo-terminal (stdin, stdout, stderr), read as it draws."""

    def __init__(self, playbook: Path, *args: str) -> None:
        self.leader, follower = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(playbook), *args], stdin=follower,
                                     stdout=follower, stderr=follower, env=_env(), close_fds=True)
        os.close(follower)
        self.raw = bytearray()

    @property
    def text(self) -> str:
        return _ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def read_until(self, done, timeout: float = 60, what: str = "output") -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.text):
                return self.text
            ready, _, _ = select.select([self.leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.leader, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                self.raw += chunk
            elif self.proc.poll() is not None:
                break
        raise AssertionError(f"no {what} within {timeout}s (exit {self.proc.poll()}): {self.text[-3000:]}")

    def interrupt(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=timeout)
        try:  # what it printed while stopping
            while select.select([self.leader], [], [], 0.2)[0]:
                chunk = os.read(self.leader, 65536)
                if not chunk:
                    break
                self.raw += chunk
        except OSError:
            pass
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.leader)


def _json_watch(playbook: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(playbook), "status", "--watch", "--output",
                             "json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), text=True)


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_watch_redraws_phase_shims_and_gates_on_a_terminal_and_ctrl_c_exits_0(server_factory, make_env):
    """On a terminal the watch redraws the phase, the running shim and the next step's gates, and Ctrl-C ends it with exit 0."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"), **FAST,
                   steps={"mirror": {"min_duration": "1h", "min_compared": 0}})
    env.set_phase(Phase.MIRRORING)
    w = Watch(env.pb.path, "status", "--watch", "--interval", "0.5")
    try:
        t0 = time.monotonic()
        out = w.read_until(lambda t: t.count("Next advance:") >= 2, what="two redraws")
        took = time.monotonic() - t0
        rc = w.interrupt()
        out = w.text
    finally:
        w.close()
    assert rc == 0, out
    assert "Traceback" not in out and "interrupted" not in out, out
    assert took < 30, f"two redraws took {took:.1f}s"
    assert "Phase: mirroring" in out
    assert f":{env.port}" in out  # the running shim's listen address
    assert "(gen " in out and "Shims: none running" not in out  # the running shim, with its generation
    assert "Next advance: mirroring → reads-on-target" in out
    assert "shim_ack" in out and "mirror_duration" in out  # the gates of that step, by name
    assert re.search(r"mirror_duration: \d+s of 1h \(59m\d+s to go\)", out), out  # time in phase against the gate
    assert "replies compared" in out and "Dirty keys: 0" in out


def test_watch_json_prints_one_object_a_line_each_interval(server_factory, make_env):
    """With --output json the watch prints one complete JSON object a line, every interval, with the live fields."""
    env = make_env(server_factory("redis-7.0"), server_factory("valkey-9.1"), **FAST)
    env.set_phase(Phase.MIRRORING)
    c = env.client()
    for i in range(20):
        c.set(f"k{i}", i)
        c.get(f"k{i}")
    env.flush()
    proc = _json_watch(env.pb.path, "--interval", "0.3")
    try:
        lines, stamps = [], []
        for _ in range(3):
            lines.append(proc.stdout.readline())  # blocks until the line is flushed
            stamps.append(time.monotonic())
    finally:
        rc, err = _stop(proc)
    assert rc == 0, err
    assert "Traceback" not in err, err
    objs = [json.loads(line) for line in lines]
    for o in objs:
        assert o["phase"] == "mirroring"
        assert len(o["shims"]) == 1 and o["shims"][0]["applied_generation"] == o["generation"]
        assert o["next"]["to"] == "reads-on-target"
        assert {g["gate"] for g in o["next"]["gates"]} >= {"shim_ack", "mirror_duration"}
        assert o["mirror"]["compared"] >= 20 and o["mirror"]["divergent"] == 0
        assert o["mirror"]["divergence_rate"] == 0
        assert o["dirty_keys"] == 0 and set(o["jobs"]) == {"sync", "check"}
    # One sample an interval, not a burst: the three were taken over at least two intervals (0.6 s).
    assert objs[2]["time_in_phase_s"] - objs[0]["time_in_phase_s"] >= 0.5, [o["time_in_phase_s"] for o in objs]
    assert stamps[2] - stamps[0] < 20, stamps


def test_watch_shows_a_running_sync_with_progress_and_eta(server_factory, make_playbook):
    """A sync running in another process appears in the watch with keys done of the total, its rate and an ETA."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    n, rate = 15000, 3000
    bulk(src.client(), n)
    path = make_playbook(src, dst, **FAST)
    sync = subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(path), "sync", "--rate", str(rate)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(), text=True)
    proc = _json_watch(path, "--interval", "0.3")
    w = None
    try:
        running = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = json.loads(proc.stdout.readline())["jobs"]["sync"]
            if job and job["state"] == "running" and job["eta_s"] is not None and job["done"] > 0:
                running = job
                break
        assert running is not None, "no running sync with an ETA seen in the watch"
        assert running["total"] == n and running["pid"] == sync.pid
        assert 0 < running["percent"] < 100
        # The rate is the sync's --rate (within what a token bucket and 1-s samples allow), and
        # the ETA what is left at that rate.
        assert rate * 0.5 <= running["rate"] <= rate * 1.5, running
        left = (n - running["done"]) / rate
        assert left * 0.5 - 1 <= running["eta_s"] <= left * 2 + 1, running
        # The same on a terminal, in words.
        w = Watch(path, "status", "--watch", "--interval", "0.5")
        out = w.read_until(lambda t: "Sync: full running" in t and "ETA " in t, what="the sync in the live view")
        assert f"/{n:,} keys" in out and "keys/s" in out
        assert w.interrupt() == 0
        # When the sync ends, the watch says so.
        assert sync.wait(timeout=60) == 0, sync.stderr.read()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            job = json.loads(proc.stdout.readline())["jobs"]["sync"]
            if job["state"] != "running":
                break
        assert job["state"] == "complete" and job["done"] == n and job["eta_s"] is None, job
    finally:
        rc, err = _stop(proc)
        if w is not None:
            w.close()
        if sync.poll() is None:
            sync.kill()
            sync.wait()
    assert rc == 0, err


def test_a_check_publishes_its_progress_and_how_it_ended(server_factory, make_playbook):
    """A full check publishes keys compared of the keys expected, and when it ends says it finished, with no ETA."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    n = 3000
    bulk(src.client(), n)
    pb = load(make_playbook(src, dst, **FAST))
    sync.run(pb)
    assert progress.read(pb.state_path, "check") is None  # no check has run: nothing to show
    check.run(pb, full=True)
    job = progress.read(pb.state_path, "check")
    assert job["state"] == "finished" and job["mode"] == "full", job
    assert job["done"] == job["total"] == n and job["percent"] == 100 and job["eta_s"] is None, job
    done = progress.read(pb.state_path, "sync")
    assert done["state"] == "complete" and done["done"] == n and done["pid"] == os.getpid(), done


def test_a_job_whose_process_is_gone_reads_as_interrupted(server_factory, make_playbook):
    """A sync killed outright (SIGKILL, no chance to say so) is shown as interrupted, not as running forever."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    bulk(src.client(), 5000)
    path = make_playbook(src, dst, **FAST)
    pb = load(path)
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "-p", str(path), "sync", "--rate", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            job = progress.read(pb.state_path, "sync")
            if job and job["state"] == "running" and job["done"] > 0:
                break
            time.sleep(0.1)
        assert job and job["state"] == "running", job
    finally:
        proc.kill()
        proc.wait()
    job = progress.read(pb.state_path, "sync")
    assert job["state"] == "interrupted" and job["eta_s"] is None and 0 < job["done"] < 5000, job


def test_watch_keeps_running_with_a_side_down_and_names_it(server_factory, make_env):
    """A side stopped while the watch runs is shown as an alert and a failing gate; the watch keeps drawing and Ctrl-C still exits 0."""
    src, dst = server_factory("redis-7.0"), server_factory("valkey-9.1")
    env = make_env(src, dst, **FAST)
    env.set_phase(Phase.MIRRORING)
    proc = _json_watch(env.pb.path, "--interval", "0.3")
    try:
        first = json.loads(proc.stdout.readline())
        assert first["sides"]["target"]["reachable"], first["alerts"]
        dst.stop()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            o = json.loads(proc.stdout.readline())
            if not o["sides"]["target"]["reachable"]:
                break
        # The gates of the same line were evaluated with the target down (they are cheap: every line).
        sides_live = next(g for g in o["next"]["gates"] if g["gate"] == "sides_live")
        took = time.monotonic() - t0
    finally:
        rc, err = _stop(proc)
    assert rc == 0 and "Traceback" not in err, err
    assert not o["sides"]["target"]["reachable"] and any("target" in a and "unreachable" in a for a in o["alerts"]), o["alerts"]
    assert not o["next"]["allowed"] and not sides_live["passed"] and "target" in sides_live["evidence"], sides_live
    assert took < 10, f"the watch took {took:.1f}s to show the side down"


def test_interval_without_watch_or_below_its_bound_is_a_usage_error(tmp_path, make_playbook):
    """--interval without --watch, or below 0.1 s, is refused with one line and exit 2 before anything is probed."""
    path = make_playbook("redis://127.0.0.1:1", "redis://127.0.0.1:2")
    r = run_cli("status", "--interval", "2", playbook=path)
    assert r.returncode == 2 and "--interval is only meaningful with --watch" in r.stderr, r.stderr
    r = run_cli("status", "--watch", "--interval", "0", playbook=path)
    assert r.returncode == 2 and "--interval" in r.stderr and "Traceback" not in r.stderr, r.stderr
