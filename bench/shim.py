"""Benchmark the shim: redis-benchmark against the source directly and through the shim in each phase.

Usage: python bench/shim.py [--workers N] [--requests N] [--phases planned,mirroring,...] [--json FILE]

Starts a Redis 7.0 source and a Valkey 9.1 target (migrator.servers), runs ``migrator shim`` as
a child process, and for each phase runs redis-benchmark twice: throughput (``-P 16 -c 50``)
and latency (``-P 1 -c 1``), each also directly against the source, in the same run, so the
ratios compare like with like on a noisy machine. Prints requests/s, p50 and p99 for each and
the ratio to direct; ``--json`` also writes them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrator import playbook, registry, servers
from migrator.phases import Phase
from migrator.state import StateStore

PHASES = [Phase.PLANNED, Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET]
TESTS = "set,get"


def redis_benchmark(port: int, requests: int, pipeline: int, clients: int) -> dict[str, dict[str, float]]:
    exe = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
    out = subprocess.run([exe, "-p", str(port), "-t", TESTS, "-n", str(requests), "-P", str(pipeline), "-c", str(clients),
                          "-r", "100000", "--csv"], capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {out.stderr.strip()[-500:]}")
    rows = {}
    for row in csv.DictReader(io.StringIO(out.stdout)):
        rows[row["test"]] = {"rps": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]),
                             "p99_ms": float(row["p99_latency_ms"])}
    return rows


def set_phase(pb, phase: Phase) -> None:
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    if st.phase == phase:
        return
    st.phase, st.generation = phase, st.generation + 1
    store.save(st)
    ack = registry.await_ack(pb.state_path, st.generation, 10)
    if not ack.ok:
        raise RuntimeError(ack.evidence())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--requests", type=int, default=200_000, help="requests per throughput run")
    ap.add_argument("--latency-requests", type=int, default=20_000)
    ap.add_argument("--phases", default=",".join(p.value for p in PHASES))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    phases = [Phase(p) for p in args.phases.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="migrator-bench-"))
    src = servers.start("redis-7.0")
    tgt = servers.start("valkey-9.1")
    shim_port, admin_port = servers.free_port(), servers.free_port()
    pb_path = tmp / "migrator.yaml"
    pb_path.write_text(json.dumps({
        "version": 1, "name": "bench", "source": {"url": src.url}, "target": {"url": tgt.url},
        "shim": {"listen": f"127.0.0.1:{shim_port}", "admin": f"127.0.0.1:{admin_port}"},
        "state_dir": str(tmp / "state"),
    }))
    pb = playbook.load(pb_path)
    log = open(tmp / "shim.log", "wb")  # noqa: SIM115 - closed in the finally below, after the child exits
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "--log-level", "warning", "-p", str(pb_path), "shim",
                             "--workers", str(args.workers)], stdout=log, stderr=subprocess.STDOUT)
    results = []
    try:
        deadline = time.monotonic() + 30
        while len(registry.read_all(pb.state_path)) < args.workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shim did not start; see {tmp / 'shim.log'}")
            time.sleep(0.1)
        load = os.getloadavg()[0]
        for phase in phases:
            set_phase(pb, phase)
            for label, pipeline, clients, n in (("throughput", 16, 50, args.requests),
                                                ("latency", 1, 1, args.latency_requests)):
                direct = redis_benchmark(src.port, n, pipeline, clients)
                shim = redis_benchmark(shim_port, n, pipeline, clients)
                for test in direct:
                    d, s = direct[test], shim[test]
                    results.append({"phase": phase.value, "run": label, "test": test, "P": pipeline, "c": clients,
                                    "direct_rps": d["rps"], "shim_rps": s["rps"], "ratio": s["rps"] / d["rps"],
                                    "direct_p50_ms": d["p50_ms"], "shim_p50_ms": s["p50_ms"],
                                    "added_p50_ms": s["p50_ms"] - d["p50_ms"],
                                    "direct_p99_ms": d["p99_ms"], "shim_p99_ms": s["p99_ms"]})
        print(f"# {os.cpu_count()} CPUs, load average {load:.2f} at start, shim workers {args.workers}, "
              f"source {src.label}, target {tgt.label}")
        print(f"{'phase':<17} {'run':<10} {'test':<4} {'direct rps':>11} {'shim rps':>10} {'ratio':>6} "
              f"{'p50 d/s ms':>12} {'p99 d/s ms':>12} {'+p50 ms':>8}")
        for r in results:
            print(f"{r['phase']:<17} {r['run']:<10} {r['test']:<4} {r['direct_rps']:>11,.0f} {r['shim_rps']:>10,.0f} "
                  f"{r['ratio']:>6.0%} {r['direct_p50_ms']:>5.3f}/{r['shim_p50_ms']:<6.3f} "
                  f"{r['direct_p99_ms']:>5.3f}/{r['shim_p99_ms']:<6.3f} {r['added_p50_ms']:>8.3f}")
        if args.json:
            args.json.write_text(json.dumps({"load_average": load, "workers": args.workers, "results": results}, indent=2))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        src.stop()
        tgt.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
