"""Benchmark the shim: redis-benchmark against the source directly and through the shim in each phase.

Usage: python bench/shim.py [--workers N] [--requests N] [--phases planned,mirroring,...] [--repeat N] [--json FILE]

Starts a Redis 7.0 source and a Valkey 9.1 target (migrator.servers), runs ``migrator shim`` as
a child process, and for each phase runs redis-benchmark twice: throughput (``-P 16 -c 50``)
and latency (``-P 1 -c 1``), each also directly against the source, in the same run, so the
ratios compare like with like on a noisy machine. Prints requests/s, p50 and p99 for each and
the ratio to direct; ``--json`` also writes them.

The same throughput runs also go through reference proxies that do no work at all
(``bench/reference_proxy.py``: a uvloop forwarder, and a mirror that writes every byte to both
servers and throws the shadow's replies away) and, when ``haproxy`` is installed, HAProxy in TCP
mode (one thread): the ceiling any proxy reaches on this machine, where the load generator, the
servers and the proxy share two cores. ``--no-reference`` skips them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from migrator import playbook, registry, servers
from migrator.phases import Phase
from migrator.state import StateStore

HAPROXY_CFG = """global
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend f
  bind 127.0.0.1:{listen}
  default_backend b
backend b
  server s 127.0.0.1:{upstream}
"""

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


def start_references(tmp: Path, src_port: int, tgt_port: int) -> tuple[dict[str, int], list[subprocess.Popen]]:
    """Reference proxies, by name -> port: ``forward`` (to the source), ``mirror`` (source answers,
    target shadows), ``mirror-back`` (target answers, source shadows), ``haproxy`` if installed."""
    script = Path(__file__).with_name("reference_proxy.py")
    ports: dict[str, int] = {}
    procs: list[subprocess.Popen] = []
    for name, upstreams in (("forward", [src_port]), ("mirror", [src_port, tgt_port]),
                            ("mirror-back", [tgt_port, src_port])):
        port = servers.free_port()
        procs.append(subprocess.Popen([sys.executable, str(script), str(port), *map(str, upstreams)]))
        ports[name] = port
    haproxy = shutil.which("haproxy") or (Path("/usr/sbin/haproxy") if Path("/usr/sbin/haproxy").exists() else None)
    if haproxy:
        port = servers.free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(listen=port, upstream=src_port))
        procs.append(subprocess.Popen([str(haproxy), "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        ports["haproxy"] = port
    deadline = time.monotonic() + 10
    for port in ports.values():
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reference proxy on port {port} did not start") from None
                time.sleep(0.05)
    return ports, procs


def references_for(phase: Phase, ports: dict[str, int]) -> list[tuple[str, int]]:
    """The reference proxies doing the least work the shim does in ``phase``."""
    if not ports:
        return []
    if phase in (Phase.PLANNED, Phase.COMPATIBLE, Phase.COMPLETED):
        return [(n, ports[n]) for n in ("forward", "haproxy") if n in ports]
    if phase == Phase.WRITES_ON_TARGET:
        return [("mirror-back", ports["mirror-back"])]
    return [("mirror", ports["mirror"])]


def summarise(results: list[dict]) -> list[dict]:
    """One row per (phase, run, test): figures as medians over the rounds, ratios with their range."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["phase"], r["run"], r["test"]), []).append(r)

    def ratio(values: list[float]) -> str:
        med = statistics.median(values)
        return f"{med:.0%}" if len(values) == 1 else f"{med:.0%} ({min(values):.0%}-{max(values):.0%})"

    rows = []
    for rs in groups.values():
        row = {k: rs[0][k] for k in ("phase", "run", "test")}
        for k in ("direct_rps", "shim_rps", "direct_p50_ms", "shim_p50_ms", "added_p50_ms", "direct_p99_ms",
                  "shim_p99_ms"):
            row[k] = statistics.median(r[k] for r in rs)
        row["ratio"] = ratio([r["ratio"] for r in rs])
        row["references"] = {name: {"ratio": ratio([r["references"][name]["ratio"] for r in rs])}
                             for name in rs[0]["references"]}
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--requests", type=int, default=200_000, help="requests per throughput run")
    ap.add_argument("--latency-requests", type=int, default=20_000)
    ap.add_argument("--phases", default=",".join(p.value for p in PHASES))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-reference", action="store_true", help="skip the reference proxies")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all phases; with more than one, each row is the median and the range of the rounds")
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
    refs: list[subprocess.Popen] = []
    try:
        ref_ports: dict[str, int] = {}
        if not args.no_reference:
            ref_ports, refs = start_references(tmp, src.port, tgt.port)
        deadline = time.monotonic() + 30
        while len(registry.read_all(pb.state_path)) < args.workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shim did not start; see {tmp / 'shim.log'}")
            time.sleep(0.1)
        load = os.getloadavg()[0]
        for phase in [p for _ in range(args.repeat) for p in phases]:
            set_phase(pb, phase)
            for label, pipeline, clients, n in (("throughput", 16, 50, args.requests),
                                                ("latency", 1, 1, args.latency_requests)):
                direct = redis_benchmark(src.port, n, pipeline, clients)
                shim = redis_benchmark(shim_port, n, pipeline, clients)
                ref = {name: redis_benchmark(port, n, pipeline, clients)
                       for name, port in (references_for(phase, ref_ports) if label == "throughput" else [])}
                for test in direct:
                    d, s = direct[test], shim[test]
                    results.append({"phase": phase.value, "run": label, "test": test, "P": pipeline, "c": clients,
                                    "direct_rps": d["rps"], "shim_rps": s["rps"], "ratio": s["rps"] / d["rps"],
                                    "direct_p50_ms": d["p50_ms"], "shim_p50_ms": s["p50_ms"],
                                    "added_p50_ms": s["p50_ms"] - d["p50_ms"],
                                    "direct_p99_ms": d["p99_ms"], "shim_p99_ms": s["p99_ms"],
                                    "references": {name: {"rps": r[test]["rps"], "ratio": r[test]["rps"] / d["rps"]}
                                                   for name, r in ref.items()}})
        print(f"# {os.cpu_count()} CPUs, load average {load:.2f} at start, shim workers {args.workers}, "
              f"source {src.label}, target {tgt.label}")
        print(f"{'phase':<17} {'run':<10} {'test':<4} {'direct rps':>11} {'shim rps':>10} {'ratio':>6} "
              f"{'p50 d/s ms':>12} {'p99 d/s ms':>12} {'+p50 ms':>8}  reference proxies (ratio to direct)")
        for r in summarise(results):
            refs_txt = "  ".join(f"{name} {x['ratio']}" for name, x in r["references"].items())
            print(f"{r['phase']:<17} {r['run']:<10} {r['test']:<4} {r['direct_rps']:>11,.0f} {r['shim_rps']:>10,.0f} "
                  f"{r['ratio']:>6} {r['direct_p50_ms']:>5.3f}/{r['shim_p50_ms']:<6.3f} "
                  f"{r['direct_p99_ms']:>5.3f}/{r['shim_p99_ms']:<6.3f} {r['added_p50_ms']:>8.3f}  {refs_txt}")
        if args.repeat > 1:
            print(f"# medians of {args.repeat} rounds; ratios as median (lowest-highest)")
        if args.json:
            args.json.write_text(json.dumps({"load_average": load, "workers": args.workers, "results": results}, indent=2))
    finally:
        for ref_proc in refs:
            ref_proc.terminate()
            ref_proc.wait(10)
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
