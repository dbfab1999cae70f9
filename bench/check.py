"""Benchmark: a full ``migrator check`` of N keys (default 1,000,000), in keys compared per second.

The same mixed data set (strings, hashes, lists, sets, sorted sets; 1 in 7 expiring) is loaded
into a Redis 7.0 source and a Valkey 9.1 target with the same server-side loader (slice by
slice on both, so expiries agree), then
``python -m migrator check --full`` runs as a child process (time and peak RSS measured).

    python bench/check.py --keys 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import load_mixed, run_measured, write_playbook
from migrator import reports, servers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    args = ap.parse_args()
    with servers.running("redis-7.0") as src, servers.running("valkey-9.1") as dst, tempfile.TemporaryDirectory() as d:
        load_mixed(src.client(), args.keys, 20_000, dst.client())
        pb = write_playbook(Path(d), src.url, dst.url)
        wall, rss, rc = run_measured([sys.executable, "-m", "migrator", "-p", str(pb), "check", "--full", "--output", "json"])
        report = reports.latest(Path(d) / "state", "check")
    if report is None:
        raise SystemExit(f"migrator check exited {rc} without a report")
    rate = report["checked"] / report["duration_s"]
    print(json.dumps({"keys": args.keys, "checked": report["checked"], "mismatches": report["mismatch_count"],
                      "check_s": report["duration_s"], "process_s": round(wall, 2), "keys_per_s": round(rate),
                      "peak_rss_mb": round(rss), "verdict": report["verdict"]}, indent=2))
    print("target (>= 50,000 keys/s):", "met" if rate >= 50_000 else "NOT met")


if __name__ == "__main__":
    main()
