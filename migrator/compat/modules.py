"""Data the target cannot hold: modules, module data types, vector sets, hash field TTLs.

``MODULE LIST`` on both sides says which modules the application may rely on; each Redis
module maps to the Valkey module that replaces it, if one exists. Sampled ``TYPE``s outside
the core types reveal module data even when MODULE LIST is disabled. Hash field expiration
(Redis 7.4+, Valkey 9.0+) is counted from INFO keyspace where the server reports it, else by
sampling HTTL.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from migrator.compat.commands import lookup, target_table
from migrator.compat.model import FAIL, PASS, WARN, Check
from migrator.compat.probe import Probe
from migrator.compat.rpc import Unavailable, text
from migrator.compat.typecopy import CORE_TYPES

# Modules a server lists but that are part of it (Valkey 9 lists its Lua engine as "lua").
BUILTIN_MODULES = frozenset({"lua"})


@dataclass(frozen=True)
class Replacement:
    what: str
    valkey_modules: tuple[str, ...]  # names MODULE LIST shows for the Valkey module that replaces it
    advice: str


MODULES: dict[str, Replacement] = {
    "rejson": Replacement("JSON (RedisJSON)", ("json",), "load valkey-json on the target"),
    "search": Replacement("RediSearch", ("search",), "load valkey-search on the target and check that your FT.* "
                                                      "queries are supported (it started with vector search)"),
    "bf": Replacement("RedisBloom", ("bf",), "load valkey-bloom on the target (bloom filters; cuckoo filters, "
                                             "top-k, count-min sketch and t-digest have no Valkey module)"),
    "timeseries": Replacement("RedisTimeSeries", (), "no Valkey module replaces it: move time series elsewhere first"),
    "vectorset": Replacement("vector sets (Redis 8)", (), "Valkey has no vector sets: move them elsewhere first"),
    "redisgears_2": Replacement("RedisGears", (), "no Valkey module replaces it: move triggers to functions first"),
    "graph": Replacement("RedisGraph", (), "no Valkey module replaces it: move graphs elsewhere first"),
}

# TYPE names of module data → the module (a MODULES key) that defines it.
MODULE_TYPES: dict[str, str] = {
    "rejson-rl": "rejson", "mbbloom--": "bf", "mbbloomcf": "bf", "topk-type": "bf", "cmsk-type": "bf",
    "tdis-type": "bf", "tsdb-type": "timeseries", "vectorset": "vectorset", "graphdata": "graph",
}


def module_names(probe: Probe, role: str) -> set[str]:
    reply = probe.side(role).call("MODULE", "LIST")
    names = {text(m.get(b"name", m.get("name", b""))).lower() for m in reply}
    return names - BUILTIN_MODULES


def compare_modules(source: set[str], target: set[str]) -> list[tuple[str, str, str]]:
    """(module, status, note) for each source module: present on the target, replaceable, or missing."""
    out = []
    for name in sorted(source):
        rep = MODULES.get(name)
        if name in target:
            out.append((name, PASS, "loaded on the target too"))
        elif rep and set(rep.valkey_modules) & target:
            out.append((name, PASS, f"{rep.what}: the target has {', '.join(sorted(set(rep.valkey_modules) & target))}"))
        elif rep:
            out.append((name, FAIL, f"{rep.what}: {rep.advice}"))
        else:
            out.append((name, FAIL, "unknown module with no known Valkey counterpart: load an equivalent on the "
                                    "target or stop using it"))
    return out


def modules_check(probe: Probe) -> Check:
    source, target = module_names(probe, "source"), module_names(probe, "target")
    rows = compare_modules(source, target)
    data = {"source": sorted(source), "target": sorted(target),
            "modules": [{"module": m, "status": s, "note": n} for m, s, n in rows]}
    failed = [(m, n) for m, s, n in rows if s == FAIL]
    if failed:
        return Check("modules", "Modules", FAIL, "; ".join(f"{m}: {n}" for m, n in failed),
                     "; ".join(n.split(": ", 1)[-1] for _m, n in failed), data)
    evidence = ("no modules loaded on the source" if not rows else "; ".join(f"{m}: {n}" for m, _s, n in rows))
    return Check("modules", "Modules", PASS, evidence, "", data)


def odd_types(probe: Probe, target_modules: set[str] | None) -> list[tuple[str, int, str, str]]:
    """(type, sampled count, status, note) for each sampled non-core type."""
    out = []
    for kind, n in sorted(probe.source_keys.types().items()):
        if kind in CORE_TYPES:
            continue
        module = MODULE_TYPES.get(kind.lower())
        rep = MODULES.get(module) if module else None
        if rep and target_modules is not None and set(rep.valkey_modules) & target_modules:
            out.append((kind, n, WARN, f"{rep.what} data; the target has a module for it, but migrator cannot "
                                       "verify the copy: cover it in test_command"))
        else:
            advice = rep.advice if rep else "a module type with no known Valkey counterpart"
            out.append((kind, n, FAIL, f"{rep.what if rep else kind}: {advice}"))
    return out


def _field_ttl_keys(probe: Probe) -> tuple[int, str]:
    """Hashes with field TTLs on the source: (count, how it was measured)."""
    counted = [d.field_ttl_keys for d in probe.source_keys.dbs.values()]
    if counted and all(c is not None for c in counted):
        return sum(counted), "INFO keyspace"
    hits = 0
    for db, key in probe.source_keys.keys_of_type("hash")[:200]:
        client = probe.source.on_db(db)
        fields = probe.source.guard("HRANDFIELD", partial(client.hrandfield, key, 16)) or []
        if fields:
            ttls = probe.source.guard("HTTL", partial(client.execute_command, "HTTL", key, "FIELDS", len(fields), *fields))
            hits += any(int(t) >= 0 for t in ttls)
    return hits, "sampled HTTL"


def _hash_ttl(probe: Probe) -> tuple[str, str] | None:
    """(status, note) about hash field TTLs, or None when the source cannot have them."""
    if not (probe.source_id.at_least("redis", 7, 4) or probe.source_id.at_least("valkey", 9, 0)):
        return None
    count, how = _field_ttl_keys(probe)
    target_has = lookup(target_table(probe), "hexpire") is not None
    if count == 0:
        return PASS, f"no hash uses field TTLs ({how})"
    if target_has:
        return PASS, f"{count} hash(es) use field TTLs ({how}); the target supports them"
    return FAIL, (f"{count} hash(es) use field TTLs ({how}), which the target {probe.target_id.label} cannot hold: "
                  "use Valkey 9.0+ as the target, or remove the field TTLs (HPERSIST) first")


def data_types_check(probe: Probe) -> Check:
    try:
        target_modules = module_names(probe, "target")
    except Unavailable:
        target_modules = None
    rows = odd_types(probe, target_modules)
    ttl = _hash_ttl(probe)
    findings = [(f"type {k} ({n} sampled)", s, note) for k, n, s, note in rows]
    if ttl:
        findings.append(("hash field TTLs", *ttl))
    sampled = sum(len(d.sampled) for d in probe.source_keys.dbs.values())
    data = {"sampled_keys": sampled, "types": dict(probe.source_keys.types()),
            "findings": [{"what": w, "status": s, "note": n} for w, s, n in findings]}
    bad = [f for f in findings if f[1] != PASS]
    if not bad:
        types = ", ".join(f"{k} {n}" for k, n in sorted(probe.source_keys.types().items())) or "none"
        extra = f"; {ttl[1]}" if ttl else ""
        return Check("data.types", "Data the target cannot hold", PASS,
                     f"{sampled} keys sampled; types: {types}; all core types{extra}", "", data)
    status = FAIL if any(s == FAIL for _w, s, _n in bad) else WARN
    return Check("data.types", "Data the target cannot hold", status,
                 f"{sampled} keys sampled; " + "; ".join(f"{w}: {n}" for w, _s, n in bad),
                 "; ".join(n.split(": ", 1)[-1] for _w, _s, n in bad), data)
