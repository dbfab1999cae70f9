"""Benchmark the shim: redis-benchmark against the source directly and through the shim in each phase.

Usage: python bench/shim.py [--workers N] [--requests N] [--phases planned,mirroring,...] [--repeat N]
                             [--runs pipelined,unpipelined,latency,reconnect] [--json FILE]

Starts a Redis 7.0 source and a Valkey 9.1 target (migrator.servers), runs ``migrator shim`` as
a child process, and for each phase runs ``redis-benchmark -t set,get -r 100000``:

- ``pipelined``   ``-P 16 -c 50``  throughput of pipelining clients;
- ``unpipelined`` ``-P 1 -c 50``   throughput of many clients that do not pipeline (web applications);
- ``latency``     ``-P 1 -c 1``    p50/p99 of one client;
- ``reconnect``   ``-P 1 -c 50 -k 0``  a new connection per request (PHP without persistent connections);

each also directly against the source in the same round, so ratios compare like with like on a
noisy machine. Prints requests/s, p50, p99, the ratio to direct and the CPU time each proxy
process spent per command (user + system, from ``/proc/<pid>/stat``, summed over the shim's
worker processes), then the issue-12 targets computed from the same round; ``--json`` writes it all.

The throughput runs also go through peers, the same requests, side by side:
- reference proxies that do no work at all (``bench/reference_proxy.py``: a uvloop forwarder, and
  a mirror that writes every byte to both servers and throws the shadow's replies away; both keep
  one upstream connection per client);
- HAProxy in TCP mode (one thread), when ``haproxy`` is installed;
- twemproxy (``nutcracker``), a C proxy that parses every command and multiplexes all clients onto
  one server connection, when it is installed (Debian ``nutcracker``).
The benchmark skips a peer that is not installed. ``--no-reference`` skips them all.
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

TWEMPROXY_CFG = """bench:
  listen: 127.0.0.1:{listen}
  redis: true
  hash: fnv1a_64
  distribution: ketama
  auto_eject_hosts: false
  timeout: 5000
  servers:
   - 127.0.0.1:{upstream}:1
