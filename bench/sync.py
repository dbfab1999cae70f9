"""Benchmark: ``migrator sync`` against a native REPLICAOF full sync of the same data.

Two data sets, each loaded once into a Redis 7.0 source:
  - mixed: N keys of mixed types (strings, hashes, lists, sets, sorted sets; 1 in 7 expiring);
  - zset: one sorted set of N members (a big key, copied in chunks).
Then, ``--repeat`` times, interleaved so both see the same machine: the time a fresh Valkey 9.1
replica takes to complete REPLICAOF (full sync, the source with repl-diskless-sync-delay 0 so it
does not wait for more replicas), and the time and peak RSS of ``python -m migrator sync`` into
another fresh Valkey 9.1 (which includes verifying every key); a full ``migrator check`` confirms
each copy (``--no-check`` skips it). Each run is printed, then the median ratio per data set:
the native baseline moves by ±30% from run to run on a shared machine, so one run says little.

    python bench/sync.py --keys 1000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import load_mixed, load_zset, native_full_sync, run_measured, write_playbook  # noqa: E402
from migrator import playbook, servers  # noqa: E402
from migrator.data import check  # noqa: E402

TARGET_RATIO = 0.30
TARGET_RSS_MB = 300


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runs(name: str, n: int, loader, units: str, batch: int | None, repeat: int, verify: bool) -> list[dict]:
    out = []
    with servers.running("redis-7.0", config={"repl-diskless-sync-delay": "0"}) as src:
        loader(src.client(), n)
        for i in range(repeat):
            with servers.running("valkey-9.1") as native_dst:
                native_s = native_full_sync(src, native_dst)
            with servers.running("valkey-9.1") as dst, tempfile.TemporaryDirectory() as d:
                pb_path = write_playbook(Path(d), src.url, dst.url)
                args = [sys.executable, "-m", "migrator", "-p", str(pb_path), "--log-level", "warning", "sync"]
                cpu0 = cpu_s(src.proc.pid), cpu_s(dst.proc.pid)
                wall, rss, rc, child_cpu = run_measured(args + (["--batch", str(batch)] if batch else []), cpu=True)
                cpu = (cpu_s(src.proc.pid) - cpu0[0], cpu_s(dst.proc.pid) - cpu0[1], child_cpu)
                if rc != 0:
                    raise SystemExit(f"{name}: migrator sync exited {rc}")
                summary = check.run(playbook.load(pb_path), full=True).summary if verify else "not checked"
            row = {"name": name, "run": i + 1, "n": n, "units": units, "native_s": native_s, "sync_s": wall,
                   "rss_mb": rss, "ratio": native_s / wall, "load": os.getloadavg()[0], "cpu": cpu, "check": summary}
            out.append(row)
            print(f"{name:<16} run {i + 1}: native {native_s:5.2f} s ({n / native_s:>9,.0f} {units}/s)  "
                  f"sync {wall:5.2f} s ({n / wall:>9,.0f} {units}/s)  ratio {row['ratio']:4.0%}  "
                  f"peak RSS {rss:4.0f} MB  CPU s source/target/sync {cpu[0]:.1f}/{cpu[1]:.1f}/{cpu[2]:.1f}  "
                  f"load {row['load']:.1f}  check: {summary}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys in the mixed set, members in the sorted set")
    ap.add_argument("--batch", type=int, default=None, help="keys per batch (default: the playbook's, 500)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved native/migrator runs per data set (default 3)")
    ap.add_argument("--only", choices=["mixed", "zset"], default=None)
    ap.add_argument("--no-check", dest="verify", action="store_false", help="skip the full check after each copy")
    args = ap.parse_args()
    sets = []
    if args.only in (None, "mixed"):
        sets.append(runs("mixed types", args.keys, load_mixed, "keys", args.batch, args.repeat, args.verify))
    if args.only in (None, "zset"):
        sets.append(runs("one sorted set", args.keys, load_zset, "members", args.batch, args.repeat, args.verify))
    print()
    print(f"{'data':<16} {'n':>10} {'runs':>4} {'native s':>9} {'sync s':>8} {'median ratio':>12} {'ratios':<18} {'peak RSS':>9}")
    ok = True
    for rows in sets:
        r0 = rows[0]
        median = statistics.median(r["ratio"] for r in rows)
        rss = max(r["rss_mb"] for r in rows)
        ratios = ", ".join(f"{r['ratio']:.0%}" for r in rows)
        ok = ok and median >= TARGET_RATIO and rss <= TARGET_RSS_MB
        print(f"{r0['name']:<16} {r0['n']:>10,} {len(rows):>4} {statistics.median(r['native_s'] for r in rows):>9.2f} "
              f"{statistics.median(r['sync_s'] for r in rows):>8.2f} {median:>12.0%} "
              f"{ratios:<18} {rss:>7.0f}MB")
    print(f"targets (median sync >= {TARGET_RATIO:.0%} of native, RSS <= {TARGET_RSS_MB} MB):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
