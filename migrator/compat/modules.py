"""Data the target cannot hold: modules, module data types, vector sets, hash field TTLs.

``MODULE LIST`` on both sides says which modules the application may rely on; each Redis
module maps to the Valkey module that replaces it, if one exists. Sampled ``TYPE``s outside
the core types reveal module data even when MODULE LIST is disabled. Hash field expiration
(Redis 7.4+, Valkey 9.0+): hashes counted from INFO keyspace where the server reports it
(``subexpiry``/``keys_with_volatile_items``), fields by reading HPEXPIRETIME over the sampled
hashes (exact when the sample is the whole keyspace, else "at least N in a sample of M").
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
    """The modules loaded; on a cluster source those of any node (any may hold module data), on a
    cluster target those loaded on every node (a module missing on one shard fails its keys)."""
    view = probe.clusters.get(role)
    per_node = [set(n.modules) for n in view.nodes if n.modules is not None] if view else []
    if view and per_node and all(n.modules is not None for n in view.nodes if n.identity is not None):
        names = set.union(*per_node) if role == "source" else set.intersection(*per_node)
        return names - BUILTIN_MODULES
    reply = probe.side(role).call("MODULE", "LIST")
    names = {text(m.get(b"name", m.get("name", b""))).lower() for m in reply}
    return names - BUILTIN_MODULES


@dataclass(frozen=True)
class Finding:
    what: str
    status: str
    note: str
    fix: str = ""

    def to_json(self) -> dict:
        return {"what": self.what, "status": self.status, "note": self.note, "fix": self.fix}


def compare_modules(source: set[str], target: set[str]) -> list[Finding]:
    """One finding per source module: loaded on the target, replaced by a Valkey module, or missing."""
    out = []
    for name in sorted(source):
        rep = MODULES.get(name)
        replaced_by = sorted(set(rep.valkey_modules) & target) if rep else []
        if name in target:
            out.append(Finding(name, PASS, "loaded on the target too"))
        elif replaced_by:
            out.append(Finding(name, PASS, f"{rep.what}: the target has {', '.join(replaced_by)}"))
        elif rep:
            out.append(Finding(name, FAIL, f"{rep.what} is not available on the target", rep.advice))
        else:
            out.append(Finding(name, FAIL, "a module with no known Valkey counterpart is not loaded on the target",
                               f"load an equivalent of {name} on the target, or stop using it"))
    return out


def _findings_check(name: str, title: str, findings: list[Finding], passed: str, data: dict) -> Check:
    data = {**data, "findings": [f.to_json() for f in findings]}
    bad = [f for f in findings if f.status != PASS]
    if not bad:
        return Check(name, title, PASS, passed, "", data)
    status = FAIL if any(f.status == FAIL for f in bad) else WARN
    return Check(name, title, status, "; ".join(f"{f.what}: {f.note}" for f in bad),
                 "; ".join(f.fix for f in bad if f.fix), data)


def modules_check(probe: Probe) -> Check:
    source, target = module_names(probe, "source"), module_names(probe, "target")
    findings = compare_modules(source, target)
    passed = "; ".join(f"{f.what}: {f.note}" for f in findings) or "no modules loaded on the source"
    return _findings_check("modules", "Modules", findings, passed, {"source": sorted(source), "target": sorted(target)})


def odd_types(types: dict[str, int], target_modules: set[str] | None) -> list[Finding]:
    """A finding for each sampled type outside the core types (module data, vector sets)."""
    out = []
    for kind, n in sorted(types.items()):
        if kind in CORE_TYPES:
            continue
        rep = MODULES.get(MODULE_TYPES.get(kind.lower(), ""))
        what = f"type {kind} ({n} sampled key{'s' if n != 1 else ''})"
        if rep and target_modules is not None and set(rep.valkey_modules) & target_modules:
            out.append(Finding(what, WARN, f"{rep.what} data; the target has a module for it, but migrator "
                                           "cannot verify the copy", "cover this data in steps.compatibility.test_command"))
        elif rep:
            out.append(Finding(what, FAIL, f"{rep.what} data the target cannot hold", rep.advice))
        else:
            out.append(Finding(what, FAIL, "a module type with no known Valkey counterpart",
                               f"load a module on the target that defines {kind}, or move this data elsewhere first"))
    return out


FIELDS_PER_HASH = 10_000  # fields whose TTLs are read per sampled hash (a bigger hash is counted in part)


@dataclass(frozen=True)
class FieldTTLCount:
    """Hashes with field TTLs on the source, and their fields that have one."""

    hashes: int  # from INFO keyspace where the server counts them, else the sampled hashes that have any
    hashes_how: str  # "INFO keyspace" or "sample"
    fields: int  # field TTLs found in the sampled hashes
    sampled_hashes: int
    exact: bool  # every hash of the source sampled, every field read

    def describe(self) -> str:
        hashes = f"{self.hashes:,} hash(es)" + (" (INFO keyspace)" if self.hashes_how == "INFO keyspace" else "")
        if self.exact:
            return f"{hashes} with {self.fields:,} field TTL(s) in all"
        return (f"{hashes}; at least {self.fields:,} field TTL(s) in a sample of {self.sampled_hashes:,} "
                "hash(es) (the rest were not read)")

    def to_json(self) -> dict:
        return {"hashes": self.hashes, "hashes_how": self.hashes_how, "fields": self.fields,
                "sampled_hashes": self.sampled_hashes, "exact": self.exact}


def count_field_ttls(probe: Probe) -> FieldTTLCount:
    """Field TTLs in the sampled hashes (all of them in a small keyspace), read with HPEXPIRETIME."""
    from migrator.data import fieldttl

    hashes_with = fields = 0
    exact = all(d.complete for d in probe.source_keys.dbs.values())
    sampled = probe.source_keys.keys_of_type("hash")
    for db, key in sampled:
        client = probe.key_client("source", db, key)
        read = found = cursor = 0
        while True:
            cursor, part = probe.source.guard("HSCAN", partial(client.hscan, key, cursor, count=1000))
            times = probe.source.guard("HPEXPIRETIME", partial(fieldttl.expiry_times, client, key, list(part)))
            found += sum(1 for t in times if t > 0)
            read += len(part)
            if cursor == 0:
                break
            if read >= FIELDS_PER_HASH:
                exact = False
                break
        hashes_with += found > 0
        fields += found
    counted = [d.field_ttl_keys for d in probe.source_keys.dbs.values()]
    if counted and all(c is not None for c in counted):
        return FieldTTLCount(sum(counted), "INFO keyspace", fields, len(sampled), exact)
    return FieldTTLCount(hashes_with, "sample", fields, len(sampled), exact)


def hash_ttl(probe: Probe) -> Finding | None:
    """Hash field TTLs (Redis 7.4+, Valkey 9.0+) on the source; None when the source cannot have them."""
    if not (probe.source_id.at_least("redis", 7, 4) or probe.source_id.at_least("valkey", 9, 0)):
        return None
    count = probe.memo("field_ttls", lambda: count_field_ttls(probe))
    if count.hashes == 0 and count.fields == 0:
        return Finding("hash field TTLs", PASS, f"no hash uses field TTLs ({count.describe()})")
    if lookup(target_table(probe), "hpexpireat") is not None:
        return Finding("hash field TTLs", PASS, f"{count.hashes:,} hash(es) use field TTLs ({count.describe()}); "
                       "the target supports them and sync copies them")
    return Finding("hash field TTLs", FAIL, f"{count.describe()} would lose their expiry: the target "
                   f"{probe.target_id.label} has no hash field expiry, so sync refuses these hashes",
                   "use Valkey 9.0+ as the target, or remove the field TTLs (HPERSIST) on the source first")


def data_types_check(probe: Probe) -> Check:
    try:
        target_modules = module_names(probe, "target")
    except Unavailable:
        target_modules = None
    types = dict(probe.source_keys.types())
    findings = odd_types(types, target_modules)
    if (ttl := hash_ttl(probe)) is not None:
        findings.append(ttl)
    sampled = sum(len(d.sampled) for d in probe.source_keys.dbs.values())
    listed = ", ".join(f"{k} {n}" for k, n in sorted(types.items())) or "none"
    passed = f"{sampled} keys sampled; types: {listed}; all core types" + (f"; {ttl.note}" if ttl else "")
    data = {"sampled_keys": sampled, "types": types}
    if ttl is not None:
        data["field_ttls"] = probe.memo("field_ttls", lambda: count_field_ttls(probe)).to_json()
    check = _findings_check("data.types", "Data the target cannot hold", findings, passed, data)
    if check.status != PASS:
        check.evidence = f"{sampled} keys sampled; {check.evidence}"
    return check
