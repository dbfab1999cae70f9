"""Fleet benchmarks (issue 13): `python bench/fleet.py [--only throughput,copy,cutover,shim-death]`.

- ``throughput``: mirroring through 1, 2 and 3 shim processes with the replication strategy, and
  through one shim with dual-write, each from a fresh Redis 7.0 → Valkey 9.1 pair walked to
  ``mirroring`` by ``migrator.command.advance``. ``redis-benchmark -t set,get -r 100000`` runs
  against every shim at once (``-c 50`` each; ``-P 1`` unpipelined and ``-P 16`` pipelined) and
  the figures add up; the source directly is measured in the same round. The CPU each shim tree
  spent per command (``/proc``) is the machine-independent figure to size a fleet with.
- ``copy``: the initial copy of ``--keys`` mixed keys: the strategy's (``advance`` to mirroring,
  which attaches the target with REPLICAOF, until the replica is in sync) against a native
  ``REPLICAOF`` into a fresh Valkey, interleaved ``--repeat`` times, each timed from the source
  starting the full sync (and from the command). Target: ≥ 90% of native.
- ``cutover``: the write cutover with the role swap, ``--rounds`` times forth (``advance`` to
  writes-on-target) and back (``rollback``), with writers through a shim: the pause the shims
  report, the time the step took, what the step's evidence says about the swap, and the slowest
  write a client saw. Target: ≤ 100 ms.
- ``shim-death``: what a client sees when its shim is killed (SIGKILL) under it: through the
  shim directly, and through HAProxy (TCP, health-checked) in front of two shims.

Not a test: it prints figures (``--json FILE`` keeps them) for docs/deploy.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench._common import load_mixed
from bench.cutover import Writers, worst_during
from bench.shim import proc_cpu
from migrator import command, playbook, registry, replication, servers
from migrator.data import check

SOURCE, TARGET = "redis-7.0", "valkey-9.1"
RUNS = {"unpipelined": 1, "pipelined": 16}
TESTS = "set,get"


# --- a migration with a fleet of shims ----------------------------------------------------------
class Fleet:
    """A Redis → Valkey migration in a temporary folder with ``len(workers)`` shim processes."""

    def __init__(self, strategy: str, shims: int = 1, source: str = SOURCE, target: str = TARGET,
                 control: dict | None = None, source_config: dict | None = None, keep_source=None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="migrator-bench-fleet-"))
        self.src = keep_source or servers.start(source, config=source_config or {"repl-diskless-sync-delay": "0"})
        self._own_src = keep_source is None
        self.tgt = servers.start(target)
        self.strategy = strategy
        doc = {"version": 1, "name": "bench-fleet", "source": {"url": self.src.url}, "target": {"url": self.tgt.url},
               "shim": {"listen": f"127.0.0.1:{servers.free_port()}", "admin": f"127.0.0.1:{servers.free_port()}"},
               "state_dir": str(self.dir / "state"), "mirror": {"strategy": strategy},
               # The gates' own thresholds are tested elsewhere; a loaded benchmark machine's p99 is not the point.
               "steps": {"mirror": {"min_duration": "0s", "min_compared": 0, "latency_floor_ms": 1000},
                         "read_cutover": {"min_duration": "0s", "min_compared": 0, "latency_floor_ms": 1000},
                         "write_cutover": {"rollback_window": "0s"}}}
        if control:
            doc["control"] = control
        self.path = self.dir / "migrator.yaml"
        self.path.write_text(json.dumps(doc))
        self.pb = playbook.load(self.path)
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        self._logs = []
        for i in range(shims):
            port = servers.free_port()
            log = (self.dir / f"shim{i + 1}.log").open("wb")
            self._logs.append(log)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "migrator", "--log-level", "warning", "-p", str(self.path), "shim",
                 "--listen", f"127.0.0.1:{port}", "--admin", ""], stdout=log, stderr=subprocess.STDOUT))
            self.ports.append(port)
        deadline = time.monotonic() + 30
        while len([r for r in registry.read_all(self.pb.state_path) if r.liveness() == "live"]) < shims:
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                raise RuntimeError(f"shims did not start; see {self.dir}/shim*.log")
            time.sleep(0.1)

    def to_mirroring(self) -> float:
        """planned → compatible → mirroring (the real pre-flight); seconds until the target is in step."""
        command.advance(self.pb)
        t0 = time.monotonic()
        command.advance(self.pb)
        if self.strategy == "replication":
            wait_in_sync(self.src.client(), self.tgt.client())
        return time.monotonic() - t0

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self._logs:
            log.close()
        self.tgt.stop()
        if self._own_src:
            self.src.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def fleet(*a, **kw):
    f = Fleet(*a, **kw)
    try:
        yield f
    finally:
        f.close()


def wait_in_sync(src: redis.Redis, tgt: redis.Redis, timeout: float = 600) -> None:
    """Until the target replicates the source with its link up, no sync loading, offsets equal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = replication.read(tgt)
        if (t.is_replica and t.link_up and not t.sync_in_progress
                and t.replica_offset == replication.read(src).master_repl_offset):
            return
        time.sleep(0.005)
    raise RuntimeError("the target did not get in sync")


