"""Keyspace: what the source holds, and whether the target is empty as the sync expects.

Migrator's own keys (``__migrator:*``, e.g. a concurrent run's canaries) do not count.
"""

from __future__ import annotations

from migrator import replication
from migrator.compat.model import FAIL, PASS, WARN, Check
from migrator.compat.probe import Probe


def _human(n: int | None) -> str:
    if n is None:
        return "memory unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _keys(n: int) -> str:
    return f"{n} key{'' if n == 1 else 's'}"


def describe_source(probe: Probe) -> str:
    dbs = probe.source_keys.dbs.values()
    if not any(d.user_keys for d in dbs):
        return "the source is empty"
    per_db = ", ".join(f"db{d.db}: {_keys(d.user_keys)} ({d.expires} with TTL, ~{_human(d.estimated_memory)})"
                       for d in dbs if d.user_keys)
    return f"source {per_db}; used_memory {_human(probe.source_keys.used_memory)}"


def keyspace_check(probe: Probe) -> Check:
    allow = probe.playbook.steps.compatibility.allow_non_empty_target
    target_keys = {d.db: d.user_keys for d in probe.target_keys.dbs.values() if d.user_keys}
    data = {"source": probe.source_keys.to_json(), "target": probe.target_keys.to_json(),
            "allow_non_empty_target": allow}
    evidence = describe_source(probe)
    if not target_keys:
        return Check("keyspace", "Keyspace", PASS, evidence + "; the target is empty", "", data)
    where = ", ".join(f"db{db}: {n}" for db, n in sorted(target_keys.items()))
    evidence += f"; the target holds {sum(target_keys.values())} key(s) ({where})"
    repl = probe.playbook.mirror
    if repl.strategy != "dual-write":
        host, port = replication.source_address(probe.playbook)
        if probe.target_id.master == f"{host}:{port}":
            return Check("keyspace", "Keyspace", PASS, evidence + f", replicated from the source ({host}:{port})", "", data)
    if repl.strategy != "dual-write" and repl.replication.replace_target_data:
        return Check("keyspace", "Keyspace", WARN, evidence + ": if the mirror strategy is replication, REPLICAOF "
                     "discards them (mirror.replication.replace_target_data: true)",
                     "make sure the target's keys are not needed", data)
    if allow:
        return Check("keyspace", "Keyspace", WARN, evidence + " (allowed by steps.compatibility.allow_non_empty_target)",
                     "make sure the target's keys cannot collide with the source's: the sync overwrites same-named keys",
                     data)
    return Check("keyspace", "Keyspace", FAIL, evidence + ": the sync expects an empty target",
                 "empty the target (FLUSHALL) if its keys are not needed, or set "
                 "steps.compatibility.allow_non_empty_target: true if they are meant to stay", data)
