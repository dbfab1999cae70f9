"""The write pause at the write cutover, measured: `python bench/cutover.py [--rounds 10]`.

Starts a Redis 7.0 and a Valkey (9.1 when present), a real `migrator shim`, and writer clients
looping SET/INCR through the shim. It then switches write authority to the target and back
(`advance` to writes-on-target, `rollback` to reads-on-target) ``--rounds`` times and prints,
for each switch, the pause the shim reports (how long it held client commands) and the
slowest write any client saw during the switch, next to the writers' normal p50/p99 latency
measured in the same run. Target: ≤ 100 ms of write unavailability.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from migrator import command, playbook, servers
from migrator.demo import ShimProcess

SKIP = "benchmark: no data to copy; the gates are tested elsewhere"


class Writers:
    """Clients writing through the shim in a loop, recording (start, latency) of every write."""

    def __init__(self, url: str, clients: int) -> None:
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(url, i), daemon=True) for i in range(clients)]

    def _run(self, url: str, i: int) -> None:
        c = redis.Redis.from_url(url, socket_timeout=10)
        n, local = 0, []
        while not self._stop.is_set():
            n += 1
            t0 = time.perf_counter()
            try:
                c.set(f"bench:{i}:{n % 100}", n) if n % 2 else c.incr(f"bench:ctr:{n % 10}")
            except redis.RedisError:
                self.errors += 1
            local.append((t0, time.perf_counter() - t0))
            if len(local) >= 1000:
                with self._lock:
                    self.samples += local
                local = []
        with self._lock:
            self.samples += local

    def start(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def worst_during(samples, start: float, end: float) -> float:
    """The slowest write that was in flight at any time between start and end (ms)."""
    return max((lat for t0, lat in samples if t0 <= end and t0 + lat >= start), default=0.0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="migrator-bench-cutover-"))
    src = servers.start("redis-7.0" if servers.find("redis-7.0") else "redis")
    tgt = servers.start("valkey-9.1" if servers.find("valkey-9.1") else "valkey")
    shim = None
    writers = None
    try:
        doc = {"version": 1, "name": "bench-cutover", "source": {"url": src.url}, "target": {"url": tgt.url},
               "shim": {"listen": f"127.0.0.1:{servers.free_port()}", "admin": f"127.0.0.1:{servers.free_port()}"},
               "state_dir": str(work / "state"),
               "steps": {"mirror": {"min_duration": "0s"}, "read_cutover": {"min_duration": "0s"},
                         "write_cutover": {"rollback_window": "0s"}}}
        path = work / "migrator.yaml"
        path.write_text(json.dumps(doc))
        pb = playbook.load(path)
        shim = ShimProcess(path, work / "shim.log")
        shim.wait_registered(pb.state_path)
        command.advance(pb, overrides={"compatibility": SKIP})
        command.advance(pb)
        command.advance(pb, overrides={g: SKIP for g in ("sync_complete", "consistency")})
        writers = Writers(f"redis://{pb.shim.listen}/0", args.clients).start()
        time.sleep(2.0)  # baseline
        rows = []
        for i in range(args.rounds):
            for direction in ("advance", "rollback"):
                t0 = time.perf_counter()
                fn = command.advance if direction == "advance" else command.rollback
                kw = {"overrides": {"consistency": SKIP}} if direction == "advance" else {}
                r = fn(pb, **kw)
                t1 = time.perf_counter()
                pause = next(a.data.get("max_pause_ms") for a in r.actions if a.name == "write_pause")
                time.sleep(0.5)
                rows.append((direction, r.to_phase.value, pause, (t0, t1)))
            time.sleep(0.3)
        writers.stop()
        base = [lat * 1000 for _t, lat in writers.samples]
        p50, p99 = statistics.median(base), statistics.quantiles(base, n=100)[98]
        print(f"source {src.binary.label}, target {tgt.binary.label}, {args.clients} writer clients through one shim, "
              f"{len(base)} writes, {writers.errors} errors")
        print(f"write latency over the whole run: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        print(f"{'switch':<10} {'to':<18} {'shim held (ms)':>15} {'slowest write in switch (ms)':>30}")
        held, worst = [], []
        for direction, to, pause, (t0, t1) in rows:
            w = worst_during(writers.samples, t0, t1)
            held.append(pause or 0.0)
            worst.append(w)
            print(f"{direction:<10} {to:<18} {pause or 0.0:>15.1f} {w:>30.1f}")
        print(f"shim held: median {statistics.median(held):.1f} ms, max {max(held):.1f} ms; slowest write during a switch: "
              f"median {statistics.median(worst):.1f} ms, max {max(worst):.1f} ms (target ≤ 100 ms)")
    finally:
        if writers is not None:
            writers.stop()
        if shim is not None:
            shim.stop()
        tgt.stop()
        src.stop()


if __name__ == "__main__":
    main()