"""

PHASES = [Phase.PLANNED, Phase.MIRRORING, Phase.READS_ON_TARGET, Phase.WRITES_ON_TARGET]
# name -> (pipeline, clients, keepalive)
RUNS = {"pipelined": (16, 50, 1), "unpipelined": (1, 50, 1), "latency": (1, 1, 1), "reconnect": (1, 50, 0)}
THROUGHPUT_RUNS = ("pipelined", "unpipelined", "reconnect")
PASSTHROUGH = (Phase.PLANNED, Phase.COMPATIBLE, Phase.COMPLETED)
TODAY_RECONNECT_RPS = 2_600  # issue 12: the shim's -k 0 figure before shared upstream connections
TESTS = "set,get"


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants still running."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


def redis_benchmark(port: int, requests: int, pipeline: int, clients: int, keepalive: int = 1,
                    pid: int | None = None) -> dict[str, dict[str, float]]:
    """redis-benchmark's figures per test; with ``pid``, also that process tree's CPU µs per command."""
    exe = shutil.which("redis-benchmark") or "/usr/bin/redis-benchmark"
    cpu0 = proc_cpu(pid) if pid else 0.0
    out = subprocess.run([exe, "-p", str(port), "-t", TESTS, "-n", str(requests), "-P", str(pipeline), "-c", str(clients),
                          "-k", str(keepalive), "-r", "100000", "--csv"], capture_output=True, text=True, timeout=900,
                         check=False)
    cpu_us = (proc_cpu(pid) - cpu0) * 1e6 / (requests * len(TESTS.split(","))) if pid else None
    if out.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {out.stderr.strip()[-500:]}")
    rows = {}
    for row in csv.DictReader(io.StringIO(out.stdout)):
        rows[row["test"]] = {"rps": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]),
                             "p99_ms": float(row["p99_latency_ms"]), "cpu_us": cpu_us}
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


def _exe(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin", "/sbin"):
        if Path(d, name).exists():
            return str(Path(d, name))
    return None


def start_references(tmp: Path, src_port: int, tgt_port: int) -> tuple[dict[str, tuple[int, int]], list[subprocess.Popen]]:
    """Peers, by name -> (port, pid): ``forward`` (to the source), ``mirror`` (source answers, target
    shadows), ``mirror-back`` (target answers, source shadows), ``haproxy`` and ``twemproxy`` if installed."""
    script = Path(__file__).with_name("reference_proxy.py")
    peers: dict[str, tuple[int, int]] = {}
    procs: list[subprocess.Popen] = []

    def spawn(name: str, port: int, argv: list[str]) -> None:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        peers[name] = (port, proc.pid)

    for name, upstreams in (("forward", [src_port]), ("mirror", [src_port, tgt_port]),
                            ("mirror-back", [tgt_port, src_port])):
        port = servers.free_port()
        spawn(name, port, [sys.executable, str(script), str(port), *map(str, upstreams)])
    haproxy = _exe("haproxy")
    if haproxy:
        port = servers.free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(listen=port, upstream=src_port))
        spawn("haproxy", port, [haproxy, "-f", str(cfg), "-db"])
    nutcracker = _exe("nutcracker")
    if nutcracker:
        port = servers.free_port()
        cfg = tmp / "twemproxy.yml"
        cfg.write_text(TWEMPROXY_CFG.format(listen=port, upstream=src_port))
        spawn("twemproxy", port, [nutcracker, "-c", str(cfg), "-s", str(servers.free_port()), "-a", "127.0.0.1",
                                  "-o", str(tmp / "twemproxy.log")])
    else:
        print("# twemproxy (nutcracker) is not installed: skipped (apt-get install nutcracker)", file=sys.stderr)
    deadline = time.monotonic() + 10
    for port, _pid in peers.values():
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reference proxy on port {port} did not start") from None
                time.sleep(0.05)
    return peers, procs


def references_for(phase: Phase, peers: dict[str, tuple[int, int]]) -> list[tuple[str, tuple[int, int]]]:
    """The peers doing the least work the shim does in ``phase``."""
    if phase in PASSTHROUGH:
        names = ("twemproxy", "haproxy", "forward")
    elif phase == Phase.WRITES_ON_TARGET:
        names = ("mirror-back",)
    else:
        names = ("mirror",)
    return [(n, peers[n]) for n in names if n in peers]


def _ratio(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.0%}" if len(values) == 1 else f"{med:.0%} ({min(values):.0%}-{max(values):.0%})"


def summarise(results: list[dict]) -> list[dict]:
    """One row per (phase, run, test): figures as medians over the rounds, ratios with their range."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["phase"], r["run"], r["test"]), []).append(r)
    rows = []
    for rs in groups.values():
        row = {k: rs[0][k] for k in ("phase", "run", "test", "P", "c", "k")}
        for k in ("direct_rps", "shim_rps", "direct_p50_ms", "shim_p50_ms", "added_p50_ms", "direct_p99_ms",
                  "shim_p99_ms", "shim_cpu_us"):
            row[k] = statistics.median(r[k] for r in rs)
        row["ratios"] = [r["ratio"] for r in rs]
        row["ratio"] = _ratio(row["ratios"])
        row["references"] = {}
        for name in rs[0]["references"]:
            x = [r["references"][name] for r in rs]
            row["references"][name] = {"ratio": _ratio([v["ratio"] for v in x]), "ratios": [v["ratio"] for v in x],
                                       "rps": statistics.median(v["rps"] for v in x),
                                       "cpu_us": statistics.median(v["cpu_us"] for v in x),
                                       "added_p50_ms": statistics.median(v["added_p50_ms"] for v in x),
                                       "shim_over_peer": [r["shim_rps"] / r["references"][name]["rps"] for r in rs]}
        rows.append(row)
    return rows


