"""Lua: function libraries (``FUNCTION LIST``) must be carried over; scripts cannot be listed.

Redis 7.0+ and Valkey keep functions in the dataset, but a DUMP/RESTORE or type-aware copy of
the keys does not copy them. EVAL scripts live only in each server's script cache, which has
no listing command, so all migrator can say is whether the application runs scripts at all.
"""

from __future__ import annotations

from migrator.compat.model import FAIL, PASS, WARN, Check
from migrator.compat.probe import Probe
from migrator.compat.rpc import Side, Unavailable, pairs, text

SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "script|load", "script")


def libraries(probe: Probe, role: str) -> dict[str, dict]:
    """{library: {"engine", "functions": [...], "code"}} from ``FUNCTION LIST WITHCODE``.

    Functions live per node in a cluster (FUNCTION LOAD reaches one node): on a cluster source a
    library loaded on any primary counts; on a cluster target only one loaded with the same code
    on every primary, and the primaries lacking one are noted (``probe.facts``)."""
    view = probe.clusters.get(role)
    if view is None:
        return _libraries(probe.side(role))
    per_node = [(n.address, _libraries(n.side)) for n in view.readable_primaries()]
    out: dict[str, dict] = {}
    for _addr, libs in per_node:
        for name, lib in libs.items():
            out.setdefault(name, lib)
    if role == "source":
        return out
    lacking = {name: [a for a, libs in per_node if libs.get(name, {}).get("code") != lib["code"]]
               for name, lib in out.items()}
    probe.facts["functions_lacking_on_target_nodes"] = {n: a for n, a in lacking.items() if a}
    return {n: lib for n, lib in out.items() if not lacking[n]}


def _libraries(side: Side) -> dict[str, dict]:
    out = {}
    for lib in side.call("FUNCTION", "LIST", "WITHCODE", raw=True):
        fields = {text(k): v for k, v in pairs(lib)}
        funcs = sorted(text(dict((text(k), v) for k, v in pairs(f))["name"]) for f in fields.get("functions", []))
        out[text(fields["library_name"])] = {"engine": text(fields.get("engine", b"")), "functions": funcs,
                                             "code": text(fields.get("library_code", b""))}
    return out


def functions_check(probe: Probe) -> Check:
    if not (probe.source_id.kind == "valkey" or probe.source_id.at_least("redis", 7, 0)):
        return Check("functions", "Lua functions", PASS,
                     f"the source {probe.source_id.label} predates functions (Redis 7.0): none to carry over", "", {})
    source = libraries(probe, "source")
    try:
        target = libraries(probe, "target")
    except Unavailable as e:
        if not source:
            return Check("functions", "Lua functions", PASS, f"the source has no function libraries ({e})", "", {})
        raise
    missing = sorted(set(source) - set(target))
    changed = sorted(n for n in set(source) & set(target) if source[n]["code"] != target[n]["code"])
    data = {"source": {n: v["functions"] for n, v in source.items()}, "target": {n: v["functions"] for n, v in target.items()},
            "missing": missing, "changed": changed}
    partial = probe.facts.get("functions_lacking_on_target_nodes", {})
    data["lacking_on_target_nodes"] = partial
    if missing or changed:
        parts = ([f"libraries missing on the target: {', '.join(missing)}"] if missing else []) + \
                ([f"libraries whose code differs: {', '.join(changed)}"] if changed else []) + \
                ([f"on the target cluster, {n} is missing or different on {', '.join(a)}"
                  for n, a in sorted(partial.items()) if n in missing])
        return Check("functions", "Lua functions", FAIL, "; ".join(parts),
                     "load them on the target (on every primary of a cluster) before mirroring: FUNCTION LOAD REPLACE "
                     "with the source's code "
                     "(FUNCTION LIST WITHCODE on the source), or FUNCTION DUMP / FUNCTION RESTORE between same-format servers",
                     data)
    n = sum(len(v["functions"]) for v in source.values())
    evidence = (f"{len(source)} library(ies), {n} function(s), all present on the target with the same code"
                if source else "the source has no function libraries")
    return Check("functions", "Lua functions", PASS, evidence, "", data)


def scripts_check(probe: Probe) -> Check:
    calls = {c: probe.commandstats[c] for c in SCRIPT_COMMANDS if c in probe.commandstats}
    data = {"calls": calls}
    if not calls:
        return Check("scripts", "Lua scripts (EVAL)", PASS,
                     "INFO commandstats shows no EVAL/EVALSHA/SCRIPT LOAD calls on the source", "", data)
    return Check("scripts", "Lua scripts (EVAL)", WARN,
                 "the application runs Lua scripts (" + ", ".join(f"{c} {n}" for c, n in calls.items()) +
                 "); a server cannot list its cached scripts, so migrator cannot check them",
                 "run the code paths that use scripts in steps.compatibility.test_command; make sure clients fall "
                 "back from EVALSHA to EVAL on NOSCRIPT (the target's script cache starts empty)", data)
