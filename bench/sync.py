"""Benchmark: ``migrator sync`` against a native REPLICAOF full sync of the same data.

Two data sets, each loaded into a Redis 7.0 source:
  - mixed: N keys of mixed types (strings, hashes, lists, sets, sorted sets; 1 in 7 expiring);
  - zset: one sorted set of N members (a big key, copied in chunks).
For each: the time a Valkey 9.1 replica takes to complete REPLICAOF (full sync, the source with
repl-diskless-sync-delay 0 so it does not wait for more replicas), and the time and peak RSS of
``python -m migrator sync`` into another, empty Valkey 9.1 (which includes verifying every key).
Then a full ``migrator check`` confirms the copy.

    python bench/sync.py --keys 1000000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import load_mixed, load_zset, native_full_sync, run_measured, write_playbook  # noqa: E402
from migrator import playbook, servers  # noqa: E402
from migrator.data import check  # noqa: E402


def one(name: str, n: int, loader, units: str, batch: int) -> dict:
    with servers.running("redis-7.0", config={"repl-diskless-sync-delay": "0"}) as src, \
            servers.running("valkey-9.1") as native_dst, servers.running("valkey-9.1") as dst:
        loader(src.client(), n)
        native_s = native_full_sync(src, native_dst)
        native_dst.stop()
        with tempfile.TemporaryDirectory() as d:
            pb_path = write_playbook(Path(d), src.url, dst.url)
            wall, rss, rc = run_measured([sys.executable, "-m", "migrator", "-p", str(pb_path), "--log-level", "warning",
                                          "sync", "--batch", str(batch)])
            if rc != 0:
                raise SystemExit(f"{name}: migrator sync exited {rc}")
            res = check.run(playbook.load(pb_path), full=True)
    return {"name": name, "n": n, "units": units, "native_s": native_s, "sync_s": wall, "rss_mb": rss,
            "ratio": native_s / wall, "check": res.summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys in the mixed set, members in the sorted set")
    ap.add_argument("--batch", type=int, default=500, help="pipeline size (default: the playbook's default, 500)")
    ap.add_argument("--only", choices=["mixed", "zset"], default=None)
    args = ap.parse_args()
    rows = []
    if args.only in (None, "mixed"):
        rows.append(one("mixed types", args.keys, load_mixed, "keys", args.batch))
    if args.only in (None, "zset"):
        rows.append(one("one sorted set", args.keys, load_zset, "members", args.batch))
    print(f"{'data':<16} {'n':>10} {'native s':>9} {'native /s':>11} {'sync s':>8} {'sync /s':>10} {'ratio':>6} {'peak RSS':>9}")
    for r in rows:
        print(f"{r['name']:<16} {r['n']:>10,} {r['native_s']:>9.2f} {r['n'] / r['native_s']:>11,.0f} {r['sync_s']:>8.2f} "
              f"{r['n'] / r['sync_s']:>10,.0f} {r['ratio']:>6.0%} {r['rss_mb']:>7.0f}MB  ({r['units']}/s; check: {r['check']})")
    ok = all(r["ratio"] >= 0.30 and r["rss_mb"] <= 300 for r in rows)
    print("targets (sync >= 30% of native, RSS <= 300 MB):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
