"""Throughput through the shim with a cluster on both sides, next to the same shim between two standalone servers.

Usage: python bench/shim_cluster.py [--requests N] [--phase mirroring] [--json FILE]

Starts a Redis 7.0 source and a Valkey 9.1 target twice: standalone, then as clusters (3
primaries -> 4 primaries, no replicas; ``tests/topologies.py`` builds them). For each, runs
``migrator shim`` as a child process in ``--phase`` (mirroring by default) and
``redis-benchmark -t set,get -r 100000`` through it, pipelined (``-P 16 -c 50``) and not
(``-P 1 -c 50``), plus directly against the standalone source for scale. A plain (not cluster-aware)
redis-benchmark works against the facade: the shim owns every slot and routes by slot itself.
Prints requests/s and p50/p99 per test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shim import redis_benchmark, set_phase
from migrator import playbook, registry, servers
from migrator.phases import Phase
from tests import topologies

RUNS = {"pipelined": (16, 50), "unpipelined": (1, 50)}


def measure(tmp: Path, source: dict, target: dict, direct_port: int | None, phase: Phase, requests: int) -> dict:
    port, admin = servers.free_port(), servers.free_port()
    pb_path = tmp / "migrator.yaml"
    pb_path.write_text(json.dumps({
        "version": 1, "name": "bench", "source": source, "target": target, "mirror": {"strategy": "dual-write"},
        "shim": {"listen": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{admin}"}, "state_dir": str(tmp / "state"),
    }))
    pb = playbook.load(pb_path)
    log = open(tmp / "shim.log", "wb")  # noqa: SIM115 - closed below, after the child exits
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "--log-level", "warning", "-p", str(pb_path), "shim"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not registry.read_all(pb.state_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shim did not start; see {tmp / 'shim.log'}")
            time.sleep(0.1)
        set_phase(pb, phase)
        out = {}
        for run, (pipeline, clients) in RUNS.items():
            out[run] = {"shim": redis_benchmark(port, requests, pipeline, clients, pid=proc.pid)}
            if direct_port is not None:
                out[run]["direct"] = redis_benchmark(direct_port, requests, pipeline, clients)
        return out
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--phase", default="mirroring")
    ap.add_argument("--json")
    args = ap.parse_args()
    phase = Phase(args.phase)
    results = {}
    with tempfile.TemporaryDirectory(prefix="migrator-bench-") as d:
        src, tgt = servers.start("redis-7.0"), servers.start("valkey-9.1")
        try:
            (Path(d) / "standalone").mkdir()
            results["standalone"] = measure(Path(d) / "standalone", {"url": src.url}, {"url": tgt.url}, src.port,
                                            phase, args.requests)
        finally:
            src.stop()
            tgt.stop()
        with topologies.start_cluster("redis-7.0", primaries=3, replicas=0) as sc, \
                topologies.start_cluster("valkey-9.1", primaries=4, replicas=0) as tc:
            (Path(d) / "cluster").mkdir()
            results["cluster"] = measure(Path(d) / "cluster", sc.endpoint(), tc.endpoint(), None,
                                         phase, args.requests)
    print(f"phase {phase}; {args.requests} requests per test; requests/s (p50 / p99 ms)")
    print(f"{'run':<12} {'test':<5} {'direct source':>24} {'shim, standalone':>24} {'shim, clusters':>24} {'cluster/standalone':>19}")
    for run in RUNS:
        for test in results["standalone"][run]["shim"]:
            d = results["standalone"][run]["direct"][test]
            s = results["standalone"][run]["shim"][test]
            c = results["cluster"][run]["shim"][test]
            cell = lambda r: f"{r['rps']:>9.0f} ({r['p50_ms']:.2f} / {r['p99_ms']:.2f})"
            print(f"{run:<12} {test:<5} {cell(d):>24} {cell(s):>24} {cell(c):>24} {c['rps'] / s['rps']:>18.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