def issue_table(rows: list[dict]) -> list[str]:
    """The issue-12 table (markdown): % of direct per run and test, peers and the shim side by side."""
    by = {(r["phase"], r["run"], r["test"]): r for r in rows}
    tests = sorted({r["test"] for r in rows}, reverse=True)
    cols = [("twemproxy", "planned", "twemproxy"), ("HAProxy (TCP)", "planned", "haproxy"),
            ("zero-work forwarder", "planned", "forward"), ("zero-work mirror", "mirroring", "mirror"),
            ("shim passthrough", "planned", None), ("shim mirroring", "mirroring", None),
            ("shim reads-on-target", "reads-on-target", None), ("shim writes-on-target", "writes-on-target", None)]
    out = ["| run | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for run, label in (("pipelined", "`-P 16 -c 50`"), ("unpipelined", "`-P 1 -c 50`"), ("reconnect", "`-P 1 -c 50 -k 0`")):
        cells = []
        for _name, phase, peer in cols:
            vals = []
            for test in tests:
                r = by.get((phase, run, test))
                if r is None:
                    continue
                if peer is None:
                    vals.append(statistics.median(r["ratios"]))
                elif peer in r["references"]:
                    vals.append(statistics.median(r["references"][peer]["ratios"]))
            cells.append("/".join(f"{v * 100:.0f}" for v in vals) if vals else "")
        if any(cells):
            out.append(f"| {label}, % of direct ({'/'.join(tests)}) | " + " | ".join(cells) + " |")
    return out


def targets(rows: list[dict]) -> list[tuple[str, str, str, bool | None]]:
    """Issue 12's targets from the same rounds: (measure, figure, target, met)."""
    by = {(r["phase"], r["run"], r["test"]): r for r in rows}
    tests = sorted({r["test"] for r in rows}, reverse=True)  # redis-benchmark names them SET, GET
    out: list[tuple[str, str, str, bool | None]] = []

    def peer_ratio(phase: str, run: str, peer: str, goal: float, label: str) -> None:
        vals = []
        for test in tests:
            r = by.get((phase, run, test))
            if r and peer in r["references"]:
                med = statistics.median(r["references"][peer]["shim_over_peer"])
                vals.append(f"{test.upper()} {med:.0%}")
                out.append((f"{label} {test.upper()}", f"{med:.0%} of {peer}", f">= {goal:.0%}", med >= goal))
        if not vals:
            out.append((label, f"{peer} not measured", f">= {goal:.0%}", None))

    for run in ("pipelined", "unpipelined"):
        peer_ratio("planned", run, "twemproxy", 1.0, f"passthrough {run}")
    peer_ratio("mirroring", "unpipelined", "mirror", 1.0, "mirroring unpipelined")
    peer_ratio("mirroring", "pipelined", "mirror", 0.8, "mirroring pipelined")
    for phase in ("reads-on-target", "writes-on-target"):
        for run in ("pipelined", "unpipelined"):
            for test in tests:
                r, m = by.get((phase, run, test)), by.get(("mirroring", run, test))
                if r and m:
                    q = r["shim_rps"] / m["shim_rps"]
                    out.append((f"{phase} {run} {test.upper()}", f"{q:.0%} of mirroring", ">= 90%", q >= 0.9))
    for r in rows:
        if r["run"] == "latency":
            peers = ", ".join(f"{n} {x['added_p50_ms']:+.3f}" for n, x in r["references"].items())
            out.append((f"added p50 {r['phase']} {r['test'].upper()}",
                        f"{r['added_p50_ms']:.3f} ms" + (f" ({peers})" if peers else ""), "<= 0.1 ms",
                        r["added_p50_ms"] <= 0.1))
        if r["run"] == "reconnect":
            q = r["shim_rps"] / TODAY_RECONNECT_RPS
            out.append((f"-k 0 {r['phase']} {r['test'].upper()}", f"{r['shim_rps']:,.0f} req/s = {q:.1f}x 2.6k",
                        ">= 2x", q >= 2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--requests", type=int, default=200_000, help="requests per throughput run")
    ap.add_argument("--latency-requests", type=int, default=20_000)
    ap.add_argument("--reconnect-requests", type=int, default=20_000)
    ap.add_argument("--phases", default=",".join(p.value for p in PHASES))
    ap.add_argument("--runs", default=",".join(RUNS), help=f"a subset of {','.join(RUNS)}")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-reference", action="store_true", help="skip the peer proxies")
    ap.add_argument("--shim", action="append", default=[], metavar="KEY=VALUE",
                    help="a shim playbook setting for this run, e.g. shared_connections=0 (to measure a lever off)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds over all phases; each row is the median and the range of the rounds")
    args = ap.parse_args()
    phases = [Phase(p) for p in args.phases.split(",")]
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")

    shim_settings = {}
    for item in args.shim:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--shim {item}: expected KEY=VALUE")
        shim_settings[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    tmp = Path(tempfile.mkdtemp(prefix="migrator-bench-"))
    src = servers.start("redis-7.0")
    tgt = servers.start("valkey-9.1")
    shim_port, admin_port = servers.free_port(), servers.free_port()
    pb_path = tmp / "migrator.yaml"
    pb_path.write_text(json.dumps({
        "version": 1, "name": "bench", "source": {"url": src.url}, "target": {"url": tgt.url},
        "shim": {"listen": f"127.0.0.1:{shim_port}", "admin": f"127.0.0.1:{admin_port}", **shim_settings},
        "state_dir": str(tmp / "state"),
    }))
    pb = playbook.load(pb_path)
    log = open(tmp / "shim.log", "wb")  # noqa: SIM115 - closed in the finally below, after the child exits
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "--log-level", "warning", "-p", str(pb_path), "shim",
                             "--workers", str(args.workers)], stdout=log, stderr=subprocess.STDOUT)
    results = []
    refs: list[subprocess.Popen] = []
    try:
        peers: dict[str, tuple[int, int]] = {}
        if not args.no_reference:
            peers, refs = start_references(tmp, src.port, tgt.port)
        deadline = time.monotonic() + 30
        while len(registry.read_all(pb.state_path)) < args.workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shim did not start; see {tmp / 'shim.log'}")
            time.sleep(0.1)
        load = os.getloadavg()[0]
        sizes = {"pipelined": args.requests, "unpipelined": args.requests, "latency": args.latency_requests,
                 "reconnect": args.reconnect_requests}
        for rnd, phase in [(i, p) for i in range(args.repeat) for p in phases]:
            set_phase(pb, phase)
            for run in runs:
                pipeline, clients, keepalive = RUNS[run]
                n = sizes[run]
                direct = redis_benchmark(src.port, n, pipeline, clients, keepalive)
                shim = redis_benchmark(shim_port, n, pipeline, clients, keepalive, pid=proc.pid)
                ref = {name: redis_benchmark(port, n, pipeline, clients, keepalive, pid=pid)
                       for name, (port, pid) in references_for(phase, peers)}
                for test in direct:
                    d, s = direct[test], shim[test]
                    results.append({"round": rnd, "phase": phase.value, "run": run, "test": test, "P": pipeline,
                                    "c": clients, "k": keepalive,
                                    "direct_rps": d["rps"], "shim_rps": s["rps"], "ratio": s["rps"] / d["rps"],
                                    "direct_p50_ms": d["p50_ms"], "shim_p50_ms": s["p50_ms"],
                                    "added_p50_ms": s["p50_ms"] - d["p50_ms"],
                                    "direct_p99_ms": d["p99_ms"], "shim_p99_ms": s["p99_ms"], "shim_cpu_us": s["cpu_us"],
                                    "references": {name: {"rps": r[test]["rps"], "ratio": r[test]["rps"] / d["rps"],
                                                          "cpu_us": r[test]["cpu_us"],
                                                          "added_p50_ms": r[test]["p50_ms"] - d["p50_ms"]}
                                                   for name, r in ref.items()}})
        load_end = os.getloadavg()[0]
        rows = summarise(results)
        print(f"# {os.cpu_count()} CPUs, load average {load:.2f} at start and {load_end:.2f} at the end, shim workers "
              f"{args.workers}, source {src.label}, target {tgt.label}, {args.repeat} round(s)"
              + (f", shim settings {shim_settings}" if shim_settings else ""))
        print(f"{'phase':<17} {'run':<12} {'test':<4} {'direct rps':>11} {'shim rps':>10} {'ratio':>14} "
              f"{'p50 d/s ms':>12} {'p99 d/s ms':>13} {'cpu us/cmd':>10}  peers: ratio to direct, cpu us/cmd")
        for r in rows:
            refs_txt = "  ".join(f"{name} {x['ratio']} {x['cpu_us']:.1f}us"
                                 + (f" +p50 {x['added_p50_ms']:.3f}ms" if r["run"] == "latency" else "")
                                 for name, x in r["references"].items())
            print(f"{r['phase']:<17} {r['run']:<12} {r['test']:<4} {r['direct_rps']:>11,.0f} {r['shim_rps']:>10,.0f} "
                  f"{r['ratio']:>14} {r['direct_p50_ms']:>5.3f}/{r['shim_p50_ms']:<6.3f} "
                  f"{r['direct_p99_ms']:>5.3f}/{r['shim_p99_ms']:<7.3f} {r['shim_cpu_us']:>10.1f}  {refs_txt}")
        if args.repeat > 1:
            print(f"# medians of {args.repeat} rounds; ratios as median (lowest-highest)")
        print("\n# the issue's table (medians of the rounds)")
        for line in issue_table(rows):
            print(line)
        goals = targets(rows)
        if goals:
            print("\n# issue 12 targets (medians of the same rounds)")
            for measure, figure, goal, met in goals:
                mark = "n/a" if met is None else ("met" if met else "MISSED")
                print(f"{measure:<40} {figure:<44} {goal:<10} {mark}")
        if args.json:
            args.json.write_text(json.dumps({"load_average": [load, load_end], "workers": args.workers,
                                             "results": results, "rows": rows,
                                             "targets": [list(g) for g in goals]}, indent=2))
    finally:
        for ref_proc in refs:
            ref_proc.terminate()
            try:
                ref_proc.wait(10)
            except subprocess.TimeoutExpired:
                ref_proc.kill()
                ref_proc.wait()
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
