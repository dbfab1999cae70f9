"""Benchmark read-your-writes in reads-on-target with the replication strategy.

Usage: python bench/ryw.py [--clients 50] [--seconds 10] [--repeat 3] [--json FILE]

Starts a Redis 7.0 source and a Valkey 9.1 target replicating it (migrator.servers), and a
``migrator shim`` child process in ``reads-on-target`` with ``state.mirror.strategy:
replication``, once with ``shim.read_your_writes: true`` and once with ``false``. Each run, the
same for the source directly:

- ``write-then-read``: each of ``--clients`` connections loops ``SET k v`` then ``GET k`` (its
  own key, unpipelined): every read follows the connection's own write, the worst case for
  read-your-writes (each read is answered by the source until the replica has the write);
- ``reads``: ``redis-benchmark -t get -P 1 -c 50``: connections that never write (the replica
  answers them with read-your-writes on or off).

Prints commands/s, the p50/p99 of the reads, the reads the shim redirected to the source, and
the ratio with read-your-writes on to off. The client load is Python (asyncio, raw RESP), so it
is a share of the machine's two cores like the shim and the servers: compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from bench.shim import redis_benchmark
from migrator import playbook, registry, servers
from migrator.phases import Phase
from migrator.state import MirrorMode, StateStore


async def _client(port: int, idx: int, stop_at: float, lat: list[float], counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = f"ryw:{idx}".encode()
    n = 0
    try:
        while time.perf_counter() < stop_at:
            val = str(n).encode()
            writer.write(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(val), val))
            line = await reader.readline()
            if line != b"+OK\r\n":
                raise RuntimeError(f"SET answered {line!r}")
            t = time.perf_counter()
            writer.write(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
            head = await reader.readline()
            body = await reader.readline() if head[:1] == b"$" and head != b"$-1\r\n" else b""
            lat.append(time.perf_counter() - t)
            if body.rstrip(b"\r\n") != val:
                counts[1] += 1  # a read that missed the connection's own write
            n += 1
        counts[0] += 2 * n
    finally:
        writer.close()


async def write_then_read(port: int, clients: int, seconds: float) -> dict:
    lat: list[float] = []
    counts = [0, 0]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, i, t0 + seconds, lat, counts) for i in range(clients)))
    took = time.perf_counter() - t0
    lat.sort()
    return {"ops": counts[0] / took, "p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000,
            "stale_reads": counts[1], "reads": len(lat)}


def _status(admin_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=5) as r:
        return json.loads(r.read())


def run_shim(tmp: Path, src, tgt, ryw: bool, args) -> list[dict]:
    shim_port, admin_port = servers.free_port(), servers.free_port()
    state = tmp / f"state-{ryw}"
    pb_path = tmp / f"migrator-{ryw}.yaml"
    pb_path.write_text(json.dumps({
        "version": 1, "name": "bench", "source": {"url": src.url}, "target": {"url": tgt.url},
        "shim": {"listen": f"127.0.0.1:{shim_port}", "admin": f"127.0.0.1:{admin_port}", "read_your_writes": ryw},
        "state_dir": str(state), "mirror": {"strategy": "replication"},
    }))
    pb = playbook.load(pb_path)
    store = StateStore(pb.state_path, pb.name)
    st = store.load()
    st.phase, st.generation, st.mirror = Phase.READS_ON_TARGET, st.generation + 1, MirrorMode("replication", "bench")
    store.save(st)
    log = open(tmp / f"shim-{ryw}.log", "wb")  # noqa: SIM115 - closed below, after the child exits
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "--log-level", "warning", "-p", str(pb_path), "shim"],
                            stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        deadline = time.monotonic() + 30
        while not registry.read_all(pb.state_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shim did not start; see {tmp / f'shim-{ryw}.log'}")
            time.sleep(0.1)
        time.sleep(1)
        for rnd in range(args.repeat):
            before = _status(admin_port)["replication"]["read_your_writes_redirects"]
            direct = asyncio.run(write_then_read(src.port, args.clients, args.seconds))
            shim = asyncio.run(write_then_read(shim_port, args.clients, args.seconds))
            redirected = _status(admin_port)["replication"]["read_your_writes_redirects"] - before
            gets_direct = redis_benchmark(src.port, args.requests, 1, 50)["GET"]
            gets_shim = redis_benchmark(shim_port, args.requests, 1, 50)["GET"]
            rows.append({"round": rnd, "read_your_writes": ryw, "direct": direct, "shim": shim,
                         "redirected": redirected, "reads_direct": gets_direct, "reads_shim": gets_shim})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--requests", type=int, default=100_000, help="GETs per redis-benchmark run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="migrator-bench-ryw-"))
    src = servers.start("redis-7.0")
    tgt = servers.start("valkey-9.1")
    try:
        redis.Redis(port=src.port).config_set("repl-diskless-sync-delay", 0)
        t = redis.Redis(port=tgt.port)
        t.execute_command("REPLICAOF", "127.0.0.1", src.port)
        deadline = time.monotonic() + 30
        while t.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the target did not start replicating the source")
            time.sleep(0.05)
        rows = run_shim(tmp, src, tgt, True, args) + run_shim(tmp, src, tgt, False, args)
        med = {}
        for ryw in (True, False):
            rs = [r for r in rows if r["read_your_writes"] is ryw]
            med[ryw] = {
                "ops": statistics.median(r["shim"]["ops"] for r in rs),
                "direct_ops": statistics.median(r["direct"]["ops"] for r in rs),
                "p50_ms": statistics.median(r["shim"]["p50_ms"] for r in rs),
                "p99_ms": statistics.median(r["shim"]["p99_ms"] for r in rs),
                "stale": sum(r["shim"]["stale_reads"] for r in rs), "reads": sum(r["shim"]["reads"] for r in rs),
                "redirected": sum(r["redirected"] for r in rs),
                "gets": statistics.median(r["reads_shim"]["rps"] for r in rs),
                "gets_direct": statistics.median(r["reads_direct"]["rps"] for r in rs),
                "gets_p50": statistics.median(r["reads_shim"]["p50_ms"] for r in rs),
            }
        print(f"# reads-on-target, replication strategy, {args.clients} clients, {args.repeat} round(s) of "
              f"{args.seconds:g} s, medians")
        print(f"{'read_your_writes':<17} {'write-then-read ops/s':>22} {'direct':>9} {'GET p50/p99 ms':>15} "
              f"{'redirected':>11} {'stale reads':>12} {'GET-only rps':>13} {'direct':>9} {'GET p50':>8}")
        for ryw in (True, False):
            m = med[ryw]
            print(f"{'on' if ryw else 'off':<17} {m['ops']:>22,.0f} {m['direct_ops']:>9,.0f} "
                  f"{m['p50_ms']:>7.3f}/{m['p99_ms']:<7.3f} {m['redirected'] / max(m['reads'], 1):>10.0%} "
                  f"{m['stale']:>5}/{m['reads']:<6} {m['gets']:>13,.0f} {m['gets_direct']:>9,.0f} {m['gets_p50']:>8.3f}")
        print(f"# write-then-read with read-your-writes: {med[True]['ops'] / med[False]['ops']:.0%} of without; "
              f"GET-only: {med[True]['gets'] / med[False]['gets']:.0%}")
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "medians": {str(k): v for k, v in med.items()}}, indent=2))
    finally:
        src.stop()
        tgt.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