# --- throughput ------------------------------------------------------------------------------------
def benchmark_many(ports: list[int], requests: int, pipeline: int, clients: int) -> dict[str, float]:
    """redis-benchmark against every port at once; requests/s per test, summed over the ports."""
    exe = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
    procs = [subprocess.Popen([exe, "-p", str(p), "-t", TESTS, "-n", str(requests), "-P", str(pipeline),
                               "-c", str(clients), "-r", "100000", "--csv"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in ports]
    total: dict[str, float] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"redis-benchmark failed: {err.strip()[-300:]}")
        for row in csv.DictReader(io.StringIO(out)):
            total[row["test"]] = total.get(row["test"], 0.0) + float(row["rps"])
    return total


def throughput(args) -> list[dict]:
    rows = []
    for strategy, shims in args.configs:
        with fleet(strategy, shims) as f:
            f.to_mirroring()
            for run in args.runs:
                pipeline = RUNS[run]
                for rnd in range(args.repeat):
                    direct = benchmark_many([f.src.port], args.requests, pipeline, 50)
                    cpu0 = sum(proc_cpu(p.pid) for p in f.procs)
                    through = benchmark_many(f.ports, args.requests, pipeline, 50)
                    cpu = sum(proc_cpu(p.pid) for p in f.procs) - cpu0
                    cmds = args.requests * len(TESTS.split(",")) * shims
                    row = {"strategy": strategy, "shims": shims, "run": run, "round": rnd,
                           "direct": direct, "through": through, "shim_cpu_us_per_cmd": cpu * 1e6 / cmds}
                    rows.append(row)
                    print(f"{strategy:<12} {shims} shim(s) {run:<12} round {rnd + 1}: "
                          + "  ".join(f"{t} {through[t]:>9,.0f}/s ({through[t] / direct[t]:.0%} of direct {direct[t]:,.0f})"
                                      for t in through)
                          + f"  shim CPU {row['shim_cpu_us_per_cmd']:.1f} us/cmd", flush=True)
    print(f"\n# throughput, medians of {args.repeat} round(s), {os.cpu_count()} CPUs shared by servers, shims and "
          f"redis-benchmark")
    print(f"{'mirroring':<24} {'run':<12} " + " ".join(f"{t:>18}" for t in ("SET", "GET")) + f" {'CPU us/cmd':>11}")
    for strategy, shims in args.configs:
        for run in args.runs:
            rs = [r for r in rows if r["strategy"] == strategy and r["shims"] == shims and r["run"] == run]
            if not rs:
                continue
            cells = []
            for t in ("SET", "GET"):
                rps = statistics.median(r["through"][t] for r in rs)
                ratio = statistics.median(r["through"][t] / r["direct"][t] for r in rs)
                cells.append(f"{rps:>9,.0f} ({ratio:>4.0%})")
            cpu = statistics.median(r["shim_cpu_us_per_cmd"] for r in rs)
            print(f"{strategy + f', {shims} shim(s)':<24} {run:<12} " + " ".join(f"{c:>18}" for c in cells)
                  + f" {cpu:>11.1f}")
    return rows


# --- initial copy ------------------------------------------------------------------------------------
def follow_copy(src: redis.Redis, tgt: redis.Redis, t0: float, full_before: int, timeout: float = 600) -> tuple[float, float]:
    """(seconds from ``t0``, seconds from the source starting the full sync) until the target is in
    sync. A replica connects to its primary on its next replication tick, up to a second after
    REPLICAOF, whichever path sent it: the second figure leaves that out."""
    began = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = time.monotonic()
        s = replication.read(src, with_stats=True)
        if began is None and (s.sync_full or 0) > full_before:
            began = now
        t = replication.read(tgt)
        if t.is_replica and t.link_up and not t.sync_in_progress and t.replica_offset == s.master_repl_offset:
            return now - t0, now - (began if began is not None else t0)
        time.sleep(0.002)
    raise RuntimeError("the target did not get in sync")


def copy(args) -> list[dict]:
    rows = []
    with servers.running(SOURCE, config={"repl-diskless-sync-delay": "0"}) as src:
        load_mixed(src.client(), args.keys)
        sc = src.client()
        used = sc.info("memory")["used_memory_human"]
        for i in range(args.repeat):
            # Alternate which goes first: the source's state after one full sync (its fork's
            # memory, its backlog) must not favour either.
            for which in (("native", "strategy") if i % 2 == 0 else ("strategy", "native")):
                full_before = replication.read(sc, with_stats=True).sync_full or 0
                if which == "native":
                    with servers.running(TARGET) as native_dst:
                        nc = native_dst.client()
                        t0 = time.monotonic()
                        nc.replicaof(src.host, src.port)
                        native_s, native_copy_s = follow_copy(sc, nc, t0, full_before)
                        nc.replicaof("no", "one")
                    continue
                with fleet("replication", 1, keep_source=src) as f:
                    command.advance(f.pb)  # the pre-flight, not part of the copy
                    t0 = time.monotonic()
                    command.advance(f.pb)  # attach: REPLICAOF, then the server's own full sync
                    attached = time.monotonic() - t0
                    strategy_s, strategy_copy_s = follow_copy(sc, f.tgt.client(), t0, full_before)
                    keys = f.tgt.client().dbsize()
                    command.rollback(f.pb)  # detach the target, so that the source serves the next copy alone
            row = {"run": i + 1, "keys": args.keys, "native_s": native_s, "strategy_s": strategy_s,
                   "native_copy_s": native_copy_s, "strategy_copy_s": strategy_copy_s, "advance_s": attached,
                   "ratio": native_copy_s / strategy_copy_s, "ratio_from_command": native_s / strategy_s,
                   "target_keys": keys}
            rows.append(row)
            print(f"copy run {i + 1}: {args.keys:,} keys ({used}): from the source starting the sync to in sync: "
                  f"native {native_copy_s:.2f} s, strategy {strategy_copy_s:.2f} s, ratio {row['ratio']:.0%}; from "
                  f"REPLICAOF / advance: native {native_s:.2f} s, strategy {strategy_s:.2f} s (advance returned after "
                  f"{attached:.2f} s); target holds {keys:,} keys", flush=True)
    med = statistics.median(r["ratio"] for r in rows)
    med_cmd = statistics.median(r["ratio_from_command"] for r in rows)
    print(f"\n# initial copy: median {med:.0%} of native over {len(rows)} run(s) (target >= 90%): "
          + ("met" if med >= 0.9 else "MISSED") + f"; from the command: {med_cmd:.0%}; load average "
          f"{os.getloadavg()[0]:.1f}")
    return rows


# --- write cutover with the role swap -------------------------------------------------------------------
def _swap_evidence(result) -> dict:
    out = {}
    for a in result.actions:
        if a.name == "write_pause":
            out["max_pause_ms"] = a.data.get("max_pause_ms")
        elif a.data:
            out[a.name] = {k: v for k, v in a.data.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return out


def cutover(args) -> list[dict]:
    rows = []
    for source in args.cutover_sources:
        with fleet("replication", 1, source=source) as f:
            f.to_mirroring()
            writers = Writers(f"redis://127.0.0.1:{f.ports[0]}/0", args.clients).start()
            try:
                time.sleep(1.0)
                check.run(f.pb, full=True)  # the consistency gate's evidence, in each phase
                command.advance(f.pb)  # → reads-on-target
                for i in range(args.rounds):
                    for direction in ("advance", "rollback"):
                        fn = command.advance if direction == "advance" else command.rollback
                        if direction == "advance":
                            check.run(f.pb, full=True)
                        t0 = time.perf_counter()
                        r = fn(f.pb)
                        t1 = time.perf_counter()
                        ev = _swap_evidence(r)
                        swap = next((e for e in reversed(command.store_for(f.pb).read_journal())
                                     if e.get("event") == "role-swap"), None)
                        if swap is not None:
                            d = swap.get("data") or {}
                            ev["swap"] = {"reverse": swap.get("reverse"),
                                          **{k: d[k] for k in ("resync", "offsets_equal_ms", "resync_ms", "fallback")
                                             if k in d}}
                        rows.append({"source": source, "round": i + 1, "direction": direction,
                                     "to": r.to_phase.value, "step_ms": (t1 - t0) * 1000,
                                     "max_pause_ms": ev.get("max_pause_ms"), "evidence": ev,
                                     "window": (t0, t1)})
                        time.sleep(0.5)
            finally:
                writers.stop()
            for row in rows:
                if row["source"] == source:
                    row["slowest_write_ms"] = worst_during(writers.samples, *row.pop("window"))
            base = [lat * 1000 for _t, lat in writers.samples]
            print(f"# {source} → {TARGET}: {len(base)} writes through the shim, {writers.errors} errors, "
                  f"p50 {statistics.median(base):.2f} ms, p99 {statistics.quantiles(base, n=100)[98]:.2f} ms")
            for row in rows:
                if row["source"] == source:
                    print(f"{row['direction']:<9} → {row['to']:<17} step {row['step_ms']:7.1f} ms, shims held "
                          f"{row['max_pause_ms'] or 0:6.1f} ms, slowest write {row['slowest_write_ms']:6.1f} ms; "
                          f"evidence {json.dumps(row['evidence'])[:300]}", flush=True)
            mine = [r for r in rows if r["source"] == source and r["direction"] == "advance"]
            held = [r["max_pause_ms"] or 0.0 for r in mine]
            worst = [r["slowest_write_ms"] for r in mine]
            print(f"# write cutover {source}: shims held median {statistics.median(held):.1f} ms, max {max(held):.1f} ms; "
                  f"slowest write median {statistics.median(worst):.1f} ms, max {max(worst):.1f} ms (target <= 100 ms)")
    return rows


# --- a shim killed under its client --------------------------------------------------------------------------
HAPROXY_CFG = """global
  nbthread 1
defaults
  mode tcp
  timeout connect 1s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:{listen}
  default_backend b
backend b
  balance leastconn
  option tcp-check
  default-server inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
{servers}
"""


class Prober:
    """One redis-py client (reconnecting with backoff, as applications do) sending INCR in a loop."""

    def __init__(self, url: str, retries: int) -> None:
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.c = redis.Redis.from_url(url, socket_timeout=5, retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), retries),
                                      retry_on_error=[redis.exceptions.ConnectionError])
        self.events: list[tuple[float, str]] = []  # (time, "ok" | error text)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.c.incr("probe")
                self.events.append((time.monotonic(), "ok"))
            except redis.exceptions.RedisError as e:
                self.events.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                time.sleep(0.05)
            time.sleep(0.002)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def after(self, t: float) -> dict:
        """What the client saw after ``t``: its errors, and the longest it went without a reply
        (a command in flight at ``t`` may still complete just after it)."""
        later = [(ts, what) for ts, what in self.events if ts >= t]
        errors = [what for _ts, what in later if what != "ok"]
        oks = [max((ts for ts, what in self.events if ts < t and what == "ok"), default=t)]
        oks += [ts for ts, what in later if what == "ok"]
        gaps = [b - a for a, b in itertools.pairwise(oks)]
        return {"errors": len(errors), "first_error": errors[0] if errors else None,
                "gap_ms": max(gaps) * 1000 if gaps else None}


