"""Benchmark: ``migrator sync`` and a full ``migrator check`` between local clusters, per source shard.

A Redis 7.0 cluster of ``--source-shards`` primaries is loaded with N mixed keys (strings,
hashes, lists, sets, sorted sets; 1 in 7 expiring) through a cluster client, then
``python -m migrator sync`` and ``python -m migrator check --full`` run as child processes
against a Valkey 9.1 cluster of ``--target-shards`` primaries (time, CPU and peak RSS measured).
Replicas are left out (``--replicas`` adds them): they do not change what the sync reads unless
``--from-replicas`` is given.

    python bench/cluster.py --keys 300000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import run_measured, write_playbook
from migrator import reports
from tests import topologies


def load(cl, n: int) -> None:
    rc = cl.cluster_client()
    try:
        p = rc.pipeline(transaction=False)
        for i in range(n):
            key, kind = f"k:{i}", i % 5
            if kind == 0:
                p.set(key, f"value-{i}")
            elif kind == 1:
                p.hset(key, mapping={"f": i, "g": "x"})
            elif kind == 2:
                p.rpush(key, i, i + 1)
            elif kind == 3:
                p.sadd(key, i, "s")
            else:
                p.zadd(key, {"m": i})
            if i % 7 == 0:
                p.expire(key, 3600)
            if i % 5000 == 4999:
                p.execute()
        p.execute()
    finally:
        rc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=300_000)
    ap.add_argument("--source-shards", type=int, default=3)
    ap.add_argument("--target-shards", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=0)
    ap.add_argument("--from-replicas", action="store_true")
    args = ap.parse_args()
    replicas = max(args.replicas, 1 if args.from_replicas else 0)
    src = topologies.start_cluster("redis-7.0", primaries=args.source_shards, replicas=replicas)
    dst = topologies.start_cluster("valkey-9.1", primaries=args.target_shards, replicas=replicas)
    try:
        load(src, args.keys)
        with tempfile.TemporaryDirectory() as d:
            pb = write_playbook(Path(d), src.url, dst.url, source=src.endpoint(), target=dst.endpoint(),
                                mirror={"strategy": "dual-write"}, sync={"read_from_replicas": args.from_replicas})
            wall, rss, rc, cpu = run_measured([sys.executable, "-m", "migrator", "-p", str(pb), "sync", "--output", "json"],
                                              cpu=True)
            sync_report = reports.latest(Path(d) / "state", "sync")
            cwall, crss, crc, ccpu = run_measured(
                [sys.executable, "-m", "migrator", "-p", str(pb), "check", "--full", "--output", "json"], cpu=True)
            check_report = reports.latest(Path(d) / "state", "check")
    finally:
        src.stop()
        dst.stop()
    if sync_report is None or check_report is None:
        raise SystemExit(f"migrator sync exited {rc}, check exited {crc}, without a report")
    secs = sync_report["duration_s"]
    print(json.dumps({
        "keys": args.keys, "shards": f"{args.source_shards} -> {args.target_shards}", "from_replicas": args.from_replicas,
        "sync": {"copied": sync_report["keys"], "complete": sync_report["complete"], "sync_s": secs,
                 "process_s": round(wall, 2), "process_cpu_s": round(cpu, 2), "keys_per_s": round(sync_report["keys"] / secs),
                 "per_shard_keys_per_s": {s["address"]: round(s["keys"] / secs) for s in sync_report["shards"]},
                 "peak_rss_mb": round(rss)},
        "check": {"checked": check_report["checked"], "mismatches": check_report["mismatch_count"],
                  "check_s": check_report["duration_s"], "process_cpu_s": round(ccpu, 2),
                  "keys_per_s": round(check_report["checked"] / check_report["duration_s"]),
                  "peak_rss_mb": round(crss), "verdict": check_report["verdict"]},
    }, indent=2))


if __name__ == "__main__":
    main()
