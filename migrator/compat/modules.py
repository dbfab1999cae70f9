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


@dataclass(frozen=True)
class ModuleType:
    """What a module data type is, which Valkey module holds it, and a command that creates it
    (the target's command table tells whether some loaded module provides it)."""

    what: str
    carrier: str  # the Valkey module that holds this type; "" if none does
    command: str


# TYPE name (lower case) → what it is. valkey-bloom holds bloom filters only; RediSearch 1.x kept
# its indexes in keys of its own types (2.x keeps none in the keyspace).
TYPE_INFO: dict[str, ModuleType] = {
    "rejson-rl": ModuleType("JSON documents", "valkey-json", "json.set"),
    "mbbloom--": ModuleType("Bloom filters", "valkey-bloom", "bf.add"),
    "mbbloomcf": ModuleType("cuckoo filters", "", "cf.add"),
    "topk-type": ModuleType("top-k sketches", "", "topk.add"),
    "cmsk-type": ModuleType("count-min sketches", "", "cms.incrby"),
    "tdis-type": ModuleType("t-digest sketches", "", "tdigest.add"),
    "tsdb-type": ModuleType("time series", "", "ts.add"),
    "vectorset": ModuleType("vector sets", "", "vadd"),
    "graphdata": ModuleType("graphs", "", "graph.query"),
    "ft_index0": ModuleType("RediSearch 1.x index structures", "", "ft.create"),
    "ft_invidx": ModuleType("RediSearch 1.x index structures", "", "ft.create"),
    "numericdx": ModuleType("RediSearch 1.x index structures", "", "ft.create"),
    "ft_tagidx": ModuleType("RediSearch 1.x index structures", "", "ft.create"),
}
MODULE_TYPES.update({"ft_index0": "search", "ft_invidx": "search", "numericdx": "search", "ft_tagidx": "search"})
JSON_KIND = "rejson-rl"  # copied and compared type-aware by sync and check (migrator/data/modtypes.py)


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


def _carried(kind: str, target_modules: set[str] | None, target_commands: dict | None) -> tuple[bool | None, str]:
    """Whether the target can hold data of module type ``kind``, and how that is known: its
    command table has the command that creates it, else MODULE LIST shows a module that holds
    it; None: cannot tell (valkey-bloom and RedisBloom are both listed as "bf")."""
    info, module = TYPE_INFO.get(kind), MODULES.get(MODULE_TYPES.get(kind, ""))
    if info and target_commands is not None:
        return lookup(target_commands, info.command) is not None, f"the target has {info.command.upper()}"
    if module is None or info is None or target_modules is None:
        return None, ""
    listed = sorted(({MODULE_TYPES[kind]} | set(module.valkey_modules)) & target_modules)
    if not listed:
        return False, ""
    return (True if info.carrier else None), f"MODULE LIST on the target shows {', '.join(listed)}"


def odd_types(types: dict[str, int], target_modules: set[str] | None, target_commands: dict | None = None,
              scope: str = "sampled") -> list[Finding]:
    """A finding for each sampled type outside the core types (module data, vector sets): how many
    keys, what holds them on Valkey, and whether the target can (``scope`` says what was counted)."""
    out = []
    for kind, n in sorted(types.items()):
        if kind in CORE_TYPES:
            continue
        low = kind.lower()
        info, rep = TYPE_INFO.get(low), MODULES.get(MODULE_TYPES.get(low, ""))
        what = f"type {kind} ({n}{' ' + scope if scope else ''} key{'s' if n != 1 else ''})"
        if info is None or rep is None:
            out.append(Finding(what, FAIL, "a module type with no known Valkey counterpart",
                               f"load a module on the target that defines {kind}, or move this data elsewhere first"))
            continue
        holder = f"{info.carrier} holds them" if info.carrier else "no Valkey module holds them"
        if info.what.startswith("RediSearch 1.x"):
            out.append(Finding(what, FAIL, f"{info.what}: an index, not data, and no copy carries them",
                               "recreate the index on the target with FT.CREATE (valkey-search) and leave these keys "
                               "out; better, upgrade RediSearch on the source first"))
            continue
        carried, how = _carried(low, target_modules, target_commands)
        if carried and low == JSON_KIND:
            out.append(Finding(what, PASS, f"{info.what}: {how}; sync copies them with JSON.GET/JSON.SET and check "
                                           "compares them as JSON"))
        elif carried:
            out.append(Finding(what, WARN, f"{info.what}: {how}, but migrator copies them by DUMP/RESTORE and "
                                           "cannot verify the copy", "cover this data in steps.compatibility.test_command"))
        elif carried is None:
            out.append(Finding(what, WARN, f"{info.what} ({holder}): could not tell whether the target holds them "
                                           f"({how or 'neither COMMAND nor MODULE LIST answered'})",
                               f"check that the target runs {info.command.upper()}; {rep.advice}"))
        else:
            if info.carrier:
                fix = f"load {info.carrier} on the target"
            elif MODULE_TYPES[low] == "bf":
                fix = f"valkey-bloom holds Bloom filters only: move the {info.what} elsewhere first"
            else:
                fix = rep.advice
            out.append(Finding(what, FAIL, f"{info.what} the target cannot hold: it has no {info.command.upper()} "
                                           f"({holder})", fix))
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
    try:
        # On a cluster target, one node's command table cannot vouch for every shard: MODULE LIST
        # of every node decides there (module_names: the modules loaded on all of them).
        target_commands = None if probe.clusters.get("target") else target_table(probe)
    except Unavailable:
        target_commands = None
    types = dict(probe.source_keys.types())
    whole = all(d.complete for d in probe.source_keys.dbs.values())
    findings = odd_types(types, target_modules, target_commands, "" if whole else "sampled")
    if (ttl := hash_ttl(probe)) is not None:
        findings.append(ttl)
    sampled = sum(len(d.sampled) for d in probe.source_keys.dbs.values())
    listed = ", ".join(f"{k} {n}" for k, n in sorted(types.items())) or "none"
    held = [f"{f.what}: {f.note}" for f in findings if f.status == PASS and f.what.startswith("type ")]
    passed = (f"{sampled} keys sampled; types: {listed}; " + ("; ".join(held) if held else "all core types")
              + (f"; {ttl.note}" if ttl else ""))
    data = {"sampled_keys": sampled, "types": types}
    if ttl is not None:
        data["field_ttls"] = probe.memo("field_ttls", lambda: count_field_ttls(probe)).to_json()
    check = _findings_check("data.types", "Data the target cannot hold", findings, passed, data)
    if check.status != PASS:
        check.evidence = f"{sampled} keys sampled; {check.evidence}"
    return check