def shim_death(args) -> list[dict]:
    rows = []
    with fleet("replication", 2) as f:
        f.to_mirroring()
        # 1. The client's own shim (a sidecar) is killed and restarted 2 s later (systemd's RestartSec).
        for retries in (0, 40):
            probe = Prober(f"redis://127.0.0.1:{f.ports[0]}/0", retries).start()
            time.sleep(1.0)
            victim = f.procs[0]
            t_kill = time.monotonic()
            victim.kill()
            victim.wait()
            time.sleep(2.0)
            f.procs[0] = subprocess.Popen(
                [sys.executable, "-m", "migrator", "--log-level", "warning", "-p", str(f.path), "shim",
                 "--listen", f"127.0.0.1:{f.ports[0]}", "--admin", ""], stdout=f._logs[0], stderr=subprocess.STDOUT)
            time.sleep(3.0)
            probe.stop()
            seen = probe.after(t_kill)
            rows.append({"case": f"own shim killed, restarted after 2 s, client retries={retries}", **seen})
        # 2. Two shims behind HAProxy (TCP, health-checked): one is killed and stays down.
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if Path(haproxy).exists():
            lb = servers.free_port()
            cfg = f.dir / "haproxy.cfg"
            cfg.write_text(HAPROXY_CFG.format(listen=lb, servers="\n".join(
                f"  server s{i} 127.0.0.1:{p} check" for i, p in enumerate(f.ports))))
            hp = subprocess.Popen([haproxy, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1.5)
                for retries in (0, 40):
                    probe = Prober(f"redis://127.0.0.1:{lb}/0", retries).start()
                    time.sleep(1.0)
                    # kill the shim this client's connection went to
                    conns = {p: _established(p) for p in f.ports}
                    idx = max(range(len(f.ports)), key=lambda i: conns[f.ports[i]])
                    t_kill = time.monotonic()
                    f.procs[idx].kill()
                    f.procs[idx].wait()
                    time.sleep(3.0)
                    probe.stop()
                    seen = probe.after(t_kill)
                    rows.append({"case": f"behind HAProxy, its shim killed (the other lives), client retries={retries}",
                                 "connections_to_shims": list(conns.values()), **seen})
                    f.procs[idx] = subprocess.Popen(
                        [sys.executable, "-m", "migrator", "--log-level", "warning", "-p", str(f.path), "shim",
                         "--listen", f"127.0.0.1:{f.ports[idx]}", "--admin", ""], stdout=f._logs[idx],
                        stderr=subprocess.STDOUT)
                    time.sleep(3.0)
            finally:
                hp.terminate()
                hp.wait(10)
    for r in rows:
        print(f"{r['case']}: {r['errors']} error(s) seen by the client"
              + (f" (first: {r['first_error']})" if r["first_error"] else "")
              + (f"; at most {r['gap_ms']:.0f} ms between two replies around the kill" if r["gap_ms"] else
                 "; no success after the kill"))
    return rows


def _established(port: int) -> int:
    """Established TCP connections to a local port (from /proc/net/tcp)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "01" and int(parts[1].split(":")[1], 16) == port:
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="throughput,copy,cutover,shim-death")
    ap.add_argument("--requests", type=int, default=100_000, help="requests per redis-benchmark (per shim)")
    ap.add_argument("--runs", default="unpipelined,pipelined")
    ap.add_argument("--configs", default="dual-write:1,replication:1,replication:2,replication:3",
                    help="throughput: STRATEGY:SHIMS, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys for the initial copy")
    ap.add_argument("--rounds", type=int, default=5, help="write cutovers (and rollbacks)")
    ap.add_argument("--clients", type=int, default=4, help="writer clients during the cutover")
    ap.add_argument("--cutover-sources", default="redis-7.0,redis-6.2")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.runs = [r for r in args.runs.split(",") if r]
    args.configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",") if c]
    args.cutover_sources = [s for s in args.cutover_sources.split(",") if s and servers.find(s)]
    out = {"cpus": os.cpu_count(), "load_start": os.getloadavg()[0]}
    for part in args.only.split(","):
        print(f"\n## {part}", flush=True)
        out[part] = {"throughput": throughput, "copy": copy, "cutover": cutover, "shim-death": shim_death}[part](args)
    out["load_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
